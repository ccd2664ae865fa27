//! The gRPC services, as thin handlers: decode the request, run one operation on the
//! [`Scheduler`](crate::scheduler::Scheduler), map its [`Error`](crate::error::Error) to a
//! status (in `error.rs`, once). Authentication is not here: each service sits behind its own
//! [`BearerAuth`](crate::auth::BearerAuth) interceptor (the job token for [`jobs`], the join
//! token for [`workers`]).

pub mod jobs;
pub mod workers;
