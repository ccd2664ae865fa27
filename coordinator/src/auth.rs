//! Bearer-token authentication as a tonic interceptor. The coordinator runs two: the job token
//! guards `JobService`, the join token guards `WorkerService`, so a user's token cannot join a
//! worker to the pool and a worker's cannot submit or cancel jobs. Tokens come from a file or
//! the environment (a Kubernetes Secret in the chart); comparison is constant-time. With mutual
//! TLS, [`require_client_cert`] guards `WorkerService` as well.

use std::sync::Arc;

use tonic::{Request, Status};

use crate::error::Error;

#[derive(Clone)]
pub struct BearerAuth {
    token: Arc<[u8]>,
    /// Which token this is ("job token", "join token"), for the refusal message.
    what: &'static str,
}

impl BearerAuth {
    pub fn new(token: &str, what: &'static str) -> Self {
        Self {
            token: token.as_bytes().into(),
            what,
        }
    }

    pub fn check<T>(&self, req: Request<T>) -> Result<Request<T>, Status> {
        let refuse = |m: String| Status::from(Error::Unauthenticated(m));
        let header = req.metadata().get("authorization").ok_or_else(|| {
            refuse(format!(
                "missing `authorization: Bearer <{}>` metadata",
                self.what
            ))
        })?;
        let presented = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| refuse("authorization must be `Bearer <token>`".into()))?;
        if !constant_time_eq(presented.as_bytes(), &self.token) {
            return Err(refuse(format!("wrong {}", self.what)));
        }
        Ok(req)
    }
}

/// With mutual TLS on (`--tls-client-ca`), a `WorkerService` call must come over a connection
/// whose client presented a certificate. rustls already checked in the handshake that a presented
/// certificate is signed by the client CA; presenting none is allowed there so that job-API users
/// connect with the server's CA alone, and is refused here.
pub fn require_client_cert<T>(req: &Request<T>) -> Result<(), Status> {
    match req.peer_certs() {
        Some(certs) if !certs.is_empty() => Ok(()),
        _ => Err(Error::Unauthenticated(
            "the worker API needs a client certificate (mutual TLS): this connection presented \
             none; give the worker --tls-cert and --tls-key signed by the coordinator's \
             --tls-client-ca"
                .into(),
        )
        .into()),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let auth = BearerAuth::new("s3cret", "job token");
        let mut ok = Request::new(());
        ok.metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(auth.check(ok).is_ok());
        let mut wrong = Request::new(());
        wrong
            .metadata_mut()
            .insert("authorization", "Bearer s3cres".parse().unwrap());
        let e = auth.check(wrong).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("job token"), "{}", e.message());
        assert_eq!(
            auth.check(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn a_connection_without_a_client_certificate_is_refused() {
        let e = require_client_cert(&Request::new(())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(
            e.message().contains("client certificate"),
            "{}",
            e.message()
        );
    }
}
