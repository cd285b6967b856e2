//! DeepSpeed's FLOPs/MACs counting rules as pure functions.
//!
//! Every function returns an [`OpCost`] computed exactly as DeepSpeed's flops profiler
//! (`deepspeed/profiling/flops_profiler/profiler.py`) counts the corresponding
//! `torch.nn.functional` / tensor op. Shapes are candle dims (`tensor.dims()`).

use serde::Serialize;

/// FLOPs and MACs of one op invocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OpCost {
    /// Floating-point operations.
    pub flops: u64,
    /// Multiply-accumulate operations.
    pub macs: u64,
}

impl OpCost {
    /// A cost with the given FLOPs and MACs.
    pub const fn new(flops: u64, macs: u64) -> Self {
        Self { flops, macs }
    }
}

/// Activation kinds and how DeepSpeed counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `F.relu`: numel FLOPs.
    Relu,
    /// `F.prelu`: numel FLOPs.
    Prelu,
    /// `F.elu`: numel FLOPs.
    Elu,
    /// `F.leaky_relu`: numel FLOPs.
    LeakyRelu,
    /// `F.relu6`: numel FLOPs.
    Relu6,
    /// `F.silu`: numel FLOPs.
    Silu,
    /// `F.gelu`: numel FLOPs.
    Gelu,
    /// `torch.tanh`: 0 FLOPs (DeepSpeed does not patch it; its LeNet-5 numbers rely on this).
    Tanh,
    /// `torch.sigmoid`: 0 FLOPs (not patched by DeepSpeed).
    Sigmoid,
}

impl Activation {
    /// Lower-case op name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu => "relu",
            Activation::Prelu => "prelu",
            Activation::Elu => "elu",
            Activation::LeakyRelu => "leaky_relu",
            Activation::Relu6 => "relu6",
            Activation::Silu => "silu",
            Activation::Gelu => "gelu",
            Activation::Tanh => "tanh",
            Activation::Sigmoid => "sigmoid",
        }
    }
}

/// Product of a shape's dims (1 for a scalar shape).
pub fn numel(shape: &[usize]) -> u64 {
    shape.iter().map(|&d| d as u64).product()
}

/// `F.linear`: MACs = input numel * out_features, FLOPs = 2 * MACs (bias not counted).
pub fn linear(input_shape: &[usize], out_features: usize) -> OpCost {
    let macs = numel(input_shape) * out_features as u64;
    OpCost::new(2 * macs, macs)
}

/// `matmul`/`mm`/`bmm`/`@`: MACs = prod(A.shape) * B.shape[-1], FLOPs = 2 * MACs.
pub fn matmul(a_shape: &[usize], b_shape: &[usize]) -> OpCost {
    let last = b_shape.last().copied().unwrap_or(1) as u64;
    let macs = numel(a_shape) * last;
    OpCost::new(2 * macs, macs)
}

/// `addmm`/`baddbmm`: 2 * MACs + numel(input), MACs as for [`matmul`].
pub fn addmm(input_shape: &[usize], a_shape: &[usize], b_shape: &[usize]) -> OpCost {
    let m = matmul(a_shape, b_shape);
    OpCost::new(m.flops + numel(input_shape), m.macs)
}

/// `F.conv{1,2,3}d`: MACs = prod(kernel) * C_in * (C_out / groups) * N * prod(out_spatial),
/// FLOPs = 2 * MACs + (C_out * N * prod(out_spatial) if bias).
///
/// `input_shape` is `(N, C_in, spatial...)`, `output_shape` is `(N, C_out, out_spatial...)`.
pub fn conv(
    input_shape: &[usize],
    kernel_spatial: &[usize],
    output_shape: &[usize],
    groups: usize,
    bias: bool,
) -> OpCost {
    let n = input_shape.first().copied().unwrap_or(1) as u64;
    let c_in = input_shape.get(1).copied().unwrap_or(1) as u64;
    let c_out = output_shape.get(1).copied().unwrap_or(1) as u64;
    let out_spatial = numel(output_shape.get(2..).unwrap_or(&[]));
    let groups = groups.max(1) as u64;
    let macs = numel(kernel_spatial) * c_in * (c_out / groups) * n * out_spatial;
    let bias_flops = if bias { c_out * n * out_spatial } else { 0 };
    OpCost::new(2 * macs + bias_flops, macs)
}

