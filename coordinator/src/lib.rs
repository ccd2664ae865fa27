//! The protodino coordinator: jobs, the worker pool, rendezvous, the committed-step ledger and
//! the checkpoint catalogue, behind two gRPC services (`docs/service.md` is the design).
//!
//! Module map (start with [`core`], where every decision is made):
//! - [`core`]: the pure state machine — worker pool and heartbeats, FIFO scheduling and
//!   rendezvous, the exactly-once ledger, replica-hash checks, job states; no tokio, no network,
//!   time passed in, unit-tested with made-up clocks;
//! - [`scheduler`]: the one owner of the core (one lock), the tick loop, and persistence: every
//!   decision's durable changes in one store transaction, written before the answer goes out;
//! - [`store`]: the redb tables (jobs, ledgers, idempotency keys) and start-up loading;
//! - [`api`]: thin gRPC handlers, `JobService` for users and `WorkerService` for workers;
//! - [`validation`]: a user's `JobSpec` → a checked `TrainConfig`, errors naming the field;
//! - [`error`]: the crate's error enum and its one mapping to gRPC status codes;
//! - [`auth`]: bearer-token interceptors (job token, join token);
//! - [`metrics`]: `/metrics` for Prometheus, from memory;
//! - [`server`]: wires the services, health, reflection and metrics, with one shutdown;
//! - [`tls`]: optional TLS on the gRPC listener, mutual TLS for workers.

pub mod api;
pub mod auth;
pub mod core;
pub mod error;
pub mod metrics;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod tls;
pub mod validation;
