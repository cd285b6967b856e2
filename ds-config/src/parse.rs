//! A lenient JSON reader that accepts what DeepSpeed's hjson loader accepts in real
//! configuration files, and refuses the rest with a line and column.
//!
//! Accepted beyond strict JSON (as hjson does): `//`, `#` and `/* */` comments, trailing
//! commas, a newline instead of a comma between members or elements, a root object written
//! without its braces, a UTF-8 byte-order mark and CRLF line endings.
//!
//! Refused (as DeepSpeed does): duplicate keys in one object (the error names the key path).
//! Refused where hjson would silently turn it into a string: an unquoted word in value
//! position (`"train_batch_size": CONFIG_BATCH_SIZE`), the signature of a template whose
//! placeholders were never filled in. The error says so.

use serde_json::{Map, Number, Value};

use crate::error::ConfigError;

/// Maximum nesting depth of objects and arrays (guards the recursive reader's stack).
const MAX_DEPTH: usize = 128;

/// Parses DeepSpeed's JSON dialect into a [`Value`] (key order preserved).
pub fn parse_json(text: &str) -> Result<Value, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut p = Parser {
        src: text.as_bytes(),
        text,
        pos: 0,
        depth: 0,
    };
    p.skip_ws()?;
    if p.pos >= p.src.len() {
        return Err(p.err("the file is empty: expected a JSON object"));
    }
    let value = if p.peek() == Some(b'"') && p.braceless_root_ahead()? {
        // hjson: a root object may omit its braces.
        p.parse_members(None, "")?
    } else {
        p.parse_value("")?
    };
    p.skip_ws()?;
    if p.pos < p.src.len() {
        return Err(p.err("unexpected text after the end of the configuration"));
    }
    Ok(value)
}

