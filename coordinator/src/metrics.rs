//! The coordinator's Prometheus endpoint (`GET /metrics` on its own port, OpenMetrics text),
//! computed from the scheduler's in-memory state at scrape time (a scrape never reads the
//! store):
//! - `protodino_build_info{version}` (a gauge fixed at 1);
//! - `protodino_jobs{state}`, `protodino_workers{state}`;
//! - `protodino_committed_steps_total`, `protodino_replica_mismatches_total`: sums over every
//!   job's durable figures, so they never go down, a restart included;
//! - `protodino_job_membership_epoch{job_id}`, `protodino_job_world_size{job_id}` for jobs that
//!   are not final (the label is `job_id`: Prometheus renames a `job` label on scrape);
//! - `protodino_recoveries_total{reason}` (regroups of started jobs: `peer_lost`,
//!   `worker_failed`, `heartbeat_expired`, `left`, `replica_mismatch`, `joined`) and the
//!   histogram `protodino_recovery_seconds` (detection to the new group's first commit).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::core::{Snapshot, job_fsm};
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

/// The OpenMetrics text of one snapshot.
pub fn render(snap: &Snapshot) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    // A gauge fixed at 1 rather than an OpenMetrics `info` type, so that classic text-format
    // parsers (promtool) accept the scrape too.
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
    let committed = Counter::<u64>::default();
    committed.inc_by(snap.committed_steps);
    registry.register(
        "protodino_committed_steps",
        "Steps committed in the ledger, all jobs",
        committed,
    );
    let mismatches = Counter::<u64>::default();
    mismatches.inc_by(snap.replica_mismatches);
    registry.register(
        "protodino_replica_mismatches",
        "Replica-hash mismatches detected (each re-synced), all jobs",
        mismatches,
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

    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, &registry)?;
    Ok(body)
}

async fn scrape(State(scheduler): State<Arc<Scheduler>>) -> impl IntoResponse {
    match render(&scheduler.snapshot().await) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
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
            replica_mismatches: 1,
            active: vec![("job-1".into(), 3, 2)],
            recoveries: Default::default(),
        };
        snap.recoveries.count("peer_lost");
        snap.recoveries.seconds.observe(1.5);
        let body = render(&snap).unwrap();
        for line in [
            "protodino_jobs{state=\"running\"} 1",
            "protodino_workers{state=\"idle\"} 2",
            "protodino_committed_steps_total 7",
            "protodino_replica_mismatches_total 1",
            "protodino_job_membership_epoch{job_id=\"job-1\"} 3",
            "protodino_job_world_size{job_id=\"job-1\"} 2",
            "protodino_recoveries_total{reason=\"peer_lost\"} 1",
            "protodino_recoveries_total{reason=\"joined\"} 0",
            "protodino_recovery_seconds_count 1",
            "protodino_recovery_seconds_bucket{le=\"2.0\"} 1",
        ] {
            assert!(body.contains(line), "{line} missing in\n{body}");
        }
        assert!(body.trim_end().ends_with("# EOF"));
    }
}
