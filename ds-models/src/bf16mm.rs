//! bf16 matrix products on the host's AVX-512 BF16 units (`vdpbf16ps`), with f32 accumulation.
//!
//! [`gemm()`] computes `C[m, n] = (acc ? C : 0) + scale * A[m, k] B[k, n]` for strided f32
//! operands (the contract of the explicit kernels' f32 GEMM): both operands are rounded to bf16
//! (round to nearest even, NaN kept NaN; [`round_bf16`]) while they are packed, the products
//! of bf16 pairs are summed in f32, and `C` stays f32.
//!
//! Layout (what `vdpbf16ps` wants): the depth `k` is taken in pairs `(k, k + 1)` (an odd depth
//! is padded with a zero). A packed B vector holds, for one pair of `k` and 16 consecutive
//! columns, the 16 pairs `(b[k, j], b[k + 1, j])` (32 bf16, 512 bits); a packed A value holds
//! the pair `(a[i, k], a[i, k + 1])` as one 32-bit value that is broadcast to the 16 lanes. The
//! micro-kernel keeps an `MR x 32` tile of C in 2 x `MR` accumulators (16 f32 lanes each).
//! B is packed [`KC`] deep and [`NB`] wide at a time, A [`MB`] rows by [`KC`] at a time (the
//! packing scratch stays bounded, about 1.5 MiB per calling thread); within such a block, tiles
//! of [`MC`] rows by [`NC`] columns run in parallel over rayon's pool when `threads > 1`.
//!
//! The micro-kernel is written once over the vector operations of the [`Lanes`] trait, with two
//! implementations: the AVX-512 BF16 instructions (`Avx512Bf16`, a handful of intrinsics,
//! picked only where the CPU has them) and [`Emulated`], 16 scalar f32 lanes that reproduce
//! `VDPBF16PS` as Intel documents it (denormal inputs and outputs flushed to zero, round to
//! nearest even). The emulation is slow: it exists so that everything but the instruction layer
//! is tested on any machine, and is never picked unless asked for (`DS_BF16_UNITS=emulate`).
//!
//! Which units run is decided once per process by [`units`]: the CPU's AVX512_BF16 (when the
//! CPU reports it and [`ds_simd::level`] allows AVX-512, i.e. `DS_SIMD` does not lower it), else
//! none; the environment variable [`ENV`] (`avx512bf16`, `emulate`, `none`) overrides that.
//!
//! AMX (`tdpbf16ps`, Sapphire Rapids and later) is not used yet: it needs inline assembly for
//! the tile instructions and the kernel's permission (`arch_prctl(ARCH_REQ_XCOMP_PERM)`) for
//! the tile state, and could not be tested where this was written. On a CPU with AMX the
//! AVX-512 BF16 path runs.

use rayon::prelude::*;
use std::sync::OnceLock;

/// Rows of the micro-kernel's tile of C.
pub const MR: usize = 8;
/// Columns of the micro-kernel's tile of C (two vectors of 16 f32 lanes).
pub const NR: usize = 32;
/// Depth of one packed block (even, so that blocks split no pair).
pub const KC: usize = 256;
/// Rows of C one task computes within a depth block (a multiple of [`MR`]).
pub const MC: usize = 128;
/// Columns of C one task computes within a depth block (a multiple of [`NR`]).
pub const NC: usize = 256;
/// Rows of A packed at a time (a multiple of [`MC`]): 1024 x [`KC`] bf16 values, 512 KiB.
pub const MB: usize = 1024;
/// Columns of B packed at a time (a multiple of [`NC`]): [`KC`] x 2048 bf16 values, 1 MiB.
pub const NB: usize = 2048;

const _: () = assert!(
    KC.is_multiple_of(2)
        && MC.is_multiple_of(MR)
        && NC.is_multiple_of(NR)
        && MB.is_multiple_of(MC)
        && NB.is_multiple_of(NC)
);

// ------------------------------------------------------------------ rounding

/// `x` rounded to bf16 (the upper 16 bits of an f32), round to nearest even; a NaN stays a NaN
/// (quieted, sign and upper payload kept), infinities and signed zeros are kept, values above
/// bf16's largest finite value round to infinity. Denormals are rounded like any other value
/// (the instruction flushes them when it reads them). The same bits as `half::bf16::from_f32`.
#[inline(always)]
pub fn round_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        return ((b >> 16) | 0x0040) as u16;
    }
    // Adding 0x7FFF plus the lowest kept bit rounds to nearest, ties to even; a carry into
    // the exponent is the correct rounding up (to infinity past the largest finite value).
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 whose upper half is the bf16 `h` (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

// ------------------------------------------------------------------ units

/// Which bf16 matrix-product units run [`gemm()`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bf16Units {
    /// The CPU's AVX-512 BF16 instructions (`vdpbf16ps`).
    Avx512Bf16,
    /// 16 scalar lanes reproducing `vdpbf16ps` (slow; for tests on any machine).
    Emulated,
    /// The bf16 GEMM of the CBLAS library `DS_BLAS` names (MKL's `cblas_gemm_bf16bf16f32`,
    /// which runs on AMX tiles or AVX-512 BF16 where the processor has them):
    /// [`crate::blas`].
    Blas,
    /// No bf16 units: matrix products stay f32.
    None,
}

impl Bf16Units {
    /// The name [`ENV`] takes for these units.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Units::Avx512Bf16 => "avx512bf16",
            Bf16Units::Emulated => "emulate",
            Bf16Units::Blas => "blas",
            Bf16Units::None => "none",
        }
    }

    /// Whether these units compute (not [`Bf16Units::None`]).
    pub fn active(self) -> bool {
        self != Bf16Units::None
    }
}

