//! The pure part of the load generator: latency summaries (exact percentiles over every
//! sample), the least-squares slope of the memory samples, and the pass/fail verdict. No I/O,
//! no clock: the driver hands in what it measured.

use std::collections::BTreeMap;
use std::fmt;

/// The RPCs the load generator makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rpc {
    Register,
    Heartbeat,
    ReportStep,
    SubmitJob,
    GetJob,
    CancelJob,
    ListJobs,
}

impl Rpc {
    pub const ALL: [Rpc; 7] = [
        Rpc::Register,
        Rpc::Heartbeat,
        Rpc::ReportStep,
        Rpc::SubmitJob,
        Rpc::GetJob,
        Rpc::CancelJob,
        Rpc::ListJobs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rpc::Register => "Register",
            Rpc::Heartbeat => "Heartbeat",
            Rpc::ReportStep => "ReportStep",
            Rpc::SubmitJob => "SubmitJob",
            Rpc::GetJob => "GetJob",
            Rpc::CancelJob => "CancelJob",
            Rpc::ListJobs => "ListJobs",
        }
    }

    /// Whether the gRPC status `code` (its name, e.g. `"Aborted"`) is part of the protocol for
    /// this call rather than a failure:
    /// - `Aborted` on `Heartbeat` / `ReportStep`: the session's membership epoch is stale (its
    ///   group was re-formed); the worker ends that session, as the real agent does.
    /// - `FailedPrecondition` on `CancelJob`: the job reached a final state first (only
    ///   possible when step reports run a job to its end).
    ///
    /// Everything else (timeouts, `Unavailable`, `NotFound` for a registered worker, …) is
    /// unexpected and fails the run.
    pub fn expects(self, code: &str) -> bool {
        matches!(
            (self, code),
            (Rpc::Heartbeat | Rpc::ReportStep, "Aborted") | (Rpc::CancelJob, "FailedPrecondition")
        )
    }
}

impl fmt::Display for Rpc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The `q`-quantile (0 ≤ q ≤ 1) of ascending `sorted` by the nearest-rank method: the smallest
/// sample with at least `q·n` samples at or below it. `None` for no samples.
pub fn percentile(sorted: &[u32], q: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    let rank = (q.clamp(0.0, 1.0) * n as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

/// Latency figures of one RPC (microseconds).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Summary {
    pub count: usize,
    pub p50_us: u32,
    pub p90_us: u32,
    pub p99_us: u32,
    pub max_us: u32,
    pub mean_us: f64,
}

impl Summary {
    /// Sorts `samples` in place and summarises them.
    pub fn of(samples: &mut [u32]) -> Summary {
        samples.sort_unstable();
        let q = |q| percentile(samples, q).unwrap_or(0);
        let sum: u64 = samples.iter().map(|&s| u64::from(s)).sum();
        Summary {
            count: samples.len(),
            p50_us: q(0.50),
            p90_us: q(0.90),
            p99_us: q(0.99),
            max_us: samples.last().copied().unwrap_or(0),
            mean_us: if samples.is_empty() {
                0.0
            } else {
                sum as f64 / samples.len() as f64
            },
        }
    }
}

/// Least-squares slope of `y` over `x`; `None` with fewer than two distinct `x`.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// One memory sample of the coordinator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemSample {
    /// Seconds since the load started.
    pub t_s: f64,
    pub rss_kib: u64,
    /// Jobs submitted so far.
    pub jobs: u64,
    /// CPU seconds the coordinator has used so far.
    pub cpu_s: f64,
}

/// What became of the coordinator's memory after warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemTrend {
    /// The first sample at or after the warm-up.
    pub start_mib: f64,
    /// The last sample.
    pub end_mib: f64,
    /// The largest sample after warm-up.
    pub max_mib: f64,
    /// Least-squares slope after warm-up, MiB per minute.
    pub slope_mib_per_min: f64,
    /// Least-squares slope of RSS over jobs submitted after warm-up, KiB per job (the cost of
    /// the job history the coordinator keeps in memory).
    pub kib_per_job: Option<f64>,
    /// `(end - start) / start`.
    pub growth: f64,
}

