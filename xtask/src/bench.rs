//! `cargo xtask bench`: protodino side by side with what a user would otherwise run, every
//! figure a ratio measured in one run on this machine.
//!
//! | row | protodino | reference |
//! |---|---|---|
//! | step | `crates/dino/examples/step_time.rs` | `scripts/gpu/step_torch.py` (eager PyTorch) |
//! | data | `protodino-data-bench` | `crates/data/reference/bench_torchvision.py` (DataLoader) |
//! | end to end | `protodino train` | `scripts/bench/train_torch.py` (DataLoader + eager loop) |
//! | all-reduce | `protodino-collectives-bench` (shared memory and TCP ring) | `bench_gloo.py` (torch.distributed gloo) |
//! | service | a job through a local coordinator + agents (`service.rs`) | `protodino train`, alone or as static-peer ranks |
//! | recovery | a 3-agent job losing one agent to SIGKILL (`recovery.rs`) | `torchrun` elastic with checkpoint-and-restart (`scripts/bench/recovery_torch.py`) |
//!
//! Memory: every command runs as a child whose process tree (the DataLoader's worker processes
//! included) is sampled every 200 ms; the figure is the peak of the summed PSS (proportional set
//! size: pages shared between a parent and its forked workers count once, split between them),
//! next to the summed RSS for reference. The Python environment is `cargo xtask pyref`'s.
//! Results: a table on stdout, `bench.md` and `bench.json` in `--out` (default
//! `<cache>/bench/latest`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::{cache_root, cargo, data, libtorch, pyref, repo_root, run, target_dir};

pub struct BenchArgs {
    pub quick: bool,
    pub only: Vec<String>,
    pub out: Option<PathBuf>,
}

mod recovery;
mod service;

const SECTIONS: &[&str] = &["step", "data", "e2e", "allreduce", "service", "recovery"];

/// What one measured child did.
struct Measured {
    stdout: Vec<String>,
    peak_pss_mib: f64,
    peak_rss_mib: f64,
}

/// Runs `cmd` (stdout captured and echoed to stderr, stderr inherited) while sampling the
/// memory of its process tree.
fn measure(label: &str, mut cmd: Command) -> Result<Measured> {
    eprintln!("bench[{label}]: {cmd:?}");
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let lines = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let out = child.stdout.take().context("stdout")?;
        let lines = Arc::clone(&lines);
        let label = label.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("  [{label}] {line}");
                lines.lock().unwrap().push(line);
            }
        })
    };
    let (mut peak_pss, mut peak_rss) = (0u64, 0u64);
    let status = loop {
        let (pss, rss) = tree_memory_kib(child.id());
        peak_pss = peak_pss.max(pss);
        peak_rss = peak_rss.max(rss);
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    reader.join().ok();
    ensure!(status.success(), "{label}: {cmd:?} failed with {status}");
    let stdout = std::mem::take(&mut *lines.lock().unwrap());
    eprintln!(
        "bench[{label}]: {:.1} s, peak PSS {:.0} MiB, peak RSS {:.0} MiB",
        start.elapsed().as_secs_f64(),
        peak_pss as f64 / 1024.0,
        peak_rss as f64 / 1024.0
    );
    Ok(Measured {
        stdout,
        peak_pss_mib: peak_pss as f64 / 1024.0,
        peak_rss_mib: peak_rss as f64 / 1024.0,
    })
}

/// (PSS, RSS) in KiB summed over `root` and all its descendants.
fn tree_memory_kib(root: u32) -> (u64, u64) {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields after the command name: state, ppid, …
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let (mut pss, mut rss) = (0, 0);
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        pss += field_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:");
        rss += field_kib(&format!("/proc/{pid}/status"), "VmRSS:");
        stack.extend(children.get(&pid).into_iter().flatten());
    }
    (pss, rss)
}

fn field_kib(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// The last stdout line that parses as a JSON object.
fn last_json(m: &Measured) -> Result<Value> {
    m.stdout
        .iter()
        .rev()
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(Value::is_object)
        })
        .context("no JSON line in the output")
}

