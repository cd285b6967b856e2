//! Keys of this runtime that DeepSpeed does not have (`comm_timeout`), and the warning for an
//! absurd `gradient_accumulation_steps`.

use ds_config::{DeepSpeedConfig, GAS_WARN_ABOVE, MAX_COMM_TIMEOUT_S};
use serde_json::json;

#[test]
fn comm_timeout_is_validated_and_defaults_to_60() {
    let r = DeepSpeedConfig::from_value(json!({"train_batch_size": 2}))
        .resolve(1)
        .unwrap();
    assert_eq!(r.comm_timeout, 60.0);
    assert_eq!(r.json()["comm_timeout"], json!(60.0));
    for (v, want) in [(json!(20), 20.0), (json!(0), 0.0), (json!("1.5"), 1.5)] {
        let r = DeepSpeedConfig::from_value(json!({"train_batch_size": 2, "comm_timeout": v}))
            .resolve(1)
            .unwrap();
        assert_eq!(r.comm_timeout, want);
    }
    for bad in [
        json!(-1),
        json!(MAX_COMM_TIMEOUT_S + 1.0),
        json!("soon"),
        json!(true),
    ] {
        let e = DeepSpeedConfig::from_value(json!({"train_batch_size": 2, "comm_timeout": bad}))
            .resolve(1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("comm_timeout"), "{e}");
        assert!(e.contains("allowed: a number from 0 to 604800"), "{e}");
    }
}

#[test]
fn unknown_keys_near_comm_timeout_are_still_refused() {
    let e = DeepSpeedConfig::from_value(json!({"train_batch_size": 2, "comm_timout": 20}))
        .resolve(1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("did you mean `comm_timeout`?"), "{e}");
    // Not a key of a section either.
    let e = DeepSpeedConfig::from_value(
        json!({"train_batch_size": 2, "comms_logger": {"comm_timeout": 20}}),
    )
    .resolve(1)
    .unwrap_err()
    .to_string();
    assert!(e.contains("comms_logger.comm_timeout"), "{e}");
}

#[test]
fn huge_gradient_accumulation_warns_and_overflow_is_refused() {
    let r = DeepSpeedConfig::from_value(json!({
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1e12
    }))
    .resolve(2)
    .unwrap();
    assert_eq!(r.gradient_accumulation_steps, 1_000_000_000_000);
    assert!(
        r.warnings.iter().any(|w| w
            .contains("gradient_accumulation_steps = 1000000000000 is very large (above 65536)")),
        "{:?}",
        r.warnings
    );
    // At the bound: no warning.
    let r = DeepSpeedConfig::from_value(json!({
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": GAS_WARN_ABOVE
    }))
    .resolve(2)
    .unwrap();
    assert!(
        !r.warnings.iter().any(|w| w.contains("very large")),
        "{:?}",
        r.warnings
    );
    // A product that overflows 64 bits is refused, naming the sizes.
    let e = DeepSpeedConfig::from_value(json!({
        "train_micro_batch_size_per_gpu": 4_000_000_000i64,
        "gradient_accumulation_steps": 4_000_000_000i64
    }))
    .resolve(2)
    .unwrap_err()
    .to_string();
    assert!(e.contains("overflows a 64-bit integer"), "{e}");
}
