//! The coordinator's Prometheus endpoint (`GET /metrics` on its own port; OpenMetrics when the
//! scraper asks for it, else the classic text format, see `protodino-metrics`), computed at
//! scrape time from the scheduler's in-memory figures and the API layer's counters: a scrape
//! never reads the store, and walks only the jobs held in memory (the unfinished ones and the
//! most recently finished; older ones are folded into fixed-size figures).
//!
//! - `protodino_build_info{version}` — a gauge fixed at 1 (not an OpenMetrics `info`, which
//!   classic-format parsers such as promtool reject);
//! - `protodino_jobs{state}`, `protodino_workers{state}` — jobs and workers by state;
//! - `protodino_committed_steps_total`, `protodino_committed_samples_total` — steps committed in
//!   the ledger over all jobs, and their samples (each step's global batch): sums of durable
//!   figures, so they never go down, a restart included;
//! - `protodino_replica_mismatches_total` — replica-hash mismatches detected (each re-synced);
//! - `protodino_checkpoint_records_total` — checkpoints added to the catalogue since the start;
//! - `protodino_job_membership_epoch{job_id}`, `protodino_job_world_size{job_id}` — for the jobs
//!   that are not final (the label is `job_id`: Prometheus renames a `job` label on scrape);
//! - `protodino_recoveries_total{reason}` — regroups of started jobs: `peer_lost`,
//!   `worker_failed`, `heartbeat_expired`, `left`, `replica_mismatch`, `joined`;
//! - `protodino_recovery_seconds` (histogram) — from detecting a failure (or a join) to the new
//!   group's first commit;
//! - `protodino_rendezvous_seconds` (histogram) — from a group's formation (its assignments
//!   handed out) to its first commit: members picking up the assignment, connecting, the state
//!   sync, the first step;
//! - `protodino_job_submissions_total{result}` — `SubmitJob` calls that passed authentication,
//!   by answer: `accepted`, `duplicate` (an idempotency key seen with the same spec, answered with
//!   the first job), `invalid` (`INVALID_ARGUMENT`), `already_exists` (a key reused with another
//!   spec), `error` (anything else);
//! - `protodino_unauthenticated_requests_total{service}` — calls refused for a missing or wrong
//!   token, by service (`job`, `worker`).
//!
//! The histograms and the API counters count since the start only.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::core::{Snapshot, job_fsm};
use crate::error::Error;
use crate::scheduler::Scheduler;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: &'static str,
}

/// How a submission was answered (the `result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submission {
    Accepted,
    Duplicate,
    Invalid,
    AlreadyExists,
    Error,
}

impl Submission {
    pub const ALL: [Submission; 5] = [
        Submission::Accepted,
        Submission::Duplicate,
        Submission::Invalid,
        Submission::AlreadyExists,
        Submission::Error,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Submission::Accepted => "accepted",
            Submission::Duplicate => "duplicate",
            Submission::Invalid => "invalid",
            Submission::AlreadyExists => "already_exists",
            Submission::Error => "error",
        }
    }

    /// The result of a submission that failed with `e`.
    pub fn of_error(e: &Error) -> Self {
        match e {
            Error::InvalidArgument { .. } => Submission::Invalid,
            Error::AlreadyExists(_) => Submission::AlreadyExists,
            _ => Submission::Error,
        }
    }
}

/// The services whose refused tokens are counted (the `service` label).
pub const SERVICES: [&str; 2] = ["job", "worker"];

/// What the API layer counts, outside the scheduler's lock (atomics).
#[derive(Debug, Clone)]
pub struct ApiCounts {
    submissions: Family<ResultLabel, Counter>,
    unauthenticated: Family<ServiceLabel, Counter>,
}

impl Default for ApiCounts {
    fn default() -> Self {
        let c = Self {
            submissions: Family::default(),
            unauthenticated: Family::default(),
        };
        // Every label value from the start, so that `rate()` sees the first one too.
        for s in Submission::ALL {
            let _ = c
                .submissions
                .get_or_create(&ResultLabel { result: s.name() });
        }
        for service in SERVICES {
            let _ = c.unauthenticated.get_or_create(&ServiceLabel { service });
        }
        c
    }
}

impl ApiCounts {
    pub fn submission(&self, result: Submission) {
        self.submissions
            .get_or_create(&ResultLabel {
                result: result.name(),
            })
            .inc();
    }

    /// A call to `service` (one of [`SERVICES`]) refused for its token.
    pub fn unauthenticated(&self, service: &'static str) {
        self.unauthenticated
            .get_or_create(&ServiceLabel { service })
            .inc();
    }
}

