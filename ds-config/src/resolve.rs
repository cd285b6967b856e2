//! Validation and resolution: from the document as written to the fully resolved config
//! (DeepSpeed key names, every default filled, aliases folded, `"auto"` resolved or refused).

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::error::{ConfigError, Issue};
use crate::parse::join_path;
use crate::schema::{self, Enabled, Ty, D, F};

/// Options for [`crate::DeepSpeedConfig::resolve_with`].
#[derive(Debug, Clone)]
pub struct ResolveOptions {
    /// Data-parallel world size used for the batch-size triangle (>= 1).
    pub world_size: usize,
    /// Report unknown keys as warnings instead of errors (DeepSpeed's permissive
    /// behaviour at the top level). Off by default: typos are errors here.
    pub allow_unknown_keys: bool,
    /// Values for keys written as `"auto"`, by dotted key path
    /// (e.g. `train_micro_batch_size_per_gpu` or `scheduler.params.total_num_steps`):
    /// what Hugging Face's integration would substitute from its training arguments.
    pub auto_values: BTreeMap<String, Value>,
}

impl Default for ResolveOptions {
    fn default() -> Self {
        ResolveOptions {
            world_size: 1,
            allow_unknown_keys: false,
            auto_values: BTreeMap::new(),
        }
    }
}

impl ResolveOptions {
    /// Options for a world size, everything else default.
    pub fn world_size(world_size: usize) -> Self {
        ResolveOptions {
            world_size,
            ..Default::default()
        }
    }
}

pub(crate) struct Ctx<'a> {
    pub issues: Vec<Issue>,
    pub warnings: Vec<String>,
    opts: &'a ResolveOptions,
    /// The supplied "auto" values a key of the config asked for.
    used_autos: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

/// Renders a value for a message (JSON text, shortened).
pub(crate) fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        let short: String = s.chars().take(77).collect();
        format!("{short}...")
    } else {
        s
    }
}

impl<'a> Ctx<'a> {
    fn issue(&mut self, path: &str, value: &Value, message: impl Into<String>) {
        self.issues.push(Issue {
            path: path.to_string(),
            value: show(value),
            message: message.into(),
        });
    }

    fn missing(&mut self, path: &str, message: impl Into<String>) {
        self.issues.push(Issue {
            path: path.to_string(),
            value: "(missing)".to_string(),
            message: message.into(),
        });
    }

    fn warn(&mut self, msg: impl Into<String>) {
        self.warnings.push(msg.into());
    }

    /// An unknown key: an error (or a warning when allowed), with the best hint available.
    fn unknown_key(&mut self, path: &str, key: &str, value: &Value, candidates: &[&str]) {
        if key.starts_with('_') {
            self.warn(format!(
                "`{path}` ignored: keys starting with `_` are treated as comments"
            ));
            return;
        }
        let mut msg = String::from("unknown key");
        if let Some((_, hint)) = schema::KEY_HINTS.iter().find(|(k, _)| *k == key) {
            msg.push_str(&format!(": {hint}"));
        } else if let Some(best) = did_you_mean(key, candidates) {
            msg.push_str(&format!("; did you mean `{best}`?"));
        } else if let Some(home) = known_elsewhere(key) {
            msg.push_str(&format!("; this key belongs in `{home}`"));
        } else if candidates.len() <= 12 {
            msg.push_str("; allowed here: ");
            msg.push_str(&candidates.join(", "));
        } else {
            msg.push_str(" (not a DeepSpeed configuration key)");
        }
        if self.opts.allow_unknown_keys {
            self.warn(format!("`{path}` ignored: {msg}"));
        } else {
            self.issue(path, value, msg);
        }
    }

    /// The override for a key written as `"auto"`, if the caller supplied one.
    fn auto_override(&self, path: &str) -> Option<Value> {
        let v = self.opts.auto_values.get(path).cloned();
        if v.is_some() {
            self.used_autos.borrow_mut().insert(path.to_string());
        }
        v
    }
}

/// Edit distance between two short strings.
fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidate within a third of the key's length (at least 2 edits).
pub(crate) fn did_you_mean<'c>(key: &str, candidates: &[&'c str]) -> Option<&'c str> {
    let lower = key.to_ascii_lowercase();
    let limit = (key.chars().count() / 3).max(2);
    // Ties go to the candidate sharing the longest prefix ("bfp16" -> "bf16", not "fp16").
    let common = |c: &str| {
        lower
            .chars()
            .zip(c.to_ascii_lowercase().chars())
            .take_while(|(a, b)| a == b)
            .count()
    };
    candidates
        .iter()
        .map(|c| (levenshtein(&lower, &c.to_ascii_lowercase()), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, c)| (*d, usize::MAX - common(c)))
        .map(|(_, c)| c)
}

/// Where else in the schema a key is known (for misplaced keys).
fn known_elsewhere(key: &str) -> Option<String> {
    if schema::TOP_SCALARS.iter().any(|f| f.key == key) {
        return Some("the top level".into());
    }
    for (section, fields) in schema::TABLE_SECTIONS {
        if fields.iter().any(|f| f.key == key) {
            return Some((*section).to_string());
        }
    }
    if schema::ZERO.iter().any(|f| f.key == key) {
        return Some("zero_optimization".into());
    }
    None
}

