//! Library side of the `ds` command: each subcommand as a function that returns its result
//! (so it can be tested without spawning the binary).

use std::collections::BTreeMap;
use std::path::Path;

use ds_config::{ConfigError, DeepSpeedConfig, ResolveOptions};
use serde_json::Value;

/// What `ds check-config` produces.
#[derive(Debug, Clone)]
pub struct CheckConfigOutput {
    /// The fully resolved configuration (DeepSpeed key names, defaults filled).
    pub resolved: Value,
    /// Notes to show on stderr.
    pub warnings: Vec<String>,
}

/// Parses `KEY=VALUE` overrides for `"auto"` values; VALUE is read as JSON when it parses as
/// JSON (numbers, booleans), else as a string.
pub fn parse_auto_values(pairs: &[String]) -> Result<BTreeMap<String, Value>, String> {
    let mut out = BTreeMap::new();
    for p in pairs {
        let Some((k, v)) = p.split_once('=') else {
            return Err(format!(
                "--auto {p:?}: expected KEY=VALUE, e.g. train_micro_batch_size_per_gpu=4"
            ));
        };
        let k = k.trim();
        if k.is_empty() {
            return Err(format!("--auto {p:?}: the key is empty"));
        }
        let value = serde_json::from_str(v.trim()).unwrap_or_else(|_| Value::String(v.to_string()));
        out.insert(k.to_string(), value);
    }
    Ok(out)
}

fn resolve(
    cfg: DeepSpeedConfig,
    world_size: usize,
    auto: &[String],
    allow_unknown: bool,
) -> Result<CheckConfigOutput, ConfigError> {
    let auto_values = parse_auto_values(auto)
        .map_err(|m| ConfigError::invalid("--auto", &format!("{auto:?}"), &m))?;
    let opts = ResolveOptions {
        world_size,
        allow_unknown_keys: allow_unknown,
        auto_values,
    };
    let r = cfg.resolve_with(&opts)?;
    Ok(CheckConfigOutput {
        resolved: r.json().clone(),
        warnings: r.warnings.clone(),
    })
}

/// `ds check-config FILE`: reads, validates and resolves a config file.
pub fn check_config(
    path: &Path,
    world_size: usize,
    auto: &[String],
    allow_unknown: bool,
) -> Result<CheckConfigOutput, ConfigError> {
    resolve(
        DeepSpeedConfig::from_path(path)?,
        world_size,
        auto,
        allow_unknown,
    )
}

/// [`check_config`] on text (`toml` selects the TOML reader).
pub fn check_config_str(
    text: &str,
    toml: bool,
    world_size: usize,
    auto: &[String],
    allow_unknown: bool,
) -> Result<CheckConfigOutput, ConfigError> {
    let cfg = if toml {
        DeepSpeedConfig::from_toml_str(text)?
    } else {
        DeepSpeedConfig::from_json_str(text)?
    };
    resolve(cfg, world_size, auto, allow_unknown)
}
