//! An optional CBLAS library for the explicit kernels' f32 matrix products, chosen at run time
//! with `DS_BLAS=PATH` (MKL's `libmkl_rt.so`, OpenBLAS, BLIS, ... any LP64 CBLAS).
//!
//! Unset (the default), every product runs on the `gemm` crate, and the build links no
//! system library either way: the library is opened with `dlopen` at the first product. Which
//! backend is fastest depends on the processor and the shape (`ds bench gemm` measures them
//! side by side; BENCHMARKS.md records the choice per machine). Only the large products go to
//! the library: the forward, input-gradient and weight-gradient products of the linear layers
//! and the head. The blocked attention's tiles stay on the `gemm` crate.
//!
//! The library computes in its own order of additions, so results differ from the `gemm`
//! crate's within f32 rounding; every rank of a run must use the same backend (the `ds`
//! command passes its environment to every rank it starts).
//!
//! ```
//! // With DS_BLAS unset, no library is used.
//! if std::env::var_os(ds_models::blas::ENV).is_none() {
//!     assert!(ds_models::blas::init().unwrap().is_none());
//! }
//! ```

use std::sync::OnceLock;

/// The environment variable naming the CBLAS shared library.
pub const ENV: &str = "DS_BLAS";

/// Products with fewer multiply-adds than this stay on the `gemm` crate (a library call's
/// fixed cost is not worth it there).
pub const MIN_MACS: usize = 1 << 18;

type CblasSgemm = unsafe extern "C" fn(
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    f32,
    *const f32,
    i32,
    *const f32,
    i32,
    f32,
    *mut f32,
    i32,
);

/// MKL's `cblas_gemm_bf16bf16f32`: bf16 operands, f32 accumulation and result (AMX tiles or
/// AVX-512 BF16 where the processor has them, converted to f32 elsewhere).
type CblasGemmBf16 = unsafe extern "C" fn(
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    f32,
    *const u16,
    i32,
    *const u16,
    i32,
    f32,
    *mut f32,
    i32,
);

/// A CBLAS library opened at run time.
pub struct Blas {
    path: String,
    // Keeps the library mapped while `sgemm` may be called.
    _lib: libloading::Library,
    sgemm: CblasSgemm,
    gemm_bf16: Option<CblasGemmBf16>,
    threads: Option<String>,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blas").field("path", &self.path).finish()
    }
}

impl Blas {
    /// Opens the library at `path` and finds `cblas_sgemm`; sets its thread count to
    /// `threads` through whichever of `openblas_set_num_threads`, `MKL_Set_Num_Threads` or
    /// `bli_thread_set_num_threads` it exports.
    pub fn open(path: &str, threads: usize) -> Result<Blas, String> {
        // SAFETY: opening a shared library runs its initialisers; the user named a BLAS.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| format!("{ENV}={path}: cannot open the library: {e}"))?;
        // SAFETY: `cblas_sgemm` has this signature in every LP64 CBLAS.
        let sgemm = *unsafe { lib.get::<CblasSgemm>(b"cblas_sgemm\0") }.map_err(|e| {
            format!("{ENV}={path}: it has no cblas_sgemm ({e}); name a CBLAS library")
        })?;
        // MKL's single dynamic library picks its threading layer at the first call; its
        // default (Intel OpenMP, libiomp5) ships in another wheel. Unless MKL_THREADING_LAYER
        // says otherwise: sequential for one thread, GNU OpenMP (gcc's libgomp) for more.
        if std::env::var_os("MKL_THREADING_LAYER").is_none() {
            // SAFETY: `int MKL_Set_Threading_Layer(int)`, called before any other MKL call.
            if let Ok(f) =
                unsafe { lib.get::<unsafe extern "C" fn(i32) -> i32>(b"MKL_Set_Threading_Layer\0") }
            {
                const SEQUENTIAL: i32 = 1;
                const GNU: i32 = 3;
                // SAFETY: as above.
                unsafe { f(if threads <= 1 { SEQUENTIAL } else { GNU }) };
            }
        }
        // SAFETY: MKL's signature (LP64), where the library has it.
        let gemm_bf16 = unsafe { lib.get::<CblasGemmBf16>(b"cblas_gemm_bf16bf16f32\0") }
            .ok()
            .map(|f| *f);
        let n = i32::try_from(threads.max(1)).unwrap_or(i32::MAX);
        let mut set = None;
        for sym in [
            "openblas_set_num_threads",
            "MKL_Set_Num_Threads",
            "bli_thread_set_num_threads",
        ] {
            let name = format!("{sym}\0");
            // SAFETY: each of these takes the thread count as a C int and returns nothing
            // (BLIS's takes a dim_t, a 64-bit integer: passed as such below).
            unsafe {
                if sym.starts_with("bli_") {
                    if let Ok(f) = lib.get::<unsafe extern "C" fn(i64)>(name.as_bytes()) {
                        f(n as i64);
                        set = Some(sym.to_string());
                        break;
                    }
                } else if let Ok(f) = lib.get::<unsafe extern "C" fn(i32)>(name.as_bytes()) {
                    f(n);
                    set = Some(sym.to_string());
                    break;
                }
            }
        }
        Ok(Blas {
            path: path.to_string(),
            _lib: lib,
            sgemm,
            gemm_bf16,
            threads: set,
        })
    }