impl std::fmt::Display for Bf16Units {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Bf16Units::Avx512Bf16 => "AVX-512 BF16 (vdpbf16ps)",
            Bf16Units::Emulated => "emulated vdpbf16ps (scalar, slow)",
            Bf16Units::Blas => "the DS_BLAS library's bf16 GEMM (MKL: AMX or AVX-512 BF16)",
            Bf16Units::None => "none",
        })
    }
}

/// The environment variable that overrides [`units`]: `avx512bf16`, `emulate` or `none`
/// (case-insensitive; empty or `auto` means what [`detect`] finds).
pub const ENV: &str = "DS_BF16_UNITS";

/// Whether this CPU (and its operating system) runs the AVX-512 BF16 instructions.
pub fn cpu_has_avx512bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has AMX tiles for bf16 (`amx_bf16` in `/proc/cpuinfo`'s flags; the
/// operating system must also grant the tile state, which MKL requests itself).
pub fn cpu_has_amx_bf16() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|t| {
            t.lines()
                .find(|l| l.starts_with("flags"))
                .is_some_and(|l| l.split_whitespace().any(|f| f == "amx_bf16"))
        })
    })
}

/// Whether the `DS_BLAS` library is open and has a bf16 GEMM ([`crate::blas::Blas::has_bf16`]).
pub fn blas_has_bf16() -> bool {
    crate::blas::init()
        .ok()
        .flatten()
        .is_some_and(|b| b.has_bf16())
}

/// The units picked without an override: the `DS_BLAS` library's bf16 GEMM where it has one
/// and the CPU has AMX (MKL's AMX kernels); else AVX-512 BF16 where the CPU has it and
/// [`ds_simd::level`] is AVX-512 (`DS_SIMD=avx2` or `scalar` keeps AVX-512 off); else
/// [`Bf16Units::None`]. Never [`Bf16Units::Emulated`].
pub fn detect() -> Bf16Units {
    if cpu_has_amx_bf16() && blas_has_bf16() {
        Bf16Units::Blas
    } else if cpu_has_avx512bf16() && ds_simd::level() >= ds_simd::Level::Avx512 {
        Bf16Units::Avx512Bf16
    } else {
        Bf16Units::None
    }
}

/// The units an override `var` (the value of [`ENV`], if set) gives where [`detect`] finds
/// `detected` and the CPU has (`has_hw`) or lacks AVX512_BF16, and the warning to print when the
/// value is not taken as it is (an unknown value, or `avx512bf16` on a CPU without it: the
/// detected units run instead).
pub fn resolve(
    detected: Bf16Units,
    has_hw: bool,
    var: Option<&str>,
) -> (Bf16Units, Option<String>) {
    let Some(v) = var else {
        return (detected, None);
    };
    let t = v.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("auto") {
        return (detected, None);
    }
    if t.eq_ignore_ascii_case("none") {
        (Bf16Units::None, None)
    } else if t.eq_ignore_ascii_case("emulate") || t.eq_ignore_ascii_case("emulated") {
        (Bf16Units::Emulated, None)
    } else if t.eq_ignore_ascii_case("blas") {
        if blas_has_bf16() {
            (Bf16Units::Blas, None)
        } else {
            (
                detected,
                Some(format!(
                    "{ENV}={v}: no DS_BLAS library with a bf16 GEMM (cblas_gemm_bf16bf16f32, e.g. MKL's libmkl_rt) is open; bf16 units: {}",
                    detected.name()
                )),
            )
        }
    } else if t.eq_ignore_ascii_case("avx512bf16") {
        if has_hw {
            (Bf16Units::Avx512Bf16, None)
        } else {
            (
                detected,
                Some(format!(
                    "{ENV}={v}: this CPU has no AVX512_BF16 instructions; bf16 units: {}",
                    detected.name()
                )),
            )
        }
    } else {
        (
            detected,
            Some(format!(
                "{ENV}={v}: unknown value (allowed: avx512bf16, blas, emulate, none, auto); bf16 units: {}",
                detected.name()
            )),
        )
    }
}

/// The units [`gemm()`] runs on by default: [`detect`], overridden by [`ENV`]. Read once per
/// process; a value that cannot be honoured prints one warning on stderr and is ignored.
pub fn units() -> Bf16Units {
    static UNITS: OnceLock<Bf16Units> = OnceLock::new();
    *UNITS.get_or_init(|| {
        let var = std::env::var(ENV).ok();
        let (u, warning) = resolve(detect(), cpu_has_avx512bf16(), var.as_deref());
        if let Some(w) = warning {
            eprintln!("warning: {w}");
        }
        u
    })
}

// ------------------------------------------------------------------ vector operations