/// Converts a written value to the key's type, or says what is allowed.
fn coerce(v: &Value, ty: Ty) -> Result<Value, String> {
    match ty {
        Ty::Bool => v
            .as_bool()
            .map(Value::Bool)
            .ok_or_else(|| "allowed: true or false".to_string()),
        Ty::Int { min, max } => {
            let range = if max == i64::MAX {
                format!("an integer >= {min}")
            } else {
                format!("an integer from {min} to {max}")
            };
            let i = as_integer(v).ok_or_else(|| {
                format!("allowed: {range} (5e8, 5.0e8 and \"5e8\" are accepted when integral)")
            })?;
            if i < min || i > max {
                return Err(format!("allowed: {range}"));
            }
            Ok(json!(i))
        }
        Ty::Float {
            min,
            exclusive,
            max,
        } => {
            let range = match (exclusive, max.is_finite()) {
                (true, false) => format!("a finite number > {min}"),
                (false, false) => format!("a finite number >= {min}"),
                (_, true) => format!("a number from {min} to {max}"),
            };
            let x = as_float(v).ok_or_else(|| format!("allowed: {range}"))?;
            let low_ok = if exclusive { x > min } else { x >= min };
            if !x.is_finite() || !low_ok || x > max {
                return Err(format!("allowed: {range}"));
            }
            Ok(json!(x))
        }
        Ty::Str => v
            .as_str()
            .map(|s| Value::String(s.to_string()))
            .ok_or_else(|| "allowed: a string".to_string()),
        Ty::Enum(choices) | Ty::EnumCi(choices) => {
            let ci = matches!(ty, Ty::EnumCi(_));
            let list = choices
                .iter()
                .map(|c| format!("\"{c}\""))
                .collect::<Vec<_>>()
                .join(", ");
            let Some(s) = v.as_str() else {
                return Err(format!("allowed: one of {list}"));
            };
            let hit = choices.iter().find(|c| {
                if ci {
                    c.eq_ignore_ascii_case(s)
                } else {
                    **c == s
                }
            });
            match hit {
                Some(c) => Ok(Value::String((*c).to_string())),
                None => {
                    let mut msg = format!("allowed: one of {list}");
                    if let Some(best) = did_you_mean(s, choices) {
                        msg.push_str(&format!("; did you mean \"{best}\"?"));
                    }
                    Err(msg)
                }
            }
        }
        Ty::StrList => match v.as_array() {
            Some(a) if a.iter().all(Value::is_string) => Ok(v.clone()),
            _ => Err("allowed: a list of strings".into()),
        },
        Ty::Betas => {
            let pair = v.as_array().and_then(|a| {
                if a.len() == 2 {
                    Some((as_float(&a[0])?, as_float(&a[1])?))
                } else {
                    None
                }
            });
            match pair {
                Some((b1, b2)) if (0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2) => {
                    Ok(json!([b1, b2]))
                }
                _ => Err("allowed: a list of two numbers in [0, 1), e.g. [0.9, 0.999]".into()),
            }
        }
        Ty::Any => Ok(v.clone()),
        Ty::Obj(_) => Err("allowed: an object".into()),
    }
}

/// An integer written as 5, 5.0, 5e8 or "5e8" (when integral and in range).
pub(crate) fn as_integer(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().and_then(float_to_int)),
        Value::String(s) => {
            let t = s.trim();
            t.parse::<i64>()
                .ok()
                .or_else(|| t.parse::<f64>().ok().and_then(float_to_int))
        }
        _ => None,
    }
}

fn float_to_int(f: f64) -> Option<i64> {
    // 9.2e18 is the largest float that converts exactly below i64::MAX.
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 9.2e18 {
        Some(f as i64)
    } else {
        None
    }
}

/// A number written as a JSON number or a numeric string (booleans are not numbers).
pub(crate) fn as_float(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}

fn default_of(ctx: &mut Ctx, field: &F, path: &str) -> Value {
    match field.def {
        D::Null => Value::Null,
        D::B(b) => json!(b),
        D::I(i) => json!(i),
        D::F(x) => json!(x),
        D::S(s) => json!(s),
        D::Betas(a, b) => json!([a, b]),
        D::EmptyList => json!([]),
        D::Obj => match field.ty {
            Ty::Obj(sub) => walk(ctx, None, sub, path),
            _ => Value::Null,
        },
        D::Required => Value::Null,
    }
}

fn is_auto(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.eq_ignore_ascii_case("auto"))
}

