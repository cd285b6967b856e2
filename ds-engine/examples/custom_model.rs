//! Bring your own model and drive the engine from your own loop: a user-defined network
//! implements `ds_engine::traits::Model` (named parameters grouped into blocks, a forward +
//! backward pass) and trains with the engine on 2 ranks (threads) at ZeRO stage 3, where each
//! block's parameters live sharded across the ranks and are gathered only around the pass. The
//! loop is DeepSpeed's: `forward_backward` then `step_micro` for every micro-batch, 2
//! micro-batches per optimizer step (gradient accumulation); the update happens at the
//! accumulation boundary only. Checked: the engine steps exactly there, and the loss falls
//! most of the way from `ln(vocab)` to the data's entropy. Rank 0 then draws its loss curve
//! with `ds_engine::plot::write_loss_curve` (a compressed PNG and an SVG beside it).
//!
//! `cargo run -p ds-engine --example custom_model`

use std::cell::RefCell;
use std::ops::Range;

use candle_core::{Device, Tensor, Var};
use ds_comm::LocalComm;
use ds_config::DeepSpeedConfig;
use ds_engine::data::Rng;
use ds_engine::data::{BigramLanguage, DataLoader};
use ds_engine::engine::Engine;
use ds_engine::traits::{autograd_forward_backward, Model, Policy, Tokens};
use ds_engine::traits::{BlockEvent, FwdBwd, NamedParam};

/// A gated token model: embedding, one gated block `x + sigmoid(x G) * tanh(x W)`, and a head.
struct GatedLm {
    vocab: usize,
    hidden: usize,
    seq: usize,
    emb: Var,
    /// The block's parameters (gate, weight), swapped out when ZeRO-3 releases them.
    block: RefCell<[Var; 2]>,
    head: Var,
}

fn var(data: Vec<f32>, shape: &[usize]) -> candle_core::Result<Var> {
    Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu)?)
}

impl GatedLm {
    fn new(vocab: usize, hidden: usize, seq: usize, seed: u64) -> candle_core::Result<Self> {
        let mut rng = Rng::new(seed);
        Ok(GatedLm {
            vocab,
            hidden,
            seq,
            emb: var(rng.normal_vec(vocab * hidden, 0.1), &[vocab, hidden])?,
            block: RefCell::new([
                var(rng.normal_vec(hidden * hidden, 0.1), &[hidden, hidden])?,
                var(rng.normal_vec(hidden * hidden, 0.1), &[hidden, hidden])?,
            ]),
            head: var(rng.normal_vec(vocab * hidden, 0.1), &[vocab, hidden])?,
        })
    }

    fn loss(&self, ids: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.emb.embedding(&ids.flatten_all()?)?;
        let [g, w] = &*self.block.borrow();
        let gate = (x.matmul(g)?.neg()?.exp()? + 1.0)?.recip()?; // sigmoid
        let x = (&x + (gate * x.matmul(w)?.tanh()?)?)?;
        let logits = x.matmul(&self.head.t()?)?;
        ds_models::kernels::cross_entropy(&logits, &targets.flatten_all()?)
    }
}

impl Model for GatedLm {
    type Batch = Tokens;
    fn params(&self) -> Vec<NamedParam> {
        let [g, w] = &*self.block.borrow();
        [
            ("emb", &self.emb),
            ("block.gate", g),
            ("block.weight", w),
            ("head", &self.head),
        ]
        .into_iter()
        .map(|(n, v)| NamedParam {
            name: n.into(),
            var: v.clone(),
        })
        .collect()
    }
    fn param_shapes(&self) -> Vec<Vec<usize>> {
        let (v, h) = (self.vocab, self.hidden);
        vec![vec![v, h], vec![h, h], vec![h, h], vec![v, h]]
    }
    fn block_param_ranges(&self) -> Vec<Range<usize>> {
        // One block: parameters 1 and 2 (gate, weight); `emb` and `head` stay whole.
        std::iter::once(1..3).collect()
    }
    fn gather_block(&self, _i: usize, flat: &[f32]) -> candle_core::Result<()> {
        let n = self.hidden * self.hidden;
        let s = [self.hidden, self.hidden];
        *self.block.borrow_mut() = [
            var(flat[..n].to_vec(), &s)?,
            var(flat[n..2 * n].to_vec(), &s)?,
        ];
        Ok(())
    }
    fn release_block(&self, _i: usize) -> candle_core::Result<()> {
        *self.block.borrow_mut() = [var(vec![], &[0])?, var(vec![], &[0])?];
        Ok(())
    }
    fn forward_backward_hooked(
        &self,
        batch: &Tokens,
        _policy: Policy,
        hook: &mut dyn FnMut(BlockEvent) -> candle_core::Result<()>,
    ) -> candle_core::Result<FwdBwd> {
        let (ids, targets) = batch.tensors(self.seq, &Device::Cpu)?;
        autograd_forward_backward(self, || self.loss(&ids, &targets), hook)
    }
}