struct Parser<'a> {
    src: &'a [u8],
    text: &'a str,
    pos: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn line_col(&self, pos: usize) -> (usize, usize) {
        let before = &self.text.as_bytes()[..pos.min(self.src.len())];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map(|i| i + 1)
            .unwrap_or(0);
        let col = String::from_utf8_lossy(&before[line_start..])
            .chars()
            .count()
            + 1;
        (line, col)
    }

    fn err(&self, msg: impl Into<String>) -> ConfigError {
        self.err_at(self.pos, msg)
    }

    fn err_at(&self, pos: usize, msg: impl Into<String>) -> ConfigError {
        let (line, column) = self.line_col(pos);
        ConfigError::Syntax {
            line,
            column,
            message: msg.into(),
        }
    }

    /// Skips whitespace and comments. Returns whether a newline was crossed.
    fn skip_ws(&mut self) -> Result<bool, ConfigError> {
        let mut newline = false;
        while let Some(c) = self.peek() {
            match c {
                b'\n' => {
                    newline = true;
                    self.pos += 1;
                }
                b' ' | b'\t' | b'\r' => self.pos += 1,
                b'#' => self.skip_line(),
                b'/' if self.src.get(self.pos + 1) == Some(&b'/') => self.skip_line(),
                b'/' if self.src.get(self.pos + 1) == Some(&b'*') => {
                    let start = self.pos;
                    self.pos += 2;
                    loop {
                        match self.peek() {
                            None => return Err(self.err_at(start, "unterminated /* comment")),
                            Some(b'*') if self.src.get(self.pos + 1) == Some(&b'/') => {
                                self.pos += 2;
                                break;
                            }
                            Some(b'\n') => {
                                newline = true;
                                self.pos += 1;
                            }
                            Some(_) => self.pos += 1,
                        }
                    }
                }
                _ => break,
            }
        }
        Ok(newline)
    }

    fn skip_line(&mut self) {
        while let Some(c) = self.peek() {
            if c == b'\n' {
                break;
            }
            self.pos += 1;
        }
    }

    /// Looks ahead: is the text a braceless root object (`"key": value ...`)?
    fn braceless_root_ahead(&mut self) -> Result<bool, ConfigError> {
        let save = self.pos;
        let depth = self.depth;
        let result = self.parse_string().is_ok() && {
            self.skip_ws()?;
            self.peek() == Some(b':')
        };
        self.pos = save;
        self.depth = depth;
        Ok(result)
    }

    fn parse_value(&mut self, path: &str) -> Result<Value, ConfigError> {
        self.skip_ws()?;
        match self.peek() {
            None => Err(self.err("unexpected end of file: expected a value")),
            Some(b'{') => {
                self.enter()?;
                self.pos += 1;
                let v = self.parse_members(Some(b'}'), path)?;
                self.depth -= 1;
                Ok(v)
            }
            Some(b'[') => {
                self.enter()?;
                self.pos += 1;
                let v = self.parse_array(path)?;
                self.depth -= 1;
                Ok(v)
            }
            Some(b'"') => Ok(Value::String(self.parse_string()?)),
            Some(b'-') | Some(b'0'..=b'9') => self.parse_number(),
            Some(c) if c.is_ascii_alphabetic() || c == b'_' || c == b'$' || c == b'<' => {
                let start = self.pos;
                while let Some(c) = self.peek() {
                    if c.is_ascii_alphanumeric() || matches!(c, b'_' | b'$' | b'<' | b'>' | b'.') {
                        self.pos += 1;
                    } else {
                        break;
                    }
                }
                let word = &self.text[start..self.pos];
                match word {
                    "true" => Ok(Value::Bool(true)),
                    "false" => Ok(Value::Bool(false)),
                    "null" => Ok(Value::Null),
                    "True" | "False" | "None" => Err(self.err_at(
                        start,
                        format!(
                            "`{word}` is Python, not JSON: write {}",
                            match word {
                                "True" => "true",
                                "False" => "false",
                                _ => "null",
                            }
                        ),
                    )),
                    _ => Err(self.err_at(
                        start,
                        format!(
                            "unquoted value `{word}`{}: this looks like a template placeholder that was never filled in; allowed: a number, a \"string\", true, false, null, an object or an array",
                            if path.is_empty() { String::new() } else { format!(" for `{path}`") }
                        ),
                    )),
                }
            }
            Some(_) => {
                let ch = self.text[self.pos..].chars().next().unwrap_or('?');
                Err(self.err(format!(
                    "unexpected character `{ch}`: expected a value (number, \"string\", true, false, null, object or array)"
                )))
            }
        }
    }

    fn enter(&mut self) -> Result<(), ConfigError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.err(format!("nesting deeper than {MAX_DEPTH} levels")));
        }
        Ok(())
    }

    /// Parses object members up to `close` (or end of input for a braceless root).
    fn parse_members(&mut self, close: Option<u8>, path: &str) -> Result<Value, ConfigError> {
        let mut map = Map::new();
        let mut need_sep = false;
        loop {
            let newline = self.skip_ws()?;
            match (self.peek(), close) {
                (None, None) => return Ok(Value::Object(map)),
                (None, Some(_)) => {
                    return Err(self.err("unexpected end of file: an object is missing its `}`"))
                }
                (Some(c), Some(cl)) if c == cl => {
                    self.pos += 1;
                    return Ok(Value::Object(map));
                }
                (Some(b','), _) => {
                    if !need_sep {
                        return Err(self.err("unexpected `,`: expected a \"key\""));
                    }
                    self.pos += 1;
                    need_sep = false;
                    continue;
                }
                (Some(_), _) => {}
            }
            if need_sep && !newline {
                return Err(self.err("expected `,` or the end of the object"));
            }
            let key_pos = self.pos;
            if self.peek() != Some(b'"') {
                return Err(self.err("expected a \"quoted key\""));
            }
            let key = self.parse_string()?;
            self.skip_ws()?;
            if self.peek() != Some(b':') {
                return Err(self.err(format!("expected `:` after the key \"{key}\"")));
            }
            self.pos += 1;
            let child = join_path(path, &key);
            let value = self.parse_value(&child)?;
            if map.contains_key(&key) {
                return Err(ConfigError::DuplicateKey {
                    path: child,
                    line: self.line_col(key_pos).0,
                });
            }
            map.insert(key, value);
            need_sep = true;
        }
    }

    fn parse_array(&mut self, path: &str) -> Result<Value, ConfigError> {
        let mut items = Vec::new();
        let mut need_sep = false;
        loop {
            let newline = self.skip_ws()?;
            match self.peek() {
                None => return Err(self.err("unexpected end of file: an array is missing its `]`")),
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                Some(b',') => {
                    if !need_sep {
                        return Err(self.err("unexpected `,`: expected a value"));
                    }
                    self.pos += 1;
                    need_sep = false;
                    continue;
                }
                Some(_) => {}
            }
            if need_sep && !newline {
                return Err(self.err("expected `,` or the end of the array"));
            }
            let child = format!("{path}[{}]", items.len());
            items.push(self.parse_value(&child)?);
            need_sep = true;
        }
    }

    fn parse_string(&mut self) -> Result<String, ConfigError> {
        let start = self.pos;
        self.pos += 1; // opening quote
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.err_at(start, "unterminated string"));
            };
            match c {
                b'"' => {
                    self.pos += 1;
                    return Ok(out);
                }
                b'\n' => return Err(self.err_at(start, "unterminated string (newline inside)")),
                b'\\' => {
                    self.pos += 1;
                    let Some(e) = self.peek() else {
                        return Err(self.err_at(start, "unterminated string"));
                    };
                    self.pos += 1;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hi = self.hex4()?;
                            let ch = if (0xD800..0xDC00).contains(&hi) {
                                if self.src.get(self.pos) == Some(&b'\\')
                                    && self.src.get(self.pos + 1) == Some(&b'u')
                                {
                                    self.pos += 2;
                                    let lo = self.hex4()?;
                                    char::from_u32(
                                        0x10000 + ((hi - 0xD800) << 10) + (lo.wrapping_sub(0xDC00)),
                                    )
                                } else {
                                    None
                                }
                            } else {
                                char::from_u32(hi)
                            };
                            out.push(ch.unwrap_or('\u{fffd}'));
                        }
                        _ => {
                            return Err(self.err_at(self.pos - 2, "invalid escape in string"));
                        }
                    }
                }
                _ => {
                    // Copy one UTF-8 character (input is valid UTF-8: it came from &str).
                    let ch = self.text[self.pos..].chars().next().unwrap_or('\u{fffd}');
                    out.push(ch);
                    self.pos += ch.len_utf8();
                }
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, ConfigError> {
        let digits = self
            .text
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| self.err("truncated \\u escape"))?;
        let v = u32::from_str_radix(digits, 16).map_err(|_| self.err("invalid \\u escape"))?;
        self.pos += 4;
        Ok(v)
    }

    fn parse_number(&mut self) -> Result<Value, ConfigError> {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c.is_ascii_digit() || matches!(c, b'-' | b'+' | b'.' | b'e' | b'E') {
                self.pos += 1;
            } else {
                break;
            }
        }
        let s = &self.text[start..self.pos];
        if let Ok(i) = s.parse::<i64>() {
            return Ok(Value::Number(i.into()));
        }
        if let Ok(u) = s.parse::<u64>() {
            return Ok(Value::Number(u.into()));
        }
        let looks_json = {
            let b = s.as_bytes();
            let digits_start = usize::from(b.first() == Some(&b'-'));
            b.get(digits_start).is_some_and(|c| c.is_ascii_digit())
        };
        match s.parse::<f64>() {
            Ok(f) if looks_json && f.is_finite() => Number::from_f64(f)
                .map(Value::Number)
                .ok_or_else(|| self.err_at(start, format!("invalid number `{s}`"))),
            Ok(_) if looks_json => Err(self.err_at(
                start,
                format!("number `{s}` is out of range (not a finite 64-bit float)"),
            )),
            _ => Err(self.err_at(start, format!("invalid number `{s}`"))),
        }
    }
}

