//! Runnable example programs for the `ds` workspace live in `examples/examples/`;
//! run one with `cargo run --release --example NAME`.