fn f(v: &Value, key: &str) -> Result<f64> {
    v[key]
        .as_f64()
        .with_context(|| format!("no number {key:?} in {v}"))
}

/// One protodino-vs-reference pair.
struct Pair {
    section: &'static str,
    what: String,
    unit: &'static str,
    ours: f64,
    theirs: f64,
    /// Peak memory of the two process trees behind this row, where it has its own.
    mem: Option<Mem>,
}

/// Peak PSS / RSS (MiB) of each side's process tree and what those processes measured.
struct Mem {
    what: String,
    /// protodino PSS, reference PSS, protodino RSS, reference RSS.
    peaks: [f64; 4],
}

impl Pair {
    fn ratio(&self) -> f64 {
        self.ours / self.theirs
    }

    fn to_json(&self) -> Value {
        json!({
            "section": self.section,
            "what": self.what,
            "unit": self.unit,
            "protodino": self.ours,
            "reference": self.theirs,
            "ratio": self.ratio(),
            "peak_pss_mib": self.mem.as_ref().map(|m| json!({"protodino": m.peaks[0], "reference": m.peaks[1]})),
            "peak_rss_mib": self.mem.as_ref().map(|m| json!({"protodino": m.peaks[2], "reference": m.peaks[3]})),
        })
    }
}

fn mem(what: &str, ours: &Measured, theirs: &Measured) -> Option<Mem> {
    Some(Mem {
        what: what.to_string(),
        peaks: [
            ours.peak_pss_mib,
            theirs.peak_pss_mib,
            ours.peak_rss_mib,
            theirs.peak_rss_mib,
        ],
    })
}

struct Ctx {
    python: PathBuf,
    release: PathBuf,
    quick: bool,
    scratch: PathBuf,
}

fn python(ctx: &Ctx, script: &str) -> Command {
    let mut c = Command::new(&ctx.python);
    c.current_dir(repo_root()).arg(script);
    c
}

fn step(ctx: &Ctx, pairs: &mut Vec<Pair>) -> Result<()> {
    for (arch, name, steps) in [
        ("vit_tiny", "ViT-Ti/16", if ctx.quick { 2 } else { 5 }),
        ("vit_small", "ViT-S/16", if ctx.quick { 2 } else { 3 }),
    ] {
        let steps = steps.to_string();
        let mut ours = Command::new(ctx.release.join("examples/step_time"));
        ours.current_dir(repo_root())
            .args(["8", "2", &steps, "65536", "0.1", "--arch", arch])
            .args(["--warmup", "1", "--json"]);
        let ours = measure(&format!("step {name} protodino"), ours)?;
        let mut theirs = python(ctx, "scripts/gpu/step_torch.py");
        theirs
            .args(["--device", "cpu", "--threads", "2", "--batch", "8"])
            .args(["--arch", arch, "--steps", &steps, "--warmup", "1"]);
        let theirs = measure(&format!("step {name} pytorch"), theirs)?;
        let what = format!("{name}, 2×224 + 10×96, batch 8, K 65536, λ 0.1, fp32, 2 threads");
        pairs.push(Pair {
            section: "step",
            mem: mem(&what, &ours, &theirs),
            what,
            unit: "img/s",
            ours: f(&last_json(&ours)?, "images_per_s")?,
            theirs: f(&last_json(&theirs)?, "images_per_s")?,
        });
    }
    Ok(())
}

/// `impl dataset preset threads img/s img/cpu-s` rows of the two data benchmarks.
fn data_rows(m: &Measured) -> HashMap<(String, String), (f64, f64)> {
    m.stdout
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() == 6 && f[0] != "impl").then(|| {
                (
                    (f[1].to_string(), f[2].to_string()),
                    (
                        f[4].parse().unwrap_or(f64::NAN),
                        f[5].parse().unwrap_or(f64::NAN),
                    ),
                )
            })
        })
        .collect()
}

