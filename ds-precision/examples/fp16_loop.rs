//! DeepSpeed's dynamic loss scaler in a hand-written candle training loop: a two-layer MLP
//! whose weights and activations are fp16 (`Var`s of dtype F16), fp32 master weights
//! (`MasterWeights`) stepped by a small Adam written here, and `MixedPrecision` doing the
//! per-step work: scale the loss, unscale the fp16 gradients into fp32 in one fused pass that
//! also checks for inf/nan and takes the norm, clip, and step or skip.
//!
//! At steps 30 and 31 a loss spike is injected (the loss multiplied by 10^6 before backward), so
//! the fp16 gradients overflow to infinity. DeepSpeed's rule (hysteresis 2): the first overflow
//! skips the step and spends one unit of hysteresis, the second skips and halves the scale; the
//! weights do not move on either. Good steps double the scale every `window` (20) steps after
//! the last overflow. The example asserts each of these and that the loss still falls.
//!
//! `cargo run -p ds-precision --example fp16_loop`

use candle_core::{DType, Device, Tensor, Var};
use ds_precision::{LossScalerOptions, MasterWeights, MixedPrecision, PrecisionPolicy};

const IN: usize = 8;
const HID: usize = 32;
const BATCH: usize = 64;
const STEPS: usize = 80;
const SPIKES: [usize; 2] = [30, 31];

/// Uniform values in [-1, 1) from a seeded LCG.
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let x = Tensor::from_vec(lcg(BATCH * IN, 1), (BATCH, IN), &dev)?;
    let target = x
        .matmul(&Tensor::from_vec(lcg(IN, 2), (IN, 1), &dev)?)?
        .sin()?;

    // fp32 initial weights -> fp32 master copy (one flat buffer) + the fp16 model's Vars.
    let scaled = |n, seed, s: f32| lcg(n, seed).into_iter().map(|v| v * s).collect::<Vec<_>>();
    let init = [
        Tensor::from_vec(scaled(IN * HID, 3, 0.5), (IN, HID), &dev)?,
        Tensor::zeros(HID, DType::F32, &dev)?,
        Tensor::from_vec(scaled(HID, 4, 0.3), (HID, 1), &dev)?,
        Tensor::zeros(1, DType::F32, &dev)?,
    ];
    let mut master = MasterWeights::from_tensors(&init.iter().collect::<Vec<_>>())?;
    assert_eq!(master.num_params(), 4);
    assert_eq!(master.numel(), IN * HID + HID + HID + 1);
    let vars = master
        .to_model_tensors(DType::F16, &dev)?
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<Vec<Var>>>()?;
    let x16 = x.to_dtype(DType::F16)?;

    let opts = LossScalerOptions {
        init_scale_power: 12, // 4096
        window: 20,
        ..Default::default() // hysteresis 2, min scale 1: DeepSpeed's defaults
    };
    let policy = PrecisionPolicy::fp16(opts).with_clip_grad(1.0);
    let mut mp = MixedPrecision::new(policy.clone())?;

    let n = master.numel();
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    let mut t = 0i32;
    let mut grads = vec![0f32; n];
    let mut losses = Vec::new();
    let mut scales = Vec::new(); // the scale used at each step
    for step in 0..STEPS {
        let h = x16
            .matmul(vars[0].as_tensor())?
            .broadcast_add(vars[1].as_tensor())?
            .relu()?;
        let out = h
            .matmul(vars[2].as_tensor())?
            .broadcast_add(vars[3].as_tensor())?;
        let loss = out.to_dtype(DType::F32)?.sub(&target)?.sqr()?.mean_all()?;
        losses.push(loss.to_scalar::<f32>()?);
        scales.push(mp.loss_scale());

        // backward of loss * scale (times 10^6 at a spike: the fp16 gradients overflow)
        let mut scaled_loss = mp.scale_loss(&loss)?;
        if SPIKES.contains(&step) {
            scaled_loss = scaled_loss.affine(1e6, 0.0)?;
        }
        let gs = scaled_loss.backward()?;
        let g: Vec<Tensor> = vars
            .iter()
            .map(|v| {
                gs.get(v)
                    .map(|g| g.detach())
                    .ok_or("a parameter got no gradient")
            })
            .collect::<Result<_, _>>()?;
        assert!(g.iter().all(|g| g.dtype() == DType::F16));
        // One pass: fp16 -> fp32, * 1/scale, inf/nan flag, squared norm.
        let stats = mp.unscale_grad_tensors(&g.iter().collect::<Vec<_>>(), &mut grads)?;
        let before = master.flat().to_vec();
        let report = mp.finish_step(stats, &mut grads)?;

        if SPIKES.contains(&step) {
            assert!(
                report.decision.is_skip(),
                "step {step}: {}",
                report.decision
            );
            assert_eq!(
                master.flat(),
                &before[..],
                "a skipped step moved the weights"
            );
            println!("step {step}: {}", report.decision);
            continue;
        }
        assert!(
            report.decision.is_step(),
            "step {step}: {}",
            report.decision
        );
        // Adam on the fp32 master weights, then the fp16 model gets their rounded copy.
        t += 1;
        let (b1, b2, lr) = (0.9f32, 0.999f32, 1e-2f32);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for (i, w) in master.flat_mut().iter_mut().enumerate() {
            m[i] = b1 * m[i] + (1.0 - b1) * grads[i];
            v[i] = b2 * v[i] + (1.0 - b2) * grads[i] * grads[i];
            *w -= lr * (m[i] / c1) / ((v[i] / c2).sqrt() + 1e-8);
        }
        master.copy_to_vars(&vars)?;
        if step % 10 == 0 {
            println!(
                "step {step}: loss {:.5}, scale {}, grad norm {:.4}",
                losses[step], scales[step], report.grad_norm
            );
        }
    }

    // DeepSpeed's dynamic loss scaler, step by step:
    // - the scale doubles after 20 good steps (iteration 20 is the 20th since the start);
    assert_eq!(scales[0], 4096.0);
    assert_eq!(scales[20], 4096.0);
    assert_eq!(scales[21], 8192.0);
    // - the first overflow (step 30) skips and spends one unit of hysteresis: scale kept;
    assert_eq!(scales[31], 8192.0);
    // - the second (step 31) skips and halves it;
    assert_eq!(scales[32], 4096.0);
    // - 20 good steps after the last overflow it doubles again (at step 52).
    assert_eq!(scales[52], 4096.0);
    assert_eq!(scales[53], 8192.0);
    assert_eq!(mp.skipped_steps(), 2);
    // The scaler's state goes into a checkpoint and comes back on resume.
    let state = mp.scaler().state();
    let mut resumed = MixedPrecision::new(policy)?;
    resumed.scaler_mut().load_state(&state)?;
    assert_eq!(resumed.loss_scale(), mp.loss_scale());
    assert_eq!(resumed.skipped_steps(), 2);
    let (first, last) = (losses[0], losses[STEPS - 1]);
    assert!(
        last < 0.5 * first,
        "the loss did not fall: {first} -> {last}"
    );
    println!(
        "loss {first:.4} -> {last:.4} in fp16 with fp32 master weights; 2 steps skipped, scale 4096 -> 8192 -> 4096 -> 8192"
    );
    Ok(())
}
