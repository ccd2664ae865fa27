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
