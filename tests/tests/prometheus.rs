//! A real Prometheus against the real service: a local coordinator and two `protodino worker`
//! agents, every `/metrics` scrape checked by `promtool check metrics` (no lint problem allowed),
//! then a Prometheus server scraping all three every second while a short job runs to the end,
//! and PromQL through its HTTP API: the series must reach the figures the job reported through
//! the job API (its step count, the unique prototypes at each ε and the usage figures of the
//! final report, the committed steps and samples).
//!
//! promtool and Prometheus come from Debian's `prometheus` package, unpacked into the cache by
//! `cargo xtask test`, which hands their paths over in `PROTODINO_PROMTOOL` and
//! `PROTODINO_PROMETHEUS`.
//!
//! Every process binds port 0 and reports what it bound: the service's first stdout lines, and
//! Prometheus's `msg="Listening on" address=…` log line (the address it actually bound), so no
//! port is chosen before it is used.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use protodino_proto::v1::JobState;
use protodino_tests::cluster::{
    Coordinator, Roots, Worker, http_get, spec, state, submit, wait_for,
};
use protodino_tests::scenario::{BASE, MINUTES, runtime, wait_idle};

const PROMETHEUS_ENV: &str = "PROTODINO_PROMETHEUS";
const PROMTOOL_ENV: &str = "PROTODINO_PROMTOOL";

/// The steps of the job (160 images, global batch 16: one epoch).
const STEPS: i64 = 10;
const GLOBAL_BATCH: i32 = 16;

/// The ε of the unique-prototype counts: the default headline, and thresholds near the
/// distance of two random unit vectors (√2), so that the counts differ from K and from each
/// other and the comparison below tells the thresholds apart.
const UNIQUE_EPS: &str = "unique_eps = [0.025, 1.3, 1.4, 1.45]";

fn tool(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "{var} is not set: run this test through `cargo xtask test`, which unpacks Debian's \
             prometheus package (promtool and the server) into the cache and sets \
             {PROMTOOL_ENV} and {PROMETHEUS_ENV} (or `cargo xtask prometheus` prints them)"
        ),
    }
}

/// `promtool check metrics` on a scrape: it must pass without a single lint problem.
fn promtool_check(promtool: &Path, what: &str, scrape: &str) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics on the {what} scrape ({}): {said}\n{scrape}",
        out.status
    );
    eprintln!(
        "promtool check metrics: {what} ({} series lines) passed",
        scrape
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .count()
    );
}

