//! The worker's Prometheus endpoint (`GET /metrics` on `--metrics-listen`; OpenMetrics when the
//! scraper asks for it, else the classic text format, see `protodino-metrics`): what this worker
//! is training, every series labelled by `job_id` (never `job`, which Prometheus renames on
//! scrape). A new job clears the previous job's series. A session resolves its job's series
//! once ([`JobMetrics`]), so the training thread only touches atomics afterwards; nothing here
//! waits for a scrape.
//!
//! Progress (gauges unless named `_total`):
//! - `protodino_worker_step`, `protodino_worker_epoch` — completed steps of the job's replica,
//!   and the epoch of the last one;
//! - `protodino_worker_steps_total` — steps this worker has run for the job (redone ones
//!   included);
//! - `protodino_worker_dino_loss`, `protodino_worker_koleo_proto` — of the last step's global
//!   batch;
//! - `protodino_worker_images_per_second` — global images per second of the running session.
//!
//! Collapse (from rank 0 only; the figures of a finished analysis, never of the step itself):
//! - `protodino_worker_unique_prototypes{eps}` — greedy unique prototypes of the teacher head at
//!   each configured ε, from the periodic background analysis and then the final report;
//! - `protodino_worker_prototype_usage_entropy` (nats) and `protodino_worker_clusters_used` —
//!   entropy of the teacher's mean assignment over the probe images, and the distinct
//!   prototypes they pick. They need teacher forwards over those images, which would hold the
//!   replica, so only the final report (after the last step) computes them.
//!
//! Time and traffic:
//! - `protodino_worker_step_phase_seconds{phase}` (histogram) — `data_wait` (the loader's next
//!   batch), `forward`, `backward`, `all_reduce` (the sample counts, the gradients with the centre
//!   statistics, and the losses with the stop vote), `optimizer` (clipping and the update),
//!   `ema` (the teacher and the centre);
//! - `protodino_worker_all_reduce_bytes_total{transport}` — bytes of the buffers the step's
//!   all-reduces carried (`shm`, `tcp` or `nccl`; nothing moves in a world of one);
//! - `protodino_worker_checkpoint_write_seconds` (histogram) and
//!   `protodino_worker_checkpoint_bytes_total` — the checkpoints rank 0 wrote.
//!
//! Faults:
//! - `protodino_worker_recoveries_total{reason}` — regroups of the job this worker took part in
//!   (every session of a membership epoch after the first), by how its own previous session of
//!   the job ended: `stopped` (told to stop at a step boundary: a join, a replica mismatch, or a
//!   member lost elsewhere), `peer_lost` (its collectives failed), `failed` (it failed itself),
//!   or `joined` (it had no earlier session of the job);
//! - `protodino_worker_collective_errors_total{kind}` — failed collectives (forming the group,
//!   the state broadcast, the step's all-reduces, the checkpoint barrier), by kind: `peer_lost`,
//!   `timeout`, `io`, `connect`, `auth`, `mismatch`, `protocol`, `poisoned`, `stream`, `nccl`,
//!   `unavailable`, `invalid_argument`.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use protodino_collectives::CollectiveError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabel {
    pub job_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EpsLabel {
    job_id: String,
    eps: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    job_id: String,
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    job_id: String,
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    job_id: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    job_id: String,
    kind: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

pub use crate::train::step_loop::PHASES;

/// The transports whose bytes are counted (the `transport` label).
pub const TRANSPORTS: [&str; 3] = ["shm", "tcp", "nccl"];

/// Buckets of a phase's seconds: a tiny CPU model's phases take a millisecond, a large model's
/// forward on a loaded CPU many seconds.
const PHASE_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets of a checkpoint write's seconds.
const CHECKPOINT_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0,
];

fn phase_histogram() -> Histogram {
    Histogram::new(PHASE_BUCKETS)
}

fn checkpoint_histogram() -> Histogram {
    Histogram::new(CHECKPOINT_BUCKETS)
}

