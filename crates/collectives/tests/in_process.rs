//! Every collective on real loopback sockets with one thread per rank (fast; the multi-process
//! scenarios live in `multi_process.rs` and `failures.rs`).

mod support;

use half::bf16;
use protodino_collectives::reference::{ring_sum, test_pattern};
use protodino_collectives::{CollectiveError, Element, GroupOptions, ReduceOp, RingGroup};
use support::{in_process_groups, opts};

fn check_all_reduce<T: Element + PartialEq + std::fmt::Debug>(
    world: usize,
    len: usize,
    op: ReduceOp,
) {
    let inputs: Vec<Vec<T>> = (0..world)
        .map(|r| test_pattern(len as u64, r, len))
        .collect();
    let mut expected = ring_sum(&inputs);
    if op == ReduceOp::Average {
        T::divide(&mut expected, world);
    }
    let outputs = in_process_groups(world, opts(), |mut g| {
        let mut buf = inputs[g.rank()].clone();
        g.all_reduce(&mut buf, op).unwrap();
        buf
    });
    for (rank, out) in outputs.iter().enumerate() {
        // Bitwise comparison: -0.0 vs 0.0 or NaN payloads would show up here.
        let same = out.iter().zip(&expected).all(|(a, b)| bits(*a) == bits(*b));
        assert!(
            same && out.len() == expected.len(),
            "world {world} len {len} rank {rank} {op:?}"
        );
    }
}

fn bits<T: Element>(v: T) -> u32 {
    v.to_f32().to_bits()
}

#[test]
fn all_reduce_matches_the_single_process_ring_sum() {
    for world in 1..=4 {
        for len in [0, 1, 3, 7, 1000, 65_537, 300_001] {
            check_all_reduce::<f32>(world, len, ReduceOp::Sum);
        }
        check_all_reduce::<f32>(world, 10_001, ReduceOp::Average);
        check_all_reduce::<bf16>(world, 70_001, ReduceOp::Sum);
        check_all_reduce::<bf16>(world, 999, ReduceOp::Average);
    }
}

#[test]
fn all_gather_broadcast_barrier_and_buckets() {
    for world in 1..=4 {
        let outputs = in_process_groups(
            world,
            GroupOptions {
                bucket_bytes: 4000,
                ..opts()
            },
            |mut g| {
                let r = g.rank();
                g.barrier().unwrap();
                // all-gather
                let mine: Vec<f32> = vec![r as f32; 5];
                let mut all = vec![0.0f32; 5 * world];
                g.all_gather(&mine, &mut all).unwrap();
                // in-memory broadcast from the last rank
                let mut state: Vec<bf16> = test_pattern(9, r, 1234);
                g.broadcast(world - 1, &mut state).unwrap();
                // streamed broadcast from rank 0 of 3 MB + 5 bytes
                let big: Vec<u8> = (0..3_000_005u32).map(|i| (i * 7 % 251) as u8).collect();
                let mut got = Vec::new();
                if r == 0 {
                    g.broadcast_send(&mut &big[..], big.len() as u64).unwrap();
                    got = big.clone();
                } else {
                    assert_eq!(g.broadcast_recv(0, &mut got).unwrap(), big.len() as u64);
                }
                // many tensors: sizes around the 1000-element bucket, one larger than a bucket
                let mut tensors: Vec<Vec<f32>> = [1, 999, 2, 1000, 5000, 0, 17]
                    .iter()
                    .map(|&n| vec![(r + 1) as f32; n])
                    .collect();
                let mut views: Vec<&mut [f32]> =
                    tensors.iter_mut().map(|t| t.as_mut_slice()).collect();
                g.all_reduce_many(&mut views, ReduceOp::Average).unwrap();
                g.barrier().unwrap();
                (all, state, got == big, tensors)
            },
        );
        let expect_all: Vec<f32> = (0..world).flat_map(|r| vec![r as f32; 5]).collect();
        let root_state: Vec<bf16> = test_pattern(9, world - 1, 1234);
        let mean = (1..=world).sum::<usize>() as f32 / world as f32;
        for (all, state, stream_ok, tensors) in outputs {
            assert_eq!(all, expect_all);
            assert_eq!(state, root_state);
            assert!(stream_ok);
            assert!(
                tensors.iter().flatten().all(|&v| v == mean),
                "world {world}"
            );
        }
    }
}