/// The OpenMetrics text of one snapshot and the API counters.
pub fn render(snap: &Snapshot, api: &ApiCounts) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    let build = Family::<BuildLabel, Gauge>::default();
    build
        .get_or_create(&BuildLabel {
            version: env!("CARGO_PKG_VERSION").into(),
        })
        .set(1);
    registry.register(
        "protodino_build_info",
        "Build information of the coordinator",
        build,
    );

    let jobs = Family::<StateLabel, Gauge>::default();
    for (s, n) in &snap.jobs_by_state {
        jobs.get_or_create(&StateLabel {
            state: job_fsm::state_name(*s),
        })
        .set(*n);
    }
    registry.register("protodino_jobs", "Jobs by state", jobs);

    let workers = Family::<StateLabel, Gauge>::default();
    for (s, n) in &snap.workers_by_state {
        workers
            .get_or_create(&StateLabel {
                state: s.to_string(),
            })
            .set(*n);
    }
    registry.register("protodino_workers", "Workers by state", workers);

    // Counters get their `_total` suffix from the encoder.
    let counter = |n: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(n);
        c
    };
    registry.register(
        "protodino_committed_steps",
        "Steps committed in the ledger, all jobs",
        counter(snap.committed_steps),
    );
    registry.register(
        "protodino_committed_samples",
        "Samples of the committed steps (each step's global batch), all jobs",
        counter(snap.committed_samples),
    );
    registry.register(
        "protodino_replica_mismatches",
        "Replica-hash mismatches detected (each re-synced), all jobs",
        counter(snap.replica_mismatches),
    );
    registry.register(
        "protodino_checkpoint_records",
        "Checkpoint records added to the catalogue since the coordinator started",
        counter(snap.checkpoint_records),
    );

    let epoch = Family::<JobLabel, Gauge>::default();
    let world = Family::<JobLabel, Gauge>::default();
    for (id, e, w) in &snap.active {
        let label = JobLabel { job_id: id.clone() };
        epoch.get_or_create(&label).set(*e);
        world.get_or_create(&label).set(*w);
    }
    registry.register(
        "protodino_job_membership_epoch",
        "Newest membership epoch of each unfinished job",
        epoch,
    );
    registry.register(
        "protodino_job_world_size",
        "Members of the current group of each unfinished job (0: none)",
        world,
    );

    let recoveries = Family::<ReasonLabel, Counter<u64>>::default();
    for (reason, n) in &snap.recoveries.by_reason {
        recoveries
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc_by(*n);
    }
    registry.register(
        "protodino_recoveries",
        "Regroups of started jobs by reason (joins included)",
        recoveries,
    );
    registry.register(
        "protodino_recovery_seconds",
        "Seconds from detecting a failure (or a join) to the new group's first committed step",
        snap.recoveries.seconds.clone(),
    );
    registry.register(
        "protodino_rendezvous_seconds",
        "Seconds from a group's formation (assignments handed out) to its first committed step",
        snap.recoveries.rendezvous_seconds.clone(),
    );
    registry.register(
        "protodino_job_submissions",
        "SubmitJob calls that passed authentication, by result",
        api.submissions.clone(),
    );
    registry.register(
        "protodino_unauthenticated_requests",
        "Calls refused for a missing or wrong bearer token, by service",
        api.unauthenticated.clone(),
    );

    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, &registry)?;
    Ok(body)
}

async fn scrape(State(scheduler): State<Arc<Scheduler>>, headers: HeaderMap) -> Response {
    let snap = scheduler.snapshot().await;
    protodino_metrics::respond(&headers, render(&snap, scheduler.api_counts()))
}

pub fn router(scheduler: Arc<Scheduler>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(scheduler)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protodino_proto::v1::JobState;

    #[test]
    fn names_and_labels() {
        let mut snap = Snapshot {
            jobs_by_state: vec![(JobState::Running, 1), (JobState::Queued, 0)],
            workers_by_state: vec![("idle", 2), ("training", 2)],
            committed_steps: 7,
            committed_samples: 112,
            checkpoint_records: 3,
            replica_mismatches: 1,
            active: vec![("job-1".into(), 3, 2)],
            recoveries: Default::default(),
        };
        snap.recoveries.count("peer_lost");
        snap.recoveries.seconds.observe(1.5);
        snap.recoveries.rendezvous_seconds.observe(0.4);
        let api = ApiCounts::default();
        api.submission(Submission::Accepted);
        api.submission(Submission::Accepted);
        api.submission(Submission::of_error(&Error::invalid("spec", "missing")));
        api.submission(Submission::of_error(&Error::AlreadyExists("key".into())));
        api.unauthenticated("job");
        let body = render(&snap, &api).unwrap();
        for line in [
            "protodino_build_info{version=\"0.1.0\"} 1",
            "protodino_jobs{state=\"running\"} 1",
            "protodino_workers{state=\"idle\"} 2",
            "protodino_committed_steps_total 7",
            "protodino_committed_samples_total 112",
            "protodino_replica_mismatches_total 1",
            "protodino_checkpoint_records_total 3",
            "protodino_job_membership_epoch{job_id=\"job-1\"} 3",
            "protodino_job_world_size{job_id=\"job-1\"} 2",
            "protodino_recoveries_total{reason=\"peer_lost\"} 1",
            "protodino_recoveries_total{reason=\"joined\"} 0",
            "protodino_recovery_seconds_count 1",
            "protodino_recovery_seconds_bucket{le=\"2.0\"} 1",
            "protodino_rendezvous_seconds_count 1",
            "protodino_rendezvous_seconds_bucket{le=\"0.5\"} 1",
            "protodino_rendezvous_seconds_bucket{le=\"0.25\"} 0",
            "protodino_job_submissions_total{result=\"accepted\"} 2",
            "protodino_job_submissions_total{result=\"invalid\"} 1",
            "protodino_job_submissions_total{result=\"already_exists\"} 1",
            "protodino_job_submissions_total{result=\"duplicate\"} 0",
            "protodino_job_submissions_total{result=\"error\"} 0",
            "protodino_unauthenticated_requests_total{service=\"job\"} 1",
            "protodino_unauthenticated_requests_total{service=\"worker\"} 0",
        ] {
            assert!(body.lines().any(|l| l == line), "{line} missing in\n{body}");
        }
        assert!(body.trim_end().ends_with("# EOF"));
        // The classic text a plain scrape gets names each counter family after its samples.
        let classic = protodino_metrics::to_classic_text(&body);
        assert!(
            classic.contains("# TYPE protodino_committed_steps_total counter\n"),
            "{classic}"
        );
        assert!(!classic.contains("# EOF"));
    }
}