    /// The library's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Which call set the library's thread count (`None`: it exports none we know; it then
    /// follows its own environment variables).
    pub fn threads_set_by(&self) -> Option<&str> {
        self.threads.as_deref()
    }

    /// `C[m,n] (row stride ldc) = beta C + alpha A B`, A element (i,p) at `a[i*ars + p*acs]`,
    /// B element (p,j) at `b[p*brs + j*bcs]`, on the library's f32 GEMM (or, with `bf16`, on
    /// its bf16 GEMM over both operands rounded to bf16, round to nearest even, summing in
    /// f32) over `threads` tasks on rayon's pool, each a band of C's rows (or columns, when C is wider than tall) with the
    /// matching band of A (or B); with `bf16` both operands are rounded once, before the
    /// split. Returns false (nothing done) where the library declines the whole product: an
    /// operand without a unit stride, a size past 32 bits, or `bf16` without a bf16 GEMM.
    /// Its bands have the same strides and smaller sizes, so none is declined once the whole
    /// is accepted.
    ///
    /// # Safety
    /// The pointers must reach every element the sizes and strides name, and `c` must not
    /// alias `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn sgemm_split(
        &self,
        threads: usize,
        bf16: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: *const f32,
        ars: usize,
        acs: usize,
        b: *const f32,
        brs: usize,
        bcs: usize,
        beta: f32,
        c: *mut f32,
        ldc: usize,
    ) -> bool {
        let Some(l) = layout(m, n, k, ars, acs, brs, bcs, ldc) else {
            return false;
        };
        let c = c as usize;
        if !bf16 {
            let (a, b, sgemm) = (a as usize, b as usize, self.sgemm);
            bands(threads, m, n, |r0, rows, c0, cols| {
                let (a, b, c) = (a as *const f32, b as *const f32, c as *mut f32);
                // SAFETY: a band of the caller's operands (rows r0.. of A and C, or columns
                // c0.. of B and C), inside them; bands do not overlap in C.
                unsafe {
                    sgemm(
                        ROW_MAJOR,
                        l.ta,
                        l.tb,
                        rows as i32,
                        cols as i32,
                        l.k,
                        alpha,
                        a.add(r0 * ars),
                        l.lda,
                        b.add(c0 * bcs),
                        l.ldb,
                        beta,
                        c.add(r0 * ldc + c0),
                        l.ldc,
                    )
                }
            });
            return true;
        }
        let Some(f) = self.gemm_bf16 else {
            return false;
        };
        // The operands rounded once into this thread's scratch, taken out of it for the
        // product (a rayon task run here while waiting may need scratch of its own).
        let (mut sa, mut sb) = BF16_SCRATCH.with(|cell| std::mem::take(&mut *cell.borrow_mut()));
        // SAFETY: the caller guarantees every (i, p) of A and (p, j) of B is readable.
        unsafe {
            pack_bf16(&mut sa, a, m, k, ars, acs);
            pack_bf16(&mut sb, b, k, n, brs, bcs);
        }
        let (pa, pb) = (sa.as_ptr() as usize, sb.as_ptr() as usize);
        bands(threads, m, n, |r0, rows, c0, cols| {
            let (pa, pb, c) = (pa as *const u16, pb as *const u16, c as *mut f32);
            // SAFETY: bands of the packed row-major copies (k and n wide) and of C; bands do
            // not overlap in C.
            unsafe {
                f(
                    ROW_MAJOR,
                    NO,
                    NO,
                    rows as i32,
                    cols as i32,
                    l.k,
                    alpha,
                    pa.add(r0 * k),
                    l.k,
                    pb.add(c0),
                    l.n,
                    beta,
                    c.add(r0 * ldc + c0),
                    l.ldc,
                )
            }
        });
        BF16_SCRATCH.with(|cell| *cell.borrow_mut() = (sa, sb));
        true
    }

    /// `C[m,n] (offset coff, row stride ldc in c) = (acc ? C : 0) + scale * A B` on strided
    /// operands, on the library's f32 GEMM (or, with `bf16`, its bf16 GEMM over both operands
    /// rounded to bf16, summing in f32), split into bands over `threads` tasks on rayon's pool
    /// (the library single-threaded in each). Bounds are checked first (a panic names an
    /// out-of-range operand: a caller error). Returns false (nothing done) where the library
    /// declines the product: an operand without a unit stride, a size past 32 bits, or
    /// `bf16` without a bf16 GEMM ([`Blas::has_bf16`]).
    #[allow(clippy::too_many_arguments)]
    pub fn product(
        &self,
        threads: usize,
        bf16: bool,
        m: usize,
        n: usize,
        k: usize,
        c: &mut [f32],
        coff: usize,
        ldc: usize,
        acc: bool,
        a: &crate::bf16mm::Operand<'_>,
        b: &crate::bf16mm::Operand<'_>,
        scale: f32,
    ) -> bool {
        crate::bf16mm::check_operands("blas product", c.len(), coff, ldc, m, n, k, a, b);
        if m == 0 || n == 0 {
            return true;
        }
        // SAFETY: the operands were checked to lie inside their slices; `c` is borrowed
        // mutably and cannot alias them.
        unsafe {
            self.sgemm_split(
                threads,
                bf16,
                m,
                n,
                k,
                scale,
                a.data.as_ptr().add(a.off),
                a.rs,
                a.cs,
                b.data.as_ptr().add(b.off),
                b.rs,
                b.cs,
                if acc { 1.0 } else { 0.0 },
                c.as_mut_ptr().add(coff),
                ldc,
            )
        }
    }

    /// Whether the library multiplies bf16 matrices (MKL's `cblas_gemm_bf16bf16f32`).
    pub fn has_bf16(&self) -> bool {
        self.gemm_bf16.is_some()
    }
}

