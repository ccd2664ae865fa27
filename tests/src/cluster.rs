//! A local training service for the scenarios: the real coordinator and worker binaries as
//! child processes on loopback ports they bind themselves (port 0, the bound address read from
//! their first stdout line), real tokens in real files, a real redb store, and gRPC clients
//! speaking the real protocol. Children are killed when their handle drops.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use protodino_proto::v1::job_service_client::JobServiceClient;
use protodino_proto::v1::{
    GetJobRequest, Job, JobSpec, JobState, SubmitJobRequest, WatchJobRequest,
};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::{binary, repo_root};

pub const JOB_TOKEN: &str = "scenario-job-token";
pub const JOIN_TOKEN: &str = "scenario-join-token";

/// The first stdout line of a server, split into words, read on a thread with a deadline.
fn first_line(child: &mut Child, what: &str) -> Vec<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        // Keep draining so the child never blocks on a full pipe.
        let mut sink = String::new();
        while reader.read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| panic!("{what} printed no address line"));
    line.split_whitespace().map(str::to_string).collect()
}

/// A coordinator process.
pub struct Coordinator {
    pub child: Child,
    /// `HOST:PORT` of the gRPC server (`127.0.0.1:PORT` unless started elsewhere).
    pub addr: String,
    pub metrics_addr: String,
    pub dir: PathBuf,
}

/// Where a scenario's service keeps its files.
pub struct Roots {
    pub dir: PathBuf,
    pub store: PathBuf,
    pub data_root: PathBuf,
    pub checkpoint_root: PathBuf,
}

impl Roots {
    /// Store and checkpoints under `dir`; the data root is the provisioned one.
    pub fn new(dir: &Path) -> Self {
        let checkpoint_root = dir.join("checkpoints");
        std::fs::create_dir_all(&checkpoint_root).unwrap();
        std::fs::write(dir.join("job-token"), JOB_TOKEN).unwrap();
        std::fs::write(dir.join("join-token"), JOIN_TOKEN).unwrap();
        Roots {
            dir: dir.to_path_buf(),
            store: dir.join("coordinator.redb"),
            data_root: protodino_config::data_root(),
            checkpoint_root,
        }
    }
}

impl Coordinator {
    /// Starts a coordinator on `listen` (`127.0.0.1:0` for a fresh port).
    pub fn start(roots: &Roots, listen: &str, extra: &[&str]) -> Self {
        Self::start_in(roots, &[], listen, extra)
    }