/// The vector operations the micro-kernel is written over: one implementation per kind of
/// bf16 units. All methods are `unsafe`: the pointers must be valid for what they read or write,
/// and an implementation may need CPU features (checked before its kernel is called).
pub trait Lanes: Copy {
    /// 16 f32 lanes (an accumulator).
    type Acc: Copy;
    /// 16 bf16 pairs (a packed B vector, or a broadcast A pair).
    type Pairs: Copy;
    /// An accumulator of zeros.
    ///
    /// # Safety
    /// The CPU runs the implementation's instructions.
    unsafe fn zero() -> Self::Acc;
    /// The packed B vector at `p`: 32 bf16 values (16 lanes of `(lo, hi)`).
    ///
    /// # Safety
    /// The CPU runs the implementation's instructions; `p` points to 32 readable u16 values.
    unsafe fn load_b(p: *const u16) -> Self::Pairs;
    /// The packed A pair at `p` (`lo | hi << 16`) in every lane.
    ///
    /// # Safety
    /// The CPU runs the implementation's instructions; `p` points to a readable u32.
    unsafe fn broadcast_a(p: *const u32) -> Self::Pairs;
    /// Per lane: `acc + a.hi * b.hi + a.lo * b.lo` (`vdpbf16ps`).
    ///
    /// # Safety
    /// The CPU runs the implementation's instructions.
    unsafe fn dot_pairs(acc: Self::Acc, a: Self::Pairs, b: Self::Pairs) -> Self::Acc;
    /// `c[..lanes] = (add ? c[..lanes] : 0) + scale * acc[..lanes]` (`lanes <= 16`; a product
    /// then a sum, both rounded).
    ///
    /// # Safety
    /// The CPU runs the implementation's instructions; `c` points to `lanes` writable f32 values.
    unsafe fn update(c: *mut f32, lanes: usize, acc: Self::Acc, scale: f32, add: bool);
}

/// `vdpbf16ps` in 16 scalar f32 lanes, as Intel documents it: per lane
/// `t = acc; t += f32(a.hi) * f32(b.hi); t += f32(a.lo) * f32(b.lo)` with round to nearest even,
/// denormal inputs (the bf16 values and the accumulator) read as zero and denormal results
/// flushed to zero (the products of two bf16 values are exact in f32 but for their range, so a
/// product that falls below the normal range is flushed too), whatever MXCSR says.
#[derive(Debug, Clone, Copy)]
pub struct Emulated;

/// `x` with a denormal replaced by a zero of its sign (DAZ / FTZ).
#[inline(always)]
fn ftz(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

impl Lanes for Emulated {
    type Acc = [f32; 16];
    type Pairs = [u32; 16];

    #[inline(always)]
    unsafe fn zero() -> [f32; 16] {
        [0.0; 16]
    }

    #[inline(always)]
    unsafe fn load_b(p: *const u16) -> [u32; 16] {
        // SAFETY: the caller passes 32 readable u16 values.
        let v = unsafe { std::slice::from_raw_parts(p, 32) };
        std::array::from_fn(|j| u32::from(v[2 * j]) | (u32::from(v[2 * j + 1]) << 16))
    }

    #[inline(always)]
    unsafe fn broadcast_a(p: *const u32) -> [u32; 16] {
        // SAFETY: the caller passes a readable u32.
        [unsafe { p.read_unaligned() }; 16]
    }

    #[inline(always)]
    unsafe fn dot_pairs(acc: [f32; 16], a: [u32; 16], b: [u32; 16]) -> [f32; 16] {
        let lo = |x: u32| ftz(bf16_to_f32(x as u16));
        let hi = |x: u32| ftz(bf16_to_f32((x >> 16) as u16));
        std::array::from_fn(|j| {
            let t = ftz(acc[j]);
            let t = ftz(t + ftz(hi(a[j]) * hi(b[j])));
            ftz(t + ftz(lo(a[j]) * lo(b[j])))
        })
    }

    #[inline(always)]
    unsafe fn update(c: *mut f32, lanes: usize, acc: [f32; 16], scale: f32, add: bool) {
        // SAFETY: the caller passes `lanes <= 16` writable values.
        let c = unsafe { std::slice::from_raw_parts_mut(c, lanes) };
        for (o, &v) in c.iter_mut().zip(&acc) {
            let s = scale * v;
            *o = if add { *o + s } else { s };
        }
    }
}

/// The AVX-512 BF16 instructions. Its methods may only run where [`cpu_has_avx512bf16`]
/// holds, inlined into a function compiled with `avx512f,avx512bf16`.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
struct Avx512Bf16;

#[cfg(target_arch = "x86_64")]
impl Lanes for Avx512Bf16 {
    type Acc = std::arch::x86_64::__m512;
    type Pairs = std::arch::x86_64::__m512bh;

    #[inline(always)]
    unsafe fn zero() -> Self::Acc {
        // SAFETY: AVX-512 F is present (see the impl's contract).
        unsafe { std::arch::x86_64::_mm512_setzero_ps() }
    }

    #[inline(always)]
    unsafe fn load_b(p: *const u16) -> Self::Pairs {
        use std::arch::x86_64::*;
        // SAFETY: 64 readable bytes at `p`; __m512i and __m512bh are both 512 plain bits.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast())) }
    }

    #[inline(always)]
    unsafe fn broadcast_a(p: *const u32) -> Self::Pairs {
        use std::arch::x86_64::*;
        // SAFETY: a readable u32 at `p`; __m512i and __m512bh are both 512 plain bits.
        unsafe {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(p.read_unaligned() as i32))
        }
    }

    #[inline(always)]
    unsafe fn dot_pairs(acc: Self::Acc, a: Self::Pairs, b: Self::Pairs) -> Self::Acc {
        // SAFETY: AVX512_BF16 is present (see the impl's contract).
        unsafe { std::arch::x86_64::_mm512_dpbf16_ps(acc, a, b) }
    }

    #[inline(always)]
    unsafe fn update(c: *mut f32, lanes: usize, acc: Self::Acc, scale: f32, add: bool) {
        use std::arch::x86_64::*;
        let mask: __mmask16 = if lanes >= 16 {
            0xFFFF
        } else {
            (1u16 << lanes) - 1
        };
        // SAFETY: `lanes` writable values at `c`; the masked load and store touch no others.
        unsafe {
            let s = _mm512_mul_ps(_mm512_set1_ps(scale), acc);
            let r = if add {
                _mm512_add_ps(_mm512_maskz_loadu_ps(mask, c), s)
            } else {
                s
            };
            _mm512_mask_storeu_ps(c, mask, r);
        }
    }
}

