//! The run's figures as `loadgen.md` (also printed) and `loadgen.json`.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::{Value, json};

use super::LoadgenArgs;
use super::jobs::JobsResult;
use super::sim::FleetCounts;
use super::stats::{MemSample, MemTrend, Outcome, Rpc, Summary};

/// The machine and what else ran on it.
#[derive(Debug, Default, Clone)]
pub struct Context {
    pub cores: usize,
    pub loadavg_before: String,
    pub loadavg_after: String,
    /// CPU seconds the coordinator used during the load.
    pub coordinator_cpu_s: f64,
    /// CPU seconds this load generator used during the load.
    pub loadgen_cpu_s: f64,
    /// Seconds from the first call until the driver's final check ended (load and drain).
    pub run_s: f64,
    pub store_mib: f64,
    pub log_mib: f64,
    /// Jobs the coordinator's metrics count as not final at the end.
    pub active_jobs_after: Option<i64>,
}

/// Latency over one window of the run.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub from_s: u32,
    pub calls: usize,
    pub heartbeat_p99_us: u32,
    pub all_p99_us: u32,
    pub all_max_us: u32,
    /// The coordinator's CPU use over the window, % of one core.
    pub cpu_pct: Option<f64>,
    /// Jobs submitted by the end of the window.
    pub jobs: u64,
}

pub struct Run {
    pub context: Context,
    pub outcome: Outcome,
    pub jobs: JobsResult,
    pub fleet: FleetCounts,
    pub mem: Vec<MemSample>,
    pub warmup_s: f64,
    pub errors: BTreeMap<(Rpc, String), u64>,
    /// The first message of each kind of error.
    pub messages: BTreeMap<(Rpc, String), String>,
    pub windows: Vec<Window>,
    pub max_active: usize,
    /// Latency after the load: every job still in flight cancelled at once, the final check.
    pub drain: (BTreeMap<Rpc, Summary>, Summary),
}

/// Per-RPC and overall summaries of the calls made in `[from_ms, to_ms)`.
pub fn summaries(
    samples: &BTreeMap<Rpc, Vec<(u32, u32)>>,
    from_ms: u32,
    to_ms: u32,
) -> (BTreeMap<Rpc, Summary>, Summary) {
    let mut all = Vec::new();
    let mut per_rpc = BTreeMap::new();
    for (rpc, s) in samples {
        let mut us: Vec<u32> = s
            .iter()
            .filter(|x| (from_ms..to_ms).contains(&x.0))
            .map(|x| x.1)
            .collect();
        if us.is_empty() {
            continue;
        }
        all.extend_from_slice(&us);
        per_rpc.insert(*rpc, Summary::of(&mut us));
    }
    (per_rpc, Summary::of(&mut all))
}

/// What the verdict judges, from the raw samples (`(ms since start, µs)` per call): latency
/// of the calls made during the load (before `load_end_ms`), failed calls of the whole run.
pub fn outcome(
    samples: &BTreeMap<Rpc, Vec<(u32, u32)>>,
    errors: &BTreeMap<(Rpc, String), u64>,
    jobs: &JobsResult,
    mem: Option<MemTrend>,
    workers_not_idle: Option<i64>,
    load_end_ms: u32,
) -> Outcome {
    let (per_rpc, all) = summaries(samples, 0, load_end_ms);
    Outcome {
        per_rpc,
        overall: all,
        unexpected: errors
            .iter()
            .filter(|((rpc, code), _)| !rpc.expects(code))
            .map(|(k, n)| (k.clone(), *n))
            .collect(),
        lost: jobs.lost.clone(),
        inconsistent: jobs.inconsistent.clone(),
        mem,
        workers_not_idle,
    }
}

