//! Errors of the configuration manager: every one names where the problem is.

use std::fmt;
use std::path::PathBuf;

/// One problem found while validating a configuration: where, what was given, and what is
/// allowed (or what to do instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// Dotted key path, e.g. `zero_optimization.offload_optimizer.device`.
    pub path: String,
    /// The offending value as written (JSON), or `(missing)`.
    pub value: String,
    /// What is allowed, or what to do instead.
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "(root)"
        } else {
            &self.path
        };
        write!(f, "`{path}` = {}: {}", self.value, self.message)
    }
}

/// Errors from loading, parsing, validating or resolving a DeepSpeed configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid JSON/hjson or TOML.
    #[error("syntax error at line {line}, column {column}: {message}")]
    Syntax {
        /// 1-based line (0 when unknown).
        line: usize,
        /// 1-based column (0 when unknown).
        column: usize,
        /// What was wrong.
        message: String,
    },
    /// The same key appears twice in one object (DeepSpeed refuses this too).
    #[error("duplicate key `{path}` (second occurrence at line {line}): DeepSpeed refuses duplicate keys; keep one")]
    DuplicateKey {
        /// Key path of the duplicate.
        path: String,
        /// Line of the second occurrence.
        line: usize,
    },
    /// The configuration parsed but is not valid; every problem found is listed.
    #[error("{}", format_issues(.0))]
    Invalid(Vec<Issue>),
}

fn format_issues(issues: &[Issue]) -> String {
    match issues {
        [one] => format!("invalid config: {one}"),
        many => {
            let mut s = format!("invalid config: {} problems", many.len());
            for i in many {
                s.push_str("\n  - ");
                s.push_str(&i.to_string());
            }
            s
        }
    }
}

impl ConfigError {
    /// A single validation problem.
    pub fn invalid(path: &str, value: &str, message: &str) -> Self {
        ConfigError::Invalid(vec![Issue {
            path: path.to_string(),
            value: value.to_string(),
            message: message.to_string(),
        }])
    }

    /// The validation problems, when this is [`ConfigError::Invalid`].
    pub fn issues(&self) -> &[Issue] {
        match self {
            ConfigError::Invalid(v) => v,
            _ => &[],
        }
    }
}
