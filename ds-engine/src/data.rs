//! Embedded training data, generated in code (no download):
//!
//! - [`AdditionTask`] (the default of `ds train`): multi-digit addition written as tokens,
//!   `123+456=9750;` with the sum's digits least-significant first (the order a carry flows),
//!   so a small GPT learns it in minutes and its progress is measured as exact-match accuracy
//!   on held-out problems;
//! - [`BigramLanguage`]: a seeded sparse bigram language whose best achievable loss is known
//!   exactly (the entropy rate of the chain).

/// Deterministic generator for initialisation and data (identical on every rank).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    /// Next 64 random bits (splitmix64).
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    /// A vector of N(0, std) values.
    pub fn normal_vec(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * std) as f32).collect()
    }
}

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

/// Token of `+` in the addition task (digits are tokens 0-9).
pub const ADD_PLUS: u32 = 10;
/// Token of `=`.
pub const ADD_EQ: u32 = 11;
/// Token ending a problem (`;`).
pub const ADD_END: u32 = 12;
/// Vocabulary the addition task needs (tokens 0..13); a larger model vocabulary is fine.
pub const ADD_VOCAB: usize = 13;

/// Multi-digit addition as a token stream: each problem is `digits` digits of `a`
/// (zero-padded, most significant first), `+`, the digits of `b`, `=`, the `digits + 1`
/// digits of `a + b` least significant first, `;`. A sequence is problems back to back from
/// a problem boundary. One pair in ten (chosen by a hash of the pair and the seed) is held
/// out: training never draws it, evaluation draws only those.
///
/// Training uses the plain next-token loss over every position (no mask): the operand digits
/// are random, so the loss has a floor ([`AdditionTask::loss_floor`]); the answer positions
/// are what can be learned, and [`AdditionTask::eval_batch`] says where they are.
#[derive(Debug, Clone)]
pub struct AdditionTask {
    digits: usize,
    seed: u64,
    seq: usize,
    max: u64,
}

/// Held-out sequences and where their answers are.
#[derive(Debug, Clone)]
pub struct EvalBatch {
    /// Inputs, `seqs * seq` tokens.
    pub inputs: Vec<u32>,
    /// Next-token targets, `seqs * seq` tokens.
    pub targets: Vec<u32>,
    /// Per problem: the flat indices (into `targets`) of its answer digits.
    pub answers: Vec<Vec<usize>>,
}

impl AdditionTask {
    /// The task for operands of `digits` digits (1..=6), sequences of `seq` tokens, and a
    /// seed (which picks the held-out pairs and the draws).
    pub fn new(digits: usize, seed: u64, seq: usize) -> Result<Self, crate::EngineError> {
        if !(1..=6).contains(&digits) {
            return Err(crate::EngineError::Data(format!(
                "the addition task takes 1 to 6 digits, got {digits}"
            )));
        }
        Ok(AdditionTask {
            digits,
            seed,
            seq,
            max: 10u64.pow(digits as u32),
        })
    }

    /// Tokens per problem: `3 * digits + 4`.
    pub fn problem_len(&self) -> usize {
        3 * self.digits + 4
    }

    /// Whether the pair `(a, b)` is held out (about one pair in ten).
    pub fn held_out(&self, a: u64, b: u64) -> bool {
        let mut r = Rng::new(self.seed ^ 0xADD0 ^ (a * self.max + b).wrapping_mul(0x2545_F491));
        r.next_u64().is_multiple_of(10)
    }

    /// The tokens of one problem.
    pub fn problem(&self, a: u64, b: u64) -> Vec<u32> {
        let d = self.digits;
        let mut t = Vec::with_capacity(self.problem_len());
        let msb_first = |v: u64, n: usize, t: &mut Vec<u32>| {
            for k in (0..n).rev() {
                t.push((v / 10u64.pow(k as u32) % 10) as u32);
            }
        };
        msb_first(a, d, &mut t);
        t.push(ADD_PLUS);
        msb_first(b, d, &mut t);
        t.push(ADD_EQ);
        let s = a + b;
        for k in 0..=d {
            t.push((s / 10u64.pow(k as u32) % 10) as u32);
        }
        t.push(ADD_END);
        t
    }