fn photos(ctx: &Ctx) -> Result<PathBuf> {
    let dir = cache_root().join("bench/photos");
    let marker = dir.join(".complete");
    if !marker.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        let mut c = python(ctx, "crates/data/reference/bench_torchvision.py");
        c.arg("--make-photos").arg(&dir);
        run(c)?;
        std::fs::write(&marker, "")?;
    }
    Ok(dir)
}

fn data_section(ctx: &Ctx, pairs: &mut Vec<Pair>) -> Result<()> {
    let photos = photos(ctx)?;
    let fm = data::data_root().join("fashion-mnist");
    let (images, repeats) = if ctx.quick {
        ("256", "2")
    } else {
        ("512", "3")
    };
    let mut ours = Command::new(ctx.release.join("protodino-data-bench"));
    ours.current_dir(repo_root())
        .arg(format!("photos={}", photos.display()))
        .arg(format!("fmnist={}", fm.join("train").display()))
        .args(["threads=2", &format!("images={images}")])
        .arg(format!("repeats={repeats}"));
    let ours = measure("data protodino", ours)?;
    let mut theirs = python(ctx, "crates/data/reference/bench_torchvision.py");
    theirs
        .arg("--photos")
        .arg(&photos)
        .arg("--fmnist-raw")
        .arg(fm.join("raw"))
        .args(["--workers", "2", "--images", images, "--repeats", repeats]);
    let theirs = measure("data torchvision", theirs)?;
    let (a, b) = (data_rows(&ours), data_rows(&theirs));
    let mut keys: Vec<_> = a.keys().cloned().collect();
    keys.sort();
    for (i, key) in keys.iter().enumerate() {
        let Some(&t) = b.get(key) else {
            bail!("torchvision printed no row for {key:?}")
        };
        let o = a[key];
        let preset = if key.1 == "dino" {
            "2×224 + 10×96"
        } else {
            "2×32 + 6×16"
        };
        // The memory figures belong to the whole benchmark command (one process tree per side
        // for every row): the first row carries them, under that name.
        let m = if i == 0 {
            mem(
                "the whole data benchmark (every data row above)",
                &ours,
                &theirs,
            )
        } else {
            None
        };
        pairs.push(Pair {
            section: "data",
            what: format!("{} {preset}, 2 threads / 2 workers", key.0),
            unit: "img/s",
            ours: o.0,
            theirs: t.0,
            mem: m,
        });
        pairs.push(Pair {
            section: "data (per CPU-s)",
            what: format!("{} {preset}", key.0),
            unit: "img/CPU-s",
            ours: o.1,
            theirs: t.1,
            mem: None,
        });
    }
    Ok(())
}

fn e2e(ctx: &Ctx, pairs: &mut Vec<Pair>) -> Result<()> {
    let steps = if ctx.quick { "30" } else { "100" };
    let fm = data::data_root().join("fashion-mnist");
    let out = ctx.scratch.join("e2e-run");
    let _ = std::fs::remove_dir_all(&out);
    let mut ours = Command::new(ctx.release.join("protodino"));
    ours.current_dir(repo_root())
        .args(["train", "--config", "configs/cpu-demo.toml"])
        .args(["--config", "configs/bench/e2e-fmnist.toml"])
        .args(["--max-steps", steps, "--json"])
        .args(["--knn-train-limit", "1000", "--knn-test-limit", "200"])
        .arg("--output-dir")
        .arg(&out);
    let ours = measure("e2e protodino", ours)?;
    let _ = std::fs::remove_dir_all(&out);
    let fin = ours
        .stdout
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["kind"] == "final")
        .context("protodino train printed no final record")?;
    let mut theirs = python(ctx, "scripts/bench/train_torch.py");
    theirs
        .args(["--config", "configs/default.toml"])
        .args(["--config", "configs/cpu-demo.toml"])
        .args(["--config", "configs/bench/e2e-fmnist.toml"])
        .arg("--fmnist-raw")
        .arg(fm.join("raw"))
        .args(["--steps", steps]);
    let theirs = measure("e2e pytorch", theirs)?;
    let what = format!(
        "train, configs/cpu-demo.toml (Fashion-MNIST, ViT-Ti/8 ×4 blocks, 2×32 + 6×16, batch 32, K 1024), {steps} steps"
    );
    pairs.push(Pair {
        section: "end to end",
        mem: mem(&what, &ours, &theirs),
        what,
        unit: "img/s",
        ours: f(&fin, "images_per_second")?,
        theirs: f(&last_json(&theirs)?, "images_per_second")?,
    });
    Ok(())
}