/// A Prometheus server; killed when dropped.
struct Prometheus {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus scraping `coordinator` and `workers` every second, its data under
    /// `dir`, on a port the system picks; waits for the address it reports.
    fn start(bin: &Path, dir: &Path, coordinator: &str, workers: &[&str]) -> Self {
        let quoted = |v: &[&str]| {
            v.iter()
                .map(|a| format!("'{a}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n\
                 \x20 - job_name: coordinator\n    static_configs:\n      - targets: [{}]\n\
                 \x20 - job_name: workers\n    static_configs:\n      - targets: [{}]\n",
                quoted(&[coordinator]),
                quoted(workers)
            ),
        )
        .unwrap();
        let log = dir.join("prometheus.log");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start prometheus");
        let mut p = Prometheus {
            child,
            addr: String::new(),
            log,
        };
        p.addr = p.bound_address();
        eprintln!("prometheus listening on {}", p.addr);
        p
    }

    /// The address from the `msg="Listening on" address=HOST:PORT` line of the log (the
    /// listener's own address; the `Start listening` line before it repeats the flag), once
    /// the log also says the server is ready.
    fn bound_address(&mut self) -> String {
        let deadline = Instant::now() + MINUTES;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let found = text
                .lines()
                .filter(|l| l.contains("msg=\"Listening on\""))
                .find_map(|l| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix("address="))
                        .map(|a| a.trim_matches('"').to_string())
                });
            // Queries are answered 503 until the storage is up: wait for the server to say
            // it is ready, too.
            let ready = text.contains("Server is ready to receive web requests");
            if let Some(a) = found.filter(|_| ready) {
                return a;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited with {status}:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "prometheus reported no address or was not ready in a minute:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The value of an instant query that returns one sample (None: no sample, or not yet
    /// ready).
    fn query(&self, promql: &str) -> Option<f64> {
        let body = http_get(
            &self.addr,
            &format!("/api/v1/query?query={}", encode(promql)),
        );
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{promql}: {e}: {body}"));
        assert_eq!(v["status"], "success", "{promql}: {body}");
        let result = v["data"]["result"].as_array()?;
        assert!(
            result.len() <= 1,
            "{promql} returned several series: {body}"
        );
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    /// Polls `promql` (every 200 ms, for at most a minute) until `done(value)`; returns it.
    fn wait(&self, promql: &str, what: &str, done: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + MINUTES;
        let mut last = None;
        loop {
            last = self.query(promql).or(last);
            if let Some(v) = last.filter(|v| done(*v)) {
                eprintln!("PromQL {promql} = {v}");
                return v;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("{promql}: {what} not reached in a minute (last {last:?})\n{log}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until `promql` equals `expected` exactly (the exposition formats and the API all
    /// round-trip an f64).
    fn wait_eq(&self, promql: &str, expected: f64) -> f64 {
        self.wait(promql, &format!("{expected}"), |v| v == expected)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encoding of a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_the_service_and_its_series_reach_what_the_job_reported() {
    let promtool = tool(PROMTOOL_ENV);
    let prometheus = tool(PROMETHEUS_ENV);
    let dir = tempfile::tempdir().unwrap();
    let roots = Roots::new(dir.path());
    let coordinator = Coordinator::start(&roots, "127.0.0.1:0", &[]);
    let workers =
        ["worker-a", "worker-b"].map(|n| Worker::start(&roots, &coordinator.url(), n, &[]));
    wait_idle(&coordinator, 2);
    // Idle: what each endpoint serves before any job.
    promtool_check(&promtool, "idle coordinator", &coordinator.metrics());
    for w in &workers {
        promtool_check(&promtool, &format!("idle {}", w.name), &w.metrics());
    }
    let server = Prometheus::start(
        &prometheus,
        dir.path(),
        &coordinator.metrics_addr,
        &[&workers[0].metrics_addr, &workers[1].metrics_addr],
    );
    // All three targets scraped (Prometheus negotiates OpenMetrics with them).
    server.wait_eq("sum(up)", 3.0);

    let done = runtime().block_on(async {
        let mut jobs = coordinator.jobs().await;
        let recipe = BASE.replace("[eval]\n", &format!("[eval]\n{UNIQUE_EPS}\n"));
        assert_ne!(recipe, BASE);
        let job = submit(&mut jobs, spec(&recipe, 2, GLOBAL_BATCH, STEPS)).await;
        wait_for(&mut jobs, &job.job_id, 5 * MINUTES, "success", |j| {
            state(j) == JobState::Succeeded
        })
        .await
    });
    let id = &done.job_id;
    let p = done.progress.unwrap();
    assert_eq!((p.step, p.world_size), (STEPS, 2), "{p:?}");
    let result: serde_json::Value = serde_json::from_str(&done.result).unwrap();
    let counts = result["collapse"]["report"]["counts"]
        .as_array()
        .unwrap_or_else(|| panic!("no unique-prototype counts in {result}"));
    assert_eq!(counts.len(), 4, "the configured eps: {counts:?}");
    let distinct: std::collections::BTreeSet<u64> =
        counts.iter().filter_map(|c| c["greedy"].as_u64()).collect();
    assert!(
        distinct.len() >= 3,
        "the counts tell the eps apart: {counts:?}"
    );
    let usage = &result["collapse"]["usage"];

    // Every endpoint with every series of a finished job: promtool finds nothing to say.
    promtool_check(&promtool, "coordinator", &coordinator.metrics());
    for w in &workers {
        let scrape = w.metrics();
        assert!(scrape.contains(&format!("job_id=\"{id}\"")), "{scrape}");
        promtool_check(&promtool, &w.name, &scrape);
    }

    // The series reach the job's final figures.
    let job = format!("job_id=\"{id}\"");
    server.wait_eq(
        &format!("max(protodino_worker_step{{{job}}})"),
        STEPS as f64,
    );
    server.wait_eq(&format!("count(protodino_worker_step{{{job}}})"), 2.0);
    server.wait_eq(&format!("max(protodino_worker_epoch{{{job}}})"), 0.0);
    for c in counts {
        let eps = c["eps"].as_f64().unwrap();
        let greedy = c["greedy"].as_f64().unwrap();
        // Rank 0's analysis only: one series per eps.
        server.wait_eq(
            &format!("protodino_worker_unique_prototypes{{{job},eps=\"{eps}\"}}"),
            greedy,
        );
    }
    server.wait_eq(
        &format!("protodino_worker_prototype_usage_entropy{{{job}}}"),
        usage["mlcd"]["entropy"].as_f64().unwrap(),
    );
    server.wait_eq(
        &format!("protodino_worker_clusters_used{{{job}}}"),
        usage["used_clusters"].as_f64().unwrap(),
    );
    server.wait_eq("protodino_committed_steps_total", STEPS as f64);
    server.wait_eq(
        "protodino_committed_samples_total",
        p.committed_samples as f64,
    );
    assert_eq!(p.committed_samples, STEPS * GLOBAL_BATCH as i64);
    server.wait_eq("protodino_jobs{state=\"succeeded\"}", 1.0);
    server.wait_eq("protodino_job_submissions_total{result=\"accepted\"}", 1.0);
    server.wait(
        "protodino_checkpoint_records_total",
        "every listed checkpoint catalogued",
        |v| v >= done.checkpoints.len() as f64 && v >= 1.0,
    );
    server.wait(
        "protodino_rendezvous_seconds_count",
        "one rendezvous",
        |v| v >= 1.0,
    );
    // Each member timed every phase of each of its steps.
    for phase in [
        "data_wait",
        "forward",
        "backward",
        "all_reduce",
        "optimizer",
        "ema",
    ] {
        server.wait(
            &format!("min(protodino_worker_step_phase_seconds_count{{{job},phase=\"{phase}\"}})"),
            "every step of both members",
            |v| v >= STEPS as f64,
        );
    }
    // Both members share this host: their all-reduces went through shared memory.
    server.wait(
        &format!("min(protodino_worker_all_reduce_bytes_total{{{job},transport=\"shm\"}})"),
        "bytes all-reduced by both members",
        |v| v > 0.0,
    );
    server.wait(
        &format!("sum(protodino_worker_checkpoint_bytes_total{{{job}}})"),
        "rank 0's checkpoints",
        |v| v > 0.0,
    );
}
