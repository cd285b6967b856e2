//! Element types, reduction kernels and zero-copy access to CPU tensors.

use crate::error::{CommError, Result};
use crate::ReduceOp;
use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};
use half::{bf16, f16};
use std::cell::RefCell;

/// Elements per block in the reduction kernels (keeps the accumulator in L1).
const BLOCK: usize = 2048;

/// An element type the CPU backends can move and reduce.
pub(crate) trait Elem:
    bytemuck::Pod + bytemuck::Zeroable + candle_core::WithDType + Send + Sync + 'static
{
    /// `dst = op(srcs[0], srcs[1], ...)`, element-wise; `Avg` divides by `srcs.len()`.
    fn reduce(dst: &mut [Self], srcs: &[&[Self]], op: ReduceOp);
    /// The vector inside a CPU storage of this type.
    fn storage_vec(s: &mut CpuStorage) -> Option<&mut Vec<Self>>;
}

macro_rules! storage_vec {
    ($variant:ident) => {
        fn storage_vec(s: &mut CpuStorage) -> Option<&mut Vec<Self>> {
            match s {
                CpuStorage::$variant(v) => Some(v),
                _ => None,
            }
        }
    };
}

#[inline(always)]
fn combine_native<T: Copy>(dst: &mut [T], srcs: &[&[T]], f: impl Fn(T, T) -> T + Copy) {
    let len = dst.len();
    let mut start = 0;
    while start < len {
        let end = (start + BLOCK).min(len);
        let d = &mut dst[start..end];
        d.copy_from_slice(&srcs[0][start..end]);
        for s in &srcs[1..] {
            for (x, y) in d.iter_mut().zip(&s[start..end]) {
                *x = f(*x, *y);
            }
        }
        start = end;
    }
}

#[inline(always)]
fn combine_first_two<T: Copy>(dst: &mut [T], srcs: &[&[T]], f: impl Fn(T, T) -> T + Copy) {
    // Fused first pass: dst = f(s0, s1) without copying s0 first.
    let len = dst.len();
    let mut start = 0;
    while start < len {
        let end = (start + BLOCK).min(len);
        let d = &mut dst[start..end];
        let a = &srcs[0][start..end];
        let b = &srcs[1][start..end];
        for ((x, p), q) in d.iter_mut().zip(a).zip(b) {
            *x = f(*p, *q);
        }
        for s in &srcs[2..] {
            for (x, y) in d.iter_mut().zip(&s[start..end]) {
                *x = f(*x, *y);
            }
        }
        start = end;
    }
}

#[inline(always)]
fn combine<T: Copy>(dst: &mut [T], srcs: &[&[T]], f: impl Fn(T, T) -> T + Copy) {
    if srcs.len() >= 2 {
        combine_first_two(dst, srcs, f)
    } else {
        combine_native(dst, srcs, f)
    }
}

macro_rules! float_elem {
    ($t:ty, $v:ident) => {
        impl Elem for $t {
            storage_vec!($v);
            fn reduce(dst: &mut [Self], srcs: &[&[Self]], op: ReduceOp) {
                match op {
                    ReduceOp::Sum => combine(dst, srcs, |a, b| a + b),
                    ReduceOp::Avg => {
                        combine(dst, srcs, |a, b| a + b);
                        let n = srcs.len() as $t;
                        dst.iter_mut().for_each(|x| *x /= n);
                    }
                    ReduceOp::Min => combine(dst, srcs, |a: $t, b: $t| a.min(b)),
                    ReduceOp::Max => combine(dst, srcs, |a: $t, b: $t| a.max(b)),
                }
            }
        }
    };
}
float_elem!(f32, F32);
float_elem!(f64, F64);

macro_rules! int_elem {
    ($t:ty, $v:ident) => {
        impl Elem for $t {
            storage_vec!($v);
            fn reduce(dst: &mut [Self], srcs: &[&[Self]], op: ReduceOp) {
                match op {
                    ReduceOp::Sum => combine(dst, srcs, |a: $t, b: $t| a.wrapping_add(b)),
                    ReduceOp::Avg => {
                        combine(dst, srcs, |a: $t, b: $t| a.wrapping_add(b));
                        let n = srcs.len() as $t;
                        dst.iter_mut().for_each(|x| *x /= n);
                    }
                    ReduceOp::Min => combine(dst, srcs, |a: $t, b: $t| a.min(b)),
                    ReduceOp::Max => combine(dst, srcs, |a: $t, b: $t| a.max(b)),
                }
            }
        }
    };
}
int_elem!(u8, U8);
int_elem!(u32, U32);
int_elem!(i64, I64);