/// The `kind` label of a collective error.
pub fn error_kind(e: &CollectiveError) -> &'static str {
    match e {
        CollectiveError::InvalidArgument(_) => "invalid_argument",
        CollectiveError::PeerLost { .. } => "peer_lost",
        CollectiveError::Timeout { .. } => "timeout",
        CollectiveError::Mismatch { .. } => "mismatch",
        CollectiveError::Protocol { .. } => "protocol",
        CollectiveError::Auth { .. } => "auth",
        CollectiveError::Connect(_) => "connect",
        CollectiveError::Poisoned => "poisoned",
        CollectiveError::Stream(_) => "stream",
        CollectiveError::Io { .. } => "io",
        CollectiveError::Nccl(_) => "nccl",
        CollectiveError::Unavailable(_) => "unavailable",
    }
}

/// The worker's metric families and their registry.
pub struct Metrics {
    registry: Registry,
    /// Bumped (under the write lock) by every job change: a lingering thread of the previous
    /// job holds an older generation and can no longer create series.
    generation: RwLock<u64>,
    step: Family<JobLabel, Gauge>,
    epoch: Family<JobLabel, Gauge>,
    steps: Family<JobLabel, Counter>,
    dino_loss: Family<JobLabel, FloatGauge>,
    koleo_proto: Family<JobLabel, FloatGauge>,
    images_per_second: Family<JobLabel, FloatGauge>,
    unique_prototypes: Family<EpsLabel, Gauge>,
    usage_entropy: Family<JobLabel, FloatGauge>,
    clusters_used: Family<JobLabel, Gauge>,
    phase_seconds: Histograms<PhaseLabel>,
    all_reduce_bytes: Family<TransportLabel, Counter>,
    checkpoint_seconds: Histograms<JobLabel>,
    checkpoint_bytes: Family<JobLabel, Counter>,
    recoveries: Family<ReasonLabel, Counter>,
    collective_errors: Family<KindLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            registry: Registry::default(),
            generation: RwLock::new(0),
            step: Family::default(),
            epoch: Family::default(),
            steps: Family::default(),
            dino_loss: Family::default(),
            koleo_proto: Family::default(),
            images_per_second: Family::default(),
            unique_prototypes: Family::default(),
            usage_entropy: Family::default(),
            clusters_used: Family::default(),
            phase_seconds: Family::new_with_constructor(phase_histogram),
            all_reduce_bytes: Family::default(),
            checkpoint_seconds: Family::new_with_constructor(checkpoint_histogram),
            checkpoint_bytes: Family::default(),
            recoveries: Family::default(),
            collective_errors: Family::default(),
        };
        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "protodino_worker_step",
            "Completed steps of the job's replica on this worker",
            m.step.clone(),
        );
        registry.register(
            "protodino_worker_epoch",
            "Epoch of the last completed step of the job's replica",
            m.epoch.clone(),
        );
        registry.register(
            "protodino_worker_steps",
            "Training steps this worker has run for the job (redone steps included)",
            m.steps.clone(),
        );
        registry.register(
            "protodino_worker_dino_loss",
            "DINO loss of the last step's global batch",
            m.dino_loss.clone(),
        );
        registry.register(
            "protodino_worker_koleo_proto",
            "KoLeo-proto regulariser of the last step",
            m.koleo_proto.clone(),
        );
        registry.register(
            "protodino_worker_images_per_second",
            "Global images per second of the running session",
            m.images_per_second.clone(),
        );
        registry.register(
            "protodino_worker_unique_prototypes",
            "Greedy unique prototypes of the teacher head at each configured eps (rank 0, latest analysis)",
            m.unique_prototypes.clone(),
        );
        registry.register(
            "protodino_worker_prototype_usage_entropy",
            "Entropy in nats of the teacher's mean prototype assignment over the probe images (rank 0, final report)",
            m.usage_entropy.clone(),
        );
        registry.register(
            "protodino_worker_clusters_used",
            "Distinct prototypes the probe images are assigned to (rank 0, final report)",
            m.clusters_used.clone(),
        );
        registry.register(
            "protodino_worker_step_phase_seconds",
            "Wall time of each phase of a training step on this worker",
            m.phase_seconds.clone(),
        );
        registry.register(
            "protodino_worker_all_reduce_bytes",
            "Bytes of the buffers the training steps all-reduced, by transport",
            m.all_reduce_bytes.clone(),
        );
        registry.register(
            "protodino_worker_checkpoint_write_seconds",
            "Wall time of writing a checkpoint file (rank 0)",
            m.checkpoint_seconds.clone(),
        );
        registry.register(
            "protodino_worker_checkpoint_bytes",
            "Bytes of the checkpoint files written (rank 0)",
            m.checkpoint_bytes.clone(),
        );
        registry.register(
            "protodino_worker_recoveries",
            "Regroups of the job this worker took part in, by how its previous session of the job ended",
            m.recoveries.clone(),
        );
        registry.register(
            "protodino_worker_collective_errors",
            "Failed collective operations, by kind",
            m.collective_errors.clone(),
        );
        Self { registry, ..m }
    }

    /// A new job: the previous job's series go.
    pub fn start_job(&self, job_id: &str) {
        let mut generation = self.generation.write().unwrap_or_else(|p| p.into_inner());
        *generation += 1;
        self.step.clear();
        self.epoch.clear();
        self.steps.clear();
        self.dino_loss.clear();
        self.koleo_proto.clear();
        self.images_per_second.clear();
        self.unique_prototypes.clear();
        self.usage_entropy.clear();
        self.clusters_used.clear();
        self.phase_seconds.clear();
        self.all_reduce_bytes.clear();
        self.checkpoint_seconds.clear();
        self.checkpoint_bytes.clear();
        self.recoveries.clear();
        self.collective_errors.clear();
        self.step.get_or_create(&Self::label(job_id)).set(0);
    }

    fn label(job_id: &str) -> JobLabel {
        JobLabel {
            job_id: job_id.to_string(),
        }
    }

    /// The series of `job_id`, resolved once for its training thread.
    pub fn job(self: &Arc<Self>, job_id: &str) -> JobMetrics {
        let l = Self::label(job_id);
        let generation = *self.generation.read().unwrap_or_else(|p| p.into_inner());
        JobMetrics {
            generation,
            step: self.step.get_or_create_owned(&l),
            epoch: self.epoch.get_or_create_owned(&l),
            steps: self.steps.get_or_create_owned(&l),
            dino_loss: self.dino_loss.get_or_create_owned(&l),
            koleo_proto: self.koleo_proto.get_or_create_owned(&l),
            images_per_second: self.images_per_second.get_or_create_owned(&l),
            phases: PHASES.map(|phase| {
                self.phase_seconds.get_or_create_owned(&PhaseLabel {
                    job_id: job_id.to_string(),
                    phase,
                })
            }),
            transports: TRANSPORTS.map(|transport| {
                self.all_reduce_bytes.get_or_create_owned(&TransportLabel {
                    job_id: job_id.to_string(),
                    transport,
                })
            }),
            checkpoint_seconds: self.checkpoint_seconds.get_or_create_owned(&l),
            checkpoint_bytes: self.checkpoint_bytes.get_or_create_owned(&l),
            job_id: job_id.to_string(),
            all: self.clone(),
        }
    }

    /// The text of every metric (OpenMetrics).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &self.registry)?;
        Ok(body)
    }
}