/// `F.conv_transpose{1,2,3}d`: as [`conv`] but MACs use the *input* spatial size.
pub fn conv_transpose(
    input_shape: &[usize],
    kernel_spatial: &[usize],
    output_shape: &[usize],
    groups: usize,
    bias: bool,
) -> OpCost {
    let n = input_shape.first().copied().unwrap_or(1) as u64;
    let c_in = input_shape.get(1).copied().unwrap_or(1) as u64;
    let c_out = output_shape.get(1).copied().unwrap_or(1) as u64;
    let in_spatial = numel(input_shape.get(2..).unwrap_or(&[]));
    let out_spatial = numel(output_shape.get(2..).unwrap_or(&[]));
    let groups = groups.max(1) as u64;
    let macs = numel(kernel_spatial) * c_in * (c_out / groups) * n * in_spatial;
    let bias_flops = if bias { c_out * n * out_spatial } else { 0 };
    OpCost::new(2 * macs + bias_flops, macs)
}

/// `F.scaled_dot_product_attention`: MACs = prod(q) * L_k + prod(q[:-1]) * L_k * d_v,
/// FLOPs = 2 * MACs. `k_shape`'s second-to-last dim is L_k, `v_shape`'s last is d_v.
pub fn scaled_dot_product_attention(
    q_shape: &[usize],
    k_shape: &[usize],
    v_shape: &[usize],
) -> OpCost {
    let lk = if k_shape.len() >= 2 {
        k_shape[k_shape.len() - 2]
    } else {
        1
    } as u64;
    let dv = v_shape.last().copied().unwrap_or(1) as u64;
    let q_lead = numel(
        q_shape
            .get(..q_shape.len().saturating_sub(1))
            .unwrap_or(&[]),
    );
    let macs = numel(q_shape) * lk + q_lead * lk * dv;
    OpCost::new(2 * macs, macs)
}

/// Activations: numel FLOPs and 0 MACs, except `tanh`/`sigmoid` which DeepSpeed counts as 0.
pub fn activation(kind: Activation, shape: &[usize]) -> OpCost {
    match kind {
        Activation::Tanh | Activation::Sigmoid => OpCost::default(),
        _ => OpCost::new(numel(shape), 0),
    }
}

/// `F.softmax`/`log_softmax`: numel FLOPs.
pub fn softmax(shape: &[usize]) -> OpCost {
    OpCost::new(numel(shape), 0)
}

/// `F.layer_norm`/`group_norm`/`instance_norm`: numel * (5 if affine else 4) FLOPs.
pub fn norm(shape: &[usize], affine: bool) -> OpCost {
    OpCost::new(numel(shape) * if affine { 5 } else { 4 }, 0)
}

/// `F.batch_norm`: training numel * (5|4), eval numel * (2|1) FLOPs.
pub fn batch_norm(shape: &[usize], affine: bool, training: bool) -> OpCost {
    let per = match (training, affine) {
        (true, true) => 5,
        (true, false) => 4,
        (false, true) => 2,
        (false, false) => 1,
    };
    OpCost::new(numel(shape) * per, 0)
}

/// Pooling (avg/max/adaptive): input numel FLOPs.
pub fn pool(input_shape: &[usize]) -> OpCost {
    OpCost::new(numel(input_shape), 0)
}

/// `F.interpolate`/upsample: output numel FLOPs.
pub fn upsample(output_shape: &[usize]) -> OpCost {
    OpCost::new(numel(output_shape), 0)
}

/// Broadcast shape of two shapes (numpy rules; mismatched dims take the larger).
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Vec<usize> {
    let n = a.len().max(b.len());
    (0..n)
        .map(|i| {
            let da = if i + a.len() >= n {
                a[i + a.len() - n]
            } else {
                1
            };
            let db = if i + b.len() >= n {
                b[i + b.len() - n]
            } else {
                1
            };
            da.max(db)
        })
        .collect()
}

/// Elementwise add/mul/sub/div: numel of the broadcast shape FLOPs.
pub fn elementwise(a_shape: &[usize], b_shape: &[usize]) -> OpCost {
    OpCost::new(numel(&broadcast_shape(a_shape, b_shape)), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_10_10() {
        assert_eq!(linear(&[1, 10], 10), OpCost::new(200, 100));
    }

    #[test]
    fn sdpa_matches_two_matmuls() {
        let c = scaled_dot_product_attention(&[2, 4, 8, 16], &[2, 4, 8, 16], &[2, 4, 8, 16]);
        let qk = matmul(&[2, 4, 8, 16], &[2, 4, 16, 8]);
        let av = matmul(&[2, 4, 8, 8], &[2, 4, 8, 16]);
        assert_eq!(c.macs, qk.macs + av.macs);
    }

    #[test]
    fn broadcast() {
        assert_eq!(broadcast_shape(&[4, 1, 3], &[5, 3]), vec![4, 5, 3]);
        assert_eq!(elementwise(&[2, 3], &[3]).flops, 6);
    }
}
