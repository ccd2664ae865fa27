//! The protodino coordinator.
//!
//! Module map:
//! - [`validation`]: a user's `JobSpec` → a checked `TrainConfig`, errors naming the field;
//! - [`store`]: the embedded job store (redb), durable per change;
//! - [`jobs`]: the `JobService` handlers (submit, get, list, cancel, watch);
//! - [`auth`]: bearer-token interceptor;
//! - [`metrics`]: `/metrics` for Prometheus;
//! - [`server`]: wires the services, health and reflection onto one listener.
//!
//! Scheduling of jobs onto workers (`WorkerService`, rendezvous, the shard ledger) is not part of
//! this crate yet: submitted jobs are stored durably and stay queued.

pub mod auth;
pub mod jobs;
pub mod metrics;
pub mod server;
pub mod store;
pub mod validation;
