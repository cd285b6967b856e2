//! Exact checks against DeepSpeed's own flops-profiler test values.

use candle_core::{DType, Device, Module, Result, Tensor};
use ds_profiler::{Activation, FlopsProfiler, ProfilerError, ProfilerOptions, ReportContext};
use proptest::prelude::*;

/// An instrumented Linear layer: `y = x W^T + b`.
struct Linear {
    w: Tensor,
    b: Tensor,
    name: &'static str,
}

impl Linear {
    fn new(name: &'static str, i: usize, o: usize, dev: &Device) -> Result<Self> {
        Ok(Self {
            w: (Tensor::randn(0f32, 1f32, (o, i), dev)? * 0.1)?,
            b: Tensor::zeros(o, DType::F32, dev)?,
            name,
        })
    }

    fn forward(&self, x: &Tensor, p: &FlopsProfiler) -> Result<Tensor> {
        let _g = p.scope(self.name, "Linear");
        p.set_params((self.w.elem_count() + self.b.elem_count()) as u64);
        p.record_linear(x.dims(), self.w.dims()[0]);
        x.broadcast_matmul(&self.w.t()?)?.broadcast_add(&self.b)
    }
}

struct Conv2d {
    w: Tensor,
    b: Tensor,
    name: &'static str,
}

impl Conv2d {
    fn new(name: &'static str, cin: usize, cout: usize, k: usize, dev: &Device) -> Result<Self> {
        Ok(Self {
            w: (Tensor::randn(0f32, 1f32, (cout, cin, k, k), dev)? * 0.1)?,
            b: Tensor::zeros(cout, DType::F32, dev)?,
            name,
        })
    }

    fn forward(&self, x: &Tensor, p: &FlopsProfiler) -> Result<Tensor> {
        let _g = p.scope(self.name, "Conv2d");
        p.set_params((self.w.elem_count() + self.b.elem_count()) as u64);
        let y = x.conv2d(&self.w, 0, 1, 1, 1)?;
        let y = y.broadcast_add(&self.b.reshape((1, self.b.dims()[0], 1, 1))?)?;
        let dims = self.w.dims();
        p.record_conv(x.dims(), &dims[2..], y.dims(), 1, true);
        Ok(y)
    }
}

fn tanh(x: &Tensor, name: &'static str, p: &FlopsProfiler) -> Result<Tensor> {
    let _g = p.scope(name, "Tanh");
    p.record_activation(Activation::Tanh, x.dims());
    x.tanh()
}

fn avg_pool(x: &Tensor, name: &'static str, p: &FlopsProfiler) -> Result<Tensor> {
    let _g = p.scope(name, "AvgPool2d");
    p.record_pool(x.dims());
    x.avg_pool2d(2)
}

/// DeepSpeed's test LeNet-5 (`feature_extractor` + `classifier` Sequentials).
struct LeNet5 {
    c1: Conv2d,
    c2: Conv2d,
    c3: Conv2d,
    f1: Linear,
    f2: Linear,
}

impl LeNet5 {
    fn new(dev: &Device) -> Result<Self> {
        Ok(Self {
            c1: Conv2d::new("0", 1, 6, 5, dev)?,
            c2: Conv2d::new("3", 6, 16, 5, dev)?,
            c3: Conv2d::new("6", 16, 120, 5, dev)?,
            f1: Linear::new("0", 120, 84, dev)?,
            f2: Linear::new("2", 84, 10, dev)?,
        })
    }

    fn forward(&self, x: &Tensor, p: &FlopsProfiler) -> Result<Tensor> {
        let _m = p.scope("lenet", "LeNet5");
        let x = {
            let _f = p.scope("feature_extractor", "Sequential");
            let x = self.c1.forward(x, p)?;
            let x = tanh(&x, "1", p)?;
            let x = avg_pool(&x, "2", p)?;
            let x = self.c2.forward(&x, p)?;
            let x = tanh(&x, "4", p)?;
            let x = avg_pool(&x, "5", p)?;
            let x = self.c3.forward(&x, p)?;
            tanh(&x, "7", p)?
        };
        let x = x.flatten_from(1)?;
        let logits = {
            let _c = p.scope("classifier", "Sequential");
            let x = self.f1.forward(&x, p)?;
            let x = tanh(&x, "1", p)?;
            self.f2.forward(&x, p)?
        };
        p.record_softmax(logits.dims());
        candle_nn::ops::softmax_last_dim(&logits)
    }
}

#[test]
fn linear_10_10_batch_1() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let p = FlopsProfiler::new();
    let l = Linear::new("linear", 10, 10, &dev)?;
    let x = Tensor::randn(0f32, 1f32, (1, 10), &dev)?;
    p.start_profile();
    let y = l.forward(&x, &p)?;
    p.stop_profile();
    assert_eq!(y.dims(), &[1, 10]);
    assert_eq!(p.total_flops(), 200);
    assert_eq!(p.total_macs(), 100);
    assert_eq!(p.total_params(), 110);
    Ok(())
}