const ROW_MAJOR: i32 = 101;
const NO: i32 = 111;
const T: i32 = 112;

/// A product's CBLAS arguments (row-major).
struct Layout {
    ta: i32,
    tb: i32,
    n: i32,
    k: i32,
    lda: i32,
    ldb: i32,
    ldc: i32,
}

/// The CBLAS arguments of `C[m,n] = A[m,k] B[k,n]` with these strides, or `None` where an
/// operand has no unit stride or a size does not fit 32 bits.
#[allow(clippy::too_many_arguments)]
fn layout(
    m: usize,
    n: usize,
    k: usize,
    ars: usize,
    acs: usize,
    brs: usize,
    bcs: usize,
    ldc: usize,
) -> Option<Layout> {
    // Row-major with leading dimension ld (>= columns), or its transpose.
    let op = |rs: usize, cs: usize, cols: usize| {
        if cs == 1 && rs >= cols.max(1) {
            Some((NO, rs))
        } else if rs == 1 && cs >= 1 {
            Some((T, cs))
        } else {
            None
        }
    };
    let (ta, lda) = op(ars, acs, k)?;
    let (tb, ldb) = op(brs, bcs, n)?;
    // A transposed operand's leading dimension must cover its stored rows' length.
    if (ta == T && lda < m) || (tb == T && ldb < k) || ldc < n {
        return None;
    }
    let i = |x: usize| i32::try_from(x).ok();
    // Every band's row count is at most m.
    i(m)?;
    Some(Layout {
        ta,
        tb,
        n: i(n)?,
        k: i(k)?,
        lda: i(lda)?,
        ldb: i(ldb)?,
        ldc: i(ldc)?,
    })
}