/// p99 per window of `width_s` seconds, with the coordinator's CPU use from `mem`.
pub fn windows(
    samples: &BTreeMap<Rpc, Vec<(u32, u32)>>,
    mem: &[MemSample],
    width_s: u32,
) -> Vec<Window> {
    let width_ms = width_s.max(1) * 1000;
    let mut all: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut hb: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (rpc, s) in samples {
        for &(at, us) in s {
            all.entry(at / width_ms).or_default().push(us);
            if *rpc == Rpc::Heartbeat {
                hb.entry(at / width_ms).or_default().push(us);
            }
        }
    }
    all.into_iter()
        .map(|(w, mut v)| {
            let s = Summary::of(&mut v);
            let h = hb.get_mut(&w).map_or(0, |v| Summary::of(v).p99_us);
            let from_s = w * width_s.max(1);
            let span = f64::from(from_s)..f64::from(from_s + width_s.max(1));
            let inside: Vec<&MemSample> = mem.iter().filter(|m| span.contains(&m.t_s)).collect();
            let cpu_pct = match (inside.first(), inside.last()) {
                (Some(a), Some(b)) if b.t_s > a.t_s => {
                    Some(100.0 * (b.cpu_s - a.cpu_s) / (b.t_s - a.t_s))
                }
                _ => None,
            };
            Window {
                from_s,
                calls: s.count,
                heartbeat_p99_us: h,
                all_p99_us: s.p99_us,
                all_max_us: s.max_us,
                cpu_pct,
                jobs: inside.last().map_or(0, |m| m.jobs),
            }
        })
        .collect()
}

fn ms(us: u32) -> f64 {
    f64::from(us) / 1000.0
}

/// Job figures: (name, value).
fn job_figures(j: &JobsResult) -> Vec<(&'static str, u64)> {
    let n = |f: &dyn Fn(&super::jobs::JobLife) -> bool| j.lives.iter().filter(|l| f(l)).count();
    vec![
        ("submitted", n(&|l| l.id.is_some()) as u64),
        ("submissions that failed", n(&|l| l.id.is_none()) as u64),
        (
            "cancelled while queued (one in ten)",
            n(&|l| l.quick && l.id.is_some()) as u64,
        ),
        (
            "scheduled (group formed)",
            n(&|l| l.scheduled_after_s.is_some()) as u64,
        ),
        (
            "seen RUNNING (steps committed)",
            n(&|l| l.seen_running) as u64,
        ),
        (
            "cancelled (CancelJob succeeded)",
            n(&|l| l.cancelled) as u64,
        ),
        (
            "already final when cancelled",
            n(&|l| l.already_final) as u64,
        ),
        ("cancelled by the final check", j.cleanup_cancels as u64),
        ("listed at the end", j.listed.len() as u64),
        ("listed but never reported submitted", j.unreported as u64),
        ("lost", j.lost.len() as u64),
        ("inconsistent", j.inconsistent.len() as u64),
    ]
}

fn schedule_latency(j: &JobsResult) -> Summary {
    let mut v: Vec<u32> = j
        .lives
        .iter()
        .filter_map(|l| l.scheduled_after_s)
        .map(|s| (s * 1e6) as u32)
        .collect();
    Summary::of(&mut v)
}

fn fleet_figures(f: &FleetCounts) -> Vec<(&'static str, u64)> {
    let g = FleetCounts::get;
    vec![
        ("registered", g(&f.registered)),
        ("registered again (NOT_FOUND)", g(&f.reregistered)),
        ("assignments received", g(&f.assignments)),
        ("sessions ended by stop", g(&f.stopped)),
        ("sessions ended by ABORTED", g(&f.stale)),
        ("step reports", g(&f.steps_reported)),
        ("assignments while training", g(&f.assigned_while_training)),
    ]
}