    /// [`Coordinator::start`] with the binary run through `prefix`, a command that ends by
    /// exec'ing its arguments (e.g. `ip netns exec NS`; empty: the binary itself).
    pub fn start_in(roots: &Roots, prefix: &[&str], listen: &str, extra: &[&str]) -> Self {
        let mut child = command(
            prefix,
            binary("protodino-coordinator", "protodino-coordinator"),
        )
        .args(["--listen", listen, "--metrics-listen", "127.0.0.1:0"])
        .arg("--store")
        .arg(&roots.store)
        .arg("--configs-dir")
        .arg(repo_root().join("configs"))
        .arg("--data-root")
        .arg(&roots.data_root)
        .arg("--checkpoint-root")
        .arg(&roots.checkpoint_root)
        .arg("--job-token-file")
        .arg(roots.dir.join("job-token"))
        .arg("--join-token-file")
        .arg(roots.dir.join("join-token"))
        .args([
            "--heartbeat-interval-ms",
            "200",
            "--heartbeat-timeout-ms",
            "5000",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(log_file(&roots.dir, "coordinator"))
        .spawn()
        .expect("start the coordinator");
        // "protodino-coordinator listening on ADDR metrics ADDR"
        let words = first_line(&mut child, "the coordinator");
        assert_eq!(words.len(), 6, "unexpected first line {words:?}");
        Coordinator {
            child,
            addr: words[3].clone(),
            metrics_addr: words[5].clone(),
            dir: roots.dir.clone(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn jobs(&self) -> JobClient {
        job_client(&self.addr, JOB_TOKEN).await
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        http_get(&self.metrics_addr, "/metrics")
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `bin` as a command, run directly or through `prefix` (`prefix[0] prefix[1..] bin`).
fn command(prefix: &[&str], bin: PathBuf) -> Command {
    match prefix.split_first() {
        None => Command::new(bin),
        Some((first, rest)) => {
            let mut cmd = Command::new(first);
            cmd.args(rest).arg(bin);
            cmd
        }
    }
}

/// Appends a child's stderr to `<dir>/<name>.log` (shown when a scenario fails).
fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .unwrap()
}

/// A worker agent process.
pub struct Worker {
    pub child: Child,
    pub name: String,
    pub collective_addr: String,
    pub metrics_addr: String,
    /// Its stderr (`<dir>/<name>.log`).
    pub log: PathBuf,
}

impl Worker {
    /// `protodino worker` against `coordinator_url`, one libtorch thread.
    pub fn start(roots: &Roots, coordinator_url: &str, name: &str, env: &[(&str, &str)]) -> Self {
        Self::start_with(roots, coordinator_url, name, env, &[])
    }

    /// [`Worker::start`] with extra flags (e.g. `--collective-timeout-ms`).
    pub fn start_with(
        roots: &Roots,
        coordinator_url: &str,
        name: &str,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> Self {
        Self::start_in(roots, &[], "127.0.0.1", coordinator_url, name, env, extra)
    }

    /// [`Worker::start_with`] with the binary run through `prefix` (see
    /// [`Coordinator::start_in`]), its collective and metrics listeners on `host` (port 0).
    pub fn start_in(
        roots: &Roots,
        prefix: &[&str],
        host: &str,
        coordinator_url: &str,
        name: &str,
        env: &[(&str, &str)],
        extra: &[&str],
    ) -> Self {
        let listen = format!("{host}:0");
        let mut cmd = command(prefix, binary("protodino-worker", "protodino"));
        cmd.args(["worker", "--coordinator", coordinator_url, "--name", name])
            .args(extra)
            .args(["--threads", "1", "--collective-listen", &listen])
            .args(["--metrics-listen", &listen])
            .arg("--data-root")
            .arg(&roots.data_root)
            .arg("--checkpoint-root")
            .arg(&roots.checkpoint_root)
            .arg("--join-token-file")
            .arg(roots.dir.join("join-token"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log_file(&roots.dir, name));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start a worker");
        // "protodino-worker listening collective ADDR metrics ADDR"
        let words = first_line(&mut child, name);
        assert_eq!(words.len(), 6, "unexpected first line {words:?}");
        Worker {
            child,
            name: name.into(),
            collective_addr: words[3].clone(),
            metrics_addr: words[5].clone(),
            log: roots.dir.join(format!("{name}.log")),
        }
    }

    pub fn metrics(&self) -> String {
        http_get(&self.metrics_addr, "/metrics")
    }

    /// The id the coordinator gave this worker at its latest registration (from its log),
    /// waiting up to a minute for the first one.
    pub fn worker_id(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(id) = text
                .lines()
                .filter_map(|l| l.split("registered as ").nth(1))
                .next_back()
            {
                return id
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "{} never registered:\n{text}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`) to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.child.id());
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET on loopback (the metrics endpoints), body only.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    let (head, rest) = body.split_once("\r\n\r\n").unwrap_or(("", &body));
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_string()
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// A metric's value in Prometheus text (`name{labels} value`), the first sample matching.
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name_and_labels).then(|| v.parse().ok())?
    })
}

#[derive(Clone)]
pub struct Bearer(pub MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type JobClient = JobServiceClient<InterceptedService<Channel, Bearer>>;

pub async fn channel(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

pub async fn job_client(addr: &str, token: &str) -> JobClient {
    let header: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    JobServiceClient::with_interceptor(channel(addr).await, Bearer(header))
}

/// A small job on the provisioned Fashion-MNIST shards: the cpu-demo preset with `toml` layered
/// on it.
pub fn spec(toml: &str, world: i32, global_batch: i32, max_steps: i64) -> JobSpec {
    JobSpec {
        preset: "cpu-demo".into(),
        config_toml: toml.into(),
        min_world_size: Some(world),
        max_world_size: Some(world),
        global_batch_size: Some(global_batch),
        max_steps: Some(max_steps),
        ..Default::default()
    }
}

pub async fn submit(client: &mut JobClient, spec: JobSpec) -> Job {
    client
        .submit_job(SubmitJobRequest { spec: Some(spec) })
        .await
        .unwrap_or_else(|s| panic!("submit: {s:?}"))
        .into_inner()
        .job
        .unwrap()
}

pub async fn get(client: &mut JobClient, id: &str) -> Job {
    client
        .get_job(GetJobRequest { job_id: id.into() })
        .await
        .unwrap_or_else(|s| panic!("get {id}: {s:?}"))
        .into_inner()
}

/// Follows `WatchJob` until `done(job)` holds (or the deadline passes: a panic naming the last
/// state). Returns the job that satisfied it.
pub async fn wait_for(
    client: &mut JobClient,
    id: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Job) -> bool,
) -> Job {
    let deadline = Instant::now() + timeout;
    let mut last: Option<Job> = None;
    // A watch ends at a final state or when the server goes away; re-watch until the deadline.
    while Instant::now() < deadline {
        let stream = client
            .watch_job(WatchJobRequest { job_id: id.into() })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, stream.message()).await {
                Ok(Ok(Some(ev))) => {
                    if let Some(job) = ev.job {
                        if done(&job) {
                            return job;
                        }
                        let final_state =
                            [JobState::Succeeded, JobState::Failed, JobState::Cancelled]
                                .iter()
                                .any(|s| *s as i32 == job.state);
                        last = Some(job);
                        if final_state {
                            panic!("waiting for {what}: job ended as {:?}", last);
                        }
                    }
                }
                Ok(Ok(None)) | Ok(Err(_)) => break,
                Err(_) => panic!("waiting for {what}: timed out; last {:?}", last),
            }
        }
    }
    panic!("waiting for {what}: timed out; last {:?}", last)
}

pub fn state(job: &Job) -> JobState {
    JobState::try_from(job.state).unwrap_or(JobState::Unspecified)
}

/// The JSON lines of a file.
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Checks `steps.jsonl`: steps 1..=n in order, every global batch of `batch` ids, and no sample
/// twice in an epoch. Returns the number of lines.
pub fn audit_exactly_once(path: &Path, batch: usize) -> usize {
    let lines = read_jsonl(path);
    let mut per_epoch: std::collections::BTreeMap<i64, std::collections::HashSet<u64>> =
        Default::default();
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(
            l["step"].as_i64(),
            Some(i as i64 + 1),
            "audit line {i}: {l}"
        );
        let ids: Vec<u64> = l["sample_ids"]
            .as_array()
            .unwrap_or_else(|| panic!("audit line {i} has no sample_ids: {l}"))
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(ids.len(), batch, "audit line {i}");
        let seen = per_epoch.entry(l["epoch"].as_i64().unwrap()).or_default();
        for id in ids {
            assert!(seen.insert(id), "sample {id} twice in epoch {}", l["epoch"]);
        }
    }
    lines.len()
}

/// Every tensor of a safetensors file as f32 (f32 and bf16 tensors; others skipped).
pub fn load_f32(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out = std::collections::BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let v: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            safetensors::Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
                .collect(),
            _ => continue,
        };
        out.insert(name.to_string(), v);
    }
    out
}

/// Worst relative difference of two tensors' elements, `|a − b| / (max|a| + 1e-6)` per tensor.
pub fn worst_relative(
    a: &std::collections::BTreeMap<String, Vec<f32>>,
    b: &std::collections::BTreeMap<String, Vec<f32>>,
) -> (f64, String) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the two checkpoints hold different tensors"
    );
    let mut worst = (0.0f64, String::new());
    for (name, x) in a {
        let y = &b[name];
        assert_eq!(x.len(), y.len(), "{name}");
        let scale = x.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64)) + 1e-6;
        let d = x
            .iter()
            .zip(y)
            .fold(0.0f64, |m, (p, q)| m.max((p - q).abs() as f64));
        if d / scale > worst.0 {
            worst = (d / scale, name.clone());
        }
    }
    worst
}

