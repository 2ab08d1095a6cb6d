//! The crate's error: every module's error composed into one, and the one
//! explicit mapping from it onto gRPC status codes. Report error codes are
//! mapped where the failures are (`runner::RunError::code`).

use tonic::Status;

use crate::auth::AuthError;
use crate::config::ConfigError;
use crate::containerd::ConnectError;
use crate::network::NetworkError;
use crate::report::flow::EndpointError;
use crate::request::ValidationError;
use crate::spec::SpecError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum Error {
    /// {0}
    Validation(#[from] ValidationError),
    /// action {action_id} in namespace {namespace} is still running or not yet reported
    AlreadyExists {
        namespace: String,
        action_id: String,
    },
    /// {0} actions are accepted and not yet reported, the configured limit
    Busy(usize),
    /// isolated is shutting down and accepts no more actions
    ShuttingDown,
    /// no action {action_id} in namespace {namespace}
    NotFound {
        namespace: String,
        action_id: String,
    },
    /// action {action_id} in namespace {namespace} has already finished
    Finished {
        namespace: String,
        action_id: String,
    },
    /// {0}
    Auth(#[from] AuthError),
    /// {0}
    Config(#[from] ConfigError),
    /// {0}
    Connect(#[from] ConnectError),
    /// {0}
    Spec(#[from] SpecError),
    /// {0}
    Endpoint(#[from] EndpointError),
    /// {0}
    Network(#[from] NetworkError),
    /// {0}
    Store(#[from] StoreError),
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match e {
            Error::Validation(_) => Status::invalid_argument(msg),
            // A known caller outside its namespaces; everything else about
            // credentials is UNAUTHENTICATED (ISOLATE.md §9).
            Error::Auth(AuthError::Forbidden { .. }) => Status::permission_denied(msg),
            Error::Auth(_) => Status::unauthenticated(msg),
            Error::AlreadyExists { .. } => Status::already_exists(msg),
            Error::Busy(_) => Status::resource_exhausted(msg),
            Error::ShuttingDown => Status::unavailable(msg),
            Error::NotFound { .. } => Status::not_found(msg),
            Error::Finished { .. } => Status::failed_precondition(msg),
            Error::Config(_) | Error::Spec(_) | Error::Endpoint(_) | Error::Network(_) => {
                Status::failed_precondition(msg)
            }
            Error::Connect(_) | Error::Store(_) => Status::unavailable(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn status_codes() {
        let s: Status = Error::Validation(ValidationError::Size(7)).into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "size 7 is outside 0..2 (0 small, 1 medium, 2 large)"
        );
        let s: Status = Error::AlreadyExists {
            namespace: "n".into(),
            action_id: "a".into(),
        }
        .into();
        assert_eq!(s.code(), Code::AlreadyExists);
        assert_eq!(Status::from(Error::Busy(3)).code(), Code::ResourceExhausted);
        let s: Status = Error::Auth(AuthError::Forbidden {
            who: "token a".into(),
            namespace: "b".into(),
        })
        .into();
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(s.message(), "token a may not use namespace b");
        let s: Status = Error::Auth(AuthError::UnknownToken).into();
        assert_eq!(s.code(), Code::Unauthenticated);
    }
}