fn allreduce(ctx: &Ctx, pairs: &mut Vec<Pair>) -> Result<Vec<Value>> {
    let json_path = ctx.scratch.join("allreduce.json");
    let mut c = Command::new(ctx.release.join("protodino-collectives-bench"));
    c.current_dir(repo_root())
        .args(["--worlds", "2,4", "--min-bytes", "1024"])
        .args([
            "--max-bytes",
            if ctx.quick { "67108864" } else { "268435456" },
        ])
        .arg("--python")
        .arg(&ctx.python)
        .args(["--trials", if ctx.quick { "3" } else { "5" }])
        .args(["--rounds", if ctx.quick { "1" } else { "3" }])
        .arg("--json")
        .arg(&json_path);
    measure("all-reduce", c)?;
    let rows: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&json_path)?)?;
    for r in &rows {
        if r["bytes"].as_u64() == Some(64 << 20) {
            // The group on one host forms the shared-memory transport; the TCP ring is what a
            // group spread over hosts uses, measured here on loopback.
            for (key, transport) in [("shm", "shared memory"), ("tcp", "TCP ring on loopback")] {
                pairs.push(Pair {
                    section: "all-reduce",
                    what: format!("64 MiB f32 sum, world {}, {transport}", r["world"]),
                    unit: "busbw GB/s",
                    ours: f(r, &format!("{key}_busbw_gbs"))?,
                    theirs: f(r, "gloo_busbw_gbs")?,
                    mem: None,
                });
            }
        }
    }
    Ok(rows)
}

fn goal(section: &str) -> Option<&'static str> {
    match section {
        "step" => Some("≥ 1×"),
        "data" => Some("≥ 3×"),
        "end to end" => Some("≥ 1.15×"),
        "all-reduce" => Some("≥ 1.2×"),
        "recovery" => Some("≤ 0.1×, ≤ 5 s"),
        "recovery (steps lost)" => Some("protodino 0"),
        _ => None,
    }
}

fn markdown(pairs: &[Pair], allreduce_rows: &[Value], header: &str) -> String {
    let mut s = format!("{header}\n\n");
    s.push_str("| row | what | unit | protodino | reference | ratio | goal |\n");
    s.push_str("|---|---|---|---:|---:|---:|---:|\n");
    for p in pairs {
        let ratio = p.ratio();
        s.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.2} | {} | {} |\n",
            p.section,
            p.what,
            p.unit,
            p.ours,
            p.theirs,
            if ratio.is_finite() {
                format!("{ratio:.2}×")
            } else {
                "—".into()
            },
            goal(p.section).unwrap_or("—")
        ));
    }
    s.push_str("\nMemory: peak of the process tree's summed PSS (RSS in brackets), MiB; ratio = protodino / reference, goal ≤ 1.0×.\n\n");
    s.push_str("| row | what | protodino | reference | ratio |\n|---|---|---:|---:|---:|\n");
    for p in pairs {
        if let Some(Mem { what, peaks: m }) = &p.mem {
            s.push_str(&format!(
                "| {} | {} | {:.0} ({:.0}) | {:.0} ({:.0}) | {:.2}× |\n",
                p.section,
                what,
                m[0],
                m[2],
                m[1],
                m[3],
                m[0] / m[1]
            ));
        }
    }
    if !allreduce_rows.is_empty() {
        s.push_str(
            "\nAll-reduce sweep (f32 sum, all ranks on this host; shm = the shared-memory transport such a group forms, tcp = the TCP ring it would use across hosts, on loopback; bus bandwidth GB/s = algbw × 2(W−1)/W):\n\n",
        );
        s.push_str("| world | size | shm µs | shm GB/s | tcp µs | tcp GB/s | gloo µs | gloo GB/s | shm / gloo | tcp / gloo |\n");
        s.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for r in allreduce_rows {
            let b = r["bytes"].as_u64().unwrap_or(0);
            let size = if b >= 1 << 20 {
                format!("{} MiB", b >> 20)
            } else {
                format!("{} KiB", b >> 10)
            };
            let num = |k: &str, d: usize| {
                r[k].as_f64()
                    .map_or("—".to_string(), |v| format!("{v:.d$}"))
            };
            s.push_str(&format!(
                "| {} | {size} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r["world"],
                num("shm_us", 1),
                num("shm_busbw_gbs", 3),
                num("tcp_us", 1),
                num("tcp_busbw_gbs", 3),
                num("gloo_us", 1),
                num("gloo_busbw_gbs", 3),
                num("shm_ratio", 2),
                num("tcp_ratio", 2)
            ));
        }
    }
    s
}

