//! The agent's gRPC client of `WorkerService`: one lazily connected channel (tonic reconnects it
//! by itself when the coordinator comes back), the join token as `authorization: Bearer <token>`
//! on every call, a per-call deadline, and the one place that decides what a failed call means
//! ([`disposition`]).

use std::time::Duration;

use anyhow::{Context, Result};
use protodino_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::client::{TlsArgs, endpoint};

/// Deadline of one call (a coordinator that accepted the connection but hangs is retried).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Adds the join token to every request.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type WorkerClient = WorkerServiceClient<InterceptedService<Channel, Bearer>>;

/// A client of the coordinator at `url` (`http://host:port`, or `https://host:port` with `tls`,
/// see [`crate::client::endpoint`]); nothing is dialled until the first call, so a coordinator
/// that is not up yet is just retried.
pub fn connect(url: &str, join_token: &str, tls: &TlsArgs) -> Result<WorkerClient> {
    let header: MetadataValue<Ascii> = format!("Bearer {join_token}")
        .parse()
        .context("the join token is not valid header text")?;
    let endpoint = endpoint(url, tls)?
        .connect_timeout(Duration::from_secs(3))
        .timeout(CALL_TIMEOUT)
        .tcp_nodelay(true);
    Ok(WorkerServiceClient::with_interceptor(
        endpoint.connect_lazy(),
        Bearer(header),
    ))
}

/// What to do about a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The coordinator is away or overloaded: try the same call again after a backoff.
    Retry,
    /// The coordinator does not know this worker (it restarted): register again, then retry.
    Reregister,
    /// The call names a membership epoch that no longer exists: end that session.
    Stale,
    /// The coordinator refused this call for good: drop it (and log why).
    Reject,
    /// This worker cannot talk to this coordinator at all (wrong join token): stop the agent.
    Fatal,
}

/// The meaning of a gRPC status for the agent.
pub fn disposition(status: &tonic::Status) -> Disposition {
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Cancelled
        | Code::Unknown
        | Code::Internal => Disposition::Retry,
        Code::NotFound => Disposition::Reregister,
        Code::Aborted => Disposition::Stale,
        Code::Unauthenticated | Code::PermissionDenied => Disposition::Fatal,
        Code::Ok
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::AlreadyExists
        | Code::Unimplemented
        | Code::DataLoss => Disposition::Reject,
    }
}

/// `Unauthenticated: wrong bearer token` — the code's name and the message.
pub fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_what_the_agent_does() {
        let d = |c| disposition(&tonic::Status::new(c, "x"));
        assert_eq!(d(Code::Unavailable), Disposition::Retry);
        assert_eq!(d(Code::NotFound), Disposition::Reregister);
        assert_eq!(d(Code::Aborted), Disposition::Stale);
        assert_eq!(d(Code::Unauthenticated), Disposition::Fatal);
        assert_eq!(d(Code::InvalidArgument), Disposition::Reject);
        assert!(
            describe(&tonic::Status::unauthenticated("wrong bearer token"))
                .contains("Unauthenticated")
        );
    }
}