macro_rules! half_elem {
    ($t:ty, $v:ident) => {
        impl Elem for $t {
            storage_vec!($v);
            fn reduce(dst: &mut [Self], srcs: &[&[Self]], op: ReduceOp) {
                use half::slice::HalfFloatSliceExt;
                // Accumulate in f32, round once: the result does not depend on the rank order
                // more than an f32 sum does, and every rank computes the same bits.
                let mut acc = [0f32; BLOCK];
                let mut tmp = [0f32; BLOCK];
                let n = srcs.len() as f32;
                let len = dst.len();
                let mut start = 0;
                while start < len {
                    let end = (start + BLOCK).min(len);
                    let m = end - start;
                    let acc = &mut acc[..m];
                    let tmp = &mut tmp[..m];
                    srcs[0][start..end].convert_to_f32_slice(acc);
                    for s in &srcs[1..] {
                        s[start..end].convert_to_f32_slice(tmp);
                        match op {
                            ReduceOp::Sum | ReduceOp::Avg => {
                                acc.iter_mut().zip(tmp.iter()).for_each(|(a, b)| *a += *b)
                            }
                            ReduceOp::Min => acc
                                .iter_mut()
                                .zip(tmp.iter())
                                .for_each(|(a, b)| *a = a.min(*b)),
                            ReduceOp::Max => acc
                                .iter_mut()
                                .zip(tmp.iter())
                                .for_each(|(a, b)| *a = a.max(*b)),
                        }
                    }
                    if op == ReduceOp::Avg {
                        acc.iter_mut().for_each(|a| *a /= n);
                    }
                    dst[start..end].convert_from_f32_slice(acc);
                    start = end;
                }
            }
        }
    };
}
half_elem!(f16, F16);
half_elem!(bf16, BF16);

/// Runs `$body` with `$T` bound to the Rust element type of `$dtype`, or returns
/// [`CommError::UnsupportedDType`].
macro_rules! with_elem {
    ($dtype:expr, $op:expr, $T:ident => $body:expr) => {{
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $T = f64;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            candle_core::DType::U8 => {
                type $T = u8;
                $body
            }
            candle_core::DType::U32 => {
                type $T = u32;
                $body
            }
            candle_core::DType::I64 => {
                type $T = i64;
                $body
            }
            other => Err($crate::error::CommError::UnsupportedDType {
                op: $op.to_string(),
                dtype: format!("{other:?}"),
            }),
        }
    }};
}
pub(crate) use with_elem;

/// The dtypes every backend supports.
pub const SUPPORTED_DTYPES: [DType; 7] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F64,
    DType::U8,
    DType::U32,
    DType::I64,
];

/// `dst = op(dst, src)` element-wise (`Avg` is not meaningful here: pass `Sum` and divide
/// afterwards), block by block through a small copy of `dst` (the block stays in L1).
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) fn accumulate<T: Elem>(dst: &mut [T], src: &[T], op: ReduceOp) {
    let mut tmp = [T::zeroed(); BLOCK];
    for (d, s) in dst.chunks_mut(BLOCK).zip(src.chunks(BLOCK)) {
        let t = &mut tmp[..d.len()];
        t.copy_from_slice(d);
        T::reduce(d, &[t, s], op);
    }
}

/// Checks that `dtype` is one of [`SUPPORTED_DTYPES`].
pub(crate) fn check_dtype(op: &str, dtype: DType) -> Result<()> {
    if SUPPORTED_DTYPES.contains(&dtype) {
        Ok(())
    } else {
        Err(CommError::UnsupportedDType {
            op: op.to_string(),
            dtype: format!("{dtype:?}"),
        })
    }
}

/// A contiguous CPU tensor (a cheap clone of the caller's, or a contiguous copy).
pub(crate) fn cpu_contiguous(op: &str, t: &Tensor) -> Result<Tensor> {
    if !matches!(t.device(), Device::Cpu) {
        return Err(CommError::invalid(
            op,
            format!(
                "tensor is on {:?}; this backend takes CPU tensors",
                t.device().location()
            ),
        ));
    }
    check_dtype(op, t.dtype())?;
    Ok(t.contiguous()?)
}

