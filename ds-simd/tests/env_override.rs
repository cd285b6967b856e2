//! `DS_SIMD=scalar` set before the first call lowers `level()` (its own process: integration
//! tests are one binary per file, and this file has one test).

#[test]
fn ds_simd_scalar_forces_the_scalar_path() {
    std::env::set_var(ds_simd::ENV, "scalar");
    assert_eq!(ds_simd::level(), ds_simd::Level::Scalar);
    // Read once: a later change does not move it.
    std::env::set_var(ds_simd::ENV, "avx512");
    assert_eq!(ds_simd::level(), ds_simd::Level::Scalar);
}
