//! All-reduce across real processes on loopback: worlds 1–4, awkward lengths, 100 MB once. Each
//! rank reports a SHA-256 of its result; all must equal the hash of the single-process ring-order
//! sum (so: correct, and bit-identical on every rank).

mod support;

use half::bf16;
use protodino_collectives::Element;
use protodino_collectives::element::as_bytes;
use protodino_collectives::reference::{ring_sum, test_pattern};
use sha2::{Digest, Sha256};
use support::spawn_group;

fn expected_hash<T: Element>(world: usize, len: usize, seed: u64, average: bool) -> String {
    let inputs: Vec<Vec<T>> = (0..world).map(|r| test_pattern(seed, r, len)).collect();
    let mut sum = ring_sum(&inputs);
    if average {
        T::divide(&mut sum, world);
    }
    hex::encode(Sha256::digest(as_bytes(&sum)))
}

fn run_case(peers: &mut [support::Peer], dtype: &str, len: usize, average: bool, seed: u64) {
    let world = peers.len();
    let op = if average { "avg" } else { "sum" };
    for p in peers.iter_mut() {
        p.send(&format!("ALLREDUCE {dtype} {len} {op} {seed}"));
    }
    let expected = match dtype {
        "bf16" => expected_hash::<bf16>(world, len, seed, average),
        _ => expected_hash::<f32>(world, len, seed, average),
    };
    for (rank, p) in peers.iter_mut().enumerate() {
        let line = p.line();
        assert_eq!(
            line,
            format!("OK {expected}"),
            "world {world} rank {rank} {dtype} len {len} {op}"
        );
    }
}

/// The line a peer of a `world`-rank group prints once formed with `--shared-memory on|off`.
fn ready(world: usize, shm: &str) -> String {
    format!("READY {}", support::expected_transport(world, shm == "on"))
}

#[test]
fn worlds_one_to_four_with_odd_lengths() {
    for (world, shm) in (1..=4).flat_map(|w| [(w, "on"), (w, "off")]) {
        let mut peers = spawn_group(world, &["--shared-memory", shm]);
        for p in peers.iter_mut() {
            assert_eq!(p.line(), ready(world, shm));
        }
        run_case(&mut peers, "f32", 1, false, 11);
        run_case(&mut peers, "f32", 1_000_003, false, 12);
        run_case(&mut peers, "f32", 77, true, 13);
        run_case(&mut peers, "bf16", 333_331, false, 14);
        run_case(&mut peers, "bf16", 5, true, 15);
        for p in peers.iter_mut() {
            p.send("EXIT");
        }
    }
}

#[test]
fn one_hundred_megabytes_world_three() {
    for shm in ["on", "off"] {
        let mut peers = spawn_group(3, &["--timeout-ms", "20000", "--shared-memory", shm]);
        for p in peers.iter_mut() {
            assert_eq!(p.line(), ready(3, shm));
        }
        run_case(&mut peers, "f32", 25_000_000, false, 100);
    }
}
