//! Embedded training data: a token stream drawn from a seeded sparse bigram language, so the
//! main job trains on real structure with no download, and its best achievable loss is known
//! exactly (the entropy rate of the chain).

use crate::model::Rng;

/// Successors per token in the synthetic language.
const BRANCHES: usize = 4;
/// Their probabilities (sum 1).
const PROBS: [f64; BRANCHES] = [0.55, 0.25, 0.15, 0.05];

/// A seeded sparse bigram language over `vocab` tokens.
#[derive(Debug, Clone)]
pub struct BigramLanguage {
    vocab: usize,
    next: Vec<[u32; BRANCHES]>,
}

impl BigramLanguage {
    /// The language for a vocabulary size and seed.
    pub fn new(vocab: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed ^ 0xDA7A);
        let next = (0..vocab)
            .map(|_| {
                let mut s = [0u32; BRANCHES];
                for x in s.iter_mut() {
                    *x = (rng.next_u64() % vocab as u64) as u32;
                }
                s
            })
            .collect();
        BigramLanguage { vocab, next }
    }

    /// Entropy rate in nats per token: the loss a perfect model reaches (successors may
    /// coincide; then their probabilities add).
    pub fn entropy(&self) -> f64 {
        // The stationary distribution is not uniform in general; estimate it by iteration.
        let v = self.vocab;
        let mut pi = vec![1.0 / v as f64; v];
        for _ in 0..200 {
            let mut nxt = vec![0.0; v];
            for (t, succ) in self.next.iter().enumerate() {
                for (k, &s) in succ.iter().enumerate() {
                    nxt[s as usize] += pi[t] * PROBS[k];
                }
            }
            pi = nxt;
        }
        let mut h = 0.0;
        for (t, succ) in self.next.iter().enumerate() {
            let mut probs: Vec<(u32, f64)> = Vec::new();
            for (k, &s) in succ.iter().enumerate() {
                match probs.iter_mut().find(|(x, _)| *x == s) {
                    Some(e) => e.1 += PROBS[k],
                    None => probs.push((s, PROBS[k])),
                }
            }
            h -= pi[t] * probs.iter().map(|(_, p)| p * p.ln()).sum::<f64>();
        }
        h
    }

    /// Sample `len` tokens starting from a random token.
    pub fn sample(&self, rng: &mut Rng, len: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(len);
        let mut t = (rng.next_u64() % self.vocab as u64) as u32;
        for _ in 0..len {
            out.push(t);
            let u = rng.uniform();
            let mut acc = 0.0;
            let mut k = BRANCHES - 1;
            for (i, p) in PROBS.iter().enumerate() {
                acc += p;
                if u < acc {
                    k = i;
                    break;
                }
            }
            t = self.next[t as usize][k];
        }
        out
    }
}

/// Deterministic batches: sample `i` of global step `s` is the same whatever the world size, so
/// runs at different world sizes see the same global batch.
#[derive(Debug, Clone)]
pub struct DataLoader {
    lang: BigramLanguage,
    seed: u64,
    seq: usize,
}

impl DataLoader {
    /// A loader of sequences of `seq` tokens (+1 for the shifted targets).
    pub fn new(lang: BigramLanguage, seed: u64, seq: usize) -> Self {
        DataLoader { lang, seed, seq }
    }

    /// The language.
    pub fn language(&self) -> &BigramLanguage {
        &self.lang
    }

    /// Global sample `index` of optimizer step `step`: (inputs, targets), `seq` tokens each.
    pub fn sample(&self, step: u64, index: u64) -> (Vec<u32>, Vec<u32>) {
        let mut rng = Rng::new(
            self.seed
                .wrapping_mul(0x100_0000_01B3)
                .wrapping_add(step.wrapping_mul(1_000_003))
                .wrapping_add(index),
        );
        let toks = self.lang.sample(&mut rng, self.seq + 1);
        (toks[..self.seq].to_vec(), toks[1..].to_vec())
    }

    /// The micro-batch of `micro` samples for `rank` at micro-step `m` of optimizer step `step`:
    /// global sample indices `(m * world_size + rank) * micro ..`.
    pub fn micro_batch(
        &self,
        step: u64,
        m: usize,
        rank: usize,
        world_size: usize,
        micro: usize,
    ) -> (Vec<u32>, Vec<u32>) {
        let first = ((m * world_size + rank) * micro) as u64;
        let mut x = Vec::with_capacity(micro * self.seq);
        let mut y = Vec::with_capacity(micro * self.seq);
        for i in 0..micro as u64 {
            let (a, b) = self.sample(step, first + i);
            x.extend(a);
            y.extend(b);
        }
        (x, y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_matches_the_empirical_loss_of_the_true_model() {
        let lang = BigramLanguage::new(64, 1);
        let h = lang.entropy();
        assert!(h > 0.5 && h < (4f64).ln() + 1e-9, "{h}");
        // Empirical cross-entropy of the true transition probabilities on a long sample.
        let mut rng = Rng::new(9);
        let s = lang.sample(&mut rng, 200_000);
        let mut nll = 0.0;
        for w in s.windows(2) {
            let p: f64 = lang.next[w[0] as usize]
                .iter()
                .zip(PROBS)
                .filter(|(t, _)| **t == w[1])
                .map(|(_, p)| p)
                .sum();
            nll -= p.ln();
        }
        let emp = nll / (s.len() - 1) as f64;
        assert!((emp - h).abs() < 0.02, "empirical {emp} vs entropy {h}");
    }

    #[test]
    fn global_batch_is_independent_of_world_size() {
        let dl = DataLoader::new(BigramLanguage::new(50, 2), 3, 8);
        // World size 1 with micro 4 == world size 2 with micro 2 (ranks concatenated).
        let (a, _) = dl.micro_batch(5, 0, 0, 1, 4);
        let (b0, _) = dl.micro_batch(5, 0, 0, 2, 2);
        let (b1, _) = dl.micro_batch(5, 0, 1, 2, 2);
        assert_eq!(a, [b0, b1].concat());
        let (x, y) = dl.sample(0, 0);
        assert_eq!(x[1..], y[..7]);
    }
}