/// One step's figures.
pub struct StepFigures<'a> {
    pub step: i64,
    pub epoch: i64,
    pub dino_loss: f64,
    pub koleo_proto: f64,
    pub images_per_second: f64,
    /// Seconds of each of [`PHASES`], in that order.
    pub phase_seconds: [f64; 6],
    /// Bytes all-reduced, by transport.
    pub all_reduce_bytes: &'a [(&'static str, u64)],
}

/// One job's series, as its training thread updates them: handles to the metrics themselves
/// (atomics), plus the families for the few series whose labels come and go.
#[derive(Clone)]
pub struct JobMetrics {
    job_id: String,
    generation: u64,
    all: Arc<Metrics>,
    step: Gauge,
    epoch: Gauge,
    steps: Counter,
    dino_loss: FloatGauge,
    koleo_proto: FloatGauge,
    images_per_second: FloatGauge,
    phases: [Histogram; 6],
    transports: [Counter; 3],
    checkpoint_seconds: Histogram,
    checkpoint_bytes: Counter,
}

impl JobMetrics {
    /// Runs `f` on the families unless another job has started since these series were
    /// resolved (the lock keeps a job change from clearing between the check and `f`).
    fn with_families(&self, f: impl FnOnce(&Metrics)) {
        let generation = self
            .all
            .generation
            .read()
            .unwrap_or_else(|p| p.into_inner());
        if *generation == self.generation {
            f(&self.all);
        }
    }

