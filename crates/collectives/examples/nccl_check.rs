//! One-GPU check of the NCCL backend ([`NcclGroup`]) for a machine with a GPU (docs/gpu.md): NCCL
//! refuses two ranks on one GPU, so everything runs as a world of one, on device memory taken with
//! cudarc's driver API (no libtorch here).
//!
//! `cargo run --release -p protodino-collectives --example nccl_check -- [--require]
//! [--device N] [--elements N] [--timeout-s S] [--skip-dead-peer]`
//!
//! Steps, each reported as one JSON line on stderr as it finishes:
//! 1. `nccl_available`; without NCCL or a CUDA driver the check prints `"status": "unavailable"`
//!    and exits 0 (1 with `--require`);
//! 2. `NcclUniqueId::generate`, `NcclGroup::init` (world of one, non-blocking communicator);
//! 3. in-place all-reduce sum and average of f32 and bf16 on a created stream, synchronised,
//!    compared bit for bit with the input (a world of one reduces to the identity);
//! 4. broadcast from rank 0, all-gather into a second buffer (data must move), barrier;
//! 5. injected errors: a broadcast from a root outside the world is refused without poisoning the
//!    group; `abort()` poisons it and the next call fails with `Poisoned`;
//! 6. re-initialisation from a *new* unique id, and all-reduce + barrier on the new group;
//! 7. a dead peer: joining a world of two whose other rank never comes must fail with a timeout
//!    (the communicator is aborted), then a third group from a new id must work.
//!
//! Then one JSON summary on stdout; exit status 0 when every step passed, 1 otherwise, 3 when the
//! watchdog (4 × timeout + 30 s) had to stop a hung step.

use std::ffi::c_void;
use std::time::{Duration, Instant};

use cudarc::driver::result as cu;
use half::bf16;
use protodino_collectives::nccl::UNIQUE_ID_BYTES;
use protodino_collectives::{
    CollectiveError, NcclDType, NcclGroup, NcclUniqueId, ReduceOp, nccl_available,
};

