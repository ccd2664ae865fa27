//! The coordinator's Prometheus endpoint (`GET /metrics` on its own port, OpenMetrics text):
//! `protodino_build_info` and `protodino_jobs{state}`, counted from the store at scrape time so
//! the figure is right after a restart too.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use protodino_proto::v1::JobState;

use crate::store::Store;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: String,
}

/// Lower-case state name without the enum prefix (`JOB_STATE_QUEUED` → `queued`).
fn state_name(s: JobState) -> String {
    s.as_str_name()
        .trim_start_matches("JOB_STATE_")
        .to_ascii_lowercase()
}

async fn scrape(State(store): State<Arc<Store>>) -> impl IntoResponse {
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
    let all = match store.list() {
        Ok(all) => all,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    for s in [
        JobState::Queued,
        JobState::Rendezvous,
        JobState::Running,
        JobState::Recovering,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ] {
        let n = all.iter().filter(|j| j.state == s as i32).count();
        jobs.get_or_create(&StateLabel {
            state: state_name(s),
        })
        .set(n as i64);
    }
    registry.register("protodino_jobs", "Jobs in the store by state", jobs);

    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

pub fn router(store: Arc<Store>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(store)
}