/// The trend of `samples` (in time order) from `warmup_s` on; `None` with fewer than two
/// samples after warm-up.
pub fn mem_trend(samples: &[MemSample], warmup_s: f64) -> Option<MemTrend> {
    let after: Vec<&MemSample> = samples.iter().filter(|s| s.t_s >= warmup_s).collect();
    let (first, last) = (after.first()?, after.last()?);
    let mib = |kib: u64| kib as f64 / 1024.0;
    let over_time: Vec<(f64, f64)> = after.iter().map(|s| (s.t_s, mib(s.rss_kib))).collect();
    let over_jobs: Vec<(f64, f64)> = after
        .iter()
        .map(|s| (s.jobs as f64, s.rss_kib as f64))
        .collect();
    let start = mib(first.rss_kib);
    let end = mib(last.rss_kib);
    Some(MemTrend {
        start_mib: start,
        end_mib: end,
        max_mib: after.iter().map(|s| mib(s.rss_kib)).fold(0.0, f64::max),
        slope_mib_per_min: slope(&over_time)? * 60.0,
        kib_per_job: slope(&over_jobs),
        growth: if start > 0.0 {
            (end - start) / start
        } else {
            0.0
        },
    })
}

/// The limits a run must stay within.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Every RPC's p99 (and all RPCs together) must stay below this.
    pub p99_ms: f64,
    /// RSS may grow at most this fraction between the end of warm-up and the end.
    pub mem_growth: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            p99_ms: 50.0,
            mem_growth: 0.20,
        }
    }
}

/// Everything the verdict is about.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub per_rpc: BTreeMap<Rpc, Summary>,
    pub overall: Summary,
    /// Unexpected failed calls by (RPC, status code name).
    pub unexpected: BTreeMap<(Rpc, String), u64>,
    /// Submitted jobs the coordinator no longer knows.
    pub lost: Vec<String>,
    /// Jobs it knows in a state that contradicts what was done to them (e.g. not cancelled
    /// after a successful cancel).
    pub inconsistent: Vec<String>,
    pub mem: Option<MemTrend>,
    /// Simulated workers the coordinator does not count as idle once everything was cancelled.
    pub workers_not_idle: Option<i64>,
}

