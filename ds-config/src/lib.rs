//! `ds-config`: DeepSpeed's configuration file, read as DeepSpeed reads it, validated better.
//!
//! The configuration file users already have for DeepSpeed works unchanged: JSON as DeepSpeed's
//! hjson loader reads it (comments, trailing commas, a root without braces; duplicate keys are
//! an error), or TOML with the same schema. [`DeepSpeedConfig::resolve`] validates every key
//! and returns a [`ResolvedConfig`]: DeepSpeed's key names with every default filled in, the
//! batch-size triangle solved for the world size, deprecated aliases folded into their
//! replacements, and `"auto"` values resolved (or refused with how to supply them).
//!
//! Where DeepSpeed is silent or vague this crate is not:
//! - unknown keys at any level are errors with a did-you-mean (DeepSpeed ignores unknown
//!   top-level keys; `ResolveOptions::allow_unknown_keys` turns them into warnings; keys that
//!   start with `_` are treated as comments);
//! - every error names the key path, the value and what is allowed, and all problems of a
//!   file are reported at once;
//! - a key that would be silently ignored (parameter offload below stage 3, optimizer offload
//!   at stage 0) or a section of a feature this runtime does not run that is enabled
//!   (pipeline, compression, elasticity, ...) is refused; a disabled one is accepted;
//! - `steps_per_print` defaults to 10 (DeepSpeed's documented default; its code now defaults
//!   to no progress output, which hides skipped steps);
//! - `fp16.min_loss_scale` may be fractional (DeepSpeed's schema wants an integer);
//! - a `gradient_accumulation_steps` above [`GAS_WARN_ABOVE`] gives a warning (each optimizer
//!   step runs that many forward/backward passes per rank), and batch sizes whose product
//!   overflows are refused.
//!
//! Keys of this runtime that DeepSpeed does not have (documented as extensions, validated like
//! the rest): `comm_timeout` (top level: seconds one MPI call may wait for its peers, default
//! 60, 0 = forever, at most [`MAX_COMM_TIMEOUT_S`]) and `checkpoint.keep_last` (retention).
//!
//! ```
//! use ds_config::DeepSpeedConfig;
//!
//! let cfg = DeepSpeedConfig::from_json_str(r#"{
//!     // comments are fine, as in DeepSpeed
//!     "train_batch_size": 32,
//!     "gradient_accumulation_steps": 2,
//!     "zero_optimization": {"stage": 2, "reduce_bucket_size": "5e8"},
//!     "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}},
//! }"#)?;
//! let r = cfg.resolve(4)?;
//! assert_eq!(r.train_micro_batch_size_per_gpu, 4); // 32 / 4 ranks / 2 steps
//! assert_eq!(r.zero_optimization.stage, 2);
//! assert_eq!(r.gradient_clipping, 1.0); // DeepSpeed's current default
//! assert_eq!(r.json()["zero_optimization"]["overlap_comm"], false);
//!
//! let err = DeepSpeedConfig::from_json_str(r#"{"train_batch_size": 8, "gradient_clipp1ng": 1.0}"#)?
//!     .resolve(1)
//!     .unwrap_err();
//! assert!(err.to_string().contains("did you mean `gradient_clipping`?"));
//! # Ok::<(), ds_config::ConfigError>(())
//! ```

#![warn(missing_docs)]

mod error;
mod parse;
mod resolve;
mod schema;
mod typed;

use std::path::Path;

use serde_json::Value;

pub use error::{ConfigError, Issue};
pub use parse::{parse_json, parse_toml};
pub use resolve::{ResolveOptions, GAS_WARN_ABOVE};
pub use schema::MAX_COMM_TIMEOUT_S;
pub use typed::*;

/// A DeepSpeed configuration as written (parsed, not yet validated).
#[derive(Debug, Clone, PartialEq)]
pub struct DeepSpeedConfig {
    doc: Value,
}

/// The text of a config file: UTF-8 (a byte-order mark is dropped), or UTF-16 with its
/// byte-order mark (what some Windows editors save); anything else is an error naming the
/// line and column of the first byte that is not text.
fn decode_text(path: &Path, bytes: Vec<u8>) -> Result<String, ConfigError> {
    let utf16 = |le: bool| -> Option<String> {
        let units: Vec<u16> = bytes[2..]
            .chunks(2)
            .map(|c| match (c, le) {
                ([a, b], true) => Some(u16::from_le_bytes([*a, *b])),
                ([a, b], false) => Some(u16::from_be_bytes([*a, *b])),
                _ => None,
            })
            .collect::<Option<_>>()?;
        char::decode_utf16(units)
            .collect::<Result<String, _>>()
            .ok()
    };
    match bytes.get(..2) {
        Some([0xFF, 0xFE]) | Some([0xFE, 0xFF]) => {
            return utf16(bytes[0] == 0xFF).ok_or_else(|| ConfigError::Syntax {
                line: 1,
                column: 1,
                message: format!(
                    "{} starts with a UTF-16 byte-order mark but is not valid UTF-16 text",
                    path.display()
                ),
            })
        }
        _ => {}
    }
    match String::from_utf8(bytes) {
        Ok(mut s) => {
            if s.starts_with('\u{feff}') {
                s.remove(0);
            }
            Ok(s)
        }
        Err(e) => {
            let at = e.utf8_error().valid_up_to();
            let bytes = e.into_bytes();
            let before = &bytes[..at];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = at
                - before
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |i| i + 1)
                + 1;
            let binary = bytes.iter().take(4096).any(|&b| b == 0);
            Err(ConfigError::Syntax {
                line,
                column,
                message: format!(
                    "{} is not UTF-8 text: byte 0x{:02x} at offset {at}{}",
                    path.display(),
                    bytes[at],
                    if binary {
                        " (it holds NUL bytes: a binary file, not a config)"
                    } else {
                        "; save the file as UTF-8"
                    }
                ),
            })
        }
    }
}

impl DeepSpeedConfig {
    /// Reads a file: TOML when the extension is `.toml`, DeepSpeed's JSON dialect otherwise.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let text = decode_text(path, bytes)?;
        let is_toml = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("toml"));
        if is_toml {
            Self::from_toml_str(&text)
        } else {
            Self::from_json_str(&text)
        }
    }

    /// Parses DeepSpeed's JSON dialect (JSON plus comments, trailing commas, braceless root).
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        Ok(DeepSpeedConfig {
            doc: parse_json(text)?,
        })
    }

    /// Parses TOML with the same schema (sections as tables).
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Ok(DeepSpeedConfig {
            doc: parse_toml(text)?,
        })
    }

    /// Wraps an already-parsed JSON value.
    pub fn from_value(doc: Value) -> Self {
        DeepSpeedConfig { doc }
    }

    /// The document as written.
    pub fn as_value(&self) -> &Value {
        &self.doc
    }

    /// Validates and resolves for a data-parallel world size (strict: unknown keys are errors).
    pub fn resolve(&self, world_size: usize) -> Result<ResolvedConfig, ConfigError> {
        self.resolve_with(&ResolveOptions::world_size(world_size))
    }

    /// Validates and resolves with explicit options.
    pub fn resolve_with(&self, opts: &ResolveOptions) -> Result<ResolvedConfig, ConfigError> {
        let (json, warnings) = resolve::resolve(&self.doc, opts)?;
        ResolvedConfig::from_resolved(json, warnings, opts.world_size)
    }
}

/// The README's examples, compiled and run as doc tests (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
