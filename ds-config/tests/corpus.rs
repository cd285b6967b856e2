//! Every real DeepSpeed config in the corpus (`shared/ds-configs/` beside the workspace, or
//! `$DS_CONFIG_CORPUS`) either resolves or is refused with the precise reasons listed in
//! `corpus_expectations.tsv` (one row per file, with why). Skipped, with a message, where
//! there is no corpus (the crate as packaged for crates.io).

use std::collections::BTreeMap;
use std::path::PathBuf;

use ds_config::{ConfigError, DeepSpeedConfig, ResolveOptions};

/// `$DS_CONFIG_CORPUS`, else `shared/ds-configs` beside the enclosing workspace (the first
/// ancestor of this crate whose `Cargo.toml` declares `[workspace]`).
fn corpus_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DS_CONFIG_CORPUS") {
        return Some(PathBuf::from(d));
    }
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = crate_dir.ancestors().find(|d| {
        std::fs::read_to_string(d.join("Cargo.toml")).is_ok_and(|t| t.contains("[workspace]"))
    })?;
    let dir = root.parent()?.join("shared/ds-configs");
    dir.is_dir().then_some(dir)
}

struct Row {
    accept: bool,
    paths: Vec<String>,
}

fn expectations() -> BTreeMap<String, Row> {
    let text = include_str!("corpus_expectations.tsv");
    let mut rows = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let cols: Vec<&str> = line.split('\t').collect();
        assert!(cols.len() >= 4, "bad row: {line}");
        let accept = match cols[1] {
            "accept" => true,
            "refuse" => false,
            other => panic!("bad outcome {other} in {line}"),
        };
        let paths = cols[2]
            .split(',')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        rows.insert(cols[0].to_string(), Row { accept, paths });
    }
    rows
}

#[test]
fn every_corpus_file_resolves_or_is_refused_precisely() {
    let Some(dir) = corpus_dir() else {
        eprintln!(
            "skipped: no config corpus (shared/ds-configs beside the workspace, or \
             $DS_CONFIG_CORPUS)"
        );
        return;
    };
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "the config corpus must be at {} (the shared folder beside the repository): {e}",
            dir.display()
        )
    });
    let expected = expectations();
    let mut seen = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let row = expected
            .get(&name)
            .unwrap_or_else(|| panic!("{name}: no row in corpus_expectations.tsv"));
        seen += 1;
        let result = DeepSpeedConfig::from_path(&path).and_then(|c| c.resolve(1));
        match (row.accept, result) {
            (true, Ok(r)) => {
                // Resolved values satisfy the triangle.
                assert_eq!(
                    r.train_batch_size,
                    r.train_micro_batch_size_per_gpu * r.gradient_accumulation_steps,
                    "{name}"
                );
            }
            (true, Err(e)) => panic!("{name}: expected to resolve, got: {e}"),
            (false, Ok(_)) => panic!("{name}: expected a refusal, but it resolved"),
            (false, Err(e)) => {
                if row.paths == ["@syntax"] {
                    assert!(matches!(e, ConfigError::Syntax { .. }), "{name}: {e}");
                    continue;
                }
                let got: Vec<&str> = e.issues().iter().map(|i| i.path.as_str()).collect();
                for p in &row.paths {
                    assert!(
                        got.contains(&p.as_str()),
                        "{name}: expected an issue at `{p}`, got {got:?}: {e}"
                    );
                }
                assert_eq!(
                    got.len(),
                    row.paths.len(),
                    "{name}: unexpected extra issues: {e}"
                );
                for i in e.issues() {
                    assert!(!i.message.is_empty() && !i.value.is_empty(), "{name}: {i}");
                }
            }
        }
    }
    assert_eq!(seen, expected.len(), "rows without a file in the corpus");
}

/// The Hugging Face style files refused only for their "auto" values resolve once the
/// values the HF integration would have filled in are supplied.
#[test]
fn hf_auto_files_resolve_with_supplied_values() {
    let Some(dir) = corpus_dir() else {
        eprintln!("skipped: no config corpus");
        return;
    };
    let mut auto = BTreeMap::new();
    auto.insert(
        "train_micro_batch_size_per_gpu".to_string(),
        serde_json::json!(4),
    );
    auto.insert(
        "gradient_accumulation_steps".to_string(),
        serde_json::json!(2),
    );
    auto.insert(
        "scheduler.params.total_num_steps".to_string(),
        serde_json::json!(1000),
    );
    let opts = ResolveOptions {
        world_size: 2,
        allow_unknown_keys: false,
        auto_values: auto,
    };
    for name in [
        "QwenLM__Qwen__finetune__ds_config_zero2.json",
        "haotian-liu__LLaVA__scripts__zero3_offload.json",
        "huggingface__accelerate__examples__deepspeed_config_templates__zero_stage1_config.json",
        "shibing624__MedicalGPT__scripts__zero3.json",
        "tatsu-lab__stanford_alpaca__configs__default_offload_opt_param.json",
        "lm-sys__FastChat__playground__deepspeed_config_s3.json",
    ] {
        let r = DeepSpeedConfig::from_path(dir.join(name))
            .and_then(|c| c.resolve_with(&opts))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(r.train_micro_batch_size_per_gpu, 4, "{name}");
        // 2 from the supplied value, or the number the file gives (accelerate's template: 1).
        let gas = if name.starts_with("huggingface__accelerate") {
            1
        } else {
            2
        };
        assert_eq!(r.gradient_accumulation_steps, gas, "{name}");
        assert_eq!(r.train_batch_size, 4 * gas * 2, "{name}");
        assert!(r.warnings.iter().any(|w| w.contains("\"auto\"")), "{name}");
    }
}
