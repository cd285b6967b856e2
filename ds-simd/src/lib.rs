//! `ds-simd`: one run-time SIMD dispatch for numeric kernels.
//!
//! A Rust crate built for baseline x86-64 vectorises its loops to 4-lane SSE only. To use the
//! wider units of the machine it runs on, a kernel is written once as an `#[inline(always)]`
//! function (its *body*) and compiled a second and third time with `#[target_feature]` for
//! AVX2+FMA and AVX-512; at run time the fastest variant the CPU supports is called. This crate
//! is that mechanism, shared by every kernel of the `ds` workspace:
//!
//! - [`Level`]: `Scalar < Avx2 < Avx512`, the three variants a kernel is compiled for;
//! - [`detected`]: what the CPU supports, detected once (`OnceLock`);
//! - [`level`]: the level kernels run at: [`detected`], lowered by the environment variable
//!   `DS_SIMD=scalar|avx2|avx512` ([`ENV`]) when it is set, so that tests and benchmarks can
//!   force each lower path (a level above the CPU's is never used: it is clamped, with a
//!   warning);
//! - [`dispatch!`]: defines the dispatching function and a `*_at(level, ..)` variant that runs
//!   the body at a chosen level (clamped to [`detected`], so it is always safe to call), which
//!   is what tests use to compare every level against the scalar path.
//!
//! The three variants run the same body: Rust never contracts `a * b + c` into a fused
//! multiply-add nor reassociates floating-point sums on its own, so a body whose lanes are
//! explicit (an accumulator array, `mul_add` where it wants a fused operation) gives bitwise
//! identical results at every level; only the speed differs.
//!
//! ```
//! #[inline(always)]
//! fn sum8_body(x: &[f32]) -> f32 {
//!     let mut acc = [0f32; 8];
//!     let mut chunks = x.chunks_exact(8);
//!     for c in &mut chunks {
//!         for i in 0..8 {
//!             acc[i] += c[i];
//!         }
//!     }
//!     acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
//! }
//!
//! ds_simd::dispatch!(
//!     /// Sum of `x` (8 lanes).
//!     fn sum8, sum8_at => sum8_body(x: &[f32]) -> f32
//! );
//!
//! let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
//! let fast = sum8(&x); // at ds_simd::level()
//! for l in ds_simd::available() {
//!     assert_eq!(sum8_at(l, &x).to_bits(), sum8_at(ds_simd::Level::Scalar, &x).to_bits());
//! }
//! assert_eq!(fast.to_bits(), sum8_at(ds_simd::level(), &x).to_bits());
//! ```
#![warn(missing_docs)]

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// The name of the environment variable that lowers [`level`]: `scalar`, `avx2` or `avx512`
/// (case-insensitive; empty or `auto` means [`detected`]).
pub const ENV: &str = "DS_SIMD";

/// A SIMD level: which variant of a kernel runs. Ordered: `Scalar < Avx2 < Avx512`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// The portable body as the crate is compiled (4-lane SSE on baseline x86-64).
    Scalar,
    /// AVX, AVX2 and FMA (x86-64-v3): 8-lane vectors.
    Avx2,
    /// AVX-512 F and VL on top of [`Level::Avx2`]: 16-lane vectors.
    Avx512,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 3] = [Level::Scalar, Level::Avx2, Level::Avx512];

    /// The name [`ENV`] takes for this level.
    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A string that names no [`Level`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseLevelError(pub String);

impl fmt::Display for ParseLevelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown SIMD level {:?} (expected scalar, avx2 or avx512)",
            self.0
        )
    }
}

impl std::error::Error for ParseLevelError {}

impl FromStr for Level {
    type Err = ParseLevelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" | "none" | "generic" => Ok(Level::Scalar),
            "avx2" => Ok(Level::Avx2),
            "avx512" => Ok(Level::Avx512),
            _ => Err(ParseLevelError(s.to_string())),
        }
    }
}

/// What the CPU supports, detected once per process.
pub fn detected() -> Level {
    static DETECTED: OnceLock<Level> = OnceLock::new();
    *DETECTED.get_or_init(detect)
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::is_x86_feature_detected!("avx")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma");
        if avx2
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vl")
        {
            return Level::Avx512;
        }
        if avx2 {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// The level kernels run at: [`detected`], lowered by [`ENV`] when set. Read once per process.
///
/// An unknown value or a level above the CPU's prints one warning on stderr and is ignored
/// (clamped, for the latter).
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let var = std::env::var(ENV).ok();
        let (l, warning) = resolve(detected(), var.as_deref());
        if let Some(w) = warning {
            eprintln!("warning: {w}");
        }
        l
    })
}

/// The level an override `var` (the value of [`ENV`], if set) gives on a CPU at `detected`,
/// and the warning to print when the value is not taken as it is.
pub fn resolve(detected: Level, var: Option<&str>) -> (Level, Option<String>) {
    let Some(v) = var else {
        return (detected, None);
    };
    let t = v.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("auto") || t.eq_ignore_ascii_case("native") {
        return (detected, None);
    }
    match t.parse::<Level>() {
        Ok(l) if l <= detected => (l, None),
        Ok(l) => (
            detected,
            Some(format!(
                "{ENV}={v}: this CPU supports up to {detected}; running at {detected}, not {l}"
            )),
        ),
        Err(e) => (detected, Some(format!("{ENV}: {e}; running at {detected}"))),
    }
}

