//! The coordinator's one error type and its one mapping to gRPC status codes.
//!
//! Every layer (validation, the pure core, the store, the handlers) returns [`Error`]; only
//! `From<Error> for tonic::Status` decides the wire code, so the codes users and workers see
//! are chosen in exactly one place:
//!
//! | variant | code | when |
//! |---|---|---|
//! | `InvalidArgument` | INVALID_ARGUMENT | a bad spec or request field, named in the message |
//! | `NotFound` | NOT_FOUND | an unknown job id, or a worker id that is not registered |
//! | `AlreadyExists` | ALREADY_EXISTS | an idempotency key reused with a different spec |
//! | `FailedPrecondition` | FAILED_PRECONDITION | a valid request in the wrong state |
//! | `Aborted` | ABORTED | a stale membership epoch: that worker's group no longer exists |
//! | `Unauthenticated` | UNAUTHENTICATED | a missing or wrong bearer token |
//! | `Internal`, `Store` | INTERNAL | a broken invariant or a failing store, never bad input |

use crate::store::StoreError;
use crate::validation::InvalidSpec;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// `field` is the request path of the offending value (`spec.optim.lr`, `step`).
    #[error("invalid `{field}`: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("{0}")]
    Store(String),
}

impl Error {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<InvalidSpec> for Error {
    fn from(e: InvalidSpec) -> Self {
        Error::InvalidArgument {
            field: e.field,
            message: e.message,
        }
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Store(e.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument { .. } => tonic::Status::invalid_argument(msg),
            Error::NotFound(_) => tonic::Status::not_found(msg),
            Error::AlreadyExists(_) => tonic::Status::already_exists(msg),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            Error::Aborted(_) => tonic::Status::aborted(msg),
            Error::Unauthenticated(_) => tonic::Status::unauthenticated(msg),
            Error::Internal(_) | Error::Store(_) => tonic::Status::internal(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_variant_has_its_code() {
        let cases = [
            (Error::invalid("step", "0 < 1"), Code::InvalidArgument),
            (Error::NotFound("x".into()), Code::NotFound),
            (Error::AlreadyExists("x".into()), Code::AlreadyExists),
            (
                Error::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (Error::Aborted("x".into()), Code::Aborted),
            (Error::Unauthenticated("x".into()), Code::Unauthenticated),
            (Error::Internal("x".into()), Code::Internal),
            (Error::Store("x".into()), Code::Internal),
        ];
        for (e, code) in cases {
            assert_eq!(tonic::Status::from(e).code(), code);
        }
        let s = tonic::Status::from(Error::invalid("spec.optim.lr", "negative"));
        assert!(s.message().contains("spec.optim.lr"), "{}", s.message());
    }
}
