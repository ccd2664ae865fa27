//! All-reduce bus bandwidth of protodino's transports (the shared-memory segment that a group on
//! one host uses, and the TCP ring that it uses across hosts) against `torch.distributed` (gloo)
//! on the same machine, in the same run, printed as one table per world size.
//!
//! ```text
//! protodino-collectives-bench [--worlds 2,4] [--min-bytes 1024] [--max-bytes 268435456]
//!                             [--transports shm,tcp]
//!                             [--python PY --gloo-script crates/collectives/reference/bench_gloo.py]
//!                             [--trials 5] [--rounds 1] [--json OUT.json]
//! ```
//! Without `--python` only protodino is measured. A worker fails if its group did not form the
//! transport it was asked for, so a column never measures the other transport. "cpu" columns: user + system CPU milliseconds per
//! call summed over all ranks (`getrusage`), the cost that matters when ranks share cores. Bus bandwidth follows nccl-tests:
//! `busbw = bytes / time × 2 (W − 1) / W`, time being the slowest rank's mean per call, f32 sums,
//! sizes doubling from `--min-bytes` to `--max-bytes`: 2 warm-up calls, then `--trials` (5) timed
//! runs of `clamp(256 MiB / bytes, 3, 200)` calls each, the fastest run counting (the gloo script
//! uses the same schedule), and with `--rounds R` the whole sweep is repeated with fresh processes
//! R times per side, the fastest round counting per size. Each rank is its own process on
//! loopback, like torchrun would start them.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use protodino_collectives::{GroupOptions, GroupSpec, ReduceOp, RingGroup, bind_listener};

const SECRET: &[u8] = b"bench-secret";

#[derive(clap::Parser)]
#[command(
    name = "protodino-collectives-bench",
    version,
    about = "All-reduce bus bandwidth of protodino's shared-memory and TCP-ring transports, \
             optionally against torch.distributed (gloo)"
)]
struct Args {
    /// World sizes to measure (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    worlds: Vec<usize>,
    /// Smallest message, in bytes (sizes double up to --max-bytes).
    #[arg(long, default_value_t = 1 << 10)]
    min_bytes: usize,
    /// Largest message, in bytes.
    #[arg(long, default_value_t = 256 << 20)]
    max_bytes: usize,
    /// Python interpreter with torch, to run the gloo side (without it only protodino runs).
    #[arg(long)]
    python: Option<String>,
    /// The gloo side's script.
    #[arg(long, default_value = "crates/collectives/reference/bench_gloo.py")]
    gloo_script: String,
    /// Internal: run as one rank (rendezvous over stdin/stdout).
    #[arg(long, hide = true)]
    worker: bool,
    /// Transports to measure (`shm`, `tcp`, comma separated), each its own column.
    #[arg(long, value_delimiter = ',', default_value = "shm,tcp")]
    transports: Vec<String>,
    /// Ring chunk size, in bytes.
    #[arg(long, default_value_t = GroupOptions::default().chunk_bytes)]
    chunk_bytes: usize,
    /// Socket send/receive buffer size, in bytes.
    #[arg(long, default_value_t = GroupOptions::default().socket_buffer_bytes)]
    socket_buffer_bytes: usize,
    /// Operations from this many bytes up send on a thread of their own (default: never).
    #[arg(long)]
    sender_thread_min_bytes: Option<usize>,
    /// When no socket is ready, retry this many microseconds before sleeping in poll(2).
    #[arg(long, default_value_t = GroupOptions::default().spin.as_micros() as u64)]
    spin_us: u64,
    /// Shared-memory chunk size, in bytes.
    #[arg(long, default_value_t = GroupOptions::default().shm_chunk_bytes)]
    shm_chunk_bytes: usize,
    /// Timed trials per size; the fastest counts (the machine is shared, so slower trials
    /// measure the neighbours). Same rule in the gloo script.
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Also write every row as JSON here.
    #[arg(long)]
    json: Option<String>,
    /// Fresh-process rounds per world (ring then gloo each time); the fastest counts per size.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = <Args as clap::Parser>::parse();
    a.trials = a.trials.max(1);
    a.rounds = a.rounds.max(1);
    if let Some(t) = a
        .transports
        .iter()
        .find(|t| !["shm", "tcp"].contains(&t.as_str()))
    {
        bail!("--transports: unknown transport {t:?} (shm, tcp)");
    }
    if a.min_bytes < 4 || a.max_bytes < a.min_bytes {
        bail!("need 4 <= --min-bytes <= --max-bytes");
    }
    Ok(a)
}

fn sizes(min: usize, max: usize) -> Vec<usize> {
    let mut v = Vec::new();
    let mut b = min;
    while b <= max {
        v.push(b);
        b *= 2;
    }
    v
}

fn iterations(bytes: usize) -> usize {
    ((256usize << 20) / bytes).clamp(3, 200)
}