/// Joins a key onto a dotted key path.
pub(crate) fn join_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Converts a TOML document into the same JSON value model.
pub fn parse_toml(text: &str) -> Result<Value, ConfigError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let (line, column) = e
            .span()
            .map(|s| {
                let before = &text.as_bytes()[..s.start.min(text.len())];
                let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
                let col = before.len()
                    - before
                        .iter()
                        .rposition(|&b| b == b'\n')
                        .map_or(0, |i| i + 1)
                    + 1;
                (line, col)
            })
            .unwrap_or((0, 0));
        ConfigError::Syntax {
            line,
            column,
            message: format!("TOML: {}", e.message()),
        }
    })?;
    toml_to_json(toml::Value::Table(table), "")
}

fn toml_to_json(v: toml::Value, path: &str) -> Result<Value, ConfigError> {
    Ok(match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::Number(i.into()),
        toml::Value::Float(f) => match Number::from_f64(f) {
            Some(n) => Value::Number(n),
            None => {
                return Err(ConfigError::invalid(
                    path,
                    &f.to_string(),
                    "a finite number (TOML nan/inf are not allowed)",
                ))
            }
        },
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => {
            return Err(ConfigError::invalid(
                path,
                &d.to_string(),
                "a number, string, boolean, table or array (dates are not config values)",
            ))
        }
        toml::Value::Array(a) => Value::Array(
            a.into_iter()
                .enumerate()
                .map(|(i, x)| toml_to_json(x, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        toml::Value::Table(t) => {
            let mut m = Map::new();
            for (k, x) in t {
                let child = join_path(path, &k);
                m.insert(k, toml_to_json(x, &child)?);
            }
            Value::Object(m)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strict_json() {
        let v =
            parse_json(r#"{"a": 1, "b": [1, 2.5, -3e2], "c": {"d": "x\"y"}, "e": null}"#).unwrap();
        assert_eq!(
            v,
            json!({"a": 1, "b": [1, 2.5, -300.0], "c": {"d": "x\"y"}, "e": null})
        );
    }

    #[test]
    fn comments_trailing_commas_newline_separators() {
        let text = "\u{feff}{\r\n  // line comment\r\n  \"a\": 1, # hash comment\n  /* block\n comment */ \"b\": [1,\n 2,\n],\n  \"c\": 3\n  \"d\": 4,\n}\n";
        let v = parse_json(text).unwrap();
        assert_eq!(v, json!({"a": 1, "b": [1, 2], "c": 3, "d": 4}));
    }

    #[test]
    fn braceless_root() {
        let v = parse_json("// hi\n\"a\": 1,\n\"b\": {\"c\": true} // x\n").unwrap();
        assert_eq!(v, json!({"a": 1, "b": {"c": true}}));
    }

    #[test]
    fn duplicate_key_names_path_and_line() {
        let e = parse_json("{\n \"zero_optimization\": {\n  \"stage\": 1,\n  \"stage\": 2\n }\n}")
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("zero_optimization.stage"), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");
    }

    #[test]
    fn placeholder_is_refused_with_position_and_key() {
        let e = parse_json("{\n  \"train_batch_size\" : CONFIG_BATCH_SIZE,\n}").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("line 2"), "{msg}");
        assert!(msg.contains("CONFIG_BATCH_SIZE"), "{msg}");
        assert!(msg.contains("train_batch_size"), "{msg}");
        assert!(msg.contains("placeholder"), "{msg}");
    }

    #[test]
    fn python_literals_refused() {
        let msg = parse_json("{\"a\": True}").unwrap_err().to_string();
        assert!(msg.contains("write true"), "{msg}");
    }

    #[test]
    fn syntax_errors_do_not_panic() {
        for bad in [
            "",
            "{",
            "}",
            "[",
            "{\"a\"",
            "{\"a\":",
            "{\"a\" 1}",
            "{,}",
            "[,]",
            "{\"a\":1 \"b\":2}",
            "\"abc",
            "{\"a\": \"\\u12\"}",
            "{\"a\": 1e999}",
            "{\"a\": -}",
            "{} x",
            "/* x",
            "{\"a\": \"\\q\"}",
            "{\"a\": 1.2.3}",
        ] {
            assert!(parse_json(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let text = "[".repeat(100_000);
        let msg = parse_json(&text).unwrap_err().to_string();
        assert!(msg.contains("nesting"), "{msg}");
    }

    #[test]
    fn big_integers_and_floats() {
        let v = parse_json("{\"a\": 9223372036854775807, \"b\": 5e8, \"c\": 1e14}").unwrap();
        assert_eq!(v["a"], json!(i64::MAX));
        assert_eq!(v["b"].as_f64(), Some(5e8));
    }

    #[test]
    fn toml_document() {
        let v = parse_toml("train_batch_size = 8\n[zero_optimization]\nstage = 2\n").unwrap();
        assert_eq!(
            v,
            json!({"train_batch_size": 8, "zero_optimization": {"stage": 2}})
        );
        let msg = parse_toml("a = 1\na = 2\n").unwrap_err().to_string();
        assert!(msg.contains("line 2"), "{msg}");
    }
}