    fn draw(&self, rng: &mut Rng, held_out: bool) -> (u64, u64) {
        loop {
            let a = rng.next_u64() % self.max;
            let b = rng.next_u64() % self.max;
            if self.held_out(a, b) == held_out {
                return (a, b);
            }
        }
    }

    fn sequence(&self, rng: &mut Rng, held_out: bool) -> (Vec<u32>, Vec<(u64, u64)>) {
        let mut toks = Vec::with_capacity(self.seq + self.problem_len());
        let mut pairs = Vec::new();
        while toks.len() < self.seq + 1 {
            let (a, b) = self.draw(rng, held_out);
            toks.extend(self.problem(a, b));
            pairs.push((a, b));
        }
        toks.truncate(self.seq + 1);
        (toks, pairs)
    }

    /// Global training sample `index` of optimizer step `step`: (inputs, targets).
    pub fn sample(&self, step: u64, index: u64) -> (Vec<u32>, Vec<u32>) {
        let mut rng = Rng::new(
            self.seed
                .wrapping_mul(0x100_0000_01B3)
                .wrapping_add(step.wrapping_mul(1_000_003))
                .wrapping_add(index)
                ^ 0xADD,
        );
        let (toks, _) = self.sequence(&mut rng, false);
        (toks[..self.seq].to_vec(), toks[1..].to_vec())
    }

    /// The micro-batch of `micro` samples for `rank` at micro-step `m` of optimizer step
    /// `step` (global sample indices `(m * world_size + rank) * micro ..`, as
    /// [`DataLoader::micro_batch`]).
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

    /// Complete held-out problems per sequence (0 when `seq` is shorter than one problem's
    /// answer).
    pub fn problems_per_sequence(&self) -> usize {
        // A problem starting at token offset o has its answer digits at o + 2d + 2 ..= o + 3d + 2,
        // predicted from target positions one earlier, which must be < seq.
        let (l, d) = (self.problem_len(), self.digits);
        let mut n = 0;
        while n * l + 3 * d + 2 <= self.seq {
            n += 1;
        }
        n
    }

    /// `seqs` held-out sequences (fixed by the seed) and the target indices of every complete
    /// problem's answer digits.
    pub fn eval_batch(&self, seqs: usize) -> EvalBatch {
        let mut rng = Rng::new(self.seed ^ 0xE7A1_5EED);
        let (l, d) = (self.problem_len(), self.digits);
        let per = self.problems_per_sequence();
        let mut out = EvalBatch {
            inputs: Vec::with_capacity(seqs * self.seq),
            targets: Vec::with_capacity(seqs * self.seq),
            answers: Vec::new(),
        };
        for s in 0..seqs {
            let (toks, _) = self.sequence(&mut rng, true);
            for p in 0..per {
                let first = p * l + 2 * d + 2; // token offset of the answer's first digit
                out.answers
                    .push((first..=first + d).map(|t| s * self.seq + t - 1).collect());
            }
            out.inputs.extend_from_slice(&toks[..self.seq]);
            out.targets.extend_from_slice(&toks[1..]);
        }
        out
    }

    /// The best achievable mean loss per target token (nats): the operand digits are uniform
    /// over the training pairs and nothing else is random, so the floor is the entropy of the
    /// operands inside a window divided by its length. Exact for windows holding whole
    /// problems, within about `ln(10/9) / seq` otherwise (a cut problem's digits counted as
    /// uniform).
    pub fn loss_floor(&self) -> f64 {
        let (l, d) = (self.problem_len(), self.digits);
        // ln of the number of training pairs, counted exactly when cheap.
        let pairs = self.max * self.max;
        let ln_train = if pairs <= 1_000_000 {
            let mut n = 0u64;
            for a in 0..self.max {
                for b in 0..self.max {
                    n += u64::from(!self.held_out(a, b));
                }
            }
            (n as f64).ln()
        } else {
            (pairs as f64 * 0.9).ln()
        };
        let digit = 10f64.ln();
        // Targets are tokens 1..=seq of the stream.
        let mut h = 0.0;
        let mut start = 0;
        while start < self.seq + 1 {
            let end = start + l; // problem tokens start..end
            let last = self.seq + 1;
            let operand_pos = (0..d)
                .map(|k| start + k)
                .chain((0..d).map(|k| start + d + 1 + k));
            let visible: Vec<usize> = operand_pos.filter(|&p| p < last).collect();
            if visible.len() == 2 * d && end <= last {
                h += ln_train;
            } else {
                h += visible.len() as f64 * digit;
            }
            start = end;
        }
        // The first token (an operand digit) is an input, never a target.
        (h - digit) / self.seq as f64
    }
}