/// Calls `f` with the elements of a contiguous CPU tensor (no copy).
pub(crate) fn with_slice<T: Elem, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| CommError::Tensor("tensor is not contiguous".into()))?;
    match &*storage {
        Storage::Cpu(cpu) => {
            let s = cpu.as_slice::<T>()?;
            Ok(f(&s[start..end]))
        }
        _ => Err(CommError::Tensor("tensor is not on the CPU".into())),
    }
}

/// An in-place op that hands the tensor's elements to a closure.
type SliceFn<'f, T, R> = Box<dyn FnOnce(&mut [T]) -> Result<R> + 'f>;

struct InPlace<'f, T, R> {
    f: RefCell<Option<SliceFn<'f, T, R>>>,
    out: RefCell<Option<Result<R>>>,
}

impl<T: Elem, R> candle_core::InplaceOp1 for InPlace<'_, T, R> {
    fn name(&self) -> &'static str {
        "ds-comm-in-place"
    }
    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let res = (|| {
            let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
                CommError::invalid("in-place collective", "the tensor must be contiguous")
            })?;
            let v = T::storage_vec(storage)
                .ok_or_else(|| CommError::Tensor("storage dtype does not match".into()))?;
            let f = self
                .f
                .borrow_mut()
                .take()
                .ok_or_else(|| CommError::Tensor("in-place op ran twice".into()))?;
            f(&mut v[start..end])
        })();
        *self.out.borrow_mut() = Some(res);
        Ok(())
    }
}

/// Calls `f` with the elements of a contiguous CPU tensor, writable in place (the tensor's storage
/// is locked for writing meanwhile).
pub(crate) fn with_slice_mut<T: Elem, R>(
    op: &str,
    t: &Tensor,
    f: impl FnOnce(&mut [T]) -> Result<R>,
) -> Result<R> {
    if !matches!(t.device(), Device::Cpu) {
        return Err(CommError::invalid(
            op,
            "in-place collectives on this backend take CPU tensors",
        ));
    }
    if !t.is_contiguous() {
        return Err(CommError::invalid(
            op,
            "in-place collectives need a contiguous tensor",
        ));
    }
    let op_ = InPlace::<T, R> {
        f: RefCell::new(Some(Box::new(f))),
        out: RefCell::new(None),
    };
    t.inplace_op1(&op_)?;
    op_.out
        .into_inner()
        .unwrap_or_else(|| Err(CommError::Tensor("in-place op did not run".into())))
}

/// Overwrites `dst` (contiguous CPU tensor) with the elements of `src` (same dtype and count).
pub(crate) fn copy_into(op: &str, dst: &Tensor, src: &Tensor) -> Result<()> {
    if dst.dtype() != src.dtype() || dst.elem_count() != src.elem_count() {
        return Err(CommError::invalid(
            op,
            "result does not match the tensor to overwrite",
        ));
    }
    let src = src.contiguous()?;
    with_elem!(dst.dtype(), op, T => {
        let v = to_vec::<T>(&src)?;
        with_slice_mut::<T, ()>(op, dst, |d| {
            d.copy_from_slice(&v);
            Ok(())
        })
    })
}

/// True when two tensors share one storage (taking a read lock on each in turn).
pub(crate) fn same_storage(a: &Tensor, b: &Tensor) -> bool {
    let pa = {
        let (g, _) = a.storage_and_layout();
        &*g as *const Storage as usize
    };
    let pb = {
        let (g, _) = b.storage_and_layout();
        &*g as *const Storage as usize
    };
    pa == pb
}

/// The address of the first element of a contiguous CPU tensor. The caller keeps a clone of
/// the tensor alive for as long as it uses the pointer.
pub(crate) fn data_ptr<T: Elem>(t: &Tensor) -> Result<*const T> {
    with_slice::<T, _>(t, |s| s.as_ptr())
}

/// Copies a contiguous CPU tensor into a `Vec`.
pub(crate) fn to_vec<T: Elem>(t: &Tensor) -> Result<Vec<T>> {
    with_slice::<T, _>(t, |s| s.to_vec())
}

/// A vector of zeros, allocated zeroed (fresh pages from the OS for large buffers, no memset).
pub(crate) fn zeroed<T: Elem>(n: usize) -> Vec<T> {
    bytemuck::allocation::zeroed_vec::<T>(n)
}