#[derive(Debug)]
struct Args {
    require: bool,
    device: i32,
    elements: usize,
    timeout: Duration,
    dead_peer: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        require: false,
        device: 0,
        elements: 1 << 20,
        timeout: Duration::from_secs(20),
        dead_peer: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match flag.as_str() {
            "--require" => a.require = true,
            "--skip-dead-peer" => a.dead_peer = false,
            "--device" => a.device = value("--device")?.parse().map_err(|e| format!("{e}"))?,
            "--elements" => {
                a.elements = value("--elements")?.parse().map_err(|e| format!("{e}"))?
            }
            "--timeout-s" => {
                a.timeout = Duration::from_secs_f64(
                    value("--timeout-s")?.parse().map_err(|e| format!("{e}"))?,
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// The results so far, shared with the watchdog.
#[derive(Default)]
struct Report {
    steps: Vec<serde_like::Step>,
}

/// Tiny JSON writing without a serde dependency in this crate.
mod serde_like {
    #[derive(Clone)]
    pub struct Step {
        pub name: String,
        pub ok: bool,
        pub seconds: f64,
        pub detail: String,
    }

    pub fn string(s: &str) -> String {
        let mut out = String::with_capacity(s.len() + 2);
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    impl Step {
        pub fn json(&self) -> String {
            format!(
                "{{\"name\":{},\"ok\":{},\"seconds\":{:.3},\"detail\":{}}}",
                string(&self.name),
                self.ok,
                self.seconds,
                string(&self.detail)
            )
        }
    }
}

fn summary(report: &Report, status: &str, nccl_version: Option<i32>, device: &str) -> String {
    let steps: Vec<String> = report.steps.iter().map(|s| s.json()).collect();
    let failed: Vec<String> = report
        .steps
        .iter()
        .filter(|s| !s.ok)
        .map(|s| serde_like::string(&s.name))
        .collect();
    format!(
        "{{\"check\":\"nccl\",\"status\":{},\"nccl_version\":{},\"device\":{},\"passed\":{},\"failed\":[{}],\"steps\":[{}]}}",
        serde_like::string(status),
        nccl_version.map_or("null".to_string(), |v| v.to_string()),
        serde_like::string(device),
        report.steps.iter().filter(|s| s.ok).count(),
        failed.join(","),
        steps.join(",")
    )
}

type Shared = std::sync::Arc<std::sync::Mutex<Report>>;

/// Runs one step, records and prints its outcome.
fn step(report: &Shared, name: &str, f: impl FnOnce() -> Result<String, String>) -> bool {
    let start = Instant::now();
    let outcome = f();
    let s = serde_like::Step {
        name: name.into(),
        ok: outcome.is_ok(),
        seconds: start.elapsed().as_secs_f64(),
        detail: match outcome {
            Ok(d) | Err(d) => d,
        },
    };
    eprintln!("{}", s.json());
    let ok = s.ok;
    report.lock().expect("report lock").steps.push(s);
    ok
}

/// A device buffer of `bytes`, freed on drop.
struct DevBuf(u64);

impl DevBuf {
    fn new(bytes: usize) -> Result<Self, String> {
        // SAFETY: a plain device allocation in the current context.
        unsafe { cu::malloc_sync(bytes) }
            .map(DevBuf)
            .map_err(|e| format!("cuMemAlloc({bytes}): {e:?}"))
    }

    fn upload<T>(&self, host: &[T]) -> Result<(), String> {
        // SAFETY: callers size the buffer for `host`.
        unsafe { cu::memcpy_htod_sync(self.0, host) }.map_err(|e| format!("HtoD: {e:?}"))
    }

    fn download<T: Clone + Default>(&self, n: usize) -> Result<Vec<T>, String> {
        let mut out = vec![T::default(); n];
        // SAFETY: callers size the buffer for `n` elements.
        unsafe { cu::memcpy_dtoh_sync(&mut out, self.0) }.map_err(|e| format!("DtoH: {e:?}"))?;
        Ok(out)
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // SAFETY: our own allocation, freed once.
        let _ = unsafe { cu::free_sync(self.0) };
    }
}

fn pattern_f32(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i % 1000) as f32 - 500.0) * 0.125 + 1.0 / 3.0)
        .collect()
}

fn pattern_bf16(n: usize) -> Vec<bf16> {
    (0..n)
        .map(|i| bf16::from_f32(((i % 777) as f32 - 300.0) * 0.0625))
        .collect()
}

fn bits_f32(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bits_bf16(v: &[bf16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn first_mismatch<T: PartialEq>(a: &[T], b: &[T]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// In-place all-reduce of `op` on `stream`, synchronised, then compared with the input.
fn all_reduce_identity(
    g: &mut NcclGroup,
    dtype: NcclDType,
    op: ReduceOp,
    n: usize,
    stream: *mut c_void,
) -> Result<String, String> {
    let bytes = match dtype {
        NcclDType::F32 => 4 * n,
        NcclDType::Bf16 => 2 * n,
    };
    let buf = DevBuf::new(bytes)?;
    let start = Instant::now();
    let mismatch = match dtype {
        NcclDType::F32 => {
            let host = pattern_f32(n);
            buf.upload(&host)?;
            // SAFETY: `buf` holds n f32 on this device; `stream` is live.
            unsafe {
                g.all_reduce(buf.0, n, dtype, op, stream)
                    .map_err(|e| e.to_string())?;
                g.synchronize(stream).map_err(|e| e.to_string())?;
            }
            first_mismatch(&bits_f32(&host), &bits_f32(&buf.download::<f32>(n)?))
        }
        NcclDType::Bf16 => {
            let host = pattern_bf16(n);
            buf.upload(&host)?;
            // SAFETY: as above, n bf16.
            unsafe {
                g.all_reduce(buf.0, n, dtype, op, stream)
                    .map_err(|e| e.to_string())?;
                g.synchronize(stream).map_err(|e| e.to_string())?;
            }
            first_mismatch(&bits_bf16(&host), &bits_bf16(&buf.download::<bf16>(n)?))
        }
    };
    let dt = start.elapsed().as_secs_f64();
    match mismatch {
        None => Ok(format!(
            "{n} elements equal to the input ({dt:.4} s incl. copies)"
        )),
        Some(i) => Err(format!("element {i} differs from the input")),
    }
}

fn run(args: &Args, report: &Shared, version: &mut Option<i32>) -> Result<(), String> {
    let n = args.elements;
    let t = args.timeout;
    let dev = args.device;

    let id = NcclUniqueId::generate().map_err(|e| e.to_string())?;
    step(report, "unique_id", || {
        if id.0 == [0u8; UNIQUE_ID_BYTES] {
            Err("all-zero unique id".into())
        } else {
            Ok(format!("{id:?}"))
        }
    });
    let mut group = None;
    let init_ok = step(report, "init_world_of_one", || {
        let g = NcclGroup::init(&id, 0, 1, dev, t).map_err(|e| e.to_string())?;
        let d = format!(
            "rank {} of {}, NCCL {}",
            g.rank(),
            g.world(),
            g.nccl_version()
        );
        group = Some(g);
        Ok(d)
    });
    if !init_ok {
        return Err("init failed".into());
    }
    let mut g = group.expect("group after init");
    *version = Some(g.nccl_version());

    let stream = cu::stream::create(cu::stream::StreamKind::NonBlocking)
        .map_err(|e| format!("cuStreamCreate: {e:?}"))? as *mut c_void;

    for (name, dtype, op) in [
        ("all_reduce_sum_f32", NcclDType::F32, ReduceOp::Sum),
        ("all_reduce_avg_f32", NcclDType::F32, ReduceOp::Average),
        ("all_reduce_sum_bf16", NcclDType::Bf16, ReduceOp::Sum),
        ("all_reduce_avg_bf16", NcclDType::Bf16, ReduceOp::Average),
    ] {
        step(report, name, || {
            all_reduce_identity(&mut g, dtype, op, n, stream)
        });
    }
    step(report, "all_reduce_sum_f32_null_stream", || {
        all_reduce_identity(
            &mut g,
            NcclDType::F32,
            ReduceOp::Sum,
            1000,
            std::ptr::null_mut(),
        )
    });

    step(report, "broadcast_f32", || {
        let host = pattern_f32(n);
        let buf = DevBuf::new(4 * n)?;
        buf.upload(&host)?;
        // SAFETY: n f32 on this device, live stream.
        unsafe {
            g.broadcast(buf.0, n, NcclDType::F32, 0, stream)
                .map_err(|e| e.to_string())?;
            g.synchronize(stream).map_err(|e| e.to_string())?;
        }
        match first_mismatch(&bits_f32(&host), &bits_f32(&buf.download::<f32>(n)?)) {
            None => Ok(format!("{n} elements from root 0")),
            Some(i) => Err(format!("element {i} changed")),
        }
    });

    step(report, "all_gather_f32", || {
        let host = pattern_f32(n);
        let send = DevBuf::new(4 * n)?;
        let recv = DevBuf::new(4 * n)?;
        send.upload(&host)?;
        recv.upload(&vec![f32::NAN; n])?;
        // SAFETY: send n, recv world * n = n f32 on this device.
        unsafe {
            g.all_gather(send.0, recv.0, n, NcclDType::F32, stream)
                .map_err(|e| e.to_string())?;
            g.synchronize(stream).map_err(|e| e.to_string())?;
        }
        match first_mismatch(&bits_f32(&host), &bits_f32(&recv.download::<f32>(n)?)) {
            None => Ok(format!("{n} elements gathered into a second buffer")),
            Some(i) => Err(format!("gathered element {i} differs")),
        }
    });

    step(report, "barrier", || {
        let start = Instant::now();
        for _ in 0..10 {
            g.barrier().map_err(|e| e.to_string())?;
        }
        Ok(format!(
            "10 barriers, {:.1} us each",
            start.elapsed().as_secs_f64() * 1e5
        ))
    });

    step(report, "invalid_root_refused_group_usable", || {
        let buf = DevBuf::new(16)?;
        // SAFETY: 4 f32; the call must be refused before NCCL sees it.
        let r = unsafe { g.broadcast(buf.0, 4, NcclDType::F32, 1, stream) };
        match r {
            Err(CollectiveError::InvalidArgument(m)) if !g.is_poisoned() => {
                g.barrier()
                    .map_err(|e| format!("barrier after refusal: {e}"))?;
                Ok(format!("refused ({m}); barrier still works"))
            }
            other => Err(format!("expected InvalidArgument, got {other:?}")),
        }
    });

    step(report, "abort_poisons", || {
        g.abort();
        match g.barrier() {
            Err(CollectiveError::Poisoned) if g.is_poisoned() => {
                Ok("barrier after abort: Poisoned".into())
            }
            other => Err(format!("expected Poisoned, got {other:?}")),
        }
    });
    drop(g);

    step(report, "reinit_new_id", || {
        let id2 = NcclUniqueId::generate().map_err(|e| e.to_string())?;
        if id2 == id {
            return Err("the new unique id equals the old one".into());
        }
        let mut g2 = NcclGroup::init(&id2, 0, 1, dev, t).map_err(|e| e.to_string())?;
        all_reduce_identity(&mut g2, NcclDType::F32, ReduceOp::Sum, n, stream)?;
        g2.barrier().map_err(|e| e.to_string())?;
        Ok("new group from a new id: all-reduce and barrier work".into())
    });

    if args.dead_peer {
        let wait = Duration::from_secs(5).min(t);
        step(report, "dead_peer_times_out", || {
            let id3 = NcclUniqueId::generate().map_err(|e| e.to_string())?;
            let start = Instant::now();
            match NcclGroup::init(&id3, 0, 2, dev, wait) {
                Err(e) if e.is_peer_failure() => Ok(format!(
                    "world of two without its second rank: {e} after {:.1} s",
                    start.elapsed().as_secs_f64()
                )),
                Err(e) => Err(format!("failed, but not as a peer failure: {e}")),
                Ok(_) => Err("a world of two formed with one rank".into()),
            }
        });
        step(report, "reinit_after_dead_peer", || {
            let id4 = NcclUniqueId::generate().map_err(|e| e.to_string())?;
            let mut g4 = NcclGroup::init(&id4, 0, 1, dev, t).map_err(|e| e.to_string())?;
            all_reduce_identity(&mut g4, NcclDType::Bf16, ReduceOp::Sum, n, stream)?;
            g4.barrier().map_err(|e| e.to_string())?;
            Ok("third group works".into())
        });
    }
    // SAFETY: our stream, no work pending (every step synchronised).
    let _ = unsafe { cu::stream::destroy(stream as _) };
    Ok(())
}

fn device_name(dev: i32) -> String {
    if cu::init().is_err() {
        return String::new();
    }
    cu::device::get(dev)
        .and_then(cu::device::get_name)
        .unwrap_or_default()
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nccl_check: {e}");
            std::process::exit(2);
        }
    };
    let report: Shared = Default::default();
    if !nccl_available() {
        // Both paths must report unavailability, not panic.
        let id = NcclUniqueId([0; UNIQUE_ID_BYTES]);
        let clean = matches!(
            NcclUniqueId::generate(),
            Err(CollectiveError::Unavailable(_))
        ) && matches!(
            NcclGroup::init(&id, 0, 1, args.device, args.timeout),
            Err(CollectiveError::Unavailable(_))
        );
        step(&report, "unavailable_reported_cleanly", || {
            if clean {
                Ok(protodino_collectives::nccl::MISSING_LIBRARIES.into())
            } else {
                Err("generate/init did not return Unavailable".into())
            }
        });
        println!(
            "{}",
            summary(&report.lock().expect("report"), "unavailable", None, "")
        );
        std::process::exit(if args.require || !clean { 1 } else { 0 });
    }

    let device = device_name(args.device);
    // Watchdog: a hung NCCL call must not eat the device lease.
    {
        let report = report.clone();
        let device = device.clone();
        let limit = args.timeout * 4 + Duration::from_secs(30);
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            let r = report.lock().map(|r| summary(&r, "hung", None, &device));
            println!("{}", r.unwrap_or_default());
            eprintln!("nccl_check: watchdog fired after {limit:?}");
            std::process::exit(3);
        });
    }
    let mut version = None;
    let result = run(&args, &report, &mut version);
    if let Err(e) = &result {
        step(&report, "run", || Err(e.clone()));
    }
    let r = report.lock().expect("report");
    let all_ok = r.steps.iter().all(|s| s.ok);
    let status = if all_ok { "ok" } else { "failed" };
    println!("{}", summary(&r, status, version, &device));
    std::process::exit(if all_ok { 0 } else { 1 });
}
