//! A minimal TCP rendezvous: rank 0 hands a 128-byte blob (the NCCL unique id) to every other
//! rank, addressed by the `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`
//! environment DeepSpeed's launcher sets (see [`DistEnv::from_env`]).
//!
//! Protocol: each rank `r > 0` connects to `MASTER_ADDR:MASTER_PORT` (retrying until the
//! deadline) and sends `"DSCOMM01"`, `r` and the world size as little-endian u64; rank 0 checks
//! them (in range, no duplicate, same world size) and answers `"DSCOMM01"` + the blob.

use crate::error::{CommError, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"DSCOMM01";

/// The launcher's description of this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// `RANK`.
    pub rank: usize,
    /// `WORLD_SIZE`.
    pub world_size: usize,
    /// `LOCAL_RANK` (the GPU to use on this node); defaults to 0 when unset.
    pub local_rank: usize,
    /// `MASTER_ADDR` (default `127.0.0.1`).
    pub master_addr: String,
    /// `MASTER_PORT` (default 29500).
    pub master_port: u16,
}

fn rdv_err(msg: impl Into<String>) -> CommError {
    CommError::Backend {
        backend: "rendezvous".into(),
        msg: msg.into(),
    }
}

impl DistEnv {
    /// Reads the variables from the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the variables through `get` (for tests and custom launchers).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        fn num<T: std::str::FromStr>(
            get: &dyn Fn(&str) -> Option<String>,
            k: &str,
            default: Option<T>,
        ) -> Result<T> {
            match get(k) {
                Some(v) => v.trim().parse::<T>().map_err(|_| {
                    rdv_err(format!(
                        "environment variable {k}={v:?} is not a valid number"
                    ))
                }),
                None => {
                    default.ok_or_else(|| rdv_err(format!("environment variable {k} is not set")))
                }
            }
        }
        let rank: usize = num(&get, "RANK", None)?;
        let world_size: usize = num(&get, "WORLD_SIZE", None)?;
        let local_rank: usize = num(&get, "LOCAL_RANK", Some(0))?;
        let master_port: u16 = num(&get, "MASTER_PORT", Some(29500))?;
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        if world_size == 0 || rank >= world_size {
            return Err(rdv_err(format!(
                "RANK={rank} must be below WORLD_SIZE={world_size}"
            )));
        }
        Ok(DistEnv {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
        })
    }
}

