//! A 2-layer MLP trained with candle autograd on fixed synthetic data in fp32, bf16 and fp16
//! (dynamic loss scaling, fp32 master weights, Adam written here): the bf16/fp16 losses must
//! track the fp32 run.

use candle_core::{DType, Device, Tensor, Var};
use ds_precision::*;

const IN: usize = 8;
const HID: usize = 32;
const BATCH: usize = 64;
const STEPS: usize = 150;

fn lcg(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    fn step(&mut self, w: &mut [f32], g: &[f32], lr: f32) {
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        self.t += 1;
        let c1 = 1.0 - b1.powi(self.t);
        let c2 = 1.0 - b2.powi(self.t);
        for i in 0..w.len() {
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
            w[i] -= lr * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + eps);
        }
    }
}

/// Returns (loss at each step, skipped steps).
fn train(policy: PrecisionPolicy) -> (Vec<f32>, u64) {
    let dev = Device::Cpu;
    let dt = policy.model_dtype;
    let x = Tensor::from_vec(lcg(BATCH * IN, 1), (BATCH, IN), &dev).unwrap();
    // target: a fixed smooth function of the inputs
    let wt = Tensor::from_vec(lcg(IN, 2), (IN, 1), &dev).unwrap();
    let y = x.matmul(&wt).unwrap().sin().unwrap();
    let init = [
        Tensor::from_vec(
            lcg(IN * HID, 3).iter().map(|v| v * 0.5).collect(),
            (IN, HID),
            &dev,
        )
        .unwrap(),
        Tensor::zeros(HID, DType::F32, &dev).unwrap(),
        Tensor::from_vec(
            lcg(HID, 4).iter().map(|v| v * 0.3).collect(),
            (HID, 1),
            &dev,
        )
        .unwrap(),
        Tensor::zeros(1, DType::F32, &dev).unwrap(),
    ];
    let mut master = MasterWeights::from_tensors(&init.iter().collect::<Vec<_>>()).unwrap();
    let vars: Vec<Var> = init
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dt).unwrap()).unwrap())
        .collect();
    let xm = x.to_dtype(dt).unwrap();
    let mut mp = MixedPrecision::new(policy).unwrap();
    let n = master.numel();
    let mut adam = Adam {
        m: vec![0.0; n],
        v: vec![0.0; n],
        t: 0,
    };
    let mut grads = vec![0f32; n];
    let mut losses = vec![];
    for _ in 0..STEPS {
        let h = xm
            .matmul(vars[0].as_tensor())
            .unwrap()
            .broadcast_add(vars[1].as_tensor())
            .unwrap()
            .relu()
            .unwrap();
        let out = h
            .matmul(vars[2].as_tensor())
            .unwrap()
            .broadcast_add(vars[3].as_tensor())
            .unwrap();
        let loss = out
            .to_dtype(DType::F32)
            .unwrap()
            .sub(&y)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let gs = mp.scale_loss(&loss).unwrap().backward().unwrap();
        let g: Vec<Tensor> = vars
            .iter()
            .map(|v| gs.get(v).expect("every param has a grad").clone())
            .collect();
        let stats = mp
            .unscale_grad_tensors(&g.iter().collect::<Vec<_>>(), &mut grads)
            .unwrap();
        let rep = mp.finish_step(stats, &mut grads).unwrap();
        if rep.decision.is_step() {
            adam.step(master.flat_mut(), &grads, 1e-2);
            master.copy_to_vars(&vars).unwrap();
        }
    }
    (losses, mp.skipped_steps())
}

#[test]
fn bf16_and_fp16_track_fp32() {
    let (l32, s32) = train(PrecisionPolicy::fp32().with_clip_grad(1.0));
    let (lbf, sbf) = train(PrecisionPolicy::bf16().with_clip_grad(1.0));
    // DeepSpeed defaults (hysteresis 2) except a shorter window and an initial scale of 2^24,
    // so that the first steps overflow in fp16 and are skipped (as on a real run).
    let opts = LossScalerOptions {
        init_scale_power: 24,
        window: 20,
        ..Default::default()
    };
    let (l16, s16) = train(PrecisionPolicy::fp16(opts).with_clip_grad(1.0));
    assert_eq!((s32, sbf), (0, 0));
    assert!(
        s16 > 0,
        "the fp16 run should have skipped overflowing steps"
    );
    let first = l32[0];
    let last = |l: &[f32]| l[l.len() - 1];
    eprintln!(
        "fp32 {first} -> {}, bf16 -> {}, fp16 -> {} ({s16} skipped)",
        last(&l32),
        last(&lbf),
        last(&l16)
    );
    // fp32 must really learn, else the comparison says nothing.
    assert!(
        last(&l32) < 0.1 * first,
        "fp32 did not train: {first} -> {}",
        last(&l32)
    );
    // Stated tolerance: after STEPS steps, within 10% of the fp32 loss + 1% of the initial loss.
    let tol = 0.10 * last(&l32) + 0.01 * first;
    assert!(
        (last(&lbf) - last(&l32)).abs() <= tol,
        "bf16 {} vs fp32 {}",
        last(&lbf),
        last(&l32)
    );
    assert!(
        (last(&l16) - last(&l32)).abs() <= tol,
        "fp16 {} vs fp32 {}",
        last(&l16),
        last(&l32)
    );
}
