//! The `ds` command. Every subcommand exits 0 on success and 2 on bad input, with the reason
//! on stderr; JSON goes to stdout and nothing else does.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ds",
    version,
    about = "A DeepSpeed-class training runtime in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Resolve and validate a DeepSpeed config (JSON or TOML); print it fully resolved as JSON.
    CheckConfig {
        /// The config file (`.toml` is read as TOML, anything else as DeepSpeed JSON).
        file: PathBuf,
        /// Data-parallel world size for the batch-size triangle.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        world_size: u32,
        /// Value for a key written as "auto", e.g. --auto train_micro_batch_size_per_gpu=4
        /// (repeatable).
        #[arg(long = "auto", value_name = "KEY=VALUE")]
        auto: Vec<String>,
        /// Report unknown keys as warnings instead of errors.
        #[arg(long)]
        allow_unknown: bool,
        /// Accepted for uniformity: the output is always JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::CheckConfig {
            file,
            world_size,
            auto,
            allow_unknown,
            json: _,
        } => match ds_engine::cli::check_config(&file, world_size as usize, &auto, allow_unknown) {
            Ok(out) => {
                for w in &out.warnings {
                    eprintln!("warning: {w}");
                }
                match serde_json::to_string_pretty(&out.resolved) {
                    Ok(s) => {
                        println!("{s}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("error: cannot print the resolved config: {e}");
                        ExitCode::from(2)
                    }
                }
            }
            Err(e) => {
                eprintln!("error: {}: {e}", file.display());
                ExitCode::from(2)
            }
        },
    }
}
