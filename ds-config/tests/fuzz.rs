//! Property tests: loading and validation never panic, whatever the input.
//! (A cargo-fuzz style target over the same entry points: arbitrary bytes and arbitrary JSON.)

use ds_config::{DeepSpeedConfig, ResolveOptions};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

fn arb_json() -> impl Strategy<Value = Value> {
    let keys = prop::sample::select(vec![
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "zero_optimization",
        "stage",
        "offload_optimizer",
        "offload_param",
        "device",
        "fp16",
        "bf16",
        "bfloat16",
        "enabled",
        "loss_scale",
        "optimizer",
        "scheduler",
        "type",
        "params",
        "lr",
        "betas",
        "cpu_offload",
        "pipeline",
        "compression_training",
        "gradient_clipping",
        "total_num_steps",
        "warmup_max_lr",
        "auto",
        "x",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        (-1e20f64..1e20).prop_map(|f| json!(f)),
        prop::sample::select(vec![
            "auto", "cpu", "nvme", "none", "Adam", "WarmupLR", "OneCycle", "5e8", "nan", "-1", ""
        ])
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((keys.clone(), inner), 0..6).prop_map(|kv| Value::Object(
                kv.into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect::<Map<_, _>>()
            )),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(c) = DeepSpeedConfig::from_json_str(&text) {
            let _ = c.resolve(2);
        }
        if let Ok(c) = DeepSpeedConfig::from_toml_str(&text) {
            let _ = c.resolve(2);
        }
    }

    #[test]
    fn arbitrary_json_text_like_never_panics(s in "[{}\\[\\]\",:0-9a-z_ .eE+\\-/*#\n]{0,200}") {
        if let Ok(c) = DeepSpeedConfig::from_json_str(&s) {
            let _ = c.resolve(1);
        }
    }

    #[test]
    fn arbitrary_values_never_panic(v in arb_json(), ws in 1usize..9, lax in any::<bool>()) {
        let opts = ResolveOptions { world_size: ws, allow_unknown_keys: lax, ..Default::default() };
        let c = DeepSpeedConfig::from_value(v.clone());
        match c.resolve_with(&opts) {
            Ok(r) => {
                // Anything accepted satisfies the triangle and round-trips through JSON text.
                prop_assert_eq!(r.train_batch_size, r.train_micro_batch_size_per_gpu * r.gradient_accumulation_steps * ws as u64);
                let again = DeepSpeedConfig::from_json_str(&r.json().to_string()).unwrap().resolve_with(&opts).unwrap();
                prop_assert_eq!(again.json(), r.json());
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn valid_configs_with_random_sections_never_panic(v in arb_json(), key in prop::sample::select(vec!["zero_optimization", "fp16", "optimizer", "scheduler", "bf16", "pipeline"])) {
        let doc = json!({"train_batch_size": 8, key: v});
        let _ = DeepSpeedConfig::from_value(doc).resolve(2);
    }
}
