//! The worker's Prometheus endpoint (`GET /metrics` on `--metrics-listen`, OpenMetrics text):
//! what this worker is training, labelled by `job_id`. Sessions update the values from their
//! own thread (the metric types are atomics); a new job clears the previous job's series.
//!
//! - `protodino_worker_step` — completed steps of the job's replica;
//! - `protodino_worker_steps_total` — steps this worker has run for the job;
//! - `protodino_worker_dino_loss`, `protodino_worker_koleo_proto` — of the last step's global
//!   batch;
//! - `protodino_worker_images_per_second` — global images per second of the running session;
//! - `protodino_worker_unique_prototypes` — greedy unique prototypes of the teacher at the first
//!   configured ε, from rank 0's latest analysis.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabel {
    pub job_id: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The worker's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    step: Family<JobLabel, Gauge>,
    steps: Family<JobLabel, Counter>,
    dino_loss: Family<JobLabel, FloatGauge>,
    koleo_proto: Family<JobLabel, FloatGauge>,
    images_per_second: Family<JobLabel, FloatGauge>,
    unique_prototypes: Family<JobLabel, Gauge>,
}

/// One step's figures.
pub struct StepFigures {
    pub step: i64,
    pub dino_loss: f64,
    pub koleo_proto: f64,
    pub images_per_second: f64,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            step: Family::default(),
            steps: Family::default(),
            dino_loss: Family::default(),
            koleo_proto: Family::default(),
            images_per_second: Family::default(),
            unique_prototypes: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "protodino_worker_step",
            "Completed steps of the job's replica on this worker",
            m.step.clone(),
        );
        registry.register(
            "protodino_worker_steps",
            "Training steps this worker has run for the job",
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
            "Greedy unique prototypes of the teacher head at the first configured eps (rank 0)",
            m.unique_prototypes.clone(),
        );
        Self { registry, ..m }
    }

    fn label(job_id: &str) -> JobLabel {
        JobLabel {
            job_id: job_id.to_string(),
        }
    }

    /// A new job: the previous job's series go.
    pub fn start_job(&self, job_id: &str) {
        self.step.clear();
        self.steps.clear();
        self.dino_loss.clear();
        self.koleo_proto.clear();
        self.images_per_second.clear();
        self.unique_prototypes.clear();
        self.step.get_or_create(&Self::label(job_id)).set(0);
    }

    pub fn record_step(&self, job_id: &str, f: &StepFigures) {
        let l = Self::label(job_id);
        self.step.get_or_create(&l).set(f.step);
        self.steps.get_or_create(&l).inc();
        self.dino_loss.get_or_create(&l).set(f.dino_loss);
        self.koleo_proto.get_or_create(&l).set(f.koleo_proto);
        self.images_per_second
            .get_or_create(&l)
            .set(f.images_per_second);
    }

    pub fn record_unique(&self, job_id: &str, unique: i64) {
        self.unique_prototypes
            .get_or_create(&Self::label(job_id))
            .set(unique);
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &self.registry)?;
        Ok(body)
    }
}

async fn scrape(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    match metrics.encode() {
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

pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prefixed_labelled_by_job_id_and_reset_per_job() {
        let m = Metrics::new();
        m.start_job("j1");
        m.record_step(
            "j1",
            &StepFigures {
                step: 3,
                dino_loss: 6.5,
                koleo_proto: -0.25,
                images_per_second: 120.0,
            },
        );
        m.record_unique("j1", 17);
        let text = m.encode().unwrap();
        for line in [
            "protodino_worker_step{job_id=\"j1\"} 3",
            "protodino_worker_steps_total{job_id=\"j1\"} 1",
            "protodino_worker_dino_loss{job_id=\"j1\"} 6.5",
            "protodino_worker_koleo_proto{job_id=\"j1\"} -0.25",
            "protodino_worker_images_per_second{job_id=\"j1\"} 120.0",
            "protodino_worker_unique_prototypes{job_id=\"j1\"} 17",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        m.start_job("j2");
        let text = m.encode().unwrap();
        assert!(!text.contains("j1"), "{text}");
        assert!(
            text.contains("protodino_worker_step{job_id=\"j2\"} 0"),
            "{text}"
        );
    }
}