/// Why the run fails; empty when it passes.
pub fn verdict(o: &Outcome, lim: &Limits) -> Vec<String> {
    let mut why = Vec::new();
    let ms = |us: u32| f64::from(us) / 1000.0;
    for (rpc, s) in &o.per_rpc {
        if s.count > 0 && ms(s.p99_us) >= lim.p99_ms {
            why.push(format!(
                "{rpc} p99 {:.1} ms ≥ {} ms",
                ms(s.p99_us),
                lim.p99_ms
            ));
        }
    }
    if o.overall.count > 0 && ms(o.overall.p99_us) >= lim.p99_ms {
        why.push(format!(
            "overall p99 {:.1} ms ≥ {} ms",
            ms(o.overall.p99_us),
            lim.p99_ms
        ));
    }
    for ((rpc, code), n) in &o.unexpected {
        why.push(format!("{n} unexpected {code} from {rpc}"));
    }
    if !o.lost.is_empty() {
        why.push(format!("{} job(s) lost (e.g. {})", o.lost.len(), o.lost[0]));
    }
    if !o.inconsistent.is_empty() {
        why.push(format!(
            "{} job(s) in an inconsistent state (e.g. {})",
            o.inconsistent.len(),
            o.inconsistent[0]
        ));
    }
    match &o.mem {
        Some(m) if m.growth > lim.mem_growth => why.push(format!(
            "coordinator RSS grew {:.0} % after warm-up ({:.1} → {:.1} MiB; limit {:.0} %)",
            m.growth * 100.0,
            m.start_mib,
            m.end_mib,
            lim.mem_growth * 100.0
        )),
        Some(_) => {}
        None => why.push("too few memory samples after warm-up".into()),
    }
    if let Some(n) = o.workers_not_idle
        && n != 0
    {
        why.push(format!(
            "{n} simulated worker(s) not idle after every job was cancelled"
        ));
    }
    why
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[7], 0.99), Some(7));
        assert_eq!(percentile(&[], 0.5), None);
        // 1 000 samples, ten slow ones: p99 is the last fast one, the max the slowest.
        let mut w = vec![1_000u32; 990];
        w.extend([90_000; 10]);
        let s = Summary::of(&mut w);
        assert_eq!((s.p50_us, s.p99_us, s.max_us), (1_000, 1_000, 90_000));
        w.push(90_000);
        assert_eq!(Summary::of(&mut w).p99_us, 90_000);
    }

    #[test]
    fn summary_sorts_and_averages() {
        let mut v = vec![30, 10, 20];
        let s = Summary::of(&mut v);
        assert_eq!(v, [10, 20, 30]);
        assert_eq!((s.count, s.p50_us, s.max_us), (3, 20, 30));
        assert!((s.mean_us - 20.0).abs() < 1e-9);
        assert_eq!(Summary::of(&mut []), Summary::default());
    }

    #[test]
    fn least_squares_slope() {
        let line: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 * i as f64 + 1.0)).collect();
        assert!((slope(&line).unwrap() - 3.0).abs() < 1e-9);
        let flat = [(0.0, 5.0), (1.0, 6.0), (2.0, 5.0), (3.0, 6.0)];
        assert!(slope(&flat).unwrap().abs() < 0.5);
        assert_eq!(slope(&[(1.0, 1.0)]), None);
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 2.0)]), None);
    }

    fn samples(rss: impl Fn(f64) -> f64) -> Vec<MemSample> {
        (0..=60)
            .map(|i| {
                let t = i as f64 * 10.0;
                MemSample {
                    t_s: t,
                    rss_kib: (rss(t) * 1024.0) as u64,
                    jobs: i * 10,
                    cpu_s: t / 2.0,
                }
            })
            .collect()
    }

    #[test]
    fn memory_trend_after_warmup() {
        // Growing fast during warm-up, then flat at 40 MiB.
        let m = mem_trend(
            &samples(|t| if t < 60.0 { 10.0 + t / 2.0 } else { 40.0 }),
            60.0,
        )
        .unwrap();
        assert!((m.start_mib - 40.0).abs() < 0.01 && (m.end_mib - 40.0).abs() < 0.01);
        assert!(m.slope_mib_per_min.abs() < 1e-6 && m.growth.abs() < 1e-6);
        // 1 MiB a minute from 40 MiB: 9 MiB over the nine minutes after warm-up.
        let g = mem_trend(&samples(|t| 40.0 + (t - 60.0).max(0.0) / 60.0), 60.0).unwrap();
        assert!((g.slope_mib_per_min - 1.0).abs() < 1e-3, "{g:?}");
        assert!((g.growth - 9.0 / 40.0).abs() < 1e-3);
        assert!((g.max_mib - 49.0).abs() < 0.01);
        // 60 jobs a minute: 1024 KiB / 60 jobs.
        assert!((g.kib_per_job.unwrap() - 1024.0 / 60.0).abs() < 0.1);
        assert_eq!(mem_trend(&samples(|_| 1.0), 1e9), None);
    }

    fn passing() -> Outcome {
        let fast = Summary {
            count: 1000,
            p50_us: 500,
            p90_us: 900,
            p99_us: 2_000,
            max_us: 30_000,
            mean_us: 600.0,
        };
        Outcome {
            per_rpc: [(Rpc::Heartbeat, fast), (Rpc::SubmitJob, fast)].into(),
            overall: fast,
            mem: mem_trend(&samples(|_| 40.0), 60.0),
            workers_not_idle: Some(0),
            ..Default::default()
        }
    }

    #[test]
    fn verdict_passes_a_clean_run() {
        assert!(verdict(&passing(), &Limits::default()).is_empty());
    }

    #[test]
    fn verdict_names_each_failure() {
        let lim = Limits::default();
        let mut o = passing();
        o.per_rpc.get_mut(&Rpc::Heartbeat).unwrap().p99_us = 50_000;
        let why = verdict(&o, &lim);
        assert_eq!(why.len(), 1);
        assert!(why[0].contains("Heartbeat p99 50.0 ms"), "{why:?}");

        let mut o = passing();
        o.unexpected
            .insert((Rpc::Heartbeat, "Unavailable".into()), 3);
        o.lost.push("job-1".into());
        o.inconsistent.push("job-2".into());
        o.workers_not_idle = Some(4);
        o.mem = mem_trend(&samples(|t| 40.0 + t / 10.0), 60.0);
        let why = verdict(&o, &lim).join("\n");
        for part in [
            "3 unexpected Unavailable from Heartbeat",
            "1 job(s) lost",
            "inconsistent",
            "RSS grew",
            "4 simulated worker(s)",
        ] {
            assert!(why.contains(part), "{part:?} missing from {why}");
        }

        let mut o = passing();
        o.mem = None;
        assert_eq!(verdict(&o, &lim).len(), 1);
    }

    #[test]
    fn expected_codes() {
        assert!(Rpc::Heartbeat.expects("Aborted"));
        assert!(Rpc::ReportStep.expects("Aborted"));
        assert!(Rpc::CancelJob.expects("FailedPrecondition"));
        assert!(!Rpc::Heartbeat.expects("NotFound"));
        assert!(!Rpc::SubmitJob.expects("Aborted"));
        assert!(!Rpc::Register.expects("DeadlineExceeded"));
    }
}
