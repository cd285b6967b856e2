//! `ds train`'s communication timeout (`--comm-timeout`, `DS_COMM_TIMEOUT`, the config's
//! `comm_timeout`) and the checks and failure handling of an MPI launch.
//!
//! The timeout is taken from, in order: the flag, the environment variable, the config key, the
//! default ([`DEFAULT_SECONDS`]). Seconds, a finite number from 0 to
//! [`ds_config::MAX_COMM_TIMEOUT_S`]; 0 waits forever (blocking MPI calls: a stalled peer then
//! hangs the job).

use std::time::Duration;

use ds_engine::EngineError;

/// The environment variable that sets the timeout in seconds.
pub const ENV: &str = "DS_COMM_TIMEOUT";

/// The default timeout in seconds: a step of a CPU job exchanges its gradients in well under a
/// minute, and a stalled peer then ends the job in about a minute.
pub const DEFAULT_SECONDS: f64 = 60.0;

/// Where the timeout in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutSource {
    /// `ds train --comm-timeout`.
    Flag,
    /// [`ENV`].
    Env,
    /// The config's `comm_timeout` (its default when the config does not set it).
    Config,
}

/// Seconds as a timeout (`None` = wait forever, from 0), or an error naming `what`, the value
/// and what is allowed.
pub fn timeout_from_seconds(what: &str, s: f64) -> Result<Option<Duration>, EngineError> {
    let max = ds_config::MAX_COMM_TIMEOUT_S;
    if !(s.is_finite() && (0.0..=max).contains(&s)) {
        return Err(EngineError::Config(format!(
            "{what} {s}: allowed: seconds from 0 to {max} (0 waits forever)"
        )));
    }
    Ok((s > 0.0).then(|| Duration::from_secs_f64(s)))
}

/// The timeout in force: `flag` (seconds), else `env` (the text of [`ENV`], if set), else
/// `config_seconds` (the resolved config's `comm_timeout`, which holds the default when the
/// file does not set it).
pub fn resolve_timeout(
    flag: Option<f64>,
    env: Option<&str>,
    config_seconds: f64,
) -> Result<(Option<Duration>, TimeoutSource), EngineError> {
    if let Some(s) = flag {
        return Ok((
            timeout_from_seconds("--comm-timeout", s)?,
            TimeoutSource::Flag,
        ));
    }
    if let Some(text) = env {
        let s: f64 = text.trim().parse().map_err(|_| {
            EngineError::Config(format!(
                "{ENV}={text:?}: allowed: seconds from 0 to {} (0 waits forever)",
                ds_config::MAX_COMM_TIMEOUT_S
            ))
        })?;
        return Ok((timeout_from_seconds(ENV, s)?, TimeoutSource::Env));
    }
    Ok((
        timeout_from_seconds("comm_timeout", config_seconds)?,
        TimeoutSource::Config,
    ))
}

/// The world size the launcher's environment announces (Open MPI's `OMPI_COMM_WORLD_SIZE`,
/// MPICH/Hydra's and Slurm's `PMI_SIZE`), `None` when the process was not started by one.
pub fn launcher_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// Refuses a `--world-size` that differs from the MPI job's size (a process started without
/// mpirun runs as a world of 1: it would otherwise train alone while the user asked for more).
pub fn check_world_size(requested: usize, mpi: usize) -> Result<(), EngineError> {
    if requested == mpi {
        return Ok(());
    }
    let how = match launcher_world_size() {
        None if mpi == 1 => " (this process was not started by mpirun: no OMPI_COMM_WORLD_SIZE or PMI_SIZE in its environment)".to_string(),
        _ => String::new(),
    };
    Err(EngineError::Config(format!(
        "--world-size {requested} with --backend mpi, but MPI runs this job as {mpi} process(es){how}: the world size of an MPI job is the number of processes mpirun starts; launch `mpirun -np {requested} ds train --backend mpi ...`, or drop --world-size to take MPI's"
    )))
}