pub fn bench(args: BenchArgs) -> Result<()> {
    for s in &args.only {
        ensure!(
            SECTIONS.contains(&s.as_str()),
            "--only {s}: the sections are {SECTIONS:?}"
        );
    }
    let want = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    libtorch::ensure()?;
    data::ensure()?;
    // The service rows compare protodino with itself; every other section needs PyTorch.
    let python = if ["step", "data", "e2e", "allreduce", "recovery"]
        .iter()
        .any(|s| want(s))
    {
        pyref::ensure()?
    } else {
        PathBuf::new()
    };
    let mut build = cargo();
    build.args(["build", "--release"]);
    build.args(["-p", "protodino-dino", "--example", "step_time"]);
    build.args(["-p", "protodino-data", "--bin", "protodino-data-bench"]);
    build.args([
        "-p",
        "protodino-collectives",
        "--bin",
        "protodino-collectives-bench",
    ]);
    build.args(["-p", "protodino-worker", "--bin", "protodino"]);
    build.args([
        "-p",
        "protodino-coordinator",
        "--bin",
        "protodino-coordinator",
    ]);
    run(build)?;
    let scratch = cache_root().join("bench/scratch");
    std::fs::create_dir_all(&scratch)?;
    let ctx = Ctx {
        python,
        release: target_dir().join("release"),
        quick: args.quick,
        scratch,
    };
    let started = Instant::now();
    let mut pairs = Vec::new();
    let mut rows = Vec::new();
    if want("step") {
        step(&ctx, &mut pairs)?;
    }
    if want("data") {
        data_section(&ctx, &mut pairs)?;
    }
    if want("e2e") {
        e2e(&ctx, &mut pairs)?;
    }
    if want("allreduce") {
        rows = allreduce(&ctx, &mut pairs)?;
    }
    if want("service") {
        service::service(&ctx, &mut pairs)?;
    }
    let (mut recovery_runs, mut recovery_note) = (Value::Null, String::new());
    if want("recovery") {
        (recovery_runs, recovery_note) = recovery::recovery(&ctx, &mut pairs)?;
    }
    let header = format!(
        "protodino vs PyTorch 2.11.0 / torchvision 0.26 (ratio = protodino / reference), {} CPU cores, {}, bench wall time {:.0} s{}",
        std::thread::available_parallelism().map_or(0, usize::from),
        machine_model(),
        started.elapsed().as_secs_f64(),
        if args.quick { ", --quick" } else { "" }
    );
    let mut md = markdown(&pairs, &rows, &header);
    md.push_str(&recovery_note);
    println!("\n{md}");
    let out = args
        .out
        .unwrap_or_else(|| cache_root().join("bench/latest"));
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("bench.md"), &md)?;
    std::fs::write(
        out.join("bench.json"),
        serde_json::to_string_pretty(&json!({
            "header": header,
            "pairs": pairs.iter().map(Pair::to_json).collect::<Vec<_>>(),
            "allreduce": rows,
            "recovery": recovery_runs,
        }))?,
    )?;
    eprintln!("bench: wrote {}", out.join("bench.md").display());
    Ok(())
}

fn machine_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