fn run_lenet(batch: usize) -> std::result::Result<FlopsProfiler, Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let net = LeNet5::new(&dev)?;
    let x = Tensor::randn(0f32, 1f32, (batch, 1, 32, 32), &dev)?;
    let p = FlopsProfiler::new();
    p.start_profile();
    let y = net.forward(&x, &p)?;
    p.stop_profile();
    assert_eq!(y.dims(), &[batch, 10]);
    Ok(p)
}

#[test]
fn lenet5_batch_1024_exact() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let p = run_lenet(1024)?;
    assert_eq!(p.total_flops(), 866_076_672);
    assert_eq!(p.total_macs(), 426_516_480);
    assert_eq!(p.total_params(), 61_706);
    let prof = p.profile();
    assert_eq!(prof.flops, 866_076_672);
    assert_eq!(prof.modules.len(), 1);
    let fe = &prof.modules[0].modules[0];
    assert_eq!(fe.name, "feature_extractor");
    // conv1 incl. bias
    assert_eq!(fe.modules[0].flops, 245_661_696);
    assert_eq!(fe.modules[0].macs, 120_422_400);
    assert_eq!(fe.modules[2].flops, 4_816_896);
    assert_eq!(fe.modules[3].flops, 493_158_400);
    assert_eq!(fe.modules[5].flops, 1_638_400);
    assert_eq!(fe.modules[6].flops, 98_426_880);
    let cl = &prof.modules[0].modules[1];
    assert_eq!(cl.modules[0].flops, 20_643_840);
    assert_eq!(cl.modules[2].flops, 1_720_320);
    assert!(prof.fwd_latency_ms > 0.0);
    Ok(())
}

#[test]
fn lenet5_scales_with_batch() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let p = run_lenet(4)?;
    assert_eq!(p.total_flops() * 256, 866_076_672);
    assert_eq!(p.total_macs() * 256, 426_516_480);
    assert_eq!(p.total_params(), 61_706);
    // A second forward accumulates ops but not params (DeepSpeed's hooks do the same).
    Ok(())
}

#[test]
fn repeated_forward_accumulates_flops_not_params(
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let net = LeNet5::new(&dev)?;
    let x = Tensor::randn(0f32, 1f32, (2, 1, 32, 32), &dev)?;
    let p = FlopsProfiler::enabled_new();
    net.forward(&x, &p)?;
    let once = p.total_flops();
    net.forward(&x, &p)?;
    assert_eq!(p.total_flops(), 2 * once);
    assert_eq!(p.total_params(), 61_706);
    assert_eq!(p.profile().modules[0].calls, 2);
    Ok(())
}

#[test]
fn disabled_records_nothing() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let net = LeNet5::new(&dev)?;
    let x = Tensor::randn(0f32, 1f32, (2, 1, 32, 32), &dev)?;
    let p = FlopsProfiler::new();
    net.forward(&x, &p)?;
    assert_eq!(p.total_flops(), 0);
    assert!(p.profile().modules.is_empty());
    Ok(())
}

#[test]
fn report_layout_and_options() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let p = run_lenet(8)?;
    let ctx = ReportContext {
        step: 3,
        world_size: 1,
        batch_size_per_gpu: Some(8),
        bwd_latency: Some(std::time::Duration::from_millis(4)),
        step_latency: Some(std::time::Duration::from_millis(1)),
        ..Default::default()
    };
    let opts = ProfilerOptions {
        enabled: true,
        top_modules: 2,
        ..Default::default()
    };
    let r = p.model_profile_report(&opts, &ctx)?;
    for needle in [
        "DeepSpeed Flops Profiler",
        "Profile Summary at step 3:",
        "world size:",
        "data parallel size:",
        "batch size per GPU:",
        "params per GPU:",
        "61.71 K",
        "fwd MACs per GPU:",
        "fwd flops per GPU:",
        "fwd latency:",
        "fwd FLOPS per GPU = fwd flops per GPU / fwd latency:",
        "bwd FLOPS per GPU = 2 * fwd flops per GPU / bwd latency:",
        "FLOPS per GPU = 3 * fwd flops per GPU / iter latency:",
        "iter latency:",
        "samples/second:",
        "Aggregated Profile per GPU",
        "depth 0:",
        "depth 2:",
        "'Conv2d'",
        "Detailed Profile per GPU",
        "LeNet5(",
        "(feature_extractor): Sequential(",
        "(0): Conv2d(156 = 0.25% Params",
        "100.00% Params",
    ] {
        assert!(r.contains(needle), "missing {needle:?} in\n{r}");
    }
    // module_depth limits both sections; detailed=false drops the tree.
    let shallow = ProfilerOptions {
        module_depth: 1,
        detailed: false,
        ..Default::default()
    };
    let r = p.model_profile_report(&shallow, &ReportContext::default())?;
    assert!(r.contains("depth 0:"));
    assert!(!r.contains("depth 1:"));
    assert!(!r.contains("Detailed Profile per GPU"));
    assert!(!r.contains("bwd latency:"));
    let tree_d2 = ProfilerOptions {
        module_depth: 2,
        ..Default::default()
    };
    let r = p.model_profile_report(&tree_d2, &ReportContext::default())?;
    assert!(r.contains("(feature_extractor): Sequential("));
    assert!(!r.contains("(0): Conv2d("));
    Ok(())
}

