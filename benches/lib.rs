//! Criterion benchmarks for the `ds` workspace live in `benches/benches/`;
//! run them with `cargo bench -p ds-benches`.
