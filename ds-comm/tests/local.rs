//! LocalComm: the conformance suite for world sizes 1-4, and failure behaviour.

use candle_core::{DType, Device, Tensor};
use ds_comm::{conformance, CommError, Communicator, LocalComm, LocalCommOptions, ReduceOp};
use std::time::{Duration, Instant};

fn opts(timeout_ms: u64) -> LocalCommOptions {
    LocalCommOptions {
        timeout: Duration::from_millis(timeout_ms),
    }
}

fn suite(n: usize) {
    let reports = LocalComm::run(n, opts(20_000), |c| conformance::run_suite(&c));
    for (rank, rep) in reports.into_iter().enumerate() {
        let rep = rep.expect("rank panicked");
        assert!(rep.ok(), "world {n} rank {rank}: {:?}", rep.failed);
        assert_eq!(rep.passed.len(), conformance::checks().len());
    }
}

#[test]
fn conformance_world_1() {
    suite(1);
}

#[test]
fn conformance_world_2() {
    suite(2);
}

#[test]
fn conformance_world_3() {
    suite(3);
}

#[test]
fn conformance_world_4() {
    suite(4);
}

fn ones(v: f32) -> Tensor {
    Tensor::full(v, 1000, &Device::Cpu).expect("tensor")
}

#[test]
fn panicking_rank_fails_pending_and_later_collectives() {
    let t0 = Instant::now();
    let res = LocalComm::run(3, opts(1_500), |c| {
        if c.rank() == 2 {
            std::thread::sleep(Duration::from_millis(100));
            panic!("rank 2 dies on purpose");
        }
        let first = c.all_reduce(&ones(1.0), ReduceOp::Sum).map(|_| ());
        let later = c.barrier();
        (first, later)
    });
    assert!(res[2].is_err(), "rank 2 should have panicked");
    for (rank, r) in res.into_iter().take(2).enumerate() {
        let (first, later) = r.expect("no panic on ranks 0 and 1");
        match first {
            Err(CommError::PeerFailed {
                op,
                rank: me,
                peer,
                reason,
            }) => {
                assert_eq!(
                    (op.as_str(), me, peer, reason.as_str()),
                    ("all_reduce", rank, 2, "panicked")
                );
            }
            other => panic!("rank {rank}: pending collective gave {other:?}"),
        }
        let later = later.expect_err("later collective must fail");
        assert!(
            later.to_string().contains("barrier") && later.to_string().contains("rank 2 panicked"),
            "{later}"
        );
    }
    // Peers learn about the panic from the dropped communicator, well before the timeout.
    assert!(t0.elapsed() < Duration::from_secs(60));
}