/// One nanoGPT token file (`train.bin` / `val.bin`: uint16 little-endian tokens), memory-mapped.
#[derive(Debug)]
pub struct TokenFile {
    map: memmap2::Mmap,
    path: std::path::PathBuf,
}

impl TokenFile {
    /// Maps `path` and checks it: an even byte length, at least `min_tokens` tokens, every
    /// token `< vocab` (one pass over the file).
    pub fn open(
        path: &std::path::Path,
        vocab: usize,
        min_tokens: usize,
    ) -> Result<Self, crate::EngineError> {
        let err = |m: String| crate::EngineError::Data(format!("{}: {m}", path.display()));
        let f = std::fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
        // SAFETY: the file is opened read-only and only read through the map; a concurrent
        // writer truncating it is outside what this loader supports (as with nanoGPT's
        // np.memmap).
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| err(format!("cannot map: {e}")))?;
        if map.len() % 2 != 0 {
            return Err(err(format!(
                "{} bytes is an odd length; nanoGPT token files hold uint16 little-endian tokens (2 bytes each)",
                map.len()
            )));
        }
        let t = TokenFile {
            map,
            path: path.to_path_buf(),
        };
        if t.len() < min_tokens {
            return Err(err(format!(
                "{} tokens; at least seq + 1 = {min_tokens} are needed",
                t.len()
            )));
        }
        if let Some((i, tok)) = (0..t.len())
            .map(|i| (i, t.get(i)))
            .find(|&(_, tok)| tok as usize >= vocab)
        {
            return Err(err(format!(
                "token {tok} at position {i} is >= --vocab {vocab}; pass a --vocab above the largest token (GPT-2's tokenizer needs 50257)"
            )));
        }
        Ok(t)
    }

    /// Tokens in the file.
    pub fn len(&self) -> usize {
        self.map.len() / 2
    }

    /// Whether the file holds no token.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Token `i` (< [`TokenFile::len`]).
    pub fn get(&self, i: usize) -> u32 {
        u32::from(u16::from_le_bytes([self.map[2 * i], self.map[2 * i + 1]]))
    }

    /// The file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// `seq` inputs and `seq` targets from the window starting at token `off`.
    pub fn window(&self, off: usize, seq: usize) -> (Vec<u32>, Vec<u32>) {
        let toks: Vec<u32> = (off..off + seq + 1).map(|i| self.get(i)).collect();
        (toks[..seq].to_vec(), toks[1..].to_vec())
    }
}

/// nanoGPT's data directory (`train.bin`, `val.bin`) with a deterministic distributed
/// sampler: sample `i` of optimizer step `s` is the window at an offset drawn from
/// `(seed, s, i)`, so the global batch is the same at every world size, ranks read disjoint
/// sample indices of it (`(m * world_size + rank) * micro ..`), and resuming at step `s`
/// (the checkpoint's `data_sampler.next_step`) continues the exact sequence of windows.
#[derive(Debug)]
pub struct TokenDataset {
    train: TokenFile,
    val: TokenFile,
    seed: u64,
    seq: usize,
}

impl TokenDataset {
    /// Opens `dir/train.bin` and `dir/val.bin` (both required) for a model of `vocab` tokens
    /// and windows of `seq`.
    pub fn open(
        dir: &std::path::Path,
        vocab: usize,
        seq: usize,
        seed: u64,
    ) -> Result<Self, crate::EngineError> {
        let train = TokenFile::open(&dir.join("train.bin"), vocab, seq + 1)?;
        let val = TokenFile::open(&dir.join("val.bin"), vocab, seq + 1)?;
        Ok(TokenDataset {
            train,
            val,
            seed,
            seq,
        })
    }