/// Shares `blob` (only used on rank 0) with all ranks; returns it on every rank.
pub fn exchange_blob(
    env: &DistEnv,
    blob: Option<[u8; 128]>,
    timeout: Duration,
) -> Result<[u8; 128]> {
    let deadline = Instant::now() + timeout;
    if env.rank == 0 {
        let blob = blob.ok_or_else(|| rdv_err("rank 0 must provide the blob"))?;
        let listener = TcpListener::bind(("0.0.0.0", env.master_port)).map_err(|e| {
            rdv_err(format!(
                "rank 0 cannot listen on port {}: {e}",
                env.master_port
            ))
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| rdv_err(e.to_string()))?;
        let mut seen = vec![false; env.world_size];
        seen[0] = true;
        let mut joined = 1;
        while joined < env.world_size {
            match listener.accept() {
                Ok((mut s, peer)) => {
                    s.set_nonblocking(false)
                        .map_err(|e| rdv_err(e.to_string()))?;
                    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                    let mut hello = [0u8; 24];
                    s.read_exact(&mut hello)
                        .map_err(|e| rdv_err(format!("bad hello from {peer}: {e}")))?;
                    let r =
                        u64::from_le_bytes(hello[8..16].try_into().unwrap_or_default()) as usize;
                    let ws =
                        u64::from_le_bytes(hello[16..24].try_into().unwrap_or_default()) as usize;
                    if &hello[..8] != MAGIC
                        || ws != env.world_size
                        || r == 0
                        || r >= env.world_size
                        || seen[r]
                    {
                        return Err(rdv_err(format!(
                            "unexpected hello from {peer}: rank {r}, world size {ws} (expected world size {}; duplicate or out of range?)",
                            env.world_size
                        )));
                    }
                    seen[r] = true;
                    joined += 1;
                    let mut reply = Vec::with_capacity(136);
                    reply.extend_from_slice(MAGIC);
                    reply.extend_from_slice(&blob);
                    s.write_all(&reply)
                        .map_err(|e| rdv_err(format!("reply to rank {r}: {e}")))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> =
                            (0..env.world_size).filter(|&k| !seen[k]).collect();
                        return Err(CommError::Timeout {
                            bytes: None,
                            op: "rendezvous".into(),
                            rank: 0,
                            waiting_for: missing,
                            timeout,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(rdv_err(format!("accept: {e}"))),
            }
        }
        Ok(blob)
    } else {
        let addr = format!("{}:{}", env.master_addr, env.master_port);
        loop {
            let attempt = (|| -> std::io::Result<[u8; 128]> {
                let sa = addr
                    .to_socket_addrs()?
                    .next()
                    .ok_or_else(|| std::io::Error::other("no address"))?;
                let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(1))?;
                s.set_read_timeout(Some(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(10)),
                ))?;
                let mut hello = Vec::with_capacity(24);
                hello.extend_from_slice(MAGIC);
                hello.extend_from_slice(&(env.rank as u64).to_le_bytes());
                hello.extend_from_slice(&(env.world_size as u64).to_le_bytes());
                s.write_all(&hello)?;
                let mut reply = [0u8; 136];
                s.read_exact(&mut reply)?;
                if &reply[..8] != MAGIC {
                    return Err(std::io::Error::other("bad magic in reply"));
                }
                let mut blob = [0u8; 128];
                blob.copy_from_slice(&reply[8..]);
                Ok(blob)
            })();
            match attempt {
                Ok(b) => return Ok(b),
                Err(e) => {
                    if Instant::now() >= deadline {
                        return Err(CommError::Timeout {
                            bytes: None,
                            op: format!("rendezvous with {addr} (last error: {e})"),
                            rank: env.rank,
                            waiting_for: vec![0],
                            timeout,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(rank: usize, ws: usize, port: u16) -> DistEnv {
        DistEnv {
            rank,
            world_size: ws,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
    }

    #[test]
    fn env_parsing() {
        let vars = |k: &str| match k {
            "RANK" => Some("2".to_string()),
            "WORLD_SIZE" => Some("4".to_string()),
            "MASTER_PORT" => Some("1234".to_string()),
            _ => None,
        };
        let e = DistEnv::from_lookup(vars).unwrap();
        assert_eq!(
            (e.rank, e.world_size, e.local_rank, e.master_port),
            (2, 4, 0, 1234)
        );
        assert_eq!(e.master_addr, "127.0.0.1");
        let bad = DistEnv::from_lookup(|k| (k == "RANK").then(|| "x".to_string())).unwrap_err();
        assert!(bad.to_string().contains("RANK=\"x\""), "{bad}");
        let missing = DistEnv::from_lookup(|k| (k == "RANK").then(|| "0".to_string())).unwrap_err();
        assert!(
            missing.to_string().contains("WORLD_SIZE is not set"),
            "{missing}"
        );
        let range = DistEnv::from_lookup(|k| match k {
            "RANK" => Some("4".to_string()),
            "WORLD_SIZE" => Some("4".to_string()),
            _ => None,
        })
        .unwrap_err();
        assert!(range.to_string().contains("below WORLD_SIZE"), "{range}");
    }

    #[test]
    fn three_ranks_get_rank_zeros_blob() {
        let port = 29_500 + (std::process::id() % 5000) as u16;
        let mut blob = [0u8; 128];
        blob.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i * 7 + 3) as u8);
        let got: Vec<[u8; 128]> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|r| {
                    s.spawn(move || {
                        exchange_blob(
                            &env(r, 3, port),
                            (r == 0).then_some(blob),
                            Duration::from_secs(20),
                        )
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        });
        assert!(got.iter().all(|b| b == &blob));
    }

    #[test]
    fn missing_rank_times_out_naming_it() {
        let port = 35_000 + (std::process::id() % 5000) as u16;
        let e = exchange_blob(
            &env(0, 2, port),
            Some([1u8; 128]),
            Duration::from_millis(300),
        )
        .unwrap_err();
        match e {
            CommError::Timeout { waiting_for, .. } => assert_eq!(waiting_for, vec![1]),
            other => panic!("{other:?}"),
        }
        let e = exchange_blob(&env(1, 2, port + 1), None, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, CommError::Timeout { .. }), "{e}");
    }
}
