//! Write your own model: a two-layer MLP in plain candle, trained data-parallel on 2 ranks with
//! ZeRO stage 2 from `ds-zero` alone (no engine, no config file).
//!
//! `cargo run --release --example custom_loop`

use candle_core::{Device, Tensor, Var, D};
use ds_comm::{Communicator, LocalComm};
use ds_zero::optim::{AdamParams, OptimizerSpec};
use ds_zero::{ZeroOptimizer, ZeroOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (inp, hidden, out) = (8usize, 32usize, 1usize);
    let results: Vec<Result<f32, String>> = std::thread::scope(|s| {
        LocalComm::create(2)
            .into_iter()
            .map(|comm| {
                s.spawn(move || -> Result<f32, String> {
                    run_rank(&comm, inp, hidden, out).map_err(|e| e.to_string())
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("rank panicked".into())))
            .collect()
    });
    for (rank, r) in results.into_iter().enumerate() {
        println!("rank {rank}: final loss {:.5}", r?);
    }
    Ok(())
}

fn run_rank(
    comm: &dyn Communicator,
    inp: usize,
    hidden: usize,
    out: usize,
) -> Result<f32, Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    // Identical initialisation on every rank (a deterministic pattern).
    let init = |n: usize, k: f32| -> Vec<f32> {
        (0..n).map(|i| ((i * 37 % 17) as f32 - 8.0) * k).collect()
    };
    let w1 = Var::from_tensor(&Tensor::from_vec(
        init(inp * hidden, 0.05),
        (inp, hidden),
        &dev,
    )?)?;
    let w2 = Var::from_tensor(&Tensor::from_vec(
        init(hidden * out, 0.05),
        (hidden, out),
        &dev,
    )?)?;
    let params = [&w1, &w2];
    let sizes: Vec<usize> = params.iter().map(|p| p.elem_count()).collect();
    let mut flat = Vec::new();
    for p in params {
        flat.extend(p.flatten_all()?.to_vec1::<f32>()?);
    }
    let spec = OptimizerSpec::Adam(AdamParams {
        lr: 0.01,
        ..Default::default()
    });
    let opts = ZeroOptions {
        stage: 2,
        ..Default::default()
    };
    let mut zero = ZeroOptimizer::new(&sizes, &flat, spec, opts, comm)?;
    let mut last = 0.0;
    for step in 0..200 {
        // Each rank its own half of the batch: y = sum(x) with x in a rank-specific pattern.
        let xs: Vec<f32> = (0..16 * inp)
            .map(|i| {
                (((i + step * 7 + comm.rank() * 1000) * 2654435761usize) % 1000) as f32 / 1000.0
                    - 0.5
            })
            .collect();
        let x = Tensor::from_vec(xs, (16, inp), &dev)?;
        let y = x.sum_keepdim(D::Minus1)?;
        let pred = x.matmul(&w1)?.tanh()?.matmul(&w2)?;
        let loss = (pred - y)?.sqr()?.mean_all()?;
        last = loss.to_scalar::<f32>()?;
        let grads = loss.backward()?;
        let mut g = Vec::with_capacity(flat.len());
        for p in params {
            match grads.get(p.as_tensor()) {
                Some(t) => g.extend(t.detach().flatten_all()?.to_vec1::<f32>()?),
                None => g.extend(std::iter::repeat_n(0.0, p.elem_count())),
            }
        }
        zero.reduce_gradients(&g, comm)?;
        zero.step(0.01, comm)?;
        let full = zero.gather_params(comm)?;
        let mut off = 0;
        for p in params {
            let n = p.elem_count();
            p.set(&Tensor::from_slice(&full[off..off + n], p.shape(), &dev)?)?;
            off += n;
        }
    }
    Ok(last)
}