    /// The training tokens.
    pub fn train(&self) -> &TokenFile {
        &self.train
    }

    /// The validation tokens.
    pub fn val(&self) -> &TokenFile {
        &self.val
    }

    /// Start offset of global sample `index` of step `step` in `train.bin`.
    pub fn offset(&self, step: u64, index: u64) -> usize {
        let span = (self.train.len() - self.seq) as u64; // valid starts: 0..span
        let mut r = Rng::new(
            self.seed
                .wrapping_mul(0x100_0000_01B3)
                .wrapping_add(step.wrapping_mul(1_000_003))
                .wrapping_add(index)
                ^ 0x7E11,
        );
        (r.next_u64() % span) as usize
    }

    /// The micro-batch of `micro` windows for `rank` at micro-step `m` of step `step`.
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
            let (a, b) = self.train.window(self.offset(step, first + i), self.seq);
            x.extend(a);
            y.extend(b);
        }
        (x, y)
    }

    /// Up to `n` validation windows, evenly spaced over `val.bin` (the same every call).
    pub fn val_batch(&self, n: usize) -> (Vec<u32>, Vec<u32>) {
        let span = self.val.len() - self.seq; // valid starts 0..span
        let n = n.min(span).max(1);
        let mut x = Vec::with_capacity(n * self.seq);
        let mut y = Vec::with_capacity(n * self.seq);
        for k in 0..n {
            let (a, b) = self.val.window(k * span / n, self.seq);
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

    #[test]
    fn addition_problem_tokens() {
        let t = AdditionTask::new(3, 0, 64).unwrap();
        // 123 + 456 = 579, the sum's 4 digits least significant first: 9 7 5 0.
        assert_eq!(
            t.problem(123, 456),
            [1, 2, 3, ADD_PLUS, 4, 5, 6, ADD_EQ, 9, 7, 5, 0, ADD_END]
        );
        assert_eq!(t.problem(999, 999)[8..12], [8, 9, 9, 1]);
        assert!(AdditionTask::new(0, 0, 64).is_err());
        assert!(AdditionTask::new(7, 0, 64).is_err());
    }

    /// Reads the numbers of problem `p` of sequence `s` back from the input tokens.
    fn operands(inputs: &[u32], seq: usize, s: usize, p: usize, d: usize) -> (u64, u64) {
        let o = s * seq + p * (3 * d + 4);
        let num = |r: &[u32]| r.iter().fold(0u64, |n, &t| n * 10 + u64::from(t));
        assert_eq!(inputs[o + d], ADD_PLUS);
        assert_eq!(inputs[o + 2 * d + 1], ADD_EQ);
        (
            num(&inputs[o..o + d]),
            num(&inputs[o + d + 1..o + 2 * d + 1]),
        )
    }

    #[test]
    fn held_out_answers_are_the_sums_and_never_trained_on() {
        let (d, seq) = (3, 64);
        let t = AdditionTask::new(d, 5, seq).unwrap();
        assert_eq!(t.problems_per_sequence(), 5); // answers of the 5th end at token 63
        let e = t.eval_batch(20);
        assert_eq!(e.answers.len(), 100);
        for (k, ans) in e.answers.iter().enumerate() {
            let (a, b) = operands(&e.inputs, seq, k / 5, k % 5, d);
            assert!(t.held_out(a, b));
            let digits: Vec<u32> = ans.iter().map(|&i| e.targets[i]).collect();
            let sum = (0..=d).fold(0u64, |n, j| n + u64::from(digits[j]) * 10u64.pow(j as u32));
            assert_eq!(sum, a + b, "problem {k}");
        }
        // Training sequences never hold a held-out pair; about one pair in ten is held out.
        let mut held = 0;
        for i in 0..200 {
            let (x, y) = t.sample(3, i);
            assert_eq!(x[1..], y[..seq - 1]);
            for p in 0..4 {
                let (a, b) = operands(&x, seq, 0, p, d);
                assert!(!t.held_out(a, b));
            }
            held += (0..10).filter(|&b| t.held_out(i, b)).count();
        }
        assert!((150..250).contains(&held), "{held} of 2000 held out");
        // The global batch does not depend on the world size.
        let (a, _) = t.micro_batch(2, 1, 0, 1, 4);
        let (b0, _) = t.micro_batch(2, 0, 0, 2, 2);
        let (b1, _) = t.micro_batch(2, 0, 1, 2, 2);
        assert_ne!(a, [b0.clone(), b1.clone()].concat()); // micro-step 1 vs 0
        let (a, _) = t.micro_batch(2, 0, 0, 1, 4);
        assert_eq!(a, [b0, b1].concat());
    }

    #[test]
    fn addition_loss_floor_is_the_operand_entropy() {
        // Windows of whole problems: seq + 1 = 4 problems of 10 tokens (2 digits). The
        // operands of each problem are uniform over the training pairs (counted here by brute
        // force); the first digit is an input, not a target, and is uniform over 10 values
        // up to the held-out skew (bounded below).
        let t = AdditionTask::new(2, 1, 39).unwrap();
        let n_train = (0..100u64)
            .flat_map(|a| (0..100u64).map(move |b| (a, b)))
            .filter(|&(a, b)| !t.held_out(a, b))
            .count() as f64;
        let want = (4.0 * n_train.ln() - 10f64.ln()) / 39.0;
        assert!((t.loss_floor() - want).abs() < 1e-12);
        // Near the uniform-digits value 4 * ln(0.9e4) - ln 10.
        let approx = (4.0 * (0.9e4f64).ln() - 10f64.ln()) / 39.0;
        assert!((t.loss_floor() - approx).abs() < 0.01, "{}", t.loss_floor());
    }

    fn token_dir(name: &str, train: &[u16], val: &[u16]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ds-tok-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bytes = |t: &[u16]| t.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        std::fs::write(dir.join("train.bin"), bytes(train)).unwrap();
        std::fs::write(dir.join("val.bin"), bytes(val)).unwrap();
        dir
    }

    #[test]
    fn nanogpt_token_files() {
        let train: Vec<u16> = (0..1000u16).map(|i| i % 300 + 200).collect();
        let val: Vec<u16> = (0..100u16).collect();
        let dir = token_dir("ok", &train, &val);
        let ds = TokenDataset::open(&dir, 500, 16, 7).unwrap();
        assert_eq!(ds.train().len(), 1000);
        assert_eq!(ds.train().get(999), 999 % 300 + 200);
        // Windows are consecutive tokens of train.bin, inside the file.
        let (x, y) = ds.micro_batch(3, 0, 0, 1, 8);
        for s in 0..8 {
            let off = ds.offset(3, s as u64);
            assert!(off + 16 < 1000);
            for k in 0..16 {
                assert_eq!(x[s * 16 + k], u32::from(train[off + k]));
                assert_eq!(y[s * 16 + k], u32::from(train[off + k + 1]));
            }
        }
        // Ranks read disjoint parts of the same global batch.
        let (r0, _) = ds.micro_batch(3, 0, 0, 2, 4);
        let (r1, _) = ds.micro_batch(3, 0, 1, 2, 4);
        assert_eq!(x, [r0, r1].concat());
        let (vx, vy) = ds.val_batch(4);
        assert_eq!(vx.len(), 64);
        assert_eq!(vx[..16].to_vec(), (0..16).collect::<Vec<u32>>());
        assert_eq!(vy[0], 1);
        // Errors name the file and the problem.
        let e = TokenDataset::open(&dir, 400, 16, 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train.bin") && e.contains(">= --vocab 400"),
            "{e}"
        );
        let e = TokenDataset::open(&dir, 500, 100, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("val.bin") && e.contains("tokens"), "{e}");
        std::fs::write(dir.join("val.bin"), [1u8, 2, 3]).unwrap();
        let e = TokenDataset::open(&dir, 500, 16, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("odd length"), "{e}");
        std::fs::remove_file(dir.join("val.bin")).unwrap();
        let e = TokenDataset::open(&dir, 500, 16, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("val.bin") && e.contains("cannot open"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