/// Worst per-tensor relative difference in norm, `‖a − b‖₂ / (‖a‖₂ + 1e-12)`.
pub fn worst_relative_l2(
    a: &std::collections::BTreeMap<String, Vec<f32>>,
    b: &std::collections::BTreeMap<String, Vec<f32>>,
) -> (f64, String) {
    let mut worst = (0.0f64, String::new());
    for (name, x) in a {
        let y = &b[name];
        assert_eq!(x.len(), y.len(), "{name}");
        let (mut d, mut n) = (0.0f64, 0.0f64);
        for (p, q) in x.iter().zip(y) {
            d += ((p - q) as f64).powi(2);
            n += (*p as f64).powi(2);
        }
        let r = d.sqrt() / (n.sqrt() + 1e-12);
        if r > worst.0 {
            worst = (r, name.clone());
        }
    }
    worst
}

/// The checkpoint root's directory of a job (`<checkpoint root>/jobs/<job id>`).
pub fn job_dir(roots: &Roots, job: &Job) -> PathBuf {
    roots.checkpoint_root.join("jobs").join(&job.job_id)
}

/// `PROTODINO_GRPCURL` (set by `cargo xtask test`), else `grpcurl` on the PATH.
pub fn grpcurl() -> PathBuf {
    if let Some(p) = std::env::var_os("PROTODINO_GRPCURL") {
        return PathBuf::from(p);
    }
    let cached = protodino_config::cache_root().join("tools/bin/grpcurl");
    if cached.exists() {
        return cached;
    }
    panic!(
        "grpcurl is not provisioned: run `cargo xtask test` (it installs grpcurl into the cache)"
    )
}