const STEPS: u64 = 150;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (vocab, hidden, seq, ws) = (64, 32, 32, 2);
    let cfg = DeepSpeedConfig::from_json_str(
        r#"{"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
            "zero_optimization": {"stage": 3}}"#,
    )?
    .resolve(ws)?;
    let lang = BigramLanguage::new(vocab, 1);
    let entropy = lang.entropy();
    let data = DataLoader::new(lang, 1, seq);
    let results: Vec<Result<Vec<f64>, String>> = std::thread::scope(|s| {
        LocalComm::create(ws)
            .into_iter()
            .map(|comm| {
                let (cfg, data) = (&cfg, &data);
                s.spawn(move || -> Result<Vec<f64>, String> {
                    let run = || -> Result<Vec<f64>, Box<dyn std::error::Error>> {
                        let model = GatedLm::new(vocab, hidden, seq, 0)?;
                        let mut engine = Engine::initialize(cfg, model, &comm)?;
                        let micro = engine.micro_batch_size();
                        let rank = ds_comm::Communicator::rank(&comm);
                        let mut losses = Vec::new();
                        let gas = engine.gradient_accumulation_steps();
                        assert_eq!(gas, 2); // 16 = 4 per micro-batch x 2 ranks x 2
                        for step in 0..STEPS {
                            let mut loss = 0.0;
                            for m in 0..gas {
                                let batch = data.micro_batch(step, m, rank, ws, micro);
                                let (l, _fwd_ms, _bwd_ms) = engine.forward_backward(batch)?;
                                loss += l / gas as f64;
                                let boundary = engine.is_gradient_accumulation_boundary();
                                assert_eq!(boundary, m + 1 == gas);
                                // Counts between boundaries; steps (and reports) at one.
                                let report = engine.step_micro()?;
                                assert_eq!(report.is_some(), boundary);
                            }
                            losses.push(loss);
                        }
                        assert_eq!(engine.global_steps(), STEPS);
                        Ok(losses)
                    };
                    run().map_err(|e| e.to_string())
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("rank panicked".into())))
            .collect()
    });
    for (rank, r) in results.into_iter().enumerate() {
        let losses = r?;
        let (first, last) = (losses[0], losses[losses.len() - 1]);
        if rank == 0 {
            let dir = std::env::temp_dir().join(format!("ds-custom-model-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let png = dir.join("loss_curve.png");
            // Steps are numbered from 1, as the engine counts them.
            ds_engine::plot::write_loss_curve(&png, &losses, 1)?;
            let bytes = std::fs::metadata(&png)?.len();
            assert!(
                bytes > 1000 && bytes < 100_000,
                "loss_curve.png is {bytes} bytes"
            );
            assert!(png.with_extension("svg").is_file());
            println!("loss curve: {} ({bytes} bytes) and its .svg", png.display());
            std::fs::remove_dir_all(&dir)?;
        }
        let ln_v = (vocab as f64).ln();
        assert!(
            last < entropy + 0.5 * (ln_v - entropy),
            "rank {rank}: loss {first:.3} -> {last:.3} did not get half way to the floor {entropy:.3}"
        );
        println!(
            "rank {rank}: loss {first:.3} -> {last:.3} (ln vocab {:.3}, data entropy {entropy:.3})",
            (vocab as f64).ln()
        );
    }
    Ok(())
}