/// Builds a CPU tensor from a vector (no copy).
pub(crate) fn from_vec<T: Elem>(v: Vec<T>, dims: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

/// The range `[lo, hi)` of elements rank `r` of `n` owns in a buffer of `len` elements when it is
/// split into `n` partitions of `ceil(len / n)` (the last ones shorter or empty), as DeepSpeed's
/// padded partitions do.
pub fn partition_range(len: usize, n: usize, r: usize) -> (usize, usize) {
    let c = len.div_ceil(n.max(1));
    let lo = (r * c).min(len);
    let hi = ((r + 1) * c).min(len);
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduce_f32_ops() {
        let a = [1.0f32, 5.0, -3.0];
        let b = [2.0f32, 4.0, 7.0];
        let c = [3.0f32, 0.0, 1.0];
        let mut d = [0f32; 3];
        f32::reduce(&mut d, &[&a, &b, &c], ReduceOp::Sum);
        assert_eq!(d, [6.0, 9.0, 5.0]);
        f32::reduce(&mut d, &[&a, &b, &c], ReduceOp::Avg);
        assert_eq!(d, [2.0, 3.0, 5.0 / 3.0]);
        f32::reduce(&mut d, &[&a, &b, &c], ReduceOp::Min);
        assert_eq!(d, [1.0, 0.0, -3.0]);
        f32::reduce(&mut d, &[&a, &b, &c], ReduceOp::Max);
        assert_eq!(d, [3.0, 5.0, 7.0]);
        f32::reduce(&mut d, &[&a], ReduceOp::Sum);
        assert_eq!(d, a);
    }

    #[test]
    fn accumulate_in_place_over_blocks() {
        let n = BLOCK * 2 + 5;
        let src: Vec<i64> = (0..n as i64).map(|i| i % 7 - 3).collect();
        let mut d: Vec<i64> = (0..n as i64).collect();
        accumulate(&mut d, &src, ReduceOp::Sum);
        assert!(d.iter().enumerate().all(|(i, &x)| x == i as i64 + src[i]));
        let mut m: Vec<i64> = vec![0; n];
        accumulate(&mut m, &src, ReduceOp::Max);
        assert!(m.iter().zip(&src).all(|(&x, &s)| x == s.max(0)));
        accumulate(&mut m, &src, ReduceOp::Min);
        assert!(m.iter().zip(&src).all(|(&x, &s)| x == s));
    }

    #[test]
    fn reduce_half_long_buffer() {
        let n = BLOCK * 2 + 17;
        let a: Vec<bf16> = (0..n).map(|i| bf16::from_f32((i % 64) as f32)).collect();
        let b: Vec<bf16> = (0..n)
            .map(|i| bf16::from_f32(1.0 + (i % 3) as f32))
            .collect();
        let mut d = vec![bf16::ZERO; n];
        bf16::reduce(&mut d, &[&a, &b], ReduceOp::Sum);
        for (i, x) in d.iter().enumerate() {
            assert_eq!(x.to_f32(), (i % 64) as f32 + 1.0 + (i % 3) as f32, "at {i}");
        }
        bf16::reduce(&mut d, &[&a, &b], ReduceOp::Max);
        for (i, x) in d.iter().enumerate() {
            assert_eq!(x.to_f32(), ((i % 64) as f32).max(1.0 + (i % 3) as f32));
        }
    }

    #[test]
    fn int_avg_truncates_and_sum_wraps() {
        let a = [1u8, 200];
        let b = [2u8, 100];
        let mut d = [0u8; 2];
        u8::reduce(&mut d, &[&a, &b], ReduceOp::Avg);
        assert_eq!(d, [1, 22]); // (1+2)/2 = 1; (200+100) mod 256 = 44, /2 = 22
        i64::reduce(&mut [0i64; 1], &[&[1i64], &[2]], ReduceOp::Sum);
    }

    #[test]
    fn partitions_match_deepspeed_padding() {
        // ws=2, 1 element: rank 0 gets 1, rank 1 gets 0.
        assert_eq!(partition_range(1, 2, 0), (0, 1));
        assert_eq!(partition_range(1, 2, 1), (1, 1));
        // ws=2, 3 elements: [0,2) and [2,3).
        assert_eq!(partition_range(3, 2, 0), (0, 2));
        assert_eq!(partition_range(3, 2, 1), (2, 3));
        // ws=4, 5 elements: c=2: [0,2) [2,4) [4,5) [5,5).
        assert_eq!(partition_range(5, 4, 3), (5, 5));
        assert_eq!(partition_range(5, 4, 2), (4, 5));
    }
}
