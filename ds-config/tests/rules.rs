//! Resolution rules, error messages and deprecated aliases, checked against DeepSpeed's
//! documented behaviour (`reference/deepspeed.md` §1.1-1.4 and its test values).

use ds_config::{ConfigError, DeepSpeedConfig, ResolveOptions, ResolvedConfig};
use serde_json::{json, Value};

fn resolve(v: Value, ws: usize) -> Result<ResolvedConfig, ConfigError> {
    DeepSpeedConfig::from_value(v).resolve(ws)
}

fn err(v: Value, ws: usize) -> ConfigError {
    match resolve(v.clone(), ws) {
        Ok(_) => panic!("expected an error for {v}"),
        Err(e) => e,
    }
}

/// The single issue at `path` (panics if absent).
fn issue_at(e: &ConfigError, path: &str) -> String {
    e.issues()
        .iter()
        .find(|i| i.path == path)
        .unwrap_or_else(|| panic!("no issue at {path}: {e}"))
        .to_string()
}

// ---------------------------------------------------------------- batch triangle

/// DeepSpeed's TestBatchConfig table (world size 2).
#[test]
fn batch_table_world_size_2() {
    for (tb, mb, gas, ok) in [
        (32, 16, 1, true),
        (32, 8, 2, true),
        (33, 17, 2, false),
        (32, 18, 1, false),
    ] {
        let v = json!({"train_batch_size": tb, "train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": gas});
        match resolve(v, 2) {
            Ok(r) => {
                assert!(ok, "({tb},{mb},{gas}) should fail");
                assert_eq!(
                    (
                        r.train_batch_size,
                        r.train_micro_batch_size_per_gpu,
                        r.gradient_accumulation_steps
                    ),
                    (tb, mb, gas)
                );
            }
            Err(e) => {
                assert!(!ok, "({tb},{mb},{gas}) should pass: {e}");
                let msg = issue_at(&e, "train_batch_size");
                // Names all three values and the world size.
                assert!(msg.contains(&format!("{tb} != {mb} * {gas} * 2")), "{msg}");
            }
        }
    }
}

/// Two of three given: the third is derived exactly as DeepSpeed does (integer division).
#[test]
fn batch_two_of_three_derivations() {
    let cases = [
        (
            json!({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8}),
            2,
            (32, 8, 2),
        ),
        (
            json!({"train_batch_size": 32, "gradient_accumulation_steps": 2}),
            2,
            (32, 8, 2),
        ),
        (
            json!({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}),
            2,
            (32, 8, 2),
        ),
        (json!({"train_batch_size": 32}), 2, (32, 16, 1)),
        (
            json!({"train_micro_batch_size_per_gpu": 16}),
            2,
            (32, 16, 1),
        ),
        (json!({"train_micro_batch_size_per_gpu": 3}), 3, (9, 3, 1)),
    ];
    for (v, ws, want) in cases {
        let r = resolve(v.clone(), ws).unwrap_or_else(|e| panic!("{v}: {e}"));
        assert_eq!(
            (
                r.train_batch_size,
                r.train_micro_batch_size_per_gpu,
                r.gradient_accumulation_steps
            ),
            want,
            "{v}"
        );
    }
}

#[test]
fn batch_derivation_that_does_not_divide_is_an_error() {
    // 33 // 2 // 2 = 8 and 8 * 2 * 2 = 32 != 33.
    let e = err(
        json!({"train_batch_size": 33, "gradient_accumulation_steps": 2}),
        2,
    );
    let msg = issue_at(&e, "train_batch_size");
    assert!(msg.contains("33 != 8 * 2 * 2"), "{msg}");
    // A batch smaller than the world size derives a zero micro-batch.
    let e = err(json!({"train_batch_size": 4}), 8);
    assert!(issue_at(&e, "train_batch_size").contains("4 != 0 * 1 * 8"));
}

#[test]
fn batch_missing() {
    for v in [json!({}), json!({"gradient_accumulation_steps": 4})] {
        let e = err(v, 1);
        assert!(issue_at(&e, "train_batch_size")
            .contains("either train_batch_size or train_micro_batch_size_per_gpu"));
    }
}