/// Validates a section against its fields and returns it with every default filled.
pub(crate) fn walk(ctx: &mut Ctx, input: Option<&Value>, fields: &[F], path: &str) -> Value {
    let empty = Map::new();
    let map = match input {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(other) => {
            ctx.issue(path, other, "allowed: an object (a section of keys)");
            &empty
        }
    };
    let names: Vec<&str> = fields.iter().map(|f| f.key).collect();
    let mut candidates = names.clone();
    if path == "zero_optimization" {
        // Deprecated spellings are consumed before this walk; offer them for typos of theirs.
        candidates.extend([
            "cpu_offload",
            "cpu_offload_param",
            "cpu_offload_use_pin_memory",
        ]);
    }
    for (k, v) in map {
        if !names.contains(&k.as_str()) {
            ctx.unknown_key(&join_path(path, k), k, v, &candidates);
        }
    }
    let mut out = Map::new();
    for field in fields {
        let p = join_path(path, field.key);
        let value = match map.get(field.key) {
            None => {
                if matches!(field.def, D::Required) {
                    ctx.missing(&p, "required: this key has no default; give a value");
                }
                default_of(ctx, field, &p)
            }
            Some(v) if is_auto(v) => match ctx.auto_override(&p) {
                Some(given) => value_for(ctx, field, &given, &p),
                None if matches!(field.def, D::Required) => {
                    ctx.issue(
                        &p,
                        v,
                        format!(
                            "\"auto\" cannot be resolved here (Hugging Face's integration fills it from its training arguments): replace it with a number, or pass --auto {p}=VALUE"
                        ),
                    );
                    Value::Null
                }
                None => {
                    let d = default_of(ctx, field, &p);
                    ctx.warn(format!(
                        "`{p}` = \"auto\" resolved to the default {} (as DeepSpeed does for \"auto\")",
                        show(&d)
                    ));
                    d
                }
            },
            Some(v) => value_for(ctx, field, v, &p),
        };
        out.insert(field.key.to_string(), value);
    }
    Value::Object(out)
}

fn value_for(ctx: &mut Ctx, field: &F, v: &Value, path: &str) -> Value {
    if v.is_null() {
        if field.nullable {
            return Value::Null;
        }
        ctx.issue(
            path,
            v,
            "null is not allowed here; remove the key to use the default",
        );
        return default_of(ctx, field, path);
    }
    if let Ty::Obj(sub) = field.ty {
        return walk(ctx, Some(v), sub, path);
    }
    match coerce(v, field.ty) {
        Ok(x) => x,
        Err(msg) => {
            ctx.issue(path, v, msg);
            default_of(ctx, field, path)
        }
    }
}

fn get_bool(v: &Value, path: &[&str]) -> bool {
    get(v, path).and_then(Value::as_bool).unwrap_or(false)
}

fn get<'v>(v: &'v Value, path: &[&str]) -> Option<&'v Value> {
    path.iter().try_fold(v, |cur, k| cur.get(k))
}

fn any_nested_enabled(v: &Value) -> Option<String> {
    fn rec(v: &Value, path: String) -> Option<String> {
        match v {
            Value::Object(m) => {
                if m.get("enabled") == Some(&Value::Bool(true)) {
                    return Some(join_path(&path, "enabled"));
                }
                m.iter().find_map(|(k, x)| rec(x, join_path(&path, k)))
            }
            _ => None,
        }
    }
    rec(v, String::new())
}

/// A `gradient_accumulation_steps` above this gives a warning: each optimizer step runs that
/// many forward/backward passes on every rank (1e12 would run for years without a word).
pub const GAS_WARN_ABOVE: i64 = 65_536;

const BATCH_KEYS: [&str; 3] = [
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
];