pub fn markdown(args: &LoadgenArgs, run: &Run, why: &[String]) -> String {
    let c = &run.context;
    let o = &run.outcome;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Coordinator load test: {} workers, {} s\n",
        args.workers, args.duration_s
    );
    let _ = writeln!(
        md,
        "Verdict: **{}**{}\n",
        if why.is_empty() { "PASS" } else { "FAIL" },
        if why.is_empty() {
            String::new()
        } else {
            format!(" — {}", why.join("; "))
        }
    );
    let _ = writeln!(
        md,
        "{} cores; load average {} before, {} after; coordinator CPU {:.0} s over the {:.0} s of load and drain \
         ({:.0} % of one core), load generator CPU {:.0} s; store {:.1} MiB, log {:.1} MiB. \
         Heartbeat every 1 s, {} HTTP/2 \
         connections, registrations over {} s, world {} jobs, at most {} in flight, lifetime \
         {} s ±50 %, step reports {}.\n",
        c.cores,
        c.loadavg_before,
        c.loadavg_after,
        c.coordinator_cpu_s,
        c.run_s,
        100.0 * c.coordinator_cpu_s / c.run_s.max(1e-9),
        c.loadgen_cpu_s,
        c.store_mib,
        c.log_mib,
        args.channels,
        args.ramp_s,
        args.world,
        run.max_active,
        args.job_lifetime_s,
        if args.step_ms > 0 {
            format!("every {} ms per member", args.step_ms)
        } else {
            "off".into()
        }
    );
    let _ = writeln!(
        md,
        "During the load ({} s; errors: the whole run):\n\n\
         | RPC | calls | errors | p50 ms | p90 ms | p99 ms | max ms |\n|---|---:|---|---:|---:|---:|---:|",
        args.duration_s
    );
    let errors_of = |rpc: Rpc| -> String {
        let e: Vec<String> = run
            .errors
            .iter()
            .filter(|((r, _), _)| *r == rpc)
            .map(|((_, code), n)| {
                format!(
                    "{n} {code}{}",
                    if rpc.expects(code) { " (expected)" } else { "" }
                )
            })
            .collect();
        if e.is_empty() {
            "0".into()
        } else {
            e.join(", ")
        }
    };
    let row = |md: &mut String, name: &str, s: &Summary, errors: String| {
        let _ = writeln!(
            md,
            "| {name} | {} | {errors} | {:.2} | {:.2} | {:.2} | {:.1} |",
            s.count,
            ms(s.p50_us),
            ms(s.p90_us),
            ms(s.p99_us),
            ms(s.max_us)
        );
    };
    for rpc in Rpc::ALL {
        if let Some(s) = o.per_rpc.get(&rpc) {
            row(&mut md, rpc.name(), s, errors_of(rpc));
        }
    }
    let total_errors: u64 = run.errors.values().sum();
    row(&mut md, "**all**", &o.overall, total_errors.to_string());
    let _ = writeln!(
        md,
        "\nThe drain (every job still in flight cancelled at once, then the final check; not \
         judged):\n\n| RPC | calls | | p50 ms | p90 ms | p99 ms | max ms |\n|---|---:|---|---:|---:|---:|---:|"
    );
    for (rpc, s) in &run.drain.0 {
        row(&mut md, rpc.name(), s, String::new());
    }
    row(&mut md, "**all**", &run.drain.1, String::new());

    if !run.messages.is_empty() {
        let _ = writeln!(md, "\nFirst message of each error:\n");
        for ((rpc, code), m) in &run.messages {
            let _ = writeln!(md, "- {rpc} {code}: {m}");
        }
    }

    let _ = writeln!(md, "\n| jobs | |\n|---|---:|");
    for (k, v) in job_figures(&run.jobs) {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    let sched = schedule_latency(&run.jobs);
    let _ = writeln!(
        md,
        "| submit → group formed, p50 / p99 / max (s, polled every 1 s) | {:.1} / {:.1} / {:.1} |",
        sched.p50_us as f64 / 1e6,
        sched.p99_us as f64 / 1e6,
        sched.max_us as f64 / 1e6
    );

    let _ = writeln!(md, "\n| simulated workers | |\n|---|---:|");
    for (k, v) in fleet_figures(&run.fleet) {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    if let Some(n) = o.workers_not_idle {
        let _ = writeln!(md, "| not idle at the end (coordinator's count) | {n} |");
    }

    let _ = writeln!(
        md,
        "\nCoordinator RSS (every 2 s, warm-up {:.0} s):",
        run.warmup_s
    );
    match &o.mem {
        Some(m) => {
            let _ = writeln!(
                md,
                "start {:.1} MiB, end {:.1} MiB, max {:.1} MiB, growth {:+.1} %, slope {:+.3} MiB/min{}.",
                m.start_mib,
                m.end_mib,
                m.max_mib,
                m.growth * 100.0,
                m.slope_mib_per_min,
                m.kib_per_job
                    .map(|k| format!(", {k:+.2} KiB per job submitted"))
                    .unwrap_or_default()
            );
        }
        None => md.push_str("too few samples.\n"),
    }
    if let Some(first) = run.mem.first() {
        let _ = writeln!(
            md,
            "(first sample {:.1} MiB)",
            first.rss_kib as f64 / 1024.0
        );
    }

    let _ = writeln!(
        md,
        "\n| from s | calls | Heartbeat p99 ms | all p99 ms | all max ms | coordinator CPU % | jobs so far |\n|---:|---:|---:|---:|---:|---:|---:|"
    );
    for w in &run.windows {
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {:.2} | {:.1} | {} | {} |",
            w.from_s,
            w.calls,
            ms(w.heartbeat_p99_us),
            ms(w.all_p99_us),
            ms(w.all_max_us),
            w.cpu_pct.map_or("–".into(), |c| format!("{c:.0}")),
            w.jobs
        );
    }
    md
}