#[test]
fn batch_numbers_written_as_floats_or_strings() {
    for tb in [
        json!(32),
        json!(32.0),
        json!(3.2e1),
        json!("32"),
        json!("3.2e1"),
    ] {
        let r = resolve(json!({"train_batch_size": tb.clone()}), 1)
            .unwrap_or_else(|e| panic!("{tb}: {e}"));
        assert_eq!(r.train_batch_size, 32, "{tb}");
    }
    for bad in [
        json!(32.5),
        json!("lots"),
        json!(true),
        json!(-4),
        json!(0),
        json!([32]),
    ] {
        let e = err(json!({"train_batch_size": bad.clone()}), 1);
        assert!(
            issue_at(&e, "train_batch_size").contains("integer >= 1"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn batch_auto_derived_or_refused_with_how_to_supply() {
    let r = resolve(json!({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}), 2).unwrap();
    assert_eq!(r.train_batch_size, 16);
    assert!(r
        .warnings
        .iter()
        .any(|w| w.contains("train_batch_size") && w.contains("auto")));
    let e = err(
        json!({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}),
        2,
    );
    let msg = issue_at(&e, "train_batch_size");
    assert!(
        msg.contains("--auto train_micro_batch_size_per_gpu="),
        "{msg}"
    );
    // Supplied through the options.
    let mut opts = ResolveOptions::world_size(2);
    opts.auto_values
        .insert("train_micro_batch_size_per_gpu".into(), json!(3));
    let r = DeepSpeedConfig::from_value(
        json!({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}),
    )
    .resolve_with(&opts)
    .unwrap();
    assert_eq!(
        (r.train_batch_size, r.train_micro_batch_size_per_gpu),
        (6, 3)
    );
}

// ---------------------------------------------------------------- defaults

#[test]
fn defaults_follow_deepspeed_code() {
    let r = resolve(json!({"train_batch_size": 8}), 1).unwrap();
    assert_eq!(r.gradient_clipping, 1.0);
    assert!(!r.fp16.enabled && !r.bf16.enabled);
    assert_eq!(r.fp16.initial_scale_power, 16);
    assert_eq!(r.fp16.loss_scale_window, 1000);
    assert_eq!(r.fp16.hysteresis, 2);
    assert_eq!(r.fp16.min_loss_scale, 1.0);
    assert!(r.fp16.dynamic_loss_scale());
    assert!(r.bf16.check_grad_overflow);
    assert_eq!(r.zero_optimization.stage, 0);
    assert_eq!(r.zero_optimization.reduce_bucket_size, 500_000_000);
    assert_eq!(r.zero_optimization.stage3_prefetch_bucket_size, 50_000_000);
    assert_eq!(
        r.zero_optimization.stage3_param_persistence_threshold,
        100_000
    );
    assert!(!r.zero_optimization.overlap_comm);
    assert_eq!(r.gradient_allreduce_op, "mean");
    assert_eq!(r.steps_per_print, Some(10));
    assert_eq!(r.flops_profiler.profile_step, 1);
    assert_eq!(r.flops_profiler.module_depth, -1);
    assert_eq!(r.checkpoint.tag_validation, "Warn");
    assert!(r.optimizer.is_none() && r.scheduler.is_none());
    assert_eq!(r.precision(), "fp32");
    // overlap_comm resolves to true at stage 3.
    let r = resolve(
        json!({"train_batch_size": 8, "zero_optimization": {"stage": 3}}),
        1,
    )
    .unwrap();
    assert!(r.zero_optimization.overlap_comm);
}

#[test]
fn optimizer_and_scheduler_defaults() {
    let r = resolve(
        json!({"train_batch_size": 8,
               "optimizer": {"type": "adam", "params": {"lr": 3e-4}},
               "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}),
        1,
    )
    .unwrap();
    let o = r.optimizer.unwrap();
    assert_eq!(o.kind, "Adam");
    assert_eq!(o.param_f64("lr"), Some(3e-4));
    assert_eq!(o.betas(), Some((0.9, 0.999)));
    assert_eq!(o.param_f64("eps"), Some(1e-8));
    assert_eq!(o.param_bool("adam_w_mode"), Some(true));
    let s = r.scheduler.unwrap();
    assert_eq!(s.kind, "WarmupLR");
    // warmup_max_lr defaults to the optimizer's lr (DeepSpeed: the param group's lr).
    assert_eq!(s.param_f64("warmup_max_lr"), Some(3e-4));
    assert_eq!(s.params["warmup_type"], "log");
    let r = resolve(
        json!({"train_batch_size": 8, "scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0.001, "cycle_max_lr": 0.01, "cycle_first_step_size": 7}}}),
        1,
    )
    .unwrap();
    let s = r.scheduler.unwrap();
    assert_eq!(s.params["cycle_second_step_size"], 7);
    assert_eq!(s.params["cycle_second_stair_count"], 0);
}

// ---------------------------------------------------------------- errors

#[test]
fn unknown_keys_with_did_you_mean_at_every_level() {
    let e = err(json!({"train_batch_size": 8, "gradient_clipp1ng": 1.0}), 1);
    assert!(issue_at(&e, "gradient_clipp1ng").contains("did you mean `gradient_clipping`?"));
    let e = err(
        json!({"train_batch_size": 8, "zero_optimization": {"stgae": 2}}),
        1,
    );
    assert!(issue_at(&e, "zero_optimization.stgae").contains("did you mean `stage`?"));
    let e = err(
        json!({"train_batch_size": 8, "zero_optimization": {"offload_optimizer": {"devcie": "cpu"}}}),
        1,
    );
    assert!(issue_at(&e, "zero_optimization.offload_optimizer.devcie")
        .contains("did you mean `device`?"));
    let e = err(
        json!({"train_batch_size": 8, "fp16": {"enabled": true, "loss_scale_windows": 10}}),
        1,
    );
    assert!(issue_at(&e, "fp16.loss_scale_windows").contains("did you mean `loss_scale_window`?"));
    let e = err(
        json!({"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {"betas1": 0.9}}}),
        1,
    );
    assert!(issue_at(&e, "optimizer.params.betas1").contains("did you mean `betas`?"));
    // Misplaced key: where it belongs.
    let e = err(
        json!({"train_batch_size": 8, "zero_optimization": {"stage": 1, "loss_scale_window": 10}}),
        1,
    );
    assert!(issue_at(&e, "zero_optimization.loss_scale_window").contains("belongs in `fp16`"));
    // Every problem is reported at once.
    let e = err(
        json!({"train_batch_size": 8, "a_typo": 1, "fp16": {"enabeld": true}}),
        1,
    );
    assert_eq!(e.issues().len(), 2, "{e}");
}

#[test]
fn unknown_keys_can_be_downgraded_to_warnings() {
    let opts = ResolveOptions {
        world_size: 1,
        allow_unknown_keys: true,
        ..Default::default()
    };
    let r = DeepSpeedConfig::from_value(json!({"train_batch_size": 8, "gradient_clipp1ng": 1.0}))
        .resolve_with(&opts)
        .unwrap();
    assert!(r.warnings.iter().any(|w| w.contains("gradient_clipp1ng")));
    assert!(r.json().get("gradient_clipp1ng").is_none());
}

#[test]
fn fp16_and_bf16_both_enabled() {
    let e = err(
        json!({"train_batch_size": 8, "fp16": {"enabled": true}, "bf16": {"enabled": true}}),
        1,
    );
    let msg = issue_at(&e, "fp16.enabled");
    assert!(msg.contains("bf16.enabled"), "{msg}");
}

#[test]
fn stage_out_of_range() {
    for s in [json!(4), json!(-1), json!("two"), json!(1.5)] {
        let e = err(
            json!({"train_batch_size": 8, "zero_optimization": {"stage": s.clone()}}),
            1,
        );
        assert!(
            issue_at(&e, "zero_optimization.stage").contains("from 0 to 3"),
            "{s}: {e}"
        );
    }
}

#[test]
fn loss_scale_must_be_finite_and_non_negative() {
    for bad in [
        json!(-1),
        json!("nan"),
        json!("inf"),
        json!(true),
        json!("-0.5"),
    ] {
        let e = err(
            json!({"train_batch_size": 8, "fp16": {"enabled": true, "loss_scale": bad.clone()}}),
            1,
        );
        assert!(
            issue_at(&e, "fp16.loss_scale").contains("finite number >= 0"),
            "{bad}: {e}"
        );
    }
    // Dynamic scaling needs a positive minimum; a static scale does not (DeepSpeed's rule).
    let e = err(
        json!({"train_batch_size": 8, "fp16": {"enabled": true, "min_loss_scale": 0}}),
        1,
    );
    assert!(issue_at(&e, "fp16.min_loss_scale").contains("> 0"));
    resolve(json!({"train_batch_size": 8, "fp16": {"enabled": true, "loss_scale": 512, "min_loss_scale": 0}}), 1).unwrap();
    // Static scale 138 kept as given.
    let r = resolve(
        json!({"train_batch_size": 8, "fp16": {"enabled": true, "loss_scale": 138}}),
        1,
    )
    .unwrap();
    assert_eq!(r.fp16.loss_scale, 138.0);
    assert!(!r.fp16.dynamic_loss_scale());
}

#[test]
fn max_grad_norm_points_to_gradient_clipping() {
    let e = err(
        json!({"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 0.1, "max_grad_norm": 1.0}}}),
        1,
    );
    assert!(issue_at(&e, "optimizer.params.max_grad_norm").contains("gradient_clipping"));
    let e = err(json!({"train_batch_size": 8, "max_grad_norm": 1.0}), 1);
    assert!(issue_at(&e, "max_grad_norm").contains("gradient_clipping"));
}

#[test]
fn scheduler_required_params() {
    let e = err(
        json!({"train_batch_size": 8, "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10}}}),
        1,
    );
    assert!(issue_at(&e, "scheduler.params.total_num_steps").contains("required"));
    let e = err(
        json!({"train_batch_size": 8, "scheduler": {"type": "OneCycle", "params": {}}}),
        1,
    );
    issue_at(&e, "scheduler.params.cycle_min_lr");
    issue_at(&e, "scheduler.params.cycle_max_lr");
    let e = err(
        json!({"train_batch_size": 8, "scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cosine"}}}),
        1,
    );
    assert!(issue_at(&e, "scheduler.params.warmup_type").contains("\"log\", \"linear\""));
    let e = err(
        json!({"train_batch_size": 8, "scheduler": {"type": "WarmupLr"}}),
        1,
    );
    assert!(issue_at(&e, "scheduler.type").contains("did you mean \"WarmupLR\"?"));
    let e = err(
        json!({"train_batch_size": 8, "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}}}),
        1,
    );
    assert!(issue_at(&e, "scheduler.params.total_num_steps")
        .contains("--auto scheduler.params.total_num_steps="));
}

#[test]
fn optimizer_types() {
    let e = err(
        json!({"train_batch_size": 8, "optimizer": {"type": "Adamm"}}),
        1,
    );
    assert!(issue_at(&e, "optimizer.type").contains("did you mean \"Adam\"?"));
    let e = err(
        json!({"train_batch_size": 8, "optimizer": {"type": "OneBitAdam"}}),
        1,
    );
    assert!(issue_at(&e, "optimizer.type").contains("not run"));
    let e = err(
        json!({"train_batch_size": 8, "optimizer": {"params": {"lr": 1}}}),
        1,
    );
    assert!(issue_at(&e, "optimizer.type").contains("required"));
    let r = resolve(json!({"train_batch_size": 8, "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}}), 1).unwrap();
    assert_eq!(r.optimizer.unwrap().param_f64("momentum"), Some(0.9));
    let e = err(
        json!({"train_batch_size": 8, "optimizer": {"type": "Adam", "params": {"betas": [0.9, 1.5]}}}),
        1,
    );
    issue_at(&e, "optimizer.params.betas");
}

#[test]
fn disabled_sections_of_features_not_run_are_accepted_enabled_ones_refused() {
    let r = resolve(json!({"train_batch_size": 8, "elasticity": {"enabled": false, "max_train_batch_size": 100}}), 1).unwrap();
    assert!(r.warnings.iter().any(|w| w.contains("elasticity")));
    let e = err(
        json!({"train_batch_size": 8, "elasticity": {"enabled": true}}),
        1,
    );
    assert!(issue_at(&e, "elasticity.enabled").contains("not run by this runtime"));
    let e = err(json!({"train_batch_size": 8, "pipeline": {"stages": 2}}), 1);
    issue_at(&e, "pipeline");
    resolve(
        json!({"train_batch_size": 8, "pipeline": {"enabled": false}}),
        1,
    )
    .unwrap();
    let e = err(
        json!({"train_batch_size": 8, "compression_training": {"weight_quantization": {"shared_parameters": {"enabled": true}}}}),
        1,
    );
    issue_at(
        &e,
        "compression_training.weight_quantization.shared_parameters.enabled",
    );
    let e = err(
        json!({"train_batch_size": 8, "amp": {"enabled": true, "opt_level": "O1"}}),
        1,
    );
    issue_at(&e, "amp.enabled");
}

#[test]
fn offload_that_would_be_silently_ignored_is_refused() {
    let e = err(
        json!({"train_batch_size": 8, "zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}),
        1,
    );
    assert!(issue_at(&e, "zero_optimization.offload_param.device").contains("stage 3"));
    let e = err(
        json!({"train_batch_size": 8, "zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}),
        1,
    );
    issue_at(&e, "zero_optimization.offload_optimizer.device");
    let r = resolve(json!({"train_batch_size": 8, "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}}}), 1).unwrap();
    assert!(r.zero_optimization.offload_optimizer_to_cpu());
    let e = err(
        json!({"train_batch_size": 8, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "gpu"}}}),
        1,
    );
    assert!(issue_at(&e, "zero_optimization.offload_optimizer.device")
        .contains("\"none\", \"cpu\", \"nvme\""));
    let e = err(
        json!({"train_batch_size": 8, "zero_optimization": {"stage": 1, "allgather_bucket_size": 5}}),
        1,
    );
    assert!(issue_at(&e, "zero_optimization.allgather_bucket_size").contains("multiple of 2"));
    let e = err(
        json!({"train_batch_size": 8, "gradient_allreduce_op": "sum", "zero_optimization": {"stage": 3}}),
        1,
    );
    issue_at(&e, "gradient_allreduce_op");
}

// ---------------------------------------------------------------- aliases

#[test]
fn deprecated_aliases() {
    // cpu_offload -> offload_optimizer {device: cpu}
    let r = resolve(
        json!({"train_batch_size": 8, "zero_optimization": {"stage": 2, "cpu_offload": true}}),
        1,
    )
    .unwrap();
    assert_eq!(
        r.json()["zero_optimization"]["offload_optimizer"]["device"],
        "cpu"
    );
    assert!(r.json()["zero_optimization"].get("cpu_offload").is_none());
    assert!(r
        .warnings
        .iter()
        .any(|w| w.contains("cpu_offload") && w.contains("deprecated")));
    // cpu_offload_param + pin memory flag
    let r = resolve(json!({"train_batch_size": 8, "zero_optimization": {"stage": 3, "cpu_offload_param": true, "cpu_offload_use_pin_memory": false}}), 1).unwrap();
    assert_eq!(
        r.json()["zero_optimization"]["offload_param"]["device"],
        "cpu"
    );
    assert_eq!(
        r.json()["zero_optimization"]["offload_param"]["pin_memory"],
        false
    );
    // cpu_offload: false means no offload.
    let r = resolve(
        json!({"train_batch_size": 8, "zero_optimization": {"stage": 2, "cpu_offload": false}}),
        1,
    )
    .unwrap();
    assert!(r.zero_optimization.offload_optimizer.is_none());
    // deprecated + new together
    let e = err(
        json!({"train_batch_size": 8, "zero_optimization": {"stage": 2, "cpu_offload": true, "offload_optimizer": {"device": "cpu"}}}),
        1,
    );
    issue_at(&e, "zero_optimization.cpu_offload");
    // stage3_gather_fp16_weights_on_model_save -> stage3_gather_16bit_weights_on_model_save
    let r = resolve(json!({"train_batch_size": 8, "zero_optimization": {"stage": 3, "stage3_gather_fp16_weights_on_model_save": true}}), 1).unwrap();
    assert!(
        r.zero_optimization
            .stage3_gather_16bit_weights_on_model_save
    );
    let e = err(
        json!({"train_batch_size": 8, "zero_optimization": {"stage": 3, "stage3_gather_fp16_weights_on_model_save": true, "stage3_gather_16bit_weights_on_model_save": true}}),
        1,
    );
    issue_at(
        &e,
        "zero_optimization.stage3_gather_fp16_weights_on_model_save",
    );
    // Short field names are read as the documented stage3_ names.
    let r = resolve(json!({"train_batch_size": 8, "zero_optimization": {"stage": 3, "prefetch_bucket_size": 1234, "param_persistence_threshold": "1e3"}}), 1).unwrap();
    assert_eq!(r.zero_optimization.stage3_prefetch_bucket_size, 1234);
    assert_eq!(r.zero_optimization.stage3_param_persistence_threshold, 1000);
    // bfloat16 -> bf16
    let r = resolve(
        json!({"train_batch_size": 8, "bfloat16": {"enabled": true}}),
        1,
    )
    .unwrap();
    assert!(r.bf16.enabled);
    assert_eq!(r.precision(), "bf16");
    let e = err(
        json!({"train_batch_size": 8, "bfloat16": {"enabled": true}, "bf16": {"enabled": true}}),
        1,
    );
    issue_at(&e, "bfloat16");
    // zero_optimization: true|false
    assert_eq!(
        resolve(json!({"train_batch_size": 8, "zero_optimization": true}), 1)
            .unwrap()
            .zero_optimization
            .stage,
        1
    );
    assert_eq!(
        resolve(
            json!({"train_batch_size": 8, "zero_optimization": false}),
            1
        )
        .unwrap()
        .zero_optimization
        .stage,
        0
    );
}

#[test]
fn integers_written_as_5e8() {
    for v in [
        json!(5e8),
        json!(5.0e8),
        json!("5e8"),
        json!("500000000"),
        json!(500000000),
    ] {
        let r = resolve(json!({"train_batch_size": 8, "zero_optimization": {"stage": 2, "reduce_bucket_size": v.clone()}}), 1).unwrap();
        assert_eq!(r.zero_optimization.reduce_bucket_size, 500_000_000, "{v}");
    }
    let e = err(
        json!({"train_batch_size": 8, "zero_optimization": {"reduce_bucket_size": 5.5}}),
        1,
    );
    issue_at(&e, "zero_optimization.reduce_bucket_size");
}

#[test]
fn auto_in_a_section_uses_the_default_like_deepspeed() {
    let r = resolve(json!({"train_batch_size": 8, "fp16": {"enabled": "auto"}, "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}), 1).unwrap();
    assert!(!r.fp16.enabled);
    assert_eq!(r.zero_optimization.reduce_bucket_size, 500_000_000);
    assert!(r.warnings.iter().any(|w| w.contains("fp16.enabled")));
}

#[test]
fn toml_reads_the_same_schema() {
    let toml = r#"
train_batch_size = 32
gradient_accumulation_steps = 2
gradient_clipping = 0.5
[optimizer]
type = "AdamW"
params = { lr = 0.0003, betas = [0.9, 0.95] }
[zero_optimization]
stage = 2
reduce_bucket_size = 5e8
[fp16]
enabled = true
initial_scale_power = 12
"#;
    let json = r#"{"train_batch_size": 32, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.0003, "betas": [0.9, 0.95]}},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8},
        "fp16": {"enabled": true, "initial_scale_power": 12}}"#;
    let a = DeepSpeedConfig::from_toml_str(toml)
        .unwrap()
        .resolve(4)
        .unwrap();
    let b = DeepSpeedConfig::from_json_str(json)
        .unwrap()
        .resolve(4)
        .unwrap();
    assert_eq!(a.json(), b.json());
    assert_eq!(a.train_micro_batch_size_per_gpu, 4);
    let e = DeepSpeedConfig::from_toml_str("train_batch_size = 8\n[fp16]\nenabeld = true\n")
        .unwrap()
        .resolve(1)
        .unwrap_err();
    assert!(issue_at(&e, "fp16.enabeld").contains("did you mean `enabled`?"));
}

#[test]
fn files_and_their_errors() {
    let dir = std::env::temp_dir().join(format!("ds-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("c.json");
    std::fs::write(
        &json_path,
        "{\n  // hjson comment\n  \"train_batch_size\": 4,\n}\n",
    )
    .unwrap();
    assert_eq!(
        DeepSpeedConfig::from_path(&json_path)
            .unwrap()
            .resolve(2)
            .unwrap()
            .train_micro_batch_size_per_gpu,
        2
    );
    let toml_path = dir.join("c.toml");
    std::fs::write(&toml_path, "train_batch_size = 4\n").unwrap();
    assert_eq!(
        DeepSpeedConfig::from_path(&toml_path)
            .unwrap()
            .resolve(1)
            .unwrap()
            .train_batch_size,
        4
    );
    let missing = dir.join("missing.json");
    let msg = DeepSpeedConfig::from_path(&missing)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("missing.json"), "{msg}");
    let bin = dir.join("b.json");
    // A UTF-16 byte-order mark followed by half a code unit.
    std::fs::write(&bin, [0xff, 0xfe, 0x00]).unwrap();
    assert!(DeepSpeedConfig::from_path(&bin)
        .unwrap_err()
        .to_string()
        .contains("not valid UTF-16"));
    std::fs::write(&bin, [0x7b, 0xff, 0x00]).unwrap();
    assert!(DeepSpeedConfig::from_path(&bin)
        .unwrap_err()
        .to_string()
        .contains("not UTF-8"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The workspace's example configs: the JSON and TOML forms resolve to the same config
/// (skipped outside the workspace: the crate as packaged).
#[test]
fn example_configs_json_and_toml_agree() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/configs");
    if !dir.is_dir() {
        eprintln!("skipped: no workspace example configs at {}", dir.display());
        return;
    }
    let a = DeepSpeedConfig::from_path(dir.join("gpt_zero2.json"))
        .unwrap()
        .resolve(2)
        .unwrap();
    let b = DeepSpeedConfig::from_path(dir.join("gpt_zero2.toml"))
        .unwrap()
        .resolve(2)
        .unwrap();
    assert_eq!(a.json(), b.json());
    assert_eq!(a.train_micro_batch_size_per_gpu, 8);
    assert_eq!(a.scheduler.as_ref().unwrap().kind, "WarmupDecayLR");
}

/// A value supplied for an "auto" key that the config does not write as "auto" (a typo in the
/// key path, say) is reported, not silently dropped; one that is used is not.
#[test]
fn unused_auto_values_are_reported() {
    let mut auto = std::collections::BTreeMap::new();
    auto.insert(
        "train_micro_batch_size_per_gpu".to_string(),
        serde_json::json!(4),
    );
    auto.insert(
        "train_micro_batch_size_per_gpo".to_string(),
        serde_json::json!(4),
    );
    let opts = ds_config::ResolveOptions {
        world_size: 2,
        allow_unknown_keys: false,
        auto_values: auto,
    };
    let r = ds_config::DeepSpeedConfig::from_json_str(
        r#"{"train_batch_size": 16, "train_micro_batch_size_per_gpu": "auto"}"#,
    )
    .unwrap()
    .resolve_with(&opts)
    .unwrap();
    assert_eq!(r.train_micro_batch_size_per_gpu, 4);
    let w = r.warnings.join("\n");
    assert!(
        w.contains("`train_micro_batch_size_per_gpo` was not used"),
        "{w}"
    );
    assert!(
        !w.contains("`train_micro_batch_size_per_gpu` was not used"),
        "{w}"
    );
}

/// A bucket size of 0 is refused naming the key; a tiny one resolves with a warning.
#[test]
fn tiny_and_zero_bucket_sizes() {
    let err = DeepSpeedConfig::from_json_str(
        r#"{"train_batch_size": 8, "zero_optimization": {"stage": 2, "reduce_bucket_size": 0}}"#,
    )
    .unwrap()
    .resolve(1)
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("zero_optimization.reduce_bucket_size"),
        "{err}"
    );
    let r = DeepSpeedConfig::from_json_str(
        r#"{"train_batch_size": 8, "zero_optimization": {"stage": 2, "allgather_bucket_size": 2}}"#,
    )
    .unwrap()
    .resolve(1)
    .unwrap();
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("zero_optimization.allgather_bucket_size = 2")),
        "{:?}",
        r.warnings
    );
}

/// Config files in UTF-16 (with a byte-order mark) or UTF-8 with a BOM are read; a binary file
/// or a stray non-UTF-8 byte is an error naming its line and column (it said "line 0, column 0").
#[test]
fn file_encodings() {
    let dir = std::env::temp_dir().join(format!("ds-config-enc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = "{\n  \"train_batch_size\": 8\n}\n";
    let mut le = vec![0xFF, 0xFE];
    le.extend(text.encode_utf16().flat_map(|u| u.to_le_bytes()));
    let mut be = vec![0xFE, 0xFF];
    be.extend(text.encode_utf16().flat_map(|u| u.to_be_bytes()));
    let mut bom = vec![0xEF, 0xBB, 0xBF];
    bom.extend(text.as_bytes());
    for (name, bytes) in [("le.json", le), ("be.json", be), ("bom.json", bom)] {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        let r = DeepSpeedConfig::from_path(&p).unwrap().resolve(1).unwrap();
        assert_eq!(r.train_batch_size, 8, "{name}");
    }
    let p = dir.join("latin1.json");
    std::fs::write(
        &p,
        b"{\n  \"train_batch_size\": 8,\n  \"x\": \"caf\xe9\"\n}",
    )
    .unwrap();
    match DeepSpeedConfig::from_path(&p).unwrap_err() {
        ConfigError::Syntax {
            line,
            column,
            message,
        } => {
            assert_eq!((line, column), (3, 12), "{message}");
            assert!(
                message.contains("0xe9") && message.contains("save the file as UTF-8"),
                "{message}"
            );
        }
        other => panic!("{other}"),
    }
    let p = dir.join("bin.json");
    std::fs::write(&p, [0x7Bu8, 0x00, 0xC3, 0x28, 0x00]).unwrap();
    let e = DeepSpeedConfig::from_path(&p).unwrap_err().to_string();
    assert!(e.contains("binary file") && !e.contains("line 0"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- ZeRO-Infinity

/// NVMe offload is accepted with a swap directory, its keys typed; without `nvme_path` (or
/// with GPUDirect Storage) it is refused by name.
#[test]
fn nvme_offload_needs_a_path() {
    let ok = resolve(
        json!({"train_batch_size": 4, "zero_optimization": {"stage": 3, "sub_group_size": 1e6,
            "offload_optimizer": {"device": "nvme", "nvme_path": "/local_nvme", "buffer_count": 3,
                                  "pipeline_read": true, "pipeline_write": true},
            "offload_param": {"device": "nvme", "nvme_path": "/local_nvme", "max_in_cpu": 1e5}},
            "aio": {"block_size": 262144, "queue_depth": 4, "thread_count": 2}}),
        1,
    )
    .unwrap();
    let z = &ok.zero_optimization;
    assert!(z.offload_optimizer_to_nvme() && z.offload_param_to_nvme());
    let o = z.offload_optimizer.as_ref().unwrap();
    assert_eq!(o.nvme_path.as_deref(), Some("/local_nvme"));
    assert_eq!(
        (o.buffer_count, o.pipeline_read, o.pipeline_write),
        (3, true, true)
    );
    assert_eq!(z.offload_param.as_ref().unwrap().max_in_cpu, Some(100_000));
    assert_eq!(z.sub_group_size, 1_000_000);
    assert_eq!(
        (ok.aio.block_size, ok.aio.queue_depth, ok.aio.thread_count),
        (262144, 4, 2)
    );
    // DeepSpeed's defaults when the section is absent.
    let d = resolve(json!({"train_batch_size": 4}), 1).unwrap();
    assert_eq!(
        (d.aio.block_size, d.aio.queue_depth, d.aio.thread_count),
        (1_048_576, 8, 1)
    );

    let e = err(
        json!({"train_batch_size": 4, "zero_optimization": {"stage": 2,
            "offload_optimizer": {"device": "nvme"}}}),
        1,
    );
    assert!(issue_at(&e, "zero_optimization.offload_optimizer.nvme_path").contains("swap files"));
    let e = err(
        json!({"train_batch_size": 4, "aio": {"use_gds": true}, "zero_optimization": {"stage": 3,
            "offload_param": {"device": "nvme", "nvme_path": ""}}}),
        1,
    );
    assert!(issue_at(&e, "zero_optimization.offload_param.nvme_path").contains("needs"));
    assert!(issue_at(&e, "aio.use_gds").contains("GPUDirect"));
}