/// Resolves a parsed document. Returns the resolved config and the warnings.
pub(crate) fn resolve(
    doc: &Value,
    opts: &ResolveOptions,
) -> Result<(Value, Vec<String>), ConfigError> {
    let Some(input) = doc.as_object() else {
        return Err(ConfigError::invalid(
            "",
            &show(doc),
            "a DeepSpeed config is an object of sections and keys",
        ));
    };
    if opts.world_size == 0 {
        return Err(ConfigError::invalid(
            "world_size",
            "0",
            "the world size must be at least 1",
        ));
    }
    let mut ctx = Ctx {
        issues: Vec::new(),
        warnings: Vec::new(),
        opts,
        used_autos: Default::default(),
    };
    let mut input = input.clone();

    // Aliases at the top level.
    if let Some(v) = input.remove("bfloat16") {
        if input.contains_key("bf16") {
            ctx.issue(
                "bfloat16",
                &v,
                "both `bfloat16` (its legacy name) and `bf16` are given; keep only `bf16`",
            );
        } else {
            ctx.warn("`bfloat16` is the legacy name of `bf16`; read as `bf16`");
            input.insert("bf16".into(), v);
        }
    }
    if let Some(Value::Bool(b)) = input.get("zero_optimization").cloned() {
        ctx.warn(format!(
            "`zero_optimization: {b}` is a deprecated form; read as {{\"stage\": {}}}",
            u8::from(b)
        ));
        input.insert("zero_optimization".into(), json!({"stage": u8::from(b)}));
    }

    // Unknown top-level keys.
    let mut known: Vec<&str> = BATCH_KEYS.to_vec();
    known.extend(schema::TOP_SCALARS.iter().map(|f| f.key));
    known.extend(schema::TABLE_SECTIONS.iter().map(|(k, _)| *k));
    known.extend(["zero_optimization", "optimizer", "scheduler"]);
    known.extend(schema::NOT_RUN.iter().map(|(k, _, _)| *k));
    for (k, v) in &input {
        if !known.contains(&k.as_str()) {
            ctx.unknown_key(k, k, v, &known);
        }
    }

    let mut out = Map::new();
    resolve_batch(&mut ctx, &input, &mut out);

    let top = walk(
        &mut ctx,
        Some(&Value::Object(
            input
                .iter()
                .filter(|(k, _)| schema::TOP_SCALARS.iter().any(|f| f.key == k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )),
        schema::TOP_SCALARS,
        "",
    );
    if let Value::Object(m) = top {
        out.extend(m);
    }

    let optimizer = resolve_optimizer(&mut ctx, input.get("optimizer"));
    let scheduler = resolve_scheduler(&mut ctx, input.get("scheduler"), &optimizer);
    out.insert("optimizer".into(), optimizer);
    out.insert("scheduler".into(), scheduler);

    for (section, fields) in schema::TABLE_SECTIONS {
        let v = walk(&mut ctx, input.get(*section), fields, section);
        out.insert((*section).to_string(), v);
    }
    let zero = resolve_zero(&mut ctx, input.get("zero_optimization"));
    out.insert("zero_optimization".into(), zero);
    if input.get("aio").and_then(|a| a.get("use_gds")) == Some(&Value::Bool(true)) {
        ctx.issue(
            "aio.use_gds",
            &Value::Bool(true),
            "GPUDirect Storage is not run by this runtime (the swap files go through host memory); allowed: false",
        );
    }

    for (key, what, mode) in schema::NOT_RUN {
        let Some(v) = input.get(*key) else { continue };
        let enabled_at = match mode {
            Enabled::Flag => (v.get("enabled") == Some(&Value::Bool(true))
                || (*key == "compile" && v.get("deepcompile") == Some(&Value::Bool(true)))
                || (*key == "tensor_parallel"
                    && v.get("autotp_size").and_then(as_integer).unwrap_or(0) > 1))
                .then(|| format!("{key}.enabled")),
            Enabled::AnyNested => any_nested_enabled(v).map(|p| join_path(key, &p)),
            Enabled::UnlessDisabled => {
                (v.get("enabled") != Some(&Value::Bool(false))).then(|| key.to_string())
            }
        };
        match enabled_at {
            Some(p) => ctx.issue(
                &p,
                // The whole section when it is enabled by being present, else the flag.
                if p == *key { v } else { &Value::Bool(true) },
                format!(
                    "{what} is not run by this runtime; allowed: remove the `{key}` section{}",
                    if matches!(mode, Enabled::AnyNested) {
                        " (or disable everything inside it)".to_string()
                    } else {
                        format!(" or set `{key}.enabled` to false")
                    }
                ),
            ),
            None => {
                ctx.warn(format!(
                    "`{key}` is disabled: accepted and ignored ({what} is not run by this runtime)"
                ));
                out.insert((*key).to_string(), v.clone());
            }
        }
    }

    cross_checks(&mut ctx, &out);

    // A supplied value for a key the config does not write as "auto" is not used: say so
    // (a typo in the key path, or a config without that "auto").
    let unused: Vec<String> = opts
        .auto_values
        .keys()
        .filter(|k| !ctx.used_autos.borrow().contains(*k))
        .cloned()
        .collect();
    for k in unused {
        ctx.warn(format!(
            "the value supplied for \"auto\" key `{k}` was not used: the config does not write `{k}` as \"auto\""
        ));
    }

    if ctx.issues.is_empty() {
        Ok((Value::Object(out), ctx.warnings))
    } else {
        Err(ConfigError::Invalid(ctx.issues))
    }
}

/// DeepSpeed's batch-size triangle (`runtime/config.py::_set_batch_related_parameters`).
fn resolve_batch(ctx: &mut Ctx, input: &Map<String, Value>, out: &mut Map<String, Value>) {
    let ws = ctx.opts.world_size as i64;
    let mut vals: [Option<i64>; 3] = [None; 3];
    let mut autos = Vec::new();
    let mut bad = false;
    for (i, key) in BATCH_KEYS.iter().enumerate() {
        let Some(v) = input.get(*key) else { continue };
        let v = if is_auto(v) {
            match ctx.auto_override(key) {
                Some(x) => x,
                None => {
                    autos.push(*key);
                    continue;
                }
            }
        } else {
            v.clone()
        };
        if v.is_null() {
            continue;
        }
        match coerce(&v, schema::int(1)) {
            Ok(x) => vals[i] = x.as_i64(),
            Err(msg) => {
                ctx.issue(key, &v, msg);
                bad = true;
            }
        }
    }
    if bad {
        return;
    }
    let (tb, mb, gas) = match vals {
        [Some(tb), Some(mb), Some(gas)] => (tb, mb, gas),
        [Some(tb), Some(mb), None] => (tb, mb, tb / mb / ws),
        [Some(tb), None, Some(gas)] => (tb, tb / ws / gas, gas),
        [None, Some(mb), Some(gas)] => (
            mb.checked_mul(gas)
                .and_then(|x| x.checked_mul(ws))
                .unwrap_or(-1),
            mb,
            gas,
        ),
        [Some(tb), None, None] => (tb, tb / ws, 1),
        [None, Some(mb), None] => (mb.checked_mul(ws).unwrap_or(-1), mb, 1),
        [None, None, _] => {
            let mut msg = String::from(
                "either train_batch_size or train_micro_batch_size_per_gpu must be given",
            );
            if !autos.is_empty() {
                msg.push_str(&format!(
                    "; {} {} \"auto\", which Hugging Face's integration fills from its training arguments: replace \"auto\" with numbers, or pass --auto train_micro_batch_size_per_gpu=N",
                    autos.join(", "),
                    if autos.len() == 1 { "is" } else { "are" }
                ));
            }
            ctx.missing("train_batch_size", msg);
            return;
        }
    };
    for a in &autos {
        ctx.warn(format!(
            "`{a}` = \"auto\" derived from the batch-size triangle at world size {ws}"
        ));
    }
    let Some(product) = mb.checked_mul(gas).and_then(|x| x.checked_mul(ws)) else {
        ctx.issue(
            "train_micro_batch_size_per_gpu",
            &json!(mb),
            format!("train_micro_batch_size_per_gpu ({mb}) * gradient_accumulation_steps ({gas}) * world_size ({ws}) overflows a 64-bit integer; allowed: sizes whose product fits"),
        );
        return;
    };
    if tb <= 0 || mb <= 0 || gas <= 0 || tb != product {
        ctx.issue(
            "train_batch_size",
            &json!(tb),
            format!(
                "train_batch_size must equal train_micro_batch_size_per_gpu * gradient_accumulation_steps * world_size, all >= 1; resolved here {tb} != {mb} * {gas} * {ws} (= {product}){}",
                if vals.iter().filter(|v| v.is_some()).count() < 3 {
                    " (missing values derived by integer division, as DeepSpeed does)"
                } else {
                    ""
                }
            ),
        );
        return;
    }
    if gas > GAS_WARN_ABOVE {
        ctx.warn(format!(
            "gradient_accumulation_steps = {gas} is very large (above {GAS_WARN_ABOVE}): every optimizer step runs {gas} forward/backward passes of {mb} sample(s) on each of the {ws} rank(s) before the weights change once; a typo? Raise train_micro_batch_size_per_gpu or lower train_batch_size instead"
        ));
    }
    out.insert(BATCH_KEYS[0].into(), json!(tb));
    out.insert(BATCH_KEYS[1].into(), json!(mb));
    out.insert(BATCH_KEYS[2].into(), json!(gas));
}

fn resolve_typed_section(
    ctx: &mut Ctx,
    v: Option<&Value>,
    section: &str,
    kinds: &[(&str, &[F])],
    not_run: &[(&str, &str)],
    case_insensitive: bool,
) -> Option<(String, Value, Map<String, Value>)> {
    let obj = match v {
        None | Some(Value::Null) => return None,
        Some(Value::Object(m)) => m,
        Some(other) => {
            ctx.issue(
                section,
                other,
                "allowed: an object {\"type\": ..., \"params\": {...}}",
            );
            return None;
        }
    };
    let allowed_keys: &[&str] = if section == "optimizer" {
        &["type", "params", "legacy_fusion"]
    } else {
        &["type", "params"]
    };
    for (k, x) in obj {
        if !allowed_keys.contains(&k.as_str()) {
            ctx.unknown_key(&join_path(section, k), k, x, allowed_keys);
        }
    }
    let tpath = join_path(section, "type");
    let names: Vec<&str> = kinds.iter().map(|(n, _)| *n).collect();
    let Some(t) = obj.get("type").and_then(Value::as_str) else {
        match obj.get("type") {
            None => ctx.missing(&tpath, format!("required; allowed: {}", names.join(", "))),
            Some(x) => ctx.issue(&tpath, x, format!("allowed: {}", names.join(", "))),
        }
        return None;
    };
    let found = kinds.iter().find(|(n, _)| {
        if case_insensitive {
            n.eq_ignore_ascii_case(t)
        } else {
            *n == t
        }
    });
    let Some((name, fields)) = found else {
        if let Some((_, why)) = not_run.iter().find(|(n, _)| n.eq_ignore_ascii_case(t)) {
            ctx.issue(&tpath, &json!(t), *why);
        } else {
            let mut msg = format!("unknown {section} type; allowed: {}", names.join(", "));
            if let Some(best) = did_you_mean(t, &names) {
                msg.push_str(&format!("; did you mean \"{best}\"?"));
            }
            ctx.issue(&tpath, &json!(t), msg);
        }
        return None;
    };
    let ppath = join_path(section, "params");
    let mut params = obj.get("params").cloned().unwrap_or(Value::Null);
    if let Value::Object(p) = &mut params {
        if let Some(x) = p.remove("max_grad_norm") {
            ctx.issue(
                &join_path(&ppath, "max_grad_norm"),
                &x,
                "not an optimizer parameter (DeepSpeed refuses it too): set the top-level `gradient_clipping` instead",
            );
        }
    }
    let resolved = walk(ctx, Some(&params), fields, &ppath);
    Some((
        (*name).to_string(),
        resolved.clone(),
        resolved.as_object().cloned().unwrap_or_default(),
    ))
}

fn resolve_optimizer(ctx: &mut Ctx, v: Option<&Value>) -> Value {
    let Some((name, params, p)) = resolve_typed_section(
        ctx,
        v,
        "optimizer",
        schema::OPTIMIZERS,
        schema::OPTIMIZERS_NOT_RUN,
        true,
    ) else {
        return Value::Null;
    };
    if p.get("amsgrad") == Some(&Value::Bool(true)) {
        ctx.issue(
            "optimizer.params.amsgrad",
            &json!(true),
            "AMSGrad is not supported by the fused optimizers (nor by DeepSpeed's FusedAdam); allowed: false",
        );
    }
    if name == "AdamW" && p.get("adam_w_mode") == Some(&Value::Bool(false)) {
        ctx.issue(
            "optimizer.params.adam_w_mode",
            &json!(false),
            "AdamW always uses decoupled weight decay; for L2-regularised Adam use type \"Adam\" with adam_w_mode false",
        );
    }
    if name == "SGD" {
        let momentum = p.get("momentum").and_then(Value::as_f64).unwrap_or(0.0);
        let dampening = p.get("dampening").and_then(Value::as_f64).unwrap_or(0.0);
        if p.get("nesterov") == Some(&Value::Bool(true)) && (momentum <= 0.0 || dampening != 0.0) {
            ctx.issue(
                "optimizer.params.nesterov",
                &json!(true),
                "Nesterov momentum requires momentum > 0 and dampening 0",
            );
        }
    }
    let legacy_fusion = match v.and_then(|o| o.get("legacy_fusion")) {
        None => false,
        Some(x) => match x.as_bool() {
            Some(b) => b,
            None => {
                ctx.issue("optimizer.legacy_fusion", x, "allowed: true or false");
                false
            }
        },
    };
    json!({"type": name, "params": params, "legacy_fusion": legacy_fusion})
}

fn resolve_scheduler(ctx: &mut Ctx, v: Option<&Value>, optimizer: &Value) -> Value {
    let not_run: &[(&str, &str)] = &[
        ("StepLR", "torch.optim.lr_scheduler types are not run by this runtime; allowed: WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest"),
        ("CosineAnnealingLR", "torch.optim.lr_scheduler types are not run by this runtime; use WarmupCosineLR"),
        ("LambdaLR", "torch.optim.lr_scheduler types are not run by this runtime; allowed: WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest"),
        ("ExponentialLR", "torch.optim.lr_scheduler types are not run by this runtime; allowed: WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest"),
    ];
    let Some((name, _, mut p)) =
        resolve_typed_section(ctx, v, "scheduler", schema::SCHEDULERS, not_run, false)
    else {
        return Value::Null;
    };
    let num = |p: &Map<String, Value>, k: &str| p.get(k).and_then(Value::as_i64);
    match name.as_str() {
        "WarmupLR" if p.get("warmup_max_lr") == Some(&Value::Null) => {
            if let Some(lr) = get(optimizer, &["params", "lr"]) {
                p.insert("warmup_max_lr".into(), lr.clone());
            }
        }
        "WarmupDecayLR" | "WarmupCosineLR" => {
            if let (Some(t), Some(w)) = (num(&p, "total_num_steps"), num(&p, "warmup_num_steps")) {
                if t < w {
                    ctx.warn(format!(
                        "scheduler.params.total_num_steps ({t}) < warmup_num_steps ({w}): the schedule never leaves warmup"
                    ));
                }
            }
        }
        "OneCycle" => {
            if p.get("cycle_second_step_size") == Some(&Value::Null) {
                let first = p["cycle_first_step_size"].clone();
                p.insert("cycle_second_step_size".into(), first);
            }
            if p.get("cycle_second_stair_count") == Some(&Value::Null) {
                let first = p["cycle_first_stair_count"].clone();
                p.insert("cycle_second_stair_count".into(), first);
            }
            let lo = p.get("cycle_min_lr").and_then(Value::as_f64);
            let hi = p.get("cycle_max_lr").and_then(Value::as_f64);
            if let (Some(lo), Some(hi)) = (lo, hi) {
                if lo > hi {
                    ctx.issue(
                        "scheduler.params.cycle_min_lr",
                        &json!(lo),
                        format!("must not exceed cycle_max_lr ({hi})"),
                    );
                }
            }
        }
        _ => {}
    }
    json!({"type": name, "params": Value::Object(p)})
}

fn resolve_zero(ctx: &mut Ctx, v: Option<&Value>) -> Value {
    let mut m = match v {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => {
            ctx.issue(
                "zero_optimization",
                other,
                "allowed: an object such as {\"stage\": 2}, or the deprecated true/false",
            );
            Map::new()
        }
    };
    for (short, long) in schema::ZERO_SHORT_ALIASES {
        if let Some(x) = m.remove(*short) {
            if m.contains_key(*long) {
                ctx.issue(
                    &format!("zero_optimization.{short}"),
                    &x,
                    format!("both `{short}` and its other name `{long}` are given; keep one"),
                );
            } else {
                if short.starts_with("stage3_gather_fp16") {
                    ctx.warn(format!(
                        "`zero_optimization.{short}` is deprecated; read as `{long}`"
                    ));
                }
                m.insert((*long).to_string(), x);
            }
        }
    }
    let pin = m.remove("cpu_offload_use_pin_memory");
    for (old, new) in [
        ("cpu_offload", "offload_optimizer"),
        ("cpu_offload_param", "offload_param"),
    ] {
        let Some(x) = m.remove(old) else { continue };
        let path = format!("zero_optimization.{old}");
        let Some(on) = x.as_bool() else {
            ctx.issue(
                &path,
                &x,
                "allowed: true or false (deprecated; write `{new}: {\"device\": \"cpu\"}`)",
            );
            continue;
        };
        if m.contains_key(new) {
            ctx.issue(
                &path,
                &x,
                format!("deprecated `{old}` given together with its replacement `{new}`; keep only `{new}`"),
            );
            continue;
        }
        ctx.warn(format!(
            "`{path}` is deprecated; read as `zero_optimization.{new}` with device \"{}\"",
            if on { "cpu" } else { "none" }
        ));
        if on {
            let mut o = json!({"device": "cpu"});
            if let Some(p) = pin.as_ref().and_then(Value::as_bool) {
                o["pin_memory"] = json!(p);
            }
            m.insert(new.into(), o);
        }
    }
    if let Some(p) = &pin {
        if p.as_bool().is_none() {
            ctx.issue(
                "zero_optimization.cpu_offload_use_pin_memory",
                p,
                "allowed: true or false",
            );
        }
    }
    let given: Vec<String> = m.keys().cloned().collect();
    let mut z = walk(
        ctx,
        Some(&Value::Object(m)),
        schema::ZERO,
        "zero_optimization",
    );
    let stage = z["stage"].as_i64().unwrap_or(0);
    if z["overlap_comm"].is_null() {
        z["overlap_comm"] = json!(stage == 3);
    }
    for key in &given {
        if key.starts_with("stage3_") && stage < 3 {
            ctx.warn(format!(
                "`zero_optimization.{key}` has no effect below stage 3 (stage is {stage})"
            ));
        }
    }
    let dev = |z: &Value, k: &str| z[k]["device"].as_str().unwrap_or("none").to_string();
    let od = dev(&z, "offload_optimizer");
    let pd = dev(&z, "offload_param");
    for (k, d) in [("offload_optimizer", &od), ("offload_param", &pd)] {
        if d == "nvme" {
            match z[k]["nvme_path"].as_str() {
                None => ctx.issue(
                    &format!("zero_optimization.{k}.nvme_path"),
                    &z[k]["nvme_path"],
                    "device \"nvme\" needs the directory of the swap files; allowed: a path on a local disk",
                ),
                Some("") => ctx.issue(
                    &format!("zero_optimization.{k}.nvme_path"),
                    &json!(""),
                    "device \"nvme\" needs the directory of the swap files; allowed: a path on a local disk",
                ),
                Some(_) => {}
            }
        }
    }
    if pd == "nvme" && od == "cpu" {
        // DeepSpeed runs this; here the host is the compute device, so "cpu" offload is the
        // in-memory placement and the combination is simply parameters on disk.
        ctx.warn(
            "`zero_optimization.offload_param.device` is \"nvme\" with the optimizer on \"cpu\": parameters are swapped, master weights and optimizer state stay in memory".to_string(),
        );
    }
    if od != "none" && stage == 0 {
        ctx.issue(
            "zero_optimization.offload_optimizer.device",
            &json!(od),
            "optimizer offload needs ZeRO stage 1, 2 or 3 but stage is 0 (DeepSpeed would silently ignore it); allowed: raise the stage, or device \"none\"",
        );
    }
    if pd != "none" && stage != 3 {
        ctx.issue(
            "zero_optimization.offload_param.device",
            &json!(pd),
            format!("parameter offload exists only in ZeRO stage 3 but stage is {stage} (DeepSpeed would silently ignore it); allowed: set stage 3, or device \"none\", or remove offload_param"),
        );
    }
    if let Some(r) = z["offload_optimizer"]["ratio"].as_f64() {
        if r != 1.0 {
            ctx.issue(
                "zero_optimization.offload_optimizer.ratio",
                &json!(r),
                "partial optimizer offload (ZeRO-Offload++) is not run by this runtime; allowed: 1.0",
            );
        }
    }
    if z["offload_optimizer"]["super_offload"] == json!(true) {
        ctx.issue(
            "zero_optimization.offload_optimizer.super_offload",
            &json!(true),
            "SuperOffload is not run by this runtime; allowed: false",
        );
    }
    if let Some(h) = z["zero_hpz_partition_size"].as_i64() {
        if h > 1 {
            ctx.issue(
                "zero_optimization.zero_hpz_partition_size",
                &json!(h),
                "ZeRO++ hierarchical partitioning (hpZ) is not run by this runtime; allowed: 1",
            );
        }
    }
    for k in [
        "zero_quantized_weights",
        "zero_quantized_nontrainable_weights",
        "zero_quantized_gradients",
    ] {
        if z[k] == json!(true) {
            ctx.issue(
                &format!("zero_optimization.{k}"),
                &json!(true),
                "ZeRO++ quantized communication is not run by this runtime; allowed: false",
            );
        }
    }
    if let Some(s) = z["mics_shard_size"].as_i64() {
        if s > 0 {
            ctx.issue(
                "zero_optimization.mics_shard_size",
                &json!(s),
                "MiCS sharding is not run by this runtime; allowed: -1",
            );
        }
    }
    if !z["zenflow"].is_null() {
        let zf = z["zenflow"].clone();
        ctx.issue(
            "zero_optimization.zenflow",
            &zf,
            "ZenFlow is not run by this runtime; remove it",
        );
    }
    if let Some(b) = z["allgather_bucket_size"].as_i64() {
        if b % 2 != 0 {
            ctx.issue(
                "zero_optimization.allgather_bucket_size",
                &json!(b),
                "must be a multiple of 2 (the partition alignment factor, as DeepSpeed requires)",
            );
        }
    }
    z
}

fn cross_checks(ctx: &mut Ctx, out: &Map<String, Value>) {
    let o = Value::Object(out.clone());
    // Bucket sizes: 0 holds nothing (every gradient would need a bucket of its own); tiny
    // buckets are legal but make every few elements a separate collective.
    for key in ["reduce_bucket_size", "allgather_bucket_size"] {
        match get(&o, &["zero_optimization", key]).and_then(Value::as_u64) {
            Some(0) => ctx.issue(
                &format!("zero_optimization.{key}"),
                &json!(0),
                "a bucket of 0 elements holds nothing; allowed: >= 1 (DeepSpeed's default is 5e8)",
            ),
            Some(n) if n < 1000 => ctx.warn(format!(
                "zero_optimization.{key} = {n}: every {n} elements are a separate collective, which can make a step many times slower than DeepSpeed's default 5e8"
            )),
            _ => {}
        }
    }
    let fp16 = get_bool(&o, &["fp16", "enabled"]);
    let bf16 = get_bool(&o, &["bf16", "enabled"]);
    if fp16 && bf16 {
        ctx.issue(
            "fp16.enabled",
            &json!(true),
            "fp16 and bf16 are both enabled; allowed: at most one of fp16.enabled and bf16.enabled",
        );
    }
    let dynamic = get(&o, &["fp16", "loss_scale"]).and_then(Value::as_f64) == Some(0.0);
    if fp16 && dynamic {
        let min = get(&o, &["fp16", "min_loss_scale"])
            .and_then(Value::as_f64)
            .unwrap_or(1.0);
        if min <= 0.0 {
            ctx.issue(
                "fp16.min_loss_scale",
                &json!(min),
                "with dynamic loss scaling (loss_scale 0) the minimum scale must be > 0",
            );
        }
    }
    for (sec, key) in [
        ("fp16", "fp16_master_weights_and_grads"),
        ("bf16", "bf16_master_weights_and_grads"),
        ("bf16", "bf16_optimizer_states"),
    ] {
        if get_bool(&o, &[sec, key]) {
            ctx.issue(
                &format!("{sec}.{key}"),
                &json!(true),
                "low-precision master weights are not run by this runtime (it always keeps fp32 master weights and optimizer states); allowed: false",
            );
        }
    }
    let stage = get(&o, &["zero_optimization", "stage"])
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if o["gradient_allreduce_op"] == json!("sum") && stage == 3 {
        ctx.issue(
            "gradient_allreduce_op",
            &json!("sum"),
            "\"sum\" is not supported with ZeRO stage 3 (as in DeepSpeed); allowed: \"mean\"",
        );
    }
    if let Some(sp) = o["sequence_parallel_size"].as_i64() {
        if sp > 1 {
            ctx.issue(
                "sequence_parallel_size",
                &json!(sp),
                "sequence parallelism (Ulysses) is not run by this runtime; allowed: 1",
            );
        }
    }
    let opt_type = get(&o, &["optimizer", "type"]).and_then(Value::as_str);
    if opt_type == Some("Lamb") && fp16 && !dynamic {
        ctx.issue(
            "fp16.loss_scale",
            &o["fp16"]["loss_scale"],
            "the Lamb optimizer requires dynamic loss scaling (as in DeepSpeed); allowed: 0",
        );
    }
    if get_bool(
        &o,
        &["activation_checkpointing", "contiguous_memory_optimization"],
    ) && !get_bool(&o, &["activation_checkpointing", "partition_activations"])
    {
        ctx.issue(
            "activation_checkpointing.contiguous_memory_optimization",
            &json!(true),
            "requires activation_checkpointing.partition_activations true (as in DeepSpeed)",
        );
    }
    if get_bool(&o, &["checkpoint", "load_universal"]) {
        ctx.issue(
            "checkpoint.load_universal",
            &json!(true),
            "DeepSpeed universal checkpoints are not read; this runtime's own checkpoints load at any world size and stage without conversion; allowed: false",
        );
    }
    for k in ["wandb", "comet"] {
        if get_bool(&o, &[k, "enabled"]) {
            ctx.issue(
                &format!("{k}.enabled"),
                &json!(true),
                format!("the {k} monitor (an online service) is not run by this runtime; use csv_monitor or tensorboard; allowed: false"),
            );
        }
    }
}