#[test]
fn output_file_and_errors() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let p = run_lenet(2)?;
    let dir = std::env::temp_dir().join(format!("ds-profiler-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("profile.txt");
    let opts = ProfilerOptions {
        output_file: Some(path.clone()),
        ..Default::default()
    };
    let r = p.model_profile_report(&opts, &ReportContext::default())?;
    assert_eq!(std::fs::read_to_string(&path)?, r);
    let bad = ProfilerOptions {
        output_file: Some(dir.join("no/such/dir/profile.txt")),
        ..Default::default()
    };
    let err = p.model_profile_report(&bad, &ReportContext::default());
    assert!(matches!(err, Err(ProfilerError::Io { .. })));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn json_and_uncounted() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let p = FlopsProfiler::enabled_new();
    {
        let _a = p.scope("attn", "Attention");
        p.record_sdpa(&[1, 2, 4, 8], &[1, 2, 4, 8], &[1, 2, 4, 8]);
        p.record_uncounted("rotary_embedding");
        {
            let _e = p.scope("emb", "Embedding");
            p.set_params(100);
            p.record_embedding(&[1, 4]);
        }
    }
    let v: serde_json::Value = serde_json::from_str(&p.to_json()?)?;
    assert_eq!(v["flops"], 2 * (64 * 4 + 8 * 4 * 8));
    assert_eq!(v["params"], 100);
    assert!(v["fwd_latency_ms"].is_number());
    assert_eq!(v["modules"][0]["name"], "attn");
    assert_eq!(v["modules"][0]["uncounted"][0], "rotary_embedding");
    assert_eq!(v["modules"][0]["modules"][0]["type"], "Embedding");
    assert_eq!(v["modules"][0]["modules"][0]["flops"], 0);
    let r = p.model_profile_report(&ProfilerOptions::default(), &ReportContext::default())?;
    assert!(r.contains("uncounted: [rotary_embedding]"));
    Ok(())
}

#[test]
fn options_deserialize_deepspeed_keys() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let o: ProfilerOptions = serde_json::from_str(
        r#"{"enabled": true, "profile_step": 5, "module_depth": 2, "top_modules": 3, "detailed": false, "output_file": null, "recompute_fwd_factor": 1.0}"#,
    )?;
    assert!(o.should_profile(5) && !o.should_profile(4));
    assert_eq!(o.top_modules, 3);
    let d: ProfilerOptions = serde_json::from_str("{}")?;
    assert_eq!(d, ProfilerOptions::default());
    Ok(())
}

#[test]
fn candle_nn_linear_counts_match() -> std::result::Result<(), Box<dyn std::error::Error>> {
    // Sanity: an uninstrumented candle_nn Linear computes what the count assumes.
    let dev = Device::Cpu;
    let w = Tensor::ones((3, 5), DType::F32, &dev)?;
    let l = candle_nn::Linear::new(w, None);
    let x = Tensor::ones((2, 5), DType::F32, &dev)?;
    let y = l.forward(&x)?;
    assert_eq!(y.to_vec2::<f32>()?[0][0], 5.0);
    assert_eq!(ds_profiler::counts::linear(x.dims(), 3).macs, 30);
    Ok(())
}

proptest! {
    #[test]
    fn linear_is_2x_macs(b in 1usize..16, i in 1usize..64, o in 1usize..64) {
        let c = ds_profiler::counts::linear(&[b, i], o);
        prop_assert_eq!(c.flops, 2 * c.macs);
        prop_assert_eq!(c.macs, (b * i * o) as u64);
    }

    #[test]
    fn matmul_equals_linear(b in 1usize..8, m in 1usize..32, k in 1usize..32, n in 1usize..32) {
        prop_assert_eq!(
            ds_profiler::counts::matmul(&[b, m, k], &[k, n]),
            ds_profiler::counts::linear(&[b, m, k], n)
        );
    }
}
