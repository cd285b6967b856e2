//! Print the loss-scale trace of DeepSpeed's dynamic loss scaler for an overflow pattern.
//!
//! ```text
//! cargo run --release --example loss_scale_trace -- --init-scale-power P --window W \
//!     --hysteresis H --min-scale M [--consecutive-hysteresis] [--no-error-at-min] \
//!     [--variant zero|fp16-optimizer] --overflows FFTF...
//! ```
//!
//! Prints one JSON line `{"scales": [scale after each update], "error": null or the message}`
//! (the trace stops at the min-scale error). Options left out take DeepSpeed's defaults
//! (16, 1000, 2, 1, ZeRO rule); `--overflows` is required (`T` = overflow, `F` = none).
//! Bad arguments: a message on stderr and exit status 2.

use ds_precision::{trace_scales, LossScalerOptions, ScalerVariant};

const USAGE: &str = "usage: loss_scale_trace --init-scale-power P --window W --hysteresis H \
--min-scale M [--consecutive-hysteresis] [--no-error-at-min] [--variant zero|fp16-optimizer] \
--overflows FFTF...";

fn value<T: std::str::FromStr>(flag: &str, v: Option<&String>) -> Result<T, String> {
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    v.parse().map_err(|_| format!("{flag}: cannot parse {v:?}"))
}

/// Parse the arguments (without the program name) and return the JSON line.
pub fn run(args: &[String]) -> Result<String, String> {
    let mut o = LossScalerOptions::default();
    let mut overflows: Option<Vec<bool>> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--init-scale-power" => o.init_scale_power = value(a, it.next())?,
            "--window" => o.window = value(a, it.next())?,
            "--hysteresis" => o.hysteresis = value(a, it.next())?,
            "--min-scale" => o.min_scale = value(a, it.next())?,
            "--consecutive-hysteresis" => o.consecutive_hysteresis = true,
            "--no-error-at-min" => o.raise_error_at_min_scale = false,
            "--variant" => {
                o.variant = match value::<String>(a, it.next())?.as_str() {
                    "zero" => ScalerVariant::Zero,
                    "fp16-optimizer" => ScalerVariant::Fp16Optimizer,
                    v => return Err(format!("--variant: {v:?} is not zero or fp16-optimizer")),
                }
            }
            "--overflows" => {
                let p: String = value(a, it.next())?;
                let v = p
                    .chars()
                    .map(|c| match c {
                        'T' | 't' | '1' => Ok(true),
                        'F' | 'f' | '0' => Ok(false),
                        c => Err(format!("--overflows: {c:?} is not T or F")),
                    })
                    .collect::<Result<Vec<bool>, String>>()?;
                overflows = Some(v);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let overflows = overflows.ok_or("--overflows is required")?;
    let (scales, err) = trace_scales(&o, &overflows).map_err(|e| e.to_string())?;
    let json = serde_json::json!({
        "scales": scales,
        "error": err.map(|e| e.to_string()),
    });
    Ok(json.to_string())
}

#[allow(dead_code)]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    match run(&args) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("loss_scale_trace: {e}\n{USAGE}");
            std::process::exit(2);
        }
    }
}