// ------------------------------------------------------------------ micro-kernel

/// One `MR x NR` tile: `C[..mr, ..nr] = (add ? C : 0) + scale * sum over `pairs` of the packed
/// A panel (`[pair][MR]` u32) times the packed B panel (`[pair][NR pairs]` u16).
///
/// # Safety
/// `a` holds `pairs * MR` values, `b` `pairs * 2 * NR`, `c` rows `0..mr` of `nr` values at
/// stride `ldc`; `U`'s operations must run on this CPU.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<U: Lanes>(
    pairs: usize,
    a: *const u32,
    b: *const u16,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    scale: f32,
    add: bool,
) {
    // SAFETY: see the function's contract.
    unsafe {
        let mut acc = [[U::zero(); 2]; MR];
        for p in 0..pairs {
            let b0 = U::load_b(b.add(p * 2 * NR));
            let b1 = U::load_b(b.add(p * 2 * NR + NR));
            let ap = a.add(p * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = U::broadcast_a(ap.add(i));
                row[0] = U::dot_pairs(row[0], ai, b0);
                row[1] = U::dot_pairs(row[1], ai, b1);
            }
        }
        for (i, row) in acc.iter().enumerate().take(mr) {
            let ci = c.add(i * ldc);
            U::update(ci, nr.min(16), row[0], scale, add);
            if nr > 16 {
                U::update(ci.add(16), nr - 16, row[1], scale, add);
            }
        }
    }
}

/// A micro-kernel compiled for one kind of units.
type Micro = unsafe fn(usize, *const u32, *const u16, *mut f32, usize, usize, usize, f32, bool);

/// [`micro`] on [`Emulated`] lanes.
///
/// # Safety
/// As [`micro`].
#[allow(clippy::too_many_arguments)]
unsafe fn micro_emulated(
    pairs: usize,
    a: *const u32,
    b: *const u16,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    scale: f32,
    add: bool,
) {
    // SAFETY: as the caller's; the emulation needs no CPU feature.
    unsafe { micro::<Emulated>(pairs, a, b, c, ldc, mr, nr, scale, add) }
}

/// [`micro`] on the AVX-512 BF16 instructions.
///
/// # Safety
/// As [`micro`], on a CPU with AVX-512 F and AVX512_BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_avx512bf16(
    pairs: usize,
    a: *const u32,
    b: *const u16,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    scale: f32,
    add: bool,
) {
    // SAFETY: as the caller's, who checked the CPU features.
    unsafe { micro::<Avx512Bf16>(pairs, a, b, c, ldc, mr, nr, scale, add) }
}

// ------------------------------------------------------------------ packing

/// A strided f32 operand: element (i, j) at `data[off + i * rs + j * cs]`.
#[derive(Debug, Clone, Copy)]
pub struct Operand<'a> {
    /// The values.
    pub data: &'a [f32],
    /// Offset of element (0, 0).
    pub off: usize,
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl Operand<'_> {
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[self.off + i * self.rs + j * self.cs]
    }
}

/// Whether a `rows x cols` operand with these strides stays inside `len` values.
fn fits(len: usize, off: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    rows == 0 || cols == 0 || off + (rows - 1) * rs + (cols - 1) * cs < len
}

/// Handles a product with nothing to multiply (`m`, `n` or `k` zero: C untouched, or zeroed
/// rows where `k` is 0 and `acc` is off) and says whether it was one.
pub(crate) fn empty_product(
    c: &mut [f32],
    coff: usize,
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    acc: bool,
) -> bool {
    if m == 0 || n == 0 {
        return true;
    }
    if k > 0 {
        return false;
    }
    if !acc {
        for r in 0..m {
            c[coff + r * ldc..coff + r * ldc + n].fill(0.0);
        }
    }
    true
}

/// Asserts that `C[m,n]` (row stride `ldc`, offset `coff`, in `c_len` values), `A[m,k]` and
/// `B[k,n]` lie inside their slices (`what` names the product in the message): the bounds
/// every product here (this module's and the f32 one in [`crate::gpt::fast`]) checks before
/// it hands raw pointers to a kernel.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_operands(
    what: &str,
    c_len: usize,
    coff: usize,
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    a: &Operand<'_>,
    b: &Operand<'_>,
) {
    assert!(fits(c_len, coff, m, n, ldc, 1), "{what}: C out of range");
    assert!(
        fits(a.data.len(), a.off, m, k, a.rs, a.cs),
        "{what}: A out of range"
    );
    assert!(
        fits(b.data.len(), b.off, k, n, b.rs, b.cs),
        "{what}: B out of range"
    );
}

/// One `MR`-row panel of A (rows `i0..`, depth `k0..k0 + kc`) into `out` (`[pair][MR]`):
/// rows past `m` and the depth past `kc` padded with zeros.
fn pack_a_panel(a: &Operand<'_>, m: usize, i0: usize, k0: usize, kc: usize, out: &mut [u32]) {
    let pairs = kc.div_ceil(2);
    for (p, chunk) in out.chunks_exact_mut(MR).take(pairs).enumerate() {
        let (k, has_hi) = (k0 + 2 * p, 2 * p + 1 < kc);
        for (r, o) in chunk.iter_mut().enumerate() {
            let i = i0 + r;
            *o = if i < m {
                let lo = u32::from(round_bf16(a.at(i, k)));
                let hi = if has_hi {
                    u32::from(round_bf16(a.at(i, k + 1)))
                } else {
                    0
                };
                lo | (hi << 16)
            } else {
                0
            };
        }
    }
}

