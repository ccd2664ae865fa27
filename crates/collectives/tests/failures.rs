//! Failure semantics across real processes: a peer killed with SIGKILL mid-operation, a peer hung
//! with SIGSTOP, strangers on the listener, and rebuilding a group in-process afterwards.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use protodino_collectives::reference::{ring_sum, test_pattern};
use protodino_collectives::{CollectiveError, auth};
use sha2::{Digest, Sha256};
use support::{Peer, spawn_group};

/// Waits until every peer has finished at least two iterations of `LOOP`.
fn wait_looping(peers: &mut [Peer]) {
    for p in peers.iter_mut() {
        p.expect("ITER 1");
    }
}

/// Reads the survivor's `ERR <kind> …` line (skipping further ITER lines); returns the kind and
/// the time since `since`.
fn error_of(p: &mut Peer, since: Instant) -> (String, Duration) {
    let rest = p.expect("ERR");
    (
        rest.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string(),
        since.elapsed(),
    )
}

#[test]
fn sigkill_mid_operation_fails_fast_then_survivors_rebuild() {
    for shm in ["on", "off"] {
        sigkill_case(shm);
    }
}

fn sigkill_case(shm: &str) {
    // A 10 s deadline: failing within 3 s shows the failure was detected, not timed out.
    let mut peers = spawn_group(4, &["--timeout-ms", "10000", "--shared-memory", shm]);
    let transport = format!("READY {}", support::expected_transport(4, shm == "on"));
    for p in peers.iter_mut() {
        assert_eq!(p.line(), transport);
        p.send("LOOP 4000000");
    }
    wait_looping(&mut peers);
    let killed_at = Instant::now();
    peers[2].signal(libc::SIGKILL);
    for rank in [0, 1, 3] {
        let (kind, took) = error_of(&mut peers[rank], killed_at);
        assert!(
            matches!(kind.as_str(), "PeerLost" | "Io"),
            "rank {rank} ({shm}): {kind}"
        );
        assert!(
            took < Duration::from_secs(3),
            "rank {rank} ({shm}) took {took:?}"
        );
    }

    // Rebuild in the same processes: new ports, new membership (world 3, new ranks).
    let mut survivors: Vec<Peer> = peers
        .into_iter()
        .enumerate()
        .filter(|(r, _)| *r != 2)
        .map(|(_, p)| p)
        .collect();
    let mut addrs = Vec::new();
    for p in survivors.iter_mut() {
        p.send("REBIND");
        addrs.push(format!("127.0.0.1:{}", p.expect("PORT")));
    }
    let list = addrs.join(",");
    for (rank, p) in survivors.iter_mut().enumerate() {
        p.send(&format!("GROUP {rank} 3 {list}"));
    }
    for p in survivors.iter_mut() {
        assert_eq!(p.line(), transport);
        p.send("ALLREDUCE f32 1001 sum 5");
    }
    let inputs: Vec<Vec<f32>> = (0..3).map(|r| test_pattern(5, r, 1001)).collect();
    let sum = ring_sum(&inputs);
    let expected = hex::encode(Sha256::digest(protodino_collectives::element::as_bytes(
        &sum,
    )));
    for p in survivors.iter_mut() {
        assert_eq!(p.line(), format!("OK {expected}"));
    }
}

#[test]
fn sigstop_hits_the_deadline_on_every_survivor() {
    for shm in ["on", "off"] {
        sigstop_case(shm);
    }
}

fn sigstop_case(shm: &str) {
    let deadline = Duration::from_millis(1500);
    let mut peers = spawn_group(3, &["--timeout-ms", "1500", "--shared-memory", shm]);
    for p in peers.iter_mut() {
        assert!(p.line().starts_with("READY "));
        p.send("LOOP 2000000");
    }
    wait_looping(&mut peers);
    let stopped_at = Instant::now();
    peers[1].signal(libc::SIGSTOP);
    for rank in [0, 2] {
        let (kind, took) = error_of(&mut peers[rank], stopped_at);
        assert!(
            matches!(kind.as_str(), "Timeout" | "PeerLost"),
            "rank {rank}: {kind}"
        );
        assert!(
            took < deadline + Duration::from_secs(3),
            "rank {rank} took {took:?}"
        );
    }
    peers[1].signal(libc::SIGKILL);
}

#[test]
fn member_with_the_wrong_secret_is_refused() {
    let args = ["--connect-timeout-ms", "2000"];
    let (mut good, port0) = Peer::spawn(&args);
    let (mut bad, port1) = Peer::spawn(&["--connect-timeout-ms", "2000", "--secret", "guessed"]);
    let list = format!("127.0.0.1:{port0},127.0.0.1:{port1}");
    good.send(&format!("GROUP 0 2 {list}"));
    bad.send(&format!("GROUP 1 2 {list}"));
    let good_err = good.expect("ERR");
    let bad_err = bad.expect("ERR");
    // Rank 0 never accepts the impostor (so it gives up on forming the group), and the impostor
    // learns that rank 0 did not prove the secret to it either.
    assert!(
        good_err.starts_with("Connect") || good_err.starts_with("Auth"),
        "{good_err}"
    );
    assert!(bad_err.starts_with("Auth"), "{bad_err}");
}

#[test]
fn strangers_are_refused_and_the_group_still_forms() {
    let mut peers = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..2 {
        let (p, port) = Peer::spawn(&[]);
        peers.push(p);
        ports.push(port);
    }
    let addr0 = format!("127.0.0.1:{}", ports[0]);
    // Garbage: rank 0 sends its challenge, reads garbage, closes without an answer.
    let mut garbage = TcpStream::connect(&addr0).unwrap();
    garbage.write_all(&[b'x'; 100]).unwrap();
    // A well-formed handshake with the wrong secret, claiming to be rank 1.
    let impostor = {
        let addr0 = addr0.clone();
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr0).unwrap();
            auth::connect(&mut s, b"wrong secret", 1, 2, 0, Duration::from_secs(10))
        })
    };
    let list = format!("{addr0},127.0.0.1:{}", ports[1]);
    peers[0].send(&format!("GROUP 0 2 {list}"));
    let mut seen = Vec::new();
    garbage
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    garbage.read_to_end(&mut seen).unwrap_or_default();
    assert_eq!(
        seen.len(),
        8 + 32,
        "only the challenge, then the connection is closed"
    );
    assert!(matches!(
        impostor.join().unwrap(),
        Err(CollectiveError::Auth { .. })
    ));

    peers[1].send(&format!("GROUP 1 2 {list}"));
    for p in peers.iter_mut() {
        assert_eq!(p.line(), "READY shm");
        p.send("ALLREDUCE f32 10 sum 1");
    }
    let a = peers[0].line();
    assert!(a.starts_with("OK "), "{a}");
    assert_eq!(peers[1].line(), a);
    // Once formed, the group listens no more: the port refuses connections.
    assert!(TcpStream::connect(&addr0).is_err());
}