#[test]
fn exited_rank_fails_peers() {
    let res = LocalComm::run(2, opts(1_500), |c| {
        if c.rank() == 1 {
            return Ok(()); // drops its communicator without calling anything
        }
        std::thread::sleep(Duration::from_millis(50));
        c.all_gather(&ones(1.0)).map(|_| ())
    });
    match &res[0] {
        Ok(Err(CommError::PeerFailed {
            peer: 1,
            reason,
            op,
            ..
        })) => {
            assert!(reason.contains("exited"), "{reason}");
            assert_eq!(op, "all_gather");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn hung_rank_times_out_naming_op_and_ranks() {
    let t0 = Instant::now();
    let res = LocalComm::run(3, opts(1_000), |c| {
        if c.rank() == 1 {
            // Stops answering for longer than the timeout, then tries again.
            std::thread::sleep(Duration::from_millis(2_500));
            return c.all_reduce(&ones(1.0), ReduceOp::Sum).map(|_| ());
        }
        c.all_reduce(&ones(1.0), ReduceOp::Sum).map(|_| ())
    });
    let mut timeouts = 0;
    for (rank, r) in res.into_iter().enumerate() {
        let e = r.expect("no panics").expect_err("every rank must fail");
        match (&e, rank) {
            (
                CommError::Timeout {
                    op,
                    waiting_for,
                    timeout,
                    ..
                },
                0 | 2,
            ) => {
                assert_eq!(op, "all_reduce");
                assert_eq!(waiting_for, &vec![1]);
                assert_eq!(*timeout, Duration::from_secs(1));
                timeouts += 1;
            }
            // The second of ranks 0/2 may see the first one's timeout instead of its own.
            (CommError::Poisoned { op, cause, .. }, 0 | 2) => {
                assert_eq!(op, "all_reduce");
                assert!(matches!(**cause, CommError::Timeout { .. }), "{cause}");
            }
            (CommError::Poisoned { op, cause, .. }, 1) => {
                assert_eq!(op, "all_reduce");
                assert!(e.to_string().contains("timed out"), "{e}");
                assert!(matches!(**cause, CommError::Timeout { .. }));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(timeouts >= 1);
    assert!(t0.elapsed() < Duration::from_secs(60));
}

#[test]
fn recv_from_silent_peer_times_out() {
    let res = LocalComm::run(2, opts(300), |c| {
        if c.rank() == 0 {
            let r = c.recv(1, &[3], DType::F32).map(|_| ());
            c.barrier().ok();
            r
        } else {
            std::thread::sleep(Duration::from_millis(600));
            Ok(())
        }
    });
    match &res[0] {
        Ok(Err(CommError::Timeout {
            op, waiting_for, ..
        })) => {
            assert_eq!(op, "recv");
            assert_eq!(waiting_for, &vec![1]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn recv_with_wrong_shape_is_an_error_not_a_truncation() {
    let res = LocalComm::run(2, opts(5_000), |c| {
        if c.rank() == 0 {
            c.send(&ones(1.0), 1).map(|_| ())
        } else {
            c.recv(0, &[999], DType::F32).map(|_| ())
        }
    });
    assert!(matches!(res[0], Ok(Ok(()))));
    match &res[1] {
        Ok(Err(CommError::Mismatch { detail, .. })) => assert!(detail.contains("999"), "{detail}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn large_all_reduce_is_exact_and_deterministic() {
    // 3 ranks, 1,000,003 elements (the partitioned path, uneven partitions), out of place and
    // in place (each rank writes its reduced partition into every rank's buffer).
    let len = 1_000_003usize;
    let res = LocalComm::run(3, opts(20_000), |c| {
        let r = c.rank() as f32;
        let x = Tensor::arange(0u32, len as u32, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .affine(1.0, r as f64)?;
        let y = c.all_reduce(&x, ReduceOp::Sum)?;
        let before = x.to_vec1::<f32>()?;
        c.all_reduce_inplace(&x, ReduceOp::Sum)?;
        let after = x.to_vec1::<f32>()?;
        let y = y.to_vec1::<f32>()?;
        // The out-of-place call left the input alone; in place gives the same result.
        assert_eq!(before[1], 1.0 + r);
        assert_eq!(after, y, "in place differs from out of place");
        Ok::<_, CommError>(y)
    });
    let outs: Vec<Vec<f32>> = res
        .into_iter()
        .map(|r| r.expect("no panic").expect("ok"))
        .collect();
    for i in [0usize, 1, 333_334, 333_335, 666_669, len - 1] {
        assert_eq!(outs[0][i], (3 * i + 3) as f32, "element {i}");
    }
    assert!(outs[1] == outs[0] && outs[2] == outs[0], "ranks disagree");
}

#[test]
fn reduce_hung_rank_times_out_and_panicked_rank_fails_peers() {
    // A rank that stops answering: the others time out in `reduce` and the group is poisoned.
    let res = LocalComm::run(3, opts(500), |c| {
        if c.rank() == 2 {
            std::thread::sleep(Duration::from_millis(1_500));
            return c.reduce(&ones(1.0), ReduceOp::Sum, 0).map(|_| ());
        }
        c.reduce(&ones(1.0), ReduceOp::Sum, 0).map(|_| ())
    });
    for (rank, r) in res.into_iter().enumerate() {
        let e = r.expect("no panics").expect_err("every rank must fail");
        match (&e, rank) {
            (
                CommError::Timeout {
                    op, waiting_for, ..
                },
                0 | 1,
            ) => {
                assert_eq!(op, "reduce");
                assert_eq!(waiting_for, &vec![2]);
            }
            (CommError::Poisoned { op, cause, .. }, _) => {
                assert_eq!(op, "reduce");
                assert!(matches!(**cause, CommError::Timeout { .. }), "{cause}");
            }
            other => panic!("rank {rank}: unexpected {other:?}"),
        }
    }
    // A rank that panics: the pending reduce fails at once on the others (the root included).
    let t0 = Instant::now();
    let res = LocalComm::run(3, opts(30_000), |c| {
        if c.rank() == 1 {
            std::thread::sleep(Duration::from_millis(100));
            panic!("rank 1 dies on purpose");
        }
        c.reduce(&ones(1.0), ReduceOp::Max, 0).map(|_| ())
    });
    assert!(res[1].is_err());
    for r in [&res[0], &res[2]] {
        match r {
            Ok(Err(CommError::PeerFailed { op, peer: 1, .. })) => assert_eq!(op, "reduce"),
            other => panic!("{other:?}"),
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(20));
}

#[test]
fn large_reduce_partitioned_is_exact_on_the_root_only() {
    // 3 ranks, 1,000,003 f32 (above the small-message size: every rank reduces a partition into
    // the root's buffer), root 1.
    let len = 1_000_003usize;
    let res = LocalComm::run(3, opts(20_000), |c| {
        let r = c.rank() as f64;
        let x = Tensor::arange(0u32, len as u32, &Device::Cpu)?
            .to_dtype(DType::F32)?
            .affine(1.0, r)?;
        let y = c.reduce(&x, ReduceOp::Sum, 1)?;
        y.map(|y| y.to_vec1::<f32>())
            .transpose()
            .map_err(CommError::from)
    });
    let outs: Vec<Option<Vec<f32>>> = res
        .into_iter()
        .map(|r| r.expect("no panic").expect("ok"))
        .collect();
    assert!(outs[0].is_none() && outs[2].is_none());
    let root = outs[1].as_ref().expect("root result");
    assert_eq!(root.len(), len);
    for i in [0usize, 1, 333_334, 333_335, 666_668, 666_669, len - 1] {
        assert_eq!(root[i], (3 * i + 3) as f32, "element {i}");
    }
}
