//! Test-support peer: one rank of a group in its own process, driven by line commands on stdin,
//! so the integration tests can use real processes, real sockets and real signals (SIGKILL,
//! SIGSTOP). Not used in production.
//!
//! ```text
//! args:    [--secret S] [--timeout-ms N] [--connect-timeout-ms N] [--shared-memory on|off]
//!          [--shm-chunk-bytes N]
//! out:     PORT <port>                       (listening on 127.0.0.1)
//! in:      GROUP <rank> <world> <a:p,b:q,…>  -> READY <solo|tcp|shm> | ERR <kind> <ms> <message>
//! in:      ALLREDUCE <f32|bf16> <len> <sum|avg> <seed>
//!                                            -> OK <sha256 of the result bytes> | ERR …
//! in:      LOOP <len>   all-reduce until an error, printing ITER <i>; then ERR …
//! in:      REBIND       drop the group, listen anew -> PORT <port>
//! in:      EXIT
//! ```

use std::io::{BufRead, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use half::bf16;
use protodino_collectives::reference::test_pattern;
use protodino_collectives::{
    CollectiveError, Element, GroupOptions, GroupSpec, ReduceOp, RingGroup, bind_listener,
};
use sha2::{Digest, Sha256};

fn kind(e: &CollectiveError) -> &'static str {
    match e {
        CollectiveError::InvalidArgument(_) => "InvalidArgument",
        CollectiveError::PeerLost { .. } => "PeerLost",
        CollectiveError::Timeout { .. } => "Timeout",
        CollectiveError::Mismatch { .. } => "Mismatch",
        CollectiveError::Protocol { .. } => "Protocol",
        CollectiveError::Auth { .. } => "Auth",
        CollectiveError::Connect(_) => "Connect",
        CollectiveError::Poisoned => "Poisoned",
        CollectiveError::Stream(_) => "Stream",
        CollectiveError::Io { .. } => "Io",
        CollectiveError::Nccl(_) => "Nccl",
        CollectiveError::Unavailable(_) => "Unavailable",
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn report(e: &CollectiveError, started: Instant) {
    say(&format!(
        "ERR {} {} {e}",
        kind(e),
        started.elapsed().as_millis()
    ));
}

fn reduce_hash<T: Element>(
    group: &mut RingGroup,
    len: usize,
    op: ReduceOp,
    seed: u64,
) -> Result<String, CollectiveError> {
    let mut buf: Vec<T> = test_pattern(seed, group.rank(), len);
    group.all_reduce(&mut buf, op)?;
    Ok(hex::encode(Sha256::digest(
        protodino_collectives::element::as_bytes(&buf),
    )))
}

fn listen(options: &GroupOptions) -> anyhow::Result<TcpListener> {
    let listener = bind_listener("127.0.0.1:0", options)?;
    say(&format!("PORT {}", listener.local_addr()?.port()));
    Ok(listener)
}

#[derive(clap::Parser)]
#[command(
    name = "protodino-collectives-peer",
    version,
    about = "Test support: one rank of a collective group, driven by line commands on stdin \
             (GROUP, ALLREDUCE, LOOP, REBIND, EXIT; see the source header)"
)]
struct Args {
    /// The group secret.
    #[arg(long, default_value = "test-group-secret")]
    secret: String,
    /// Progress deadline of every operation, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    timeout_ms: u64,
    /// Deadline for forming the group, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    connect_timeout_ms: u64,
    /// Whether ranks on one host use the shared-memory transport (default: the library's).
    #[arg(long, value_parser = ["on", "off"])]
    shared_memory: Option<String>,
    /// Shared-memory chunk size, in bytes (default: the library's).
    #[arg(long)]
    shm_chunk_bytes: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let secret = args.secret.into_bytes();
    let mut options = GroupOptions {
        timeout: Duration::from_millis(args.timeout_ms),
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        ..Default::default()
    };
    if let Some(v) = &args.shared_memory {
        options.shared_memory = v == "on";
    }
    if let Some(n) = args.shm_chunk_bytes {
        options.shm_chunk_bytes = n;
    }
    let mut listener = Some(listen(&options)?);
    let mut group: Option<RingGroup> = None;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let started = Instant::now();
        match words.as_slice() {
            ["GROUP", rank, world, peers] => {
                let spec = GroupSpec {
                    rank: rank.parse()?,
                    world: world.parse()?,
                    peers: peers.split(',').map(str::to_string).collect(),
                    secret: secret.clone(),
                };
                let l = listener.take().context("GROUP twice without REBIND")?;
                match RingGroup::connect(&spec, l, options.clone()) {
                    Ok(g) => {
                        say(&format!("READY {}", g.transport().as_str()));
                        group = Some(g);
                    }
                    Err(e) => report(&e, started),
                }
            }
            ["ALLREDUCE", dtype, len, op, seed] => {
                let g = group.as_mut().context("no group")?;
                let op = if *op == "avg" {
                    ReduceOp::Average
                } else {
                    ReduceOp::Sum
                };
                let (len, seed) = (len.parse()?, seed.parse()?);
                let result = match *dtype {
                    "bf16" => reduce_hash::<bf16>(g, len, op, seed),
                    _ => reduce_hash::<f32>(g, len, op, seed),
                };
                match result {
                    Ok(h) => say(&format!("OK {h}")),
                    Err(e) => report(&e, started),
                }
            }
            ["LOOP", len] => {
                let g = group.as_mut().context("no group")?;
                let mut buf = vec![1.0f32; len.parse()?];
                for iter in 0u64.. {
                    let t = Instant::now();
                    if let Err(e) = g.all_reduce(&mut buf, ReduceOp::Average) {
                        report(&e, t);
                        break;
                    }
                    say(&format!("ITER {iter}"));
                }
            }
            ["REBIND"] => {
                group = None;
                listener = Some(listen(&options)?);
            }
            ["EXIT"] => break,
            _ => bail!("unknown command {line:?}"),
        }
    }
    Ok(())
}