/// One rank: rendezvous over stdin/stdout, then time every size; rank 0 prints `RESULT` lines.
fn worker(args: &Args) -> anyhow::Result<()> {
    let transport = args.transports.first().context("--transports")?.as_str();
    let options = GroupOptions {
        shared_memory: transport == "shm",
        shm_chunk_bytes: args.shm_chunk_bytes,
        chunk_bytes: args.chunk_bytes,
        socket_buffer_bytes: args.socket_buffer_bytes,
        sender_thread_min_bytes: args.sender_thread_min_bytes,
        spin: std::time::Duration::from_micros(args.spin_us),
        ..GroupOptions::default()
    };
    let listener = bind_listener("127.0.0.1:0", &options)?;
    println!("PORT {}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let w: Vec<&str> = line.split_whitespace().collect();
    let [_, rank, world, peers] = w.as_slice() else {
        bail!("bad rendezvous line {line:?}")
    };
    let spec = GroupSpec {
        rank: rank.parse()?,
        world: world.parse()?,
        peers: peers.split(',').map(str::to_string).collect(),
        secret: SECRET.to_vec(),
    };
    let mut group = RingGroup::connect(&spec, listener, options)?;
    if group.transport().as_str() != transport {
        bail!(
            "asked for the {transport} transport, the group formed {}",
            group.transport().as_str()
        );
    }
    let mut buf = vec![0.0f32; args.max_bytes / 4];
    for bytes in sizes(args.min_bytes, args.max_bytes) {
        let slice = &mut buf[..bytes / 4];
        for _ in 0..2 {
            group.all_reduce(slice, ReduceOp::Sum)?;
        }
        let iters = iterations(bytes);
        // (slowest rank's seconds per call, all ranks' CPU seconds per call) of the fastest trial
        let mut best = (f32::INFINITY, 0.0f32);
        for _ in 0..args.trials {
            group.barrier()?;
            let (t0, cpu0) = (Instant::now(), cpu_seconds());
            for _ in 0..iters {
                group.all_reduce(slice, ReduceOp::Sum)?;
            }
            let mine = [
                t0.elapsed().as_secs_f32() / iters as f32,
                (cpu_seconds() - cpu0) as f32 / iters as f32,
            ];
            let mut all = vec![0.0f32; 2 * spec.world];
            group.all_gather(&mine, &mut all)?;
            let slowest = all.chunks(2).map(|c| c[0]).fold(0.0f32, f32::max);
            if slowest < best.0 {
                best = (slowest, all.chunks(2).map(|c| c[1]).sum());
            }
        }
        if spec.rank == 0 {
            println!("RESULT {bytes} {:e} {:e}", best.0, best.1);
            std::io::stdout().flush()?;
        }
    }
    Ok(())
}

/// Runs protodino's `transport` at `world` and returns (seconds, CPU seconds) per call by size.
fn run_ours(
    args: &Args,
    transport: &str,
    world: usize,
) -> anyhow::Result<BTreeMap<usize, (f64, f64)>> {
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..world {
        let mut child = Command::new(&exe)
            .args([
                "--worker",
                "--min-bytes",
                &args.min_bytes.to_string(),
                "--max-bytes",
                &args.max_bytes.to_string(),
            ])
            .args(["--transports", transport])
            .args(["--shm-chunk-bytes", &args.shm_chunk_bytes.to_string()])
            .args(["--chunk-bytes", &args.chunk_bytes.to_string()])
            .args([
                "--socket-buffer-bytes",
                &args.socket_buffer_bytes.to_string(),
            ])
            .args(["--trials", &args.trials.to_string()])
            .args(["--spin-us", &args.spin_us.to_string()])
            .args(
                args.sender_thread_min_bytes
                    .map(|b| ["--sender-thread-min-bytes".to_string(), b.to_string()])
                    .into_iter()
                    .flatten(),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut out = BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .with_context(|| format!("worker said {line:?}"))?
            .to_string();
        addrs.push(format!("127.0.0.1:{port}"));
        children.push((child, out));
    }
    let list = addrs.join(",");
    for (rank, (child, _)) in children.iter_mut().enumerate() {
        writeln!(
            child.stdin.as_mut().context("stdin")?,
            "GROUP {rank} {world} {list}"
        )?;
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut children[0].1, &mut text)?;
    let results = parse_results(&text)?;
    for (mut child, _) in children {
        if !child.wait()?.success() {
            bail!("a {transport} worker failed");
        }
    }
    Ok(results)
}

/// Runs the gloo script at `world`; it prints `RESULT <bytes> <seconds>` lines too.
fn run_gloo(
    args: &Args,
    python: &str,
    world: usize,
) -> anyhow::Result<BTreeMap<usize, (f64, f64)>> {
    let out = Command::new(python)
        .args([&args.gloo_script, "--world", &world.to_string()])
        .args([
            "--min-bytes",
            &args.min_bytes.to_string(),
            "--max-bytes",
            &args.max_bytes.to_string(),
        ])
        .args(["--trials", &args.trials.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {python} {}", args.gloo_script))?;
    if !out.status.success() {
        bail!("gloo benchmark failed: {}", out.status);
    }
    parse_results(&String::from_utf8_lossy(&out.stdout))
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// `RESULT <bytes> <seconds per call> <CPU seconds per call, all ranks>` lines of a run.
fn parse_results(text: &str) -> anyhow::Result<BTreeMap<usize, (f64, f64)>> {
    let mut results = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("RESULT ") {
            let mut it = rest.split_whitespace();
            let bytes: usize = it.next().context("bytes")?.parse()?;
            let secs: f64 = it.next().context("secs")?.parse()?;
            let cpu: f64 = it.next().context("cpu")?.parse()?;
            results.insert(bytes, (secs, cpu));
        }
    }
    Ok(results)
}

/// Merge one round's results, keeping the faster call per size.
fn keep_fastest(best: &mut BTreeMap<usize, (f64, f64)>, round: BTreeMap<usize, (f64, f64)>) {
    for (bytes, r) in round {
        let e = best.entry(bytes).or_insert(r);
        if r.0 < e.0 {
            *e = r;
        }
    }
}

fn busbw_gbs(bytes: usize, secs: f64, world: usize) -> f64 {
    bytes as f64 / secs / 1e9 * 2.0 * (world as f64 - 1.0) / world as f64
}

fn human(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if args.worker {
        return worker(&args);
    }
    let mut rows = Vec::new();
    for &world in &args.worlds {
        // Each round starts fresh processes on every side (protodino's transports, then gloo);
        // per size the fastest round counts on each side. On the 2-core build machine the TCP
        // ring's 64 MiB call is 29-30 ms or 37-40 ms depending on the process start (the whole
        // profile scales, not one function), so one start per side measures luck as much as the
        // code.
        let mut ours: Vec<BTreeMap<usize, (f64, f64)>> =
            vec![BTreeMap::new(); args.transports.len()];
        let mut gloo = BTreeMap::new();
        for _ in 0..args.rounds {
            for (t, transport) in args.transports.iter().enumerate() {
                keep_fastest(&mut ours[t], run_ours(&args, transport, world)?);
            }
            if let Some(py) = &args.python {
                keep_fastest(&mut gloo, run_gloo(&args, py, world)?);
            }
        }
        println!(
            "\nall-reduce f32 sum, world {world}, one host, bus bandwidth GB/s (nccl-tests formula); \
             cpu = CPU ms per call, all ranks"
        );
        let mut head = format!("{:>9}", "size");
        let names: Vec<&str> = args
            .transports
            .iter()
            .map(String::as_str)
            .chain(args.python.as_ref().map(|_| "gloo"))
            .collect();
        for name in &names {
            head += &format!(
                " | {:>10} | {:>10} | {:>8}",
                format!("{name} us"),
                format!("{name} GB/s"),
                format!("{name} cpu")
            );
        }
        if args.python.is_some() {
            for t in &args.transports {
                head += &format!(" | {:>9}", format!("{t}/gloo"));
            }
        }
        println!("{head}");
        for &bytes in ours[0].keys() {
            let mut row = serde_json::json!({ "world": world, "bytes": bytes });
            let mut line = format!("{:>9}", human(bytes));
            let sides: Vec<Option<&(f64, f64)>> = ours
                .iter()
                .map(|m| m.get(&bytes))
                .chain(args.python.as_ref().map(|_| gloo.get(&bytes)))
                .collect();
            let bw: Vec<Option<f64>> = sides
                .iter()
                .map(|s| s.map(|&(secs, _)| busbw_gbs(bytes, secs, world)))
                .collect();
            for ((name, side), bw) in names.iter().zip(&sides).zip(&bw) {
                row[format!("{name}_us")] = serde_json::json!(side.map(|s| s.0 * 1e6));
                row[format!("{name}_busbw_gbs")] = serde_json::json!(bw);
                row[format!("{name}_cpu_ms")] = serde_json::json!(side.map(|s| s.1 * 1e3));
                line += &match (side, bw) {
                    (Some((secs, cpu)), Some(bw)) => {
                        format!(" | {:>10.1} | {bw:>10.3} | {:>8.2}", secs * 1e6, cpu * 1e3)
                    }
                    _ => format!(" | {:>10} | {:>10} | {:>8}", "-", "-", "-"),
                };
            }
            if args.python.is_some() {
                let theirs = bw[bw.len() - 1];
                for (t, transport) in args.transports.iter().enumerate() {
                    let ratio = bw[t].zip(theirs).map(|(a, b)| a / b);
                    row[format!("{transport}_ratio")] = serde_json::json!(ratio);
                    line += &ratio.map_or(format!(" | {:>9}", "-"), |r| format!(" | {r:>9.2}"));
                }
            }
            println!("{line}");
            rows.push(row);
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}
