//! Shared by the coordinator's socket tests: the real binary on ephemeral loopback ports, gRPC
//! clients with either token, and a tiny ImageFolder data set.

#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use protodino_proto::v1::JobSpec;
use protodino_proto::v1::job_service_client::JobServiceClient;
use protodino_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const JOB_TOKEN: &str = "test-job-token";
pub const JOIN_TOKEN: &str = "test-join-token";

/// Images in [`tiny_dataset`].
pub const TINY_IMAGES: u64 = 16;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Authed = InterceptedService<Channel, Bearer>;

pub struct Coordinator {
    pub child: Child,
    pub addr: String,
    pub metrics_addr: String,
}

pub fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

/// The command line every test starts from (tokens in the environment, ports 0).
pub fn command(store: &Path, data_root: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_protodino-coordinator"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--max-workers",
        "8",
        // Long enough that no test ever sees a worker expire by accident.
        "--heartbeat-timeout-ms",
        "60000",
        "--heartbeat-interval-ms",
        "100",
    ])
    .arg("--store")
    .arg(store)
    .arg("--configs-dir")
    .arg(configs_dir())
    .arg("--data-root")
    .arg(data_root)
    .arg("--checkpoint-root")
    .arg(data_root.join("runs"))
    .env("PROTODINO_JOB_TOKEN", JOB_TOKEN)
    .env("PROTODINO_JOIN_TOKEN", JOIN_TOKEN)
    .env_remove("PROTODINO_JOB_TOKEN_FILE")
    .env_remove("PROTODINO_JOIN_TOKEN_FILE");
    cmd
}

impl Coordinator {
    pub fn start(store: &Path, data_root: &Path) -> Self {
        let mut child = command(store, data_root)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the coordinator");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the first line");
        // "protodino-coordinator listening on ADDR metrics ADDR"
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words.len(), 6, "unexpected first line {line:?}");
        let (addr, metrics_addr) = (words[3].to_string(), words[5].to_string());
        assert!(
            addr.starts_with("127.0.0.1:"),
            "unexpected first line {line:?}"
        );
        Coordinator {
            child,
            addr,
            metrics_addr,
        }
    }

    /// SIGKILL: no graceful shutdown, no final write.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("an address")
            .connect()
            .await
            .expect("connect")
    }

    fn authed(channel: Channel, token: &str) -> Authed {
        let value = format!("Bearer {token}").parse().expect("ascii");
        InterceptedService::new(channel, Bearer(value))
    }

    /// A `JobService` client presenting `token`.
    pub async fn jobs_with(&self, token: &str) -> JobServiceClient<Authed> {
        JobServiceClient::new(Self::authed(self.channel().await, token))
    }

    pub async fn jobs(&self) -> JobServiceClient<Authed> {
        self.jobs_with(JOB_TOKEN).await
    }

    /// A `WorkerService` client presenting `token`.
    pub async fn workers_with(&self, token: &str) -> WorkerServiceClient<Authed> {
        WorkerServiceClient::new(Self::authed(self.channel().await, token))
    }

    pub async fn workers(&self) -> WorkerServiceClient<Authed> {
        self.workers_with(JOIN_TOKEN).await
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `<root>/tiny/{a,b}/<n>.png`: [`TINY_IMAGES`] 8×8 images in two classes.
pub fn tiny_dataset(root: &Path) {
    for (class, shade) in [("a", 40u8), ("b", 200u8)] {
        let dir = root.join("tiny").join(class);
        std::fs::create_dir_all(&dir).expect("mkdir");
        for n in 0..TINY_IMAGES / 2 {
            let img = image::RgbImage::from_fn(8, 8, |x, y| {
                image::Rgb([shade, (x * 16) as u8, (y * 16 + n as u32) as u8])
            });
            img.save(dir.join(format!("{n}.png"))).expect("write a png");
        }
    }
}

/// The CPU demo over the tiny set: global batch `2 × max_world` per step.
pub fn tiny_spec(min_world: i32, max_world: i32) -> JobSpec {
    JobSpec {
        preset: "cpu-demo".into(),
        koleo_weight: Some(0.1),
        epochs: Some(1),
        batch_size_per_worker: Some(2),
        min_world_size: Some(min_world),
        max_world_size: Some(max_world),
        dataset: "tiny".into(),
        dataset_format: "image_folder".into(),
        data_limit: Some(TINY_IMAGES as i32),
        ..Default::default()
    }
}

/// A minimal HTTP/1.1 GET over a real socket (no client library needed for one request).
pub async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}
