//! Activation checkpointing on a candle-nn model: four residual MLP blocks
//! (`x + down(dropout(gelu(up(x))))`, `candle_nn::Linear` layers from a `VarMap`), trained one
//! step with and without checkpointing. Each block is a segment written once against a
//! `VarBuilder`: the tracked form reads the `VarMap` (the graph is recorded), the untracked form
//! a map of detached copies of the same tensors (no graph). With `Policy::Count(2)` two of the
//! four blocks keep only their input through the forward pass and are recomputed in backward;
//! dropout masks come from `dropout_mask(seed, step, block)`, so the recompute drops exactly
//! the same elements. The loss and every parameter's gradient must equal the plain run's bit
//! for bit.
//!
//! `cargo run -p ds-ckpt-act --example candle_nn_blocks`

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{linear, VarBuilder, VarMap};
use ds_ckpt_act::{checkpoint_forward, dropout_mask, recompute_backward, Mode, Policy, Saved};

const BATCH: usize = 16;
const H: usize = 32;
const BLOCKS: usize = 4;
const P_DROP: f32 = 0.1;
const SEED: u64 = 7;

/// Block `i` built from `vb` (tracked or untracked) and applied to `x`.
fn block(vb: &VarBuilder, i: usize, x: &Tensor) -> candle_core::Result<Tensor> {
    let up = linear(H, 4 * H, vb.pp(format!("b{i}.up")))?;
    let down = linear(4 * H, H, vb.pp(format!("b{i}.down")))?;
    let mask = Tensor::from_vec(
        dropout_mask(BATCH * 4 * H, P_DROP, SEED, 0, i as u64),
        (BATCH, 4 * H),
        x.device(),
    )?;
    let h = (up.forward(x)?.gelu()? * mask)?;
    x + down.forward(&h)?
}

fn loss_of(y: &Tensor, target: &Tensor) -> candle_core::Result<Tensor> {
    (y - target)?.sqr()?.mean_all()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let tracked = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let x = Tensor::randn(0f32, 1.0, (BATCH, H), &dev)?;
    let target = Tensor::randn(0f32, 1.0, (BATCH, H), &dev)?;
    // Create (initialise) every block's parameters once.
    for i in 0..BLOCKS {
        block(&tracked, i, &x)?;
    }
    let vars: HashMap<String, Var> = varmap.data().lock().expect("varmap lock").clone();
    let block_vars = |i: usize| -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = vars
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("b{i}.")))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    // The untracked view: detached tensors of the same parameters (no graph, no copy of data).
    let detached = VarBuilder::from_tensors(
        vars.iter()
            .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
            .collect(),
        DType::F32,
        &dev,
    );

    // --- reference: plain forward and backward through candle autograd
    let mut h = x.clone();
    for i in 0..BLOCKS {
        h = block(&tracked, i, &h)?;
    }
    let ref_loss = loss_of(&h, &target)?;
    let ref_grads = ref_loss.backward()?;

    // --- checkpointed: Policy::Count(2) of 4 blocks
    let policy = Policy::Count(2);
    enum Kept {
        /// A checkpointed block: its input only.
        Input(Saved),
        /// A plain block: its input (a Var, for its gradient) and its recorded output.
        Graph(Var, Tensor),
    }
    let mut kept = Vec::new();
    let mut h = x.clone();
    let mut saved_bytes = 0;
    for i in 0..BLOCKS {
        let seg = |x: &Tensor, mode: Mode| match mode {
            Mode::Tracked => block(&tracked, i, x),
            Mode::Untracked => block(&detached, i, x),
        };
        if policy.checkpointed(i, BLOCKS) {
            let (y, saved) = checkpoint_forward(&seg, &h)?;
            saved_bytes += saved.bytes();
            assert!(saved.on_host()); // a CPU model: the saved input is in host memory
            kept.push(Kept::Input(saved));
            h = y;
        } else {
            let xin = Var::from_tensor(&h)?;
            let y = seg(xin.as_tensor(), Mode::Tracked)?;
            h = y.detach();
            kept.push(Kept::Graph(xin, y));
        }
    }
    // The loss on the last block's output, made a leaf so that its gradient is dL/dy.
    let y_last = Var::from_tensor(&h)?;
    let loss = loss_of(y_last.as_tensor(), &target)?;
    let mut upstream = loss
        .backward()?
        .get(y_last.as_tensor())
        .ok_or("no gradient for the output")?
        .detach();
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    for (i, k) in kept.iter().enumerate().rev() {
        let bv = block_vars(i);
        let seg = |x: &Tensor, mode: Mode| match mode {
            Mode::Tracked => block(&tracked, i, x),
            Mode::Untracked => block(&detached, i, x),
        };
        let (dx, dparams) = match k {
            Kept::Input(saved) => {
                let refs: Vec<&Var> = bv.iter().map(|(_, v)| v).collect();
                let g = recompute_backward(&seg, saved, &upstream, &refs)?;
                (g.input, g.params)
            }
            Kept::Graph(xin, y) => {
                let g = (y * &upstream)?.sum_all()?.backward()?;
                let dx = g.get(xin.as_tensor()).ok_or("no input gradient")?.detach();
                let dp = bv
                    .iter()
                    .map(|(_, v)| g.get(v.as_tensor()).map(|t| t.detach()));
                (dx, dp.collect())
            }
        };
        for ((name, _), g) in bv.iter().zip(dparams) {
            grads.insert(name.clone(), g.ok_or(format!("{name}: no gradient"))?);
        }
        upstream = dx;
    }

    // --- equal bit for bit
    let bits = |t: &Tensor| -> candle_core::Result<Vec<u32>> {
        Ok(t.flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|v| v.to_bits())
            .collect())
    };
    assert_eq!(
        loss.to_scalar::<f32>()?.to_bits(),
        ref_loss.to_scalar::<f32>()?.to_bits(),
        "loss"
    );
    assert_eq!(grads.len(), vars.len());
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let want = ref_grads
            .get(vars[name].as_tensor())
            .ok_or("no reference gradient")?;
        assert_eq!(bits(&grads[name])?, bits(want)?, "{name}: gradients differ");
    }
    let checkpointed: Vec<usize> = (0..BLOCKS)
        .filter(|&i| policy.checkpointed(i, BLOCKS))
        .collect();
    println!(
        "loss {:.6}; blocks {checkpointed:?} checkpointed ({saved_bytes} bytes of saved inputs); \
         all {} parameter gradients equal the plain run's bit for bit",
        loss.to_scalar::<f32>()?,
        vars.len()
    );
    Ok(())
}