/// The MPI communicator of `ds train`: initialised with the flag's or the environment's
/// timeout (else the default; [`apply_config_timeout`] applies the config's once it is
/// resolved), the SIGTERM handler installed, the requested world size checked.
#[cfg(feature = "mpi")]
pub fn init_mpi(
    flag: Option<f64>,
    requested_world_size: Option<usize>,
) -> Result<ds_comm::MpiComm, EngineError> {
    let env = std::env::var(ENV).ok();
    let (timeout, _) = resolve_timeout(flag, env.as_deref(), DEFAULT_SECONDS)?;
    let comm = ds_comm::MpiComm::init(ds_comm::MpiCommOptions {
        timeout,
        ..Default::default()
    })?;
    ds_comm::install_termination_handler()?;
    if let Some(n) = requested_world_size {
        check_world_size(n, ds_comm::Communicator::world_size(&comm))?;
    }
    Ok(comm)
}

/// Applies the config's `comm_timeout` when neither the flag nor [`ENV`] set the timeout.
#[cfg(feature = "mpi")]
pub fn apply_config_timeout(
    comm: &mut ds_comm::MpiComm,
    flag: Option<f64>,
    config_seconds: f64,
) -> Result<(), EngineError> {
    let env = std::env::var(ENV).ok();
    let (timeout, source) = resolve_timeout(flag, env.as_deref(), config_seconds)?;
    if source == TimeoutSource::Config {
        comm.set_timeout(timeout);
    }
    Ok(())
}

/// Reports a failure of this rank's run on stderr (every live rank does: the message names the
/// op, its bytes and the silent ranks for a communication failure) and ends the whole job with
/// `MPI_Abort` and status 2: `MPI_Finalize` would wait for peers that are gone.
#[cfg(feature = "mpi")]
pub fn fail(comm: &ds_comm::MpiComm, e: EngineError) -> ! {
    eprintln!("error: rank {}: {e}", ds_comm::Communicator::rank(comm));
    comm.abort_after_failure(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_over_env_over_config() {
        let secs = |r: (Option<Duration>, TimeoutSource)| (r.0.map(|d| d.as_secs_f64()), r.1);
        assert_eq!(
            secs(resolve_timeout(Some(20.0), Some("30"), 40.0).unwrap()),
            (Some(20.0), TimeoutSource::Flag)
        );
        assert_eq!(
            secs(resolve_timeout(None, Some(" 30.5 "), 40.0).unwrap()),
            (Some(30.5), TimeoutSource::Env)
        );
        assert_eq!(
            secs(resolve_timeout(None, None, 40.0).unwrap()),
            (Some(40.0), TimeoutSource::Config)
        );
        // 0 = wait forever, at every level.
        assert_eq!(
            secs(resolve_timeout(Some(0.0), None, 40.0).unwrap()),
            (None, TimeoutSource::Flag)
        );
        assert_eq!(
            secs(resolve_timeout(None, Some("0"), 40.0).unwrap()),
            (None, TimeoutSource::Env)
        );
    }

    #[test]
    fn bad_values_name_the_source_and_the_range() {
        for (flag, env, want) in [
            (Some(-1.0), None, "--comm-timeout -1"),
            (Some(f64::NAN), None, "--comm-timeout NaN"),
            (Some(1e9), None, "--comm-timeout 1000000000"),
            (None, Some("soon"), "DS_COMM_TIMEOUT=\"soon\""),
            (None, Some("-5"), "DS_COMM_TIMEOUT -5"),
        ] {
            let e = resolve_timeout(flag, env, 60.0).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(e.contains("allowed: seconds from 0 to 604800"), "{e}");
        }
    }

    #[test]
    fn world_size_mismatch_is_refused() {
        assert!(check_world_size(2, 2).is_ok());
        let e = check_world_size(2, 1).unwrap_err().to_string();
        assert!(e.contains("--world-size 2 with --backend mpi"), "{e}");
        assert!(e.contains("as 1 process(es)"), "{e}");
        assert!(e.contains("mpirun -np 2"), "{e}");
    }
}
