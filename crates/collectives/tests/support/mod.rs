//! Shared helpers of the integration tests: in-process groups on loopback (one thread per rank),
//! and child processes of the `protodino-collectives-peer` binary with their rendezvous.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use protodino_collectives::{GroupOptions, GroupSpec, RingGroup, bind_listener};

pub const SECRET: &[u8] = b"test-group-secret";

/// Short deadlines so failure tests stay fast.
pub fn opts() -> GroupOptions {
    GroupOptions {
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(10),
        ..GroupOptions::default()
    }
}

/// As [`opts`], with the shared-memory transport off: the TCP ring even on one host.
pub fn tcp_opts() -> GroupOptions {
    GroupOptions {
        shared_memory: false,
        ..opts()
    }
}

/// The transport a group of `world` ranks on this host forms when every rank has
/// `shared_memory` (as `RingGroup::transport().as_str()` and the peer's `READY` line name it).
pub fn expected_transport(world: usize, shared_memory: bool) -> &'static str {
    match (world, shared_memory) {
        (1, _) => "solo",
        (_, true) => "shm",
        _ => "tcp",
    }
}

/// Forms a group of `world` ranks in this process (one thread each) and returns `f`'s results in
/// rank order.
pub fn in_process_groups<R: Send, F: Fn(RingGroup) -> R + Sync>(
    world: usize,
    options: GroupOptions,
    f: F,
) -> Vec<R> {
    in_process_groups_with(world, |_| options.clone(), f)
}

/// As [`in_process_groups`], with each rank's options from `options(rank)`.
pub fn in_process_groups_with<R: Send, F: Fn(RingGroup) -> R + Sync>(
    world: usize,
    options: impl Fn(usize) -> GroupOptions,
    f: F,
) -> Vec<R> {
    let listeners: Vec<_> = (0..world)
        .map(|rank| bind_listener("127.0.0.1:0", &options(rank)).unwrap())
        .collect();
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let spec = GroupSpec {
                    rank,
                    world,
                    peers: peers.clone(),
                    secret: SECRET.to_vec(),
                };
                let options = options(rank);
                let f = &f;
                s.spawn(move || f(RingGroup::connect(&spec, listener, options).unwrap()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// One child process running the peer binary, driven line by line over stdin/stdout.
pub struct Peer {
    pub child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    /// Starts a peer with `args` (the scenario); it prints `PORT <port>` once listening.
    pub fn spawn(args: &[&str]) -> (Peer, u16) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_protodino-collectives-peer"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn peer");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut peer = Peer {
            child,
            stdin,
            stdout,
        };
        let port = peer.expect("PORT").parse().unwrap();
        (peer, port)
    }

    /// Sends a line.
    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Reads lines until one starts with `tag`; returns the rest of that line.
    pub fn expect(&mut self, tag: &str) -> String {
        loop {
            let mut line = String::new();
            if self.stdout.read_line(&mut line).unwrap() == 0 {
                panic!("peer exited while waiting for {tag}");
            }
            if let Some(rest) = line.trim_end().strip_prefix(tag) {
                return rest.trim().to_string();
            }
        }
    }

    /// Next line, whatever it is.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim_end().to_string()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child by pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `world` peers with the same `args`, then hands each the full rendezvous
/// (`GROUP <rank> <world> <addr,...>`).
pub fn spawn_group(world: usize, args: &[&str]) -> Vec<Peer> {
    let mut peers = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..world {
        let (p, port) = Peer::spawn(args);
        peers.push(p);
        addrs.push(format!("127.0.0.1:{port}"));
    }
    let list = addrs.join(",");
    for (rank, p) in peers.iter_mut().enumerate() {
        p.send(&format!("GROUP {rank} {world} {list}"));
    }
    peers
}