#[test]
fn mismatched_calls_are_an_error_not_garbage() {
    let outputs = in_process_groups(2, opts(), |mut g| {
        let mut buf = vec![1.0f32; 10 + g.rank()];
        let first = g.all_reduce(&mut buf, ReduceOp::Sum);
        let second = g.barrier();
        (first, second)
    });
    for (first, second) in outputs {
        assert!(
            matches!(
                first,
                Err(CollectiveError::Mismatch { .. }) | Err(CollectiveError::PeerLost { .. })
            ),
            "{first:?}"
        );
        assert!(
            matches!(second, Err(CollectiveError::Poisoned)),
            "{second:?}"
        );
    }
}

#[test]
fn wrong_length_all_gather_is_rejected_locally() {
    let out = in_process_groups(1, opts(), |mut g: RingGroup| {
        let e = g.all_gather(&[1.0f32; 3], &mut [0.0f32; 2]);
        (
            matches!(e, Err(CollectiveError::InvalidArgument(_))),
            g.is_poisoned(),
        )
    });
    assert_eq!(out, vec![(true, false)]);
}

#[test]
fn odd_chunk_sizes_on_both_engines() {
    // 4100-byte chunks: not a power of two, and half a bf16 chunk is not a whole f32 chunk.
    // 333_333 f32 (1.3 MB) take the two-thread engine, the rest the one-thread loop.
    let options = GroupOptions {
        chunk_bytes: 4100,
        ..opts()
    };
    for world in [2, 3] {
        let inputs: Vec<Vec<f32>> = (0..world).map(|r| test_pattern(3, r, 333_333)).collect();
        let small: Vec<Vec<bf16>> = (0..world).map(|r| test_pattern(4, r, 70_001)).collect();
        let outputs = in_process_groups(world, options.clone(), |mut g| {
            let mut a = inputs[g.rank()].clone();
            g.all_reduce(&mut a, ReduceOp::Sum).unwrap();
            let mut b = small[g.rank()].clone();
            g.all_reduce(&mut b, ReduceOp::Sum).unwrap();
            (a, b)
        });
        let (ea, eb) = (ring_sum(&inputs), ring_sum(&small));
        for (a, b) in outputs {
            assert!(a.iter().zip(&ea).all(|(x, y)| x.to_bits() == y.to_bits()));
            assert_eq!(b, eb);
        }
    }
}

#[test]
fn a_rank_that_never_arrives_hits_the_deadline() {
    let options = GroupOptions {
        timeout: std::time::Duration::from_millis(300),
        ..opts()
    };
    let outputs = in_process_groups(3, options, |mut g| {
        if g.rank() == 1 {
            // Stays in the group but never enters the collective, then leaves after the others.
            std::thread::sleep(std::time::Duration::from_millis(1500));
            return None;
        }
        let started = std::time::Instant::now();
        let mut big = vec![1.0f32; 2_000_000];
        let err = g.all_reduce(&mut big, ReduceOp::Sum).unwrap_err();
        Some((
            err.is_peer_failure(),
            started.elapsed(),
            g.all_reduce(&mut big, ReduceOp::Sum).is_err(),
        ))
    });
    for (failed, took, still_failing) in outputs.into_iter().flatten() {
        assert!(failed && still_failing);
        assert!(took < std::time::Duration::from_millis(1200), "{took:?}");
    }
}

#[test]
fn broadcast_source_failure_fails_everyone() {
    struct Failing(usize);
    impl std::io::Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("disk gone"));
            }
            let n = buf.len().min(self.0);
            self.0 -= n;
            Ok(n)
        }
    }
    let outputs = in_process_groups(3, opts(), |mut g| {
        let started = std::time::Instant::now();
        let result = if g.rank() == 0 {
            g.broadcast_send(&mut Failing(1 << 20), 8 << 20).map(|()| 0)
        } else {
            g.broadcast_recv(0, &mut std::io::sink())
        };
        (result, started.elapsed())
    });
    assert!(
        matches!(outputs[0].0, Err(CollectiveError::Stream(_))),
        "{:?}",
        outputs[0].0
    );
    for (result, took) in &outputs[1..] {
        assert!(
            matches!(result, Err(e) if e.is_peer_failure()),
            "{result:?}"
        );
        assert!(*took < std::time::Duration::from_secs(2), "{took:?}");
    }
}

#[test]
fn solo_group_is_local() {
    let mut g = RingGroup::solo(opts());
    let mut v = vec![1.5f32, 2.0];
    g.all_reduce(&mut v, ReduceOp::Average).unwrap();
    g.barrier().unwrap();
    let mut out = vec![0.0f32; 2];
    g.all_gather(&v, &mut out).unwrap();
    g.broadcast(0, &mut v).unwrap();
    assert_eq!((v, out), (vec![1.5, 2.0], vec![1.5, 2.0]));
}