fn summary_json(s: &Summary) -> Value {
    json!({
        "count": s.count,
        "p50_ms": ms(s.p50_us),
        "p90_ms": ms(s.p90_us),
        "p99_ms": ms(s.p99_us),
        "max_ms": ms(s.max_us),
        "mean_ms": s.mean_us / 1000.0,
    })
}

pub fn json(args: &LoadgenArgs, run: &Run, why: &[String]) -> Value {
    let c = &run.context;
    let o = &run.outcome;
    let rpcs: serde_json::Map<String, Value> = o
        .per_rpc
        .iter()
        .map(|(r, s)| (r.name().to_string(), summary_json(s)))
        .collect();
    let errors: Vec<Value> = run
        .errors
        .iter()
        .map(|((rpc, code), n)| {
            json!({
                "rpc": rpc.name(),
                "code": code,
                "count": n,
                "expected": rpc.expects(code),
                "first_message": run.messages.get(&(*rpc, code.clone())),
            })
        })
        .collect();
    let figures = |v: Vec<(&str, u64)>| -> serde_json::Map<String, Value> {
        v.into_iter()
            .map(|(k, n)| (k.to_string(), json!(n)))
            .collect()
    };
    json!({
        "pass": why.is_empty(),
        "failures": why,
        "args": {
            "workers": args.workers,
            "duration_s": args.duration_s,
            "channels": args.channels,
            "ramp_s": args.ramp_s,
            "world": args.world,
            "max_active": run.max_active,
            "submit_per_s": args.submit_per_s,
            "job_lifetime_s": args.job_lifetime_s,
            "step_ms": args.step_ms,
        },
        "context": {
            "cores": c.cores,
            "loadavg_before": c.loadavg_before,
            "loadavg_after": c.loadavg_after,
            "coordinator_cpu_s": c.coordinator_cpu_s,
            "loadgen_cpu_s": c.loadgen_cpu_s,
            "run_s": c.run_s,
            "store_mib": c.store_mib,
            "log_mib": c.log_mib,
            "active_jobs_after": c.active_jobs_after,
        },
        "latency": {"per_rpc": rpcs, "overall": summary_json(&o.overall)},
        "drain_latency": {
            "per_rpc": run.drain.0.iter()
                .map(|(r, s)| (r.name().to_string(), summary_json(s)))
                .collect::<serde_json::Map<String, Value>>(),
            "overall": summary_json(&run.drain.1),
        },
        "errors": errors,
        "jobs": figures(job_figures(&run.jobs)),
        "jobs_lost": run.jobs.lost,
        "jobs_inconsistent": run.jobs.inconsistent,
        "schedule_latency": summary_json(&schedule_latency(&run.jobs)),
        "fleet": figures(fleet_figures(&run.fleet)),
        "workers_not_idle": o.workers_not_idle,
        "memory": {
            "warmup_s": run.warmup_s,
            "trend": o.mem.map(|m| json!({
                "start_mib": m.start_mib,
                "end_mib": m.end_mib,
                "max_mib": m.max_mib,
                "growth": m.growth,
                "slope_mib_per_min": m.slope_mib_per_min,
                "kib_per_job": m.kib_per_job,
            })),
            "samples_t_s_rss_kib_jobs_cpu_s": run.mem.iter()
                .map(|s| json!([s.t_s, s.rss_kib, s.jobs, s.cpu_s]))
                .collect::<Vec<_>>(),
        },
        "windows": run.windows.iter().map(|w| json!({
            "from_s": w.from_s,
            "calls": w.calls,
            "heartbeat_p99_ms": ms(w.heartbeat_p99_us),
            "all_p99_ms": ms(w.all_p99_us),
            "all_max_ms": ms(w.all_max_us),
            "coordinator_cpu_pct": w.cpu_pct,
            "jobs": w.jobs,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_split_by_time() {
        let mut s = BTreeMap::new();
        s.insert(Rpc::Heartbeat, vec![(0, 100), (500, 200), (10_500, 300)]);
        s.insert(Rpc::GetJob, vec![(9_999, 5_000)]);
        let mem: Vec<MemSample> = [(0.0, 0.0, 1), (8.0, 4.0, 5)]
            .iter()
            .map(|&(t_s, cpu_s, jobs)| MemSample {
                t_s,
                rss_kib: 1,
                jobs,
                cpu_s,
            })
            .collect();
        let w = windows(&s, &mem, 10);
        assert_eq!((w[0].cpu_pct, w[0].jobs), (Some(50.0), 5));
        assert_eq!(w[1].cpu_pct, None);
        assert_eq!(w.len(), 2);
        assert_eq!((w[0].from_s, w[0].calls), (0, 3));
        assert_eq!((w[0].heartbeat_p99_us, w[0].all_max_us), (200, 5_000));
        assert_eq!((w[1].from_s, w[1].calls, w[1].all_p99_us), (10, 1, 300));
    }

    #[test]
    fn load_and_drain_split() {
        let mut s = BTreeMap::new();
        s.insert(Rpc::Heartbeat, vec![(0, 100), (999, 200), (1000, 90_000)]);
        s.insert(Rpc::CancelJob, vec![(1500, 800_000)]);
        let o = outcome(
            &s,
            &BTreeMap::new(),
            &JobsResult::default(),
            None,
            None,
            1000,
        );
        assert_eq!((o.overall.count, o.overall.max_us), (2, 200));
        assert!(!o.per_rpc.contains_key(&Rpc::CancelJob));
        let (per, all) = summaries(&s, 1000, u32::MAX);
        assert_eq!((all.count, all.max_us), (2, 800_000));
        assert_eq!(per[&Rpc::Heartbeat].max_us, 90_000);
    }

    #[test]
    fn unexpected_errors_only() {
        let mut e = BTreeMap::new();
        e.insert((Rpc::Heartbeat, "Aborted".to_string()), 2);
        e.insert((Rpc::Heartbeat, "Unavailable".to_string()), 1);
        let o = outcome(
            &BTreeMap::new(),
            &e,
            &JobsResult::default(),
            None,
            Some(0),
            1000,
        );
        assert_eq!(o.unexpected.len(), 1);
        assert!(
            o.unexpected
                .contains_key(&(Rpc::Heartbeat, "Unavailable".to_string()))
        );
    }
}