/// `f(first row, rows, first column, columns)` over bands of an `m x n` result: one band on
/// this thread when `threads` is 1 or the result is small, else about `threads` bands of whole
/// 16-row (or 16-column, when wider than tall) groups on rayon's pool, so that a library's
/// micro-tiles line up.
fn bands(threads: usize, m: usize, n: usize, f: impl Fn(usize, usize, usize, usize) + Sync) {
    let t = threads.max(1);
    if t == 1 || m.max(n) < 2 * 16 {
        return f(0, m, 0, n);
    }
    let by_rows = m >= n;
    let len = if by_rows { m } else { n };
    let band = len.div_ceil(t).div_ceil(16) * 16;
    let f = &f;
    rayon::scope(|s| {
        for start in (0..len).step_by(band) {
            let w = band.min(len - start);
            s.spawn(move |_| {
                if by_rows {
                    f(start, w, 0, n)
                } else {
                    f(0, m, start, w)
                }
            });
        }
    });
}

thread_local! {
    /// Per-thread bf16 copies of the two operands of a bf16 [`Blas::product`], kept between calls.
    static BF16_SCRATCH: std::cell::RefCell<(Vec<u16>, Vec<u16>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Writes the `rows x cols` matrix at `p` (element (i, j) at `p[i*rs + j*cs]`) row-major as
/// bf16 into `out`.
///
/// # Safety
/// Every element the sizes and strides name must be readable.
unsafe fn pack_bf16(
    out: &mut Vec<u16>,
    p: *const f32,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
) {
    out.clear();
    out.reserve(rows * cols);
    for i in 0..rows {
        // SAFETY: (i, j) is inside the operand (the caller's guarantee).
        out.extend(
            (0..cols).map(|j| crate::bf16mm::round_bf16(unsafe { *p.add(i * rs + j * cs) })),
        );
    }
}

static BLAS: OnceLock<Result<Option<Blas>, String>> = OnceLock::new();

/// Opens the library `DS_BLAS` names (once per process; later calls return the first
/// result), single-threaded: the kernels split each product over their own threads
/// ([`Blas::product`]), so that the library's thread pool and the kernels' (rayon) do not
/// compete for the cores (measured: with both pools spinning, a GPT-2-small step on 2 cores
/// took 2.3x as long). `Ok(None)` when `DS_BLAS` is unset or empty; an error names the
/// variable, the path and what went wrong.
pub fn init() -> Result<Option<&'static Blas>, String> {
    BLAS.get_or_init(|| match std::env::var(ENV) {
        Ok(p) if !p.trim().is_empty() => Blas::open(p.trim(), 1).map(Some),
        _ => Ok(None),
    })
    .as_ref()
    .map(|o| o.as_ref())
    .map_err(|e| e.clone())
}

/// The library for a product of `m x k x n`, if one is in use and the product is large
/// enough ([`MIN_MACS`]). A library that failed to open is not used (`ds` reports the error
/// at start-up through [`init`]).
pub(crate) fn for_product(m: usize, k: usize, n: usize) -> Option<&'static Blas> {
    if m.saturating_mul(k).saturating_mul(n) < MIN_MACS {
        return None;
    }
    init().ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_without_cblas_or_missing_is_an_error_naming_it() {
        let e = Blas::open("/nonexistent/libnope.so", 1).unwrap_err();
        assert!(e.contains("DS_BLAS=/nonexistent/libnope.so"), "{e}");
        // libc is a shared library without cblas_sgemm.
        let e = Blas::open("libc.so.6", 1).unwrap_err();
        assert!(e.contains("no cblas_sgemm"), "{e}");
    }

    use crate::bf16mm::Operand;

    /// `c0 + alpha * sum_p round(A[i,p]) round(B[p,j])` in f64 for every (i, j), with the sum
    /// of the terms' magnitudes (for tolerances).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        a: &Operand<'_>,
        b: &Operand<'_>,
        alpha: f64,
        c0: f64,
        round: impl Fn(f32) -> f64,
    ) -> Vec<(f64, f64)> {
        let at = |x: &Operand<'_>, i: usize, j: usize| round(x.data[x.off + i * x.rs + j * x.cs]);
        (0..m * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                let terms = (0..k).map(|p| at(a, i, p) * at(b, p, j));
                let (sum, mag) = terms.fold((0.0, 0.0), |(s, g), t| (s + t, g + t.abs()));
                (c0 + alpha * sum, c0.abs() + alpha.abs() * mag)
            })
            .collect()
    }

    /// Deterministic values in about [-1.6, 1.6].
    fn values(len: usize, mul: usize, modulus: usize, div: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * mul % modulus) as f32 - (modulus / 2) as f32) / div)
            .collect()
    }

    /// (row stride, column stride) of A (m x k) and B (k x n) stored NN, NT and TN.
    fn layouts(m: usize, k: usize, n: usize) -> [((usize, usize), (usize, usize)); 3] {
        [((k, 1), (n, 1)), ((k, 1), (1, k)), ((1, m), (n, 1))]
    }

    /// MKL's bf16 GEMM (when an MKL is at hand: `DS_TEST_MKL=PATH/libmkl_rt.so.3`, or the one
    /// `benches/gemm_backends.sh` fetched under target/blas; skipped with a message
    /// otherwise) against an f64 product of the bf16-rounded operands, in the three layouts,
    /// on one thread and split into bands (the operands rounded once before the split).
    #[test]
    fn mkl_bf16_gemm_matches_the_rounded_product() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/blas/mkl");
        let found = std::env::var("DS_TEST_MKL").ok().or_else(|| {
            std::fs::read_dir(&root).ok()?.flatten().find_map(|e| {
                let p = e.path().join("data/lib/libmkl_rt.so.3");
                p.exists().then(|| p.display().to_string())
            })
        });
        let Some(path) = found else {
            eprintln!("no MKL (DS_TEST_MKL or target/blas/mkl): skipped");
            return;
        };
        let blas = Blas::open(&path, 1).unwrap();
        assert!(blas.has_bf16(), "{path} has no cblas_gemm_bf16bf16f32");
        let r = |x: f32| f32::from_bits((crate::bf16mm::round_bf16(x) as u32) << 16) as f64;
        for (m, k, n) in [(9usize, 37usize, 11usize), (70, 37, 40), (20, 37, 75)] {
            let a = values(m * k, 7919, 1000, 311.0);
            let b = values(k * n, 104729, 1000, 173.0);
            for ((ars, acs), (brs, bcs)) in layouts(m, k, n) {
                let oa = Operand {
                    data: &a,
                    off: 0,
                    rs: ars,
                    cs: acs,
                };
                let ob = Operand {
                    data: &b,
                    off: 0,
                    rs: brs,
                    cs: bcs,
                };
                let want = reference(m, n, k, &oa, &ob, 0.5, 2.0, r);
                for threads in [1, 3] {
                    let ldc = n + 1;
                    let mut c = vec![2f32; m * ldc];
                    assert!(
                        blas.product(threads, true, m, n, k, &mut c, 0, ldc, true, &oa, &ob, 0.5)
                    );
                    for (ij, &(w, mag)) in want.iter().enumerate() {
                        let (i, j) = (ij / n, ij % n);
                        let got = c[i * ldc + j] as f64;
                        // f32 accumulation of k exact products.
                        assert!(
                            (got - w).abs() <= 1e-6 * mag,
                            "{m}x{k}x{n} t{threads} ({i},{j}): {got} vs {w}"
                        );
                    }
                }
            }
        }
        eprintln!("MKL bf16 GEMM checked: {path}");
    }

    /// Whatever CBLAS the machine has (Debian's OpenBLAS or BLIS), against an f64 triple loop
    /// in the three layouts training uses, on one thread and split into bands over 2-4
    /// threads (rows when C is taller, columns when wider); skipped with a message when there
    /// is none.
    #[test]
    fn a_system_cblas_matches_a_triple_loop_in_every_layout() {
        let candidates = [
            "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
            "/usr/lib/x86_64-linux-gnu/libblis.so.4",
        ];
        let Some(blas) = candidates.iter().find_map(|p| Blas::open(p, 1).ok()) else {
            eprintln!("no system CBLAS (libopenblas0 / libblis4): skipped");
            return;
        };
        eprintln!("testing {}", blas.path());
        for (m, k, n) in [
            (7usize, 13usize, 5usize),
            (70, 9, 40),
            (33, 9, 90),
            (50, 9, 50),
        ] {
            let a = values(m * k, 13, 17, 5.0);
            let b = values(k * n, 11, 19, 7.0);
            for ((ars, acs), (brs, bcs)) in layouts(m, k, n) {
                let oa = Operand {
                    data: &a,
                    off: 0,
                    rs: ars,
                    cs: acs,
                };
                let ob = Operand {
                    data: &b,
                    off: 0,
                    rs: brs,
                    cs: bcs,
                };
                let want = reference(m, n, k, &oa, &ob, 2.0, 0.5, |x| x as f64);
                for threads in [1, 2, 3, 4] {
                    let ldc = n + 2;
                    let mut c = vec![0.5f32; m * ldc];
                    assert!(
                        blas.product(threads, false, m, n, k, &mut c, 0, ldc, true, &oa, &ob, 2.0)
                    );
                    for (ij, &(w, _)) in want.iter().enumerate() {
                        let (i, j) = (ij / n, ij % n);
                        let got = c[i * ldc + j] as f64;
                        assert!(
                            (got - w).abs() < 1e-4,
                            "{m}x{k}x{n} ({ars},{acs},{brs},{bcs}) t{threads} ({i},{j}): {got} vs {w}"
                        );
                    }
                    // The padding columns are untouched.
                    assert!((0..m).all(|i| c[i * ldc + n] == 0.5 && c[i * ldc + n + 1] == 0.5));
                }
            }
        }
        // An operand with no unit stride is declined, and nothing is written.
        let (a, b) = (values(16, 13, 17, 5.0), values(4, 11, 19, 7.0));
        let oa = Operand {
            data: &a,
            off: 0,
            rs: 4,
            cs: 2,
        };
        let ob = Operand {
            data: &b,
            off: 0,
            rs: 2,
            cs: 1,
        };
        let mut c = [7f32; 4];
        assert!(!blas.product(1, false, 2, 2, 2, &mut c, 0, 2, false, &oa, &ob, 1.0));
        assert_eq!(c, [7.0; 4]);
    }
}
