//! Every collective on real loopback sockets with one thread per rank (fast; the multi-process
//! scenarios live in `multi_process.rs` and `failures.rs`).

mod support;

use half::bf16;
use protodino_collectives::reference::{ring_sum, test_pattern};
use protodino_collectives::{CollectiveError, Element, GroupOptions, ReduceOp, RingGroup};
use support::{expected_transport, in_process_groups, in_process_groups_with, opts, tcp_opts};

/// The transports, and the shared-memory one with a one-page chunk (many rounds, so chunk
/// boundaries cut through ring segments and both slot sets are reused many times).
fn all_options() -> Vec<GroupOptions> {
    vec![
        opts(),
        tcp_opts(),
        GroupOptions {
            shm_chunk_bytes: 4096,
            ..opts()
        },
    ]
}

fn check_all_reduce<T: Element + PartialEq + std::fmt::Debug>(
    options: &GroupOptions,
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
    let outputs = in_process_groups(world, options.clone(), |mut g| {
        assert_eq!(
            g.transport().as_str(),
            expected_transport(world, options.shared_memory)
        );
        let mut buf = inputs[g.rank()].clone();
        g.all_reduce(&mut buf, op).unwrap();
        buf
    });
    for (rank, out) in outputs.iter().enumerate() {
        // Bitwise comparison: -0.0 vs 0.0 or NaN payloads would show up here.
        let same = out.iter().zip(&expected).all(|(a, b)| bits(*a) == bits(*b));
        assert!(
            same && out.len() == expected.len(),
            "world {world} len {len} rank {rank} {op:?} {options:?}"
        );
    }
}

fn bits<T: Element>(v: T) -> u32 {
    v.to_f32().to_bits()
}

#[test]
fn all_reduce_matches_the_single_process_ring_sum() {
    for options in all_options() {
        for world in 1..=4 {
            for len in [0, 1, 3, 7, 1000, 65_537, 300_001] {
                check_all_reduce::<f32>(&options, world, len, ReduceOp::Sum);
            }
            check_all_reduce::<f32>(&options, world, 10_001, ReduceOp::Average);
            check_all_reduce::<bf16>(&options, world, 70_001, ReduceOp::Sum);
            check_all_reduce::<bf16>(&options, world, 999, ReduceOp::Average);
        }
    }
}

#[test]
fn back_to_back_operations_of_every_size_interleaved_with_socket_collectives() {
    // One-shot and chunked all-reduces in a row (both slot sets and both header slots reused),
    // with ring collectives in between: a rank that races ahead into a barrier sends socket data
    // to a neighbour still finishing its shared-memory rounds, which must not be an error.
    let lens = [1usize, 5000, 0, 300_000, 7, 1 << 18, 3, 9000];
    for options in all_options() {
        for world in [2, 3, 4] {
            let inputs: Vec<Vec<Vec<f32>>> = (0..world)
                .map(|r| {
                    lens.iter()
                        .enumerate()
                        .map(|(i, &len)| test_pattern(i as u64, r, len))
                        .collect()
                })
                .collect();
            let outputs = in_process_groups(world, options.clone(), |mut g| {
                let mut outs = Vec::new();
                for round in 0..3 {
                    for (i, input) in inputs[g.rank()].iter().enumerate() {
                        let mut buf = input.clone();
                        g.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
                        if (i + round) % 3 == 0 {
                            g.barrier().unwrap();
                        }
                        outs.push(buf);
                    }
                }
                outs
            });
            for (i, _) in lens.iter().enumerate() {
                let per_rank: Vec<Vec<f32>> = inputs.iter().map(|r| r[i].clone()).collect();
                let expected = ring_sum(&per_rank);
                for (rank, outs) in outputs.iter().enumerate() {
                    for round in 0..3 {
                        assert!(
                            outs[round * lens.len() + i]
                                .iter()
                                .zip(&expected)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "world {world} rank {rank} op {i} round {round} {options:?}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn transport_is_shared_memory_only_if_every_rank_agrees() {
    // One rank with the option off: the whole group keeps the TCP ring, and it still works.
    let options = |rank| if rank == 1 { tcp_opts() } else { opts() };
    let results = in_process_groups_with(3, options, |mut g| {
        let mut v = vec![g.rank() as f32; 1000];
        g.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        (g.transport().as_str(), v[999])
    });
    assert_eq!(results, vec![("tcp", 3.0); 3]);
}

#[test]
fn an_aborting_rank_fails_the_shared_memory_group_at_once() {
    // Rank 1 gives up (as a worker told to regroup does) while the others wait for it inside a
    // shared-memory all-reduce: they fail in about one wait slice, far inside the deadline.
    let outputs = in_process_groups(3, opts(), |mut g| {
        let started = std::time::Instant::now();
        if g.rank() == 1 {
            std::thread::sleep(std::time::Duration::from_millis(200));
            g.abort();
            return None;
        }
        let err = g
            .all_reduce(&mut vec![1.0f32; 100_000], ReduceOp::Sum)
            .unwrap_err();
        Some((err.is_peer_failure(), started.elapsed()))
    });
    for (failed, took) in outputs.into_iter().flatten() {
        assert!(failed);
        assert!(took < std::time::Duration::from_millis(1500), "{took:?}");
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
    for options in [opts(), tcp_opts()] {
        for world in [2, 3] {
            // Lengths differ (one-shot and chunked), then the collectives themselves differ.
            for (len0, len1) in [(10, 11), (1_000_000, 1_000_001)] {
                let outputs = in_process_groups(world, options.clone(), |mut g| {
                    let mut buf = vec![1.0f32; if g.rank() == 1 { len1 } else { len0 }];
                    let first = g.all_reduce(&mut buf, ReduceOp::Sum);
                    let second = g.barrier();
                    (first, second)
                });
                for (first, second) in outputs {
                    assert!(
                        matches!(
                            first,
                            Err(CollectiveError::Mismatch { .. })
                                | Err(CollectiveError::PeerLost { .. })
                        ),
                        "{first:?}"
                    );
                    assert!(
                        matches!(second, Err(CollectiveError::Poisoned)),
                        "{second:?}"
                    );
                }
            }
            let started = std::time::Instant::now();
            let outputs = in_process_groups(world, options.clone(), |mut g| {
                if g.rank() == 1 {
                    g.barrier()
                } else {
                    g.all_reduce(&mut vec![1.0f32; 100], ReduceOp::Sum)
                }
            });
            for out in outputs {
                assert!(out.is_err(), "{out:?}");
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(8),
                "{:?}",
                started.elapsed()
            );
        }
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
        ..tcp_opts()
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
    for base in [opts(), tcp_opts()] {
        let options = GroupOptions {
            timeout: std::time::Duration::from_millis(300),
            ..base
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