/// One `NR`-column panel of B (columns `j0..`, depth `k0..k0 + kc`) into `out`
/// (`[pair][NR][lo, hi]`): columns past `n` and the depth past `kc` padded with zeros.
fn pack_b_panel(b: &Operand<'_>, n: usize, j0: usize, k0: usize, kc: usize, out: &mut [u16]) {
    let pairs = kc.div_ceil(2);
    let nr = NR.min(n - j0);
    for (p, chunk) in out.chunks_exact_mut(2 * NR).take(pairs).enumerate() {
        let (k, has_hi) = (k0 + 2 * p, 2 * p + 1 < kc);
        for (j, pair) in chunk.chunks_exact_mut(2).enumerate() {
            if j < nr {
                pair[0] = round_bf16(b.at(k, j0 + j));
                pair[1] = if has_hi {
                    round_bf16(b.at(k + 1, j0 + j))
                } else {
                    0
                };
            } else {
                pair[0] = 0;
                pair[1] = 0;
            }
        }
    }
}

/// A raw pointer that may cross threads: each task writes a disjoint region of C.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint tiles of one buffer to parallel tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    /// Packing scratch (A panels, B panels), kept per thread between calls.
    static SCRATCH: std::cell::RefCell<(Vec<u32>, Vec<u16>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

// ------------------------------------------------------------------ the product

/// `C[m, n]` (row stride `ldc`, from `c[coff]`) `= (acc ? C : 0) + scale * A[m, k] B[k, n]` on
/// the bf16 `units`: A and B rounded to bf16, products summed in f32. `threads > 1` splits the
/// tiles over rayon's pool.
///
/// # Panics
/// When an operand does not fit its slice, when `units` is [`Bf16Units::None`], or when it is
/// [`Bf16Units::Avx512Bf16`] on a CPU without those instructions (check [`units`] or
/// [`cpu_has_avx512bf16`] first). All of these are errors of the caller, not of its input.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    units: Bf16Units,
    threads: usize,
    m: usize,
    n: usize,
    k: usize,
    c: &mut [f32],
    coff: usize,
    ldc: usize,
    acc: bool,
    a: Operand<'_>,
    b: Operand<'_>,
    scale: f32,
) {
    check_operands("bf16 gemm", c.len(), coff, ldc, m, n, k, &a, &b);
    if units == Bf16Units::Blas {
        if let Some(lib) = crate::blas::init().ok().flatten() {
            if lib.product(threads, true, m, n, k, c, coff, ldc, acc, &a, &b, scale) {
                return;
            }
        }
    }
    let kernel: Micro = match units {
        Bf16Units::Emulated => micro_emulated,
        // Only where the library declined (a size past 32 bits) or is absent: the same
        // rounding and f32 sums on the hardware kernel if there is one, else emulated.
        #[cfg(target_arch = "x86_64")]
        Bf16Units::Blas if cpu_has_avx512bf16() => micro_avx512bf16,
        Bf16Units::Blas => micro_emulated,
        #[cfg(target_arch = "x86_64")]
        Bf16Units::Avx512Bf16 => {
            assert!(
                cpu_has_avx512bf16(),
                "bf16 gemm: this CPU has no AVX512_BF16 instructions"
            );
            micro_avx512bf16
        }
        #[cfg(not(target_arch = "x86_64"))]
        Bf16Units::Avx512Bf16 => panic!("bf16 gemm: AVX512_BF16 exists on x86-64 only"),
        Bf16Units::None => panic!("bf16 gemm: no bf16 units (use the f32 product)"),
    };
    if empty_product(c, coff, ldc, m, n, k, acc) {
        return;
    }
    let pairs_max = KC.min(k).div_ceil(2);
    let (mut pa, mut pb) = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    pa.resize(MB.min(m).div_ceil(MR) * pairs_max * MR, 0);
    pb.resize(NB.min(n).div_ceil(NR) * pairs_max * 2 * NR, 0);
    let par = threads > 1;
    let cp = SendPtr(c[coff..].as_mut_ptr());
    // Column blocks of NB, depth blocks of KC (B packed once per pair of them), row blocks of
    // MB (A packed once per column and depth block); within a block, tiles of MC x NC rows and
    // columns are the parallel tasks.
    for j0 in (0..n).step_by(NB) {
        let nb = NB.min(n - j0);
        let panels_b = nb.div_ceil(NR);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let pairs = kc.div_ceil(2);
            let (la, lb) = (pairs * MR, pairs * 2 * NR);
            let pb = &mut pb[..panels_b * lb];
            let fill_b =
                |(q, out): (usize, &mut [u16])| pack_b_panel(&b, n, j0 + q * NR, k0, kc, out);
            if par {
                pb.par_chunks_mut(lb).enumerate().for_each(fill_b);
            } else {
                pb.chunks_mut(lb).enumerate().for_each(fill_b);
            }
            let pb = &*pb;
            let add = acc || k0 > 0;
            for i0 in (0..m).step_by(MB) {
                let mb = MB.min(m - i0);
                let panels_a = mb.div_ceil(MR);
                let pa = &mut pa[..panels_a * la];
                let fill_a =
                    |(q, out): (usize, &mut [u32])| pack_a_panel(&a, m, i0 + q * MR, k0, kc, out);
                if par {
                    pa.par_chunks_mut(la).enumerate().for_each(fill_a);
                } else {
                    pa.chunks_mut(la).enumerate().for_each(fill_a);
                }
                let pa = &*pa;
                let (tiles_m, tiles_n) = (mb.div_ceil(MC), nb.div_ceil(NC));
                let tile = |t: usize| {
                    // Rows and columns relative to the block.
                    let (tm, tn) = (t / tiles_n, t % tiles_n);
                    let (r0, r1) = (tm * MC, ((tm + 1) * MC).min(mb));
                    let (s0, s1) = (tn * NC, ((tn + 1) * NC).min(nb));
                    for s in (s0..s1).step_by(NR) {
                        let bp = &pb[(s / NR) * lb..][..lb];
                        for r in (r0..r1).step_by(MR) {
                            let ap = &pa[(r / MR) * la..][..la];
                            let (i, j) = (i0 + r, j0 + s);
                            // SAFETY: the panels hold `pairs` pairs; rows i..i + mr and
                            // columns j..j + nr of C lie inside `c` (checked above) and belong
                            // to this tile only; `kernel` was checked to run on this CPU.
                            unsafe {
                                kernel(
                                    pairs,
                                    ap.as_ptr(),
                                    bp.as_ptr(),
                                    cp.get().add(i * ldc + j),
                                    ldc,
                                    MR.min(m - i),
                                    NR.min(n - j),
                                    scale,
                                    add,
                                );
                            }
                        }
                    }
                };
                if par && tiles_m * tiles_n > 1 {
                    (0..tiles_m * tiles_n).into_par_iter().for_each(tile);
                } else {
                    (0..tiles_m * tiles_n).for_each(tile);
                }
            }
        }
    }
    SCRATCH.with(|s| *s.borrow_mut() = (pa, pb));
}