    pub fn record_step(&self, f: &StepFigures<'_>) {
        self.step.set(f.step);
        self.epoch.set(f.epoch);
        self.steps.inc();
        self.dino_loss.set(f.dino_loss);
        self.koleo_proto.set(f.koleo_proto);
        self.images_per_second.set(f.images_per_second);
        for (h, s) in self.phases.iter().zip(f.phase_seconds) {
            h.observe(s);
        }
        for (transport, bytes) in f.all_reduce_bytes {
            if *bytes == 0 {
                continue;
            }
            match TRANSPORTS.iter().position(|t| t == transport) {
                Some(i) => {
                    self.transports[i].inc_by(*bytes);
                }
                None => self.with_families(|m| {
                    m.all_reduce_bytes
                        .get_or_create(&TransportLabel {
                            job_id: self.job_id.clone(),
                            transport,
                        })
                        .inc_by(*bytes);
                }),
            }
        }
    }

    /// Unique prototypes of an analysis: `(eps, greedy count)` for each configured ε.
    pub fn record_unique(&self, counts: impl IntoIterator<Item = (f64, usize)>) {
        self.with_families(|m| {
            for (eps, greedy) in counts {
                m.unique_prototypes
                    .get_or_create(&EpsLabel {
                        job_id: self.job_id.clone(),
                        eps: eps.to_string(),
                    })
                    .set(greedy as i64);
            }
        });
    }

    /// The usage figures of the final report.
    pub fn record_usage(&self, entropy: f64, clusters_used: i64) {
        let l = Metrics::label(&self.job_id);
        self.with_families(|m| {
            m.usage_entropy.get_or_create(&l).set(entropy);
            m.clusters_used.get_or_create(&l).set(clusters_used);
        });
    }

    pub fn record_checkpoint(&self, seconds: f64, bytes: u64) {
        self.checkpoint_seconds.observe(seconds);
        self.checkpoint_bytes.inc_by(bytes);
    }

    /// A session of a membership epoch after the first: a regroup this worker takes part in.
    pub fn record_recovery(&self, reason: &'static str) {
        self.with_families(|m| {
            m.recoveries
                .get_or_create(&ReasonLabel {
                    job_id: self.job_id.clone(),
                    reason,
                })
                .inc();
        });
    }

    pub fn record_collective_error(&self, e: &CollectiveError) {
        self.with_families(|m| {
            m.collective_errors
                .get_or_create(&KindLabel {
                    job_id: self.job_id.clone(),
                    kind: error_kind(e),
                })
                .inc();
        });
    }
}

async fn scrape(State(metrics): State<Arc<Metrics>>, headers: HeaderMap) -> Response {
    protodino_metrics::respond(&headers, metrics.encode())
}

pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn figures<'a>(step: i64, bytes: &'a [(&'static str, u64)]) -> StepFigures<'a> {
        StepFigures {
            step,
            epoch: 1,
            dino_loss: 6.5,
            koleo_proto: -0.25,
            images_per_second: 120.0,
            phase_seconds: [0.002, 0.03, 0.05, 0.004, 0.01, 0.0007],
            all_reduce_bytes: bytes,
        }
    }

    fn has(text: &str, line: &str) {
        assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
    }

    #[test]
    fn names_are_prefixed_labelled_by_job_id_and_reset_per_job() {
        let m = Arc::new(Metrics::new());
        m.start_job("j1");
        let j = m.job("j1");
        j.record_step(&figures(3, &[("shm", 1000), ("tcp", 12)]));
        j.record_step(&figures(4, &[("shm", 1000), ("solo", 0)]));
        j.record_unique([(0.025, 17), (0.1, 9)]);
        j.record_usage(4.25, 31);
        j.record_checkpoint(0.3, 4096);
        j.record_recovery("joined");
        j.record_collective_error(&CollectiveError::Timeout {
            timeout: Duration::from_secs(10),
            during: "all_reduce",
        });
        let text = m.encode().unwrap();
        for line in [
            "protodino_worker_step{job_id=\"j1\"} 4",
            "protodino_worker_epoch{job_id=\"j1\"} 1",
            "protodino_worker_steps_total{job_id=\"j1\"} 2",
            "protodino_worker_dino_loss{job_id=\"j1\"} 6.5",
            "protodino_worker_koleo_proto{job_id=\"j1\"} -0.25",
            "protodino_worker_images_per_second{job_id=\"j1\"} 120.0",
            "protodino_worker_unique_prototypes{job_id=\"j1\",eps=\"0.025\"} 17",
            "protodino_worker_unique_prototypes{job_id=\"j1\",eps=\"0.1\"} 9",
            "protodino_worker_prototype_usage_entropy{job_id=\"j1\"} 4.25",
            "protodino_worker_clusters_used{job_id=\"j1\"} 31",
            "protodino_worker_step_phase_seconds_count{job_id=\"j1\",phase=\"forward\"} 2",
            "protodino_worker_step_phase_seconds_bucket{le=\"0.05\",job_id=\"j1\",phase=\"backward\"} 2",
            "protodino_worker_step_phase_seconds_bucket{le=\"0.001\",job_id=\"j1\",phase=\"ema\"} 2",
            "protodino_worker_all_reduce_bytes_total{job_id=\"j1\",transport=\"shm\"} 2000",
            "protodino_worker_all_reduce_bytes_total{job_id=\"j1\",transport=\"tcp\"} 12",
            "protodino_worker_all_reduce_bytes_total{job_id=\"j1\",transport=\"nccl\"} 0",
            "protodino_worker_checkpoint_write_seconds_count{job_id=\"j1\"} 1",
            "protodino_worker_checkpoint_bytes_total{job_id=\"j1\"} 4096",
            "protodino_worker_recoveries_total{job_id=\"j1\",reason=\"joined\"} 1",
            "protodino_worker_collective_errors_total{job_id=\"j1\",kind=\"timeout\"} 1",
        ] {
            has(&text, line);
        }
        assert!(!text.contains("solo"), "a transport without bytes: {text}");
        // `job`, Prometheus' own target label, is never used.
        assert!(!text.contains("{job="), "{text}");

        m.start_job("j2");
        let text = m.encode().unwrap();
        assert!(!text.contains("j1"), "{text}");
        has(&text, "protodino_worker_step{job_id=\"j2\"} 0");
        // A lingering thread of the old job updates nothing any more.
        j.record_step(&figures(5, &[("other", 3)]));
        j.record_unique([(0.025, 1)]);
        j.record_usage(1.0, 1);
        j.record_recovery("stopped");
        j.record_collective_error(&CollectiveError::Poisoned);
        assert!(!m.encode().unwrap().contains("j1"));
    }

    #[test]
    fn every_collective_error_has_a_kind_of_its_own() {
        let io = || std::io::Error::other("x");
        let all = [
            CollectiveError::InvalidArgument(String::new()),
            CollectiveError::PeerLost {
                rank: 0,
                during: "",
            },
            CollectiveError::Timeout {
                timeout: Duration::ZERO,
                during: "",
            },
            CollectiveError::Mismatch {
                rank: 0,
                expected: String::new(),
                got: String::new(),
            },
            CollectiveError::Protocol {
                rank: 0,
                detail: String::new(),
            },
            CollectiveError::Auth {
                peer: String::new(),
                detail: String::new(),
            },
            CollectiveError::Connect(String::new()),
            CollectiveError::Poisoned,
            CollectiveError::Stream(io()),
            CollectiveError::Io {
                rank: 0,
                source: io(),
            },
            CollectiveError::Nccl(String::new()),
            CollectiveError::Unavailable(String::new()),
        ];
        let kinds: std::collections::BTreeSet<&str> = all.iter().map(error_kind).collect();
        assert_eq!(kinds.len(), all.len(), "{kinds:?}");
    }
}