/// `level` lowered to what the CPU supports: the level a `*_at` function of [`dispatch!`]
/// really runs at.
#[inline]
pub fn clamp(level: Level) -> Level {
    level.min(detected())
}

/// The levels this CPU can run, lowest first (always starts with [`Level::Scalar`]).
pub fn available() -> impl Iterator<Item = Level> {
    let d = detected();
    Level::ALL.into_iter().filter(move |&l| l <= d)
}

/// Defines a kernel `$name(args)` running the `#[inline(always)]` function `$body` compiled for
/// [`level()`](crate::level), and `$at(level, args)` running it at a chosen level (clamped to
/// [`detected()`](crate::detected), so both are safe to call on any CPU).
///
/// ```
/// #[inline(always)]
/// fn scale_body(x: &mut [f32], a: f32) {
///     x.iter_mut().for_each(|v| *v *= a);
/// }
/// ds_simd::dispatch!(
///     /// `x *= a`.
///     pub fn scale, scale_at => scale_body(x: &mut [f32], a: f32)
/// );
/// let mut x = vec![1f32, 2., 3.];
/// scale(&mut x, 2.0);
/// scale_at(ds_simd::Level::Scalar, &mut x, 0.5);
/// assert_eq!(x, [1., 2., 3.]);
/// ```
///
/// Attributes (doc comments) before `fn` go on `$name`; a visibility before `fn` applies to
/// both. On other architectures than x86-64 both call `$body` directly.
#[macro_export]
macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident, $at:ident => $body:ident ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)?) => {
        $(#[$m])*
        #[inline]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            $at($crate::level(), $($arg),*)
        }

        #[doc = concat!("[`", stringify!($name), "`] at a chosen SIMD level (clamped to what the CPU supports).")]
        #[allow(dead_code)] // used by tests that compare the levels
        $vis fn $at(level: $crate::Level, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn v4($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn v3($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                match $crate::clamp(level) {
                    // SAFETY: `clamp` lowers the level to what the CPU supports, and
                    // `Level::Avx512` means AVX-512 F+VL, AVX2 and FMA were detected.
                    $crate::Level::Avx512 => return unsafe { v4($($arg),*) },
                    // SAFETY: as above, `Level::Avx2` means AVX2 and FMA were detected.
                    $crate::Level::Avx2 => return unsafe { v3($($arg),*) },
                    $crate::Level::Scalar => {}
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = level;
            $body($($arg),*)
        }
    };
}

/// The README's examples, compiled and run as doc tests (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_print_and_order() {
        for l in Level::ALL {
            assert_eq!(l.name().parse::<Level>().unwrap(), l);
            assert_eq!(l.to_string(), l.name());
        }
        assert_eq!(" AVX2 ".parse::<Level>().unwrap(), Level::Avx2);
        assert!("sse".parse::<Level>().is_err());
        assert!(Level::Scalar < Level::Avx2 && Level::Avx2 < Level::Avx512);
    }

    #[test]
    fn the_override_only_lowers() {
        assert_eq!(resolve(Level::Avx2, None), (Level::Avx2, None));
        assert_eq!(resolve(Level::Avx2, Some("")), (Level::Avx2, None));
        assert_eq!(resolve(Level::Avx2, Some("auto")), (Level::Avx2, None));
        assert_eq!(resolve(Level::Avx2, Some("scalar")), (Level::Scalar, None));
        assert_eq!(resolve(Level::Avx512, Some("avx2")), (Level::Avx2, None));
        let (l, w) = resolve(Level::Avx2, Some("avx512"));
        assert_eq!(l, Level::Avx2);
        assert!(w.unwrap().contains("supports up to avx2"));
        let (l, w) = resolve(Level::Scalar, Some("fast"));
        assert_eq!(l, Level::Scalar);
        assert!(w.unwrap().contains("unknown SIMD level"));
    }

    #[test]
    fn available_starts_at_scalar_and_ends_at_detected() {
        let a: Vec<Level> = available().collect();
        assert_eq!(a.first(), Some(&Level::Scalar));
        assert_eq!(a.last(), Some(&detected()));
        assert!(level() <= detected());
        for l in Level::ALL {
            assert!(clamp(l) <= detected() && clamp(l) <= l);
        }
    }

    #[inline(always)]
    fn fma_sum_body(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 16];
        for (ca, cb) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
            for i in 0..16 {
                acc[i] = ca[i].mul_add(cb[i], acc[i]);
            }
        }
        acc.iter().sum()
    }

    dispatch!(
        /// A 16-lane fused dot product.
        fn fma_sum, fma_sum_at => fma_sum_body(a: &[f32], b: &[f32]) -> f32
    );

    #[test]
    fn every_level_equals_scalar_bitwise() {
        let a: Vec<f32> = (0..4096).map(|i| (i as f32 * 0.11).sin() * 1e3).collect();
        let b: Vec<f32> = (0..4096).map(|i| (i as f32 * 0.07).cos()).collect();
        let s = fma_sum_at(Level::Scalar, &a, &b);
        for l in Level::ALL {
            assert_eq!(fma_sum_at(l, &a, &b).to_bits(), s.to_bits(), "{l}");
        }
        assert_eq!(fma_sum(&a, &b).to_bits(), s.to_bits());
    }
}