/// `C = A B` for row-major `A` (m, k) and `B` (k, n) on the bf16 `units` with `threads`
/// threads (see [`gemm()`]); `None` when the lengths do not match the shape or `units` cannot
/// run here.
pub fn matmul(
    units: Bf16Units,
    threads: usize,
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
) -> Option<Vec<f32>> {
    let runs = match units {
        Bf16Units::Emulated => true,
        Bf16Units::Avx512Bf16 => cpu_has_avx512bf16(),
        Bf16Units::Blas => blas_has_bf16(),
        Bf16Units::None => false,
    };
    if !runs || a.len() != m * k || b.len() != k * n {
        return None;
    }
    let mut c = vec![0f32; m * n];
    let op = |data, rs| Operand {
        data,
        off: 0,
        rs,
        cs: 1,
    };
    gemm(
        units,
        threads,
        m,
        n,
        k,
        &mut c,
        0,
        n,
        false,
        op(a, k),
        op(b, n),
        1.0,
    );
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic generator of test values.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 11
        }
        /// Values in (-2, 2) with magnitudes spread over a few binades.
        fn value(&mut self) -> f32 {
            let u = (self.next() as f64 / (1u64 << 53) as f64) * 4.0 - 2.0;
            let e = (self.next() % 6) as i32 - 3;
            (u * 2f64.powi(e)) as f32
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.value()).collect()
        }
    }

    const U32: f64 = 1.0 / (1u64 << 24) as f64; // f32 unit roundoff
    const U16: f64 = 1.0 / 256.0; // bf16 unit roundoff

    fn rounded(x: f32) -> f32 {
        bf16_to_f32(round_bf16(x))
    }

    /// The DAZ'd bf16 value `vdpbf16ps` reads for `x`.
    fn as_read(x: f32) -> f64 {
        f64::from(ftz(rounded(x)))
    }

    #[test]
    fn rounding_matches_half() {
        let half = |x: f32| half::bf16::from_f32(x).to_bits();
        let mut specials = vec![
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7F80_0001), // signalling NaN
            f32::from_bits(0xFFC1_2345),
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::from_bits(1), // smallest denormal
            f32::from_bits(0x0000_8000),
            f32::from_bits(0x0001_8000),
            f32::from_bits(0x807F_FFFF),
            f32::from_bits(0x7F7F_8000), // rounds up to infinity
            f32::from_bits(0x7F7F_7FFF),
        ];
        // Ties to even both ways, just below and above a tie, around 1.
        for hi in [0x3F80u32, 0x3F81, 0xBF80, 0xBF81, 0x0001, 0x0080] {
            for lo in [0x8000u32, 0x7FFF, 0x8001, 0, 0xFFFF] {
                specials.push(f32::from_bits((hi << 16) | lo));
            }
        }
        for &x in &specials {
            let (got, want) = (round_bf16(x), half(x));
            if x.is_nan() {
                assert!(bf16_to_f32(got).is_nan(), "{x:e} ({:#x})", x.to_bits());
            }
            assert_eq!(got, want, "{x:e} ({:#x})", x.to_bits());
        }
        let mut g = Lcg(9);
        for _ in 0..1_000_000 {
            let x = f32::from_bits(g.next() as u32);
            assert_eq!(round_bf16(x), half(x), "{:#x}", x.to_bits());
        }
        println!("bf16 rounding: round_bf16 == half::bf16::from_f32 on 1e6 random bit patterns");
    }

    #[test]
    fn emulated_dot_follows_intels_definition() {
        let pair = |lo: f32, hi: f32| u32::from(round_bf16(lo)) | (u32::from(round_bf16(hi)) << 16);
        let lanes = |x: u32| [x; 16];
        let run = |acc: f32, a: u32, b: u32| {
            // SAFETY: the emulation has no requirement.
            unsafe { Emulated::dot_pairs([acc; 16], lanes(a), lanes(b))[0] }
        };
        // The high pair is added first: 1 + 2^24 rounds to 2^24 (tie to even), then -2^24.
        let big = 16_777_216.0f32;
        assert_eq!(run(1.0, pair(-big, 1.0), pair(1.0, big)), 0.0);
        // Plain sum.
        assert_eq!(run(0.5, pair(2.0, 3.0), pair(4.0, 5.0)), 0.5 + 15.0 + 8.0);
        // Denormal inputs read as zero: a denormal bf16 times a huge one gives nothing.
        let den = f32::from_bits(0x0040_0000);
        assert_eq!(run(1.0, pair(den, 0.0), pair(2f32.powi(100), 0.0)), 1.0);
        // A product below the normal range is flushed, and so is a denormal accumulator.
        let tiny = 2f32.powi(-70);
        assert_eq!(run(0.0, pair(tiny, 0.0), pair(tiny, 0.0)), 0.0);
        assert_eq!(run(f32::from_bits(5), pair(0.0, 0.0), pair(0.0, 0.0)), 0.0);
        // NaN and infinities propagate.
        assert!(run(0.0, pair(f32::NAN, 0.0), pair(1.0, 0.0)).is_nan());
        assert_eq!(
            run(0.0, pair(f32::INFINITY, 0.0), pair(1.0, 0.0)),
            f32::INFINITY
        );
        println!("units: {}", Bf16Units::Emulated);
    }

    /// One product case: C (with an offset and a padded row stride), A and B laid out as
    /// `a_t` / `b_t` (transposed or not) with offsets and padded strides.
    struct Case {
        m: usize,
        n: usize,
        k: usize,
        a_t: bool,
        b_t: bool,
        acc: bool,
        scale: f32,
    }

    fn operand(data: &[f32], off: usize, rows: usize, cols: usize, t: bool) -> Operand<'_> {
        // Row-major with 3 spare columns, or column-major with 2 spare rows.
        let (rs, cs) = if t { (1, rows + 2) } else { (cols + 3, 1) };
        Operand { data, off, rs, cs }
    }

    /// Runs `case` on `units` with `threads`, checks it against f64 references on the bf16
    /// inputs (f32-accumulation tolerance) and on the unrounded inputs (bf16 tolerance); returns
    /// the result.
    fn check(units: Bf16Units, threads: usize, case: &Case, g: &mut Lcg) -> Vec<f32> {
        let Case {
            m,
            n,
            k,
            a_t,
            b_t,
            acc,
            scale,
        } = *case;
        let (offa, offb, offc, ldc) = (3, 5, 2, n + 1);
        let a_data = g.vec(offa + (m + 2) * (k + 3));
        let b_data = g.vec(offb + (k + 2) * (n + 3));
        let a = operand(&a_data, offa, m, k, a_t);
        let b = operand(&b_data, offb, k, n, b_t);
        let c0 = g.vec(offc + m * ldc);
        let mut c = c0.clone();
        gemm(units, threads, m, n, k, &mut c, offc, ldc, acc, a, b, scale);
        let s = f64::from(scale);
        for i in 0..m {
            for j in 0..n {
                let (mut exact, mut exact_abs, mut raw, mut raw_abs) = (0f64, 0f64, 0f64, 0f64);
                for l in 0..k {
                    let (x, y) = (a.at(i, l), b.at(l, j));
                    let (xr, yr) = (as_read(x), as_read(y));
                    exact += xr * yr;
                    exact_abs += (xr * yr).abs();
                    raw += f64::from(x) * f64::from(y);
                    raw_abs += (f64::from(x) * f64::from(y)).abs();
                }
                let base = if acc {
                    f64::from(c0[offc + i * ldc + j])
                } else {
                    0.0
                };
                let got = f64::from(c[offc + i * ldc + j]);
                // f32 accumulation over k terms (and one rounding per depth block), then the
                // scaling and the sum with C.
                let tol = (k as f64 + 4.0) * U32 * (base.abs() + s.abs() * exact_abs) + 1e-30;
                let want = base + s * exact;
                assert!(
                    (got - want).abs() <= tol,
                    "{units:?} threads {threads} m {m} n {n} k {k} a_t {a_t} b_t {b_t} acc {acc}: ({i},{j}) {got} vs {want} (tol {tol:e})"
                );
                // Against the unrounded inputs: each product off by 2u + u^2 in bf16's u.
                let tol_raw = tol + s.abs() * (2.0 * U16 + U16 * U16) * raw_abs * 1.01;
                let want_raw = base + s * raw;
                assert!(
                    (got - want_raw).abs() <= tol_raw,
                    "{units:?} m {m} n {n} k {k}: ({i},{j}) {got} vs unrounded {want_raw} (tol {tol_raw:e})"
                );
            }
        }
        // Nothing outside the destination tile was written.
        for (idx, (&x, &y)) in c.iter().zip(&c0).enumerate() {
            let inside = idx >= offc && (idx - offc) / ldc < m && (idx - offc) % ldc < n;
            if !inside {
                assert_eq!(x.to_bits(), y.to_bits(), "wrote outside C at {idx}");
            }
        }
        c
    }

    fn cases() -> Vec<Case> {
        let mut v = Vec::new();
        let small = [1usize, 2, 7, 17, 33];
        let mut flip = 0usize;
        for &m in &small {
            for &n in &small {
                for &k in &small {
                    flip += 1;
                    v.push(Case {
                        m,
                        n,
                        k,
                        a_t: flip.is_multiple_of(2),
                        b_t: flip.is_multiple_of(3),
                        acc: flip % 5 < 2,
                        scale: if flip.is_multiple_of(4) { 1.0 } else { -0.37 },
                    });
                }
            }
        }
        // Several row and column tiles, several depth blocks (an odd last one), wide panels.
        for &(m, n, k) in &[
            (64, 64, 64),
            (130, 33, 7),
            (7, 290, 130),
            (130, 270, 301),
            (2, 64, 513),
            (140, 1, 260),
            // Several packed row blocks (MB) and column blocks (NB).
            (1030, 2060, 5),
            (1025, 40, 260),
        ] {
            for (a_t, b_t, acc) in [(false, false, false), (true, true, true)] {
                v.push(Case {
                    m,
                    n,
                    k,
                    a_t,
                    b_t,
                    acc,
                    scale: 0.5,
                });
            }
        }
        v
    }

    #[test]
    fn emulated_gemm_matches_f64_on_odd_shapes() {
        let mut g = Lcg(1);
        for case in cases() {
            for threads in [1, 3] {
                check(Bf16Units::Emulated, threads, &case, &mut g);
            }
        }
        println!(
            "units: {} (bf16 gemm against f64 references)",
            Bf16Units::Emulated
        );
    }

    #[test]
    fn thread_count_does_not_change_bits_and_empty_shapes_work() {
        let mut g = Lcg(2);
        let case = Case {
            m: 130,
            n: 270,
            k: 301,
            a_t: true,
            b_t: false,
            acc: true,
            scale: 1.5,
        };
        let c1 = check(Bf16Units::Emulated, 1, &case, &mut Lcg(4));
        let c4 = check(Bf16Units::Emulated, 4, &case, &mut Lcg(4));
        assert_eq!(c1, c4);
        // k = 0: C cleared (acc false) or kept; m or n = 0: nothing to do.
        let a = g.vec(4);
        let op = Operand {
            data: &a,
            off: 0,
            rs: 1,
            cs: 1,
        };
        let mut c = vec![3f32; 6];
        gemm(
            Bf16Units::Emulated,
            1,
            2,
            3,
            0,
            &mut c,
            0,
            3,
            true,
            op,
            op,
            1.0,
        );
        assert_eq!(c, vec![3.0; 6]);
        gemm(
            Bf16Units::Emulated,
            1,
            2,
            3,
            0,
            &mut c,
            0,
            3,
            false,
            op,
            op,
            1.0,
        );
        assert_eq!(c, vec![0.0; 6]);
        gemm(
            Bf16Units::Emulated,
            1,
            0,
            3,
            2,
            &mut c,
            0,
            3,
            false,
            op,
            op,
            1.0,
        );
        assert!(matmul(Bf16Units::None, 1, &a, &a, 2, 2, 2).is_none());
        assert!(matmul(Bf16Units::Emulated, 1, &a, &a, 2, 3, 2).is_none());
        println!("units: {}", Bf16Units::Emulated);
    }

    #[test]
    fn avx512bf16_matches_emulation_where_present() {
        if !cpu_has_avx512bf16() {
            println!(
                "units: none: this CPU has no AVX512_BF16; the real kernel is not tested here"
            );
            return;
        }
        println!("units: {}", Bf16Units::Avx512Bf16);
        for case in cases() {
            for threads in [1, 3] {
                let real = check(Bf16Units::Avx512Bf16, threads, &case, &mut Lcg(7));
                let emu = check(Bf16Units::Emulated, threads, &case, &mut Lcg(7));
                for (x, y) in real.iter().zip(&emu) {
                    // Same operations in the same order: equal but for denormal handling.
                    let tol = (case.k as f32 + 4.0) * f32::EPSILON * x.abs().max(y.abs()) + 1e-30;
                    assert!((x - y).abs() <= tol, "{x} vs {y}");
                }
            }
        }
        // A GPT-2-sized product, to exercise full tiles at speed.
        let (m, k, n) = (256, 768, 1024);
        let mut g = Lcg(3);
        let (a, b) = (g.vec(m * k), g.vec(k * n));
        let real = matmul(Bf16Units::Avx512Bf16, 4, &a, &b, m, k, n).unwrap_or_default();
        let emu = matmul(Bf16Units::Emulated, 4, &a, &b, m, k, n).unwrap_or_default();
        assert_eq!(real.len(), m * n);
        for (x, y) in real.iter().zip(&emu) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    #[test]
    fn override_values() {
        use Bf16Units::*;
        assert_eq!(resolve(None, false, Option::None), (None, Option::None));
        assert_eq!(resolve(Avx512Bf16, true, Some(" auto ")).0, Avx512Bf16);
        assert_eq!(
            resolve(Avx512Bf16, true, Some("none")),
            (None, Option::None)
        );
        assert_eq!(
            resolve(None, false, Some("EMULATE")),
            (Emulated, Option::None)
        );
        assert_eq!(
            resolve(None, true, Some("avx512bf16")),
            (Avx512Bf16, Option::None)
        );
        let (u, w) = resolve(None, false, Some("avx512bf16"));
        assert_eq!(u, None);
        assert!(w.unwrap_or_default().contains("no AVX512_BF16"));
        let (u, w) = resolve(None, false, Some("amx"));
        assert_eq!(u, None);
        let w = w.unwrap_or_default();
        assert!(w.contains("avx512bf16, blas, emulate, none"), "{w}");
        // `blas` without a DS_BLAS library that has a bf16 GEMM: a warning naming it.
        if !blas_has_bf16() {
            let (u, w) = resolve(None, false, Some("blas"));
            assert_eq!(u, None);
            assert!(w.unwrap_or_default().contains("cblas_gemm_bf16bf16f32"));
        }
        // Without an override the emulation is never picked.
        assert_ne!(detect(), Emulated);
        println!("units detected here: {}", units());
    }
}
