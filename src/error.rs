//! The crate's error as the gRPC services answer it: every module's error a
//! call can end in, composed into one, and the one explicit mapping from it
//! onto gRPC status codes, for every service (DirektivIsolate, the control
//! service, the gate in front of them). Report error codes are mapped where
//! the failures are (`runner::RunError::code`).

use tonic::Status;

use crate::auth::AuthError;
use std::path::PathBuf;

use crate::engine::EngineError;
use crate::image::import::ImportError;
use crate::request::ValidationError;
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
    Store(#[from] StoreError),
    /// {0}
    Input(#[from] crate::inputs::InputError),
    /// {0}
    Import(#[from] ImportError),
    /// the import stream is empty
    EmptyImport,
    /// the archive is larger than max_import_bytes ({0} bytes)
    ImportTooLarge(u64),
    /// imports in progress already spool {held} bytes: max_import_bytes ({limit} bytes) is what all imports at once may spool; try again when they are done
    ImportSpoolFull { held: u64, limit: u64 },
    /// cannot spool the archive under {dir}: {reason}
    Spool { dir: PathBuf, reason: String },
    /// the report of action {action_id} in namespace {namespace} is not undeliverable (the action is {state}, or a retry or drop of it is under way)
    NotUndeliverable {
        namespace: String,
        action_id: String,
        state: &'static str,
    },
    /// the command on the report of action {action_id} in namespace {namespace} was not carried out: the daemon is stopping
    CommandLost {
        namespace: String,
        action_id: String,
    },
    /// no image {name} in namespace {namespace}
    NoImage { namespace: String, name: String },
    /// image name {name:?} is not a valid reference: {reason}
    ImageName { name: String, reason: String },
    /// {0}
    Engine(#[from] EngineError),
    /// this node is draining and accepts no action; send it to another node
    Draining,
    /// isolated is stopping; the action goes on and is reported as usual (follow it again with isolatectl get)
    Stopping,
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match e {
            Error::Validation(_) => Status::invalid_argument(msg),
            // A known caller outside its namespaces; everything else about
            // credentials is UNAUTHENTICATED (ISOLATE.md §9).
            Error::Auth(AuthError::Forbidden { .. } | AuthError::NodeWide { .. }) => {
                Status::permission_denied(msg)
            }
            Error::Auth(_) => Status::unauthenticated(msg),
            Error::AlreadyExists { .. } => Status::already_exists(msg),
            Error::Busy(_) | Error::ImportTooLarge(_) | Error::ImportSpoolFull { .. } => {
                Status::resource_exhausted(msg)
            }
            Error::NotFound { .. } => Status::not_found(msg),
            Error::Finished { .. } | Error::NotUndeliverable { .. } => {
                Status::failed_precondition(msg)
            }
            Error::CommandLost { .. } => Status::unavailable(msg),
            Error::NoImage { .. } => Status::not_found(msg),
            Error::ImageName { .. } => Status::invalid_argument(msg),
            Error::Engine(EngineError::NotFound { .. }) => Status::not_found(msg),
            Error::Engine(EngineError::Unavailable { .. }) => Status::unavailable(msg),
            Error::Engine(_) => Status::internal(msg),
            // Not durable, so not done: the caller may try again.
            Error::Store(_) | Error::Input(_) => Status::unavailable(msg),
            // UNAVAILABLE is what a gRPC client retries elsewhere (issue 17).
            Error::Draining => Status::unavailable(msg),
            // A follower (watch, logs) cut off by a graceful stop.
            Error::Stopping => Status::unavailable(msg),
            Error::EmptyImport => Status::invalid_argument(msg),
            // The archive's faults are the caller's; containerd's are ours.
            Error::Import(
                ImportError::Containerd { .. }
                | ImportError::Unpack { .. }
                | ImportError::Io { .. },
            )
            | Error::Spool { .. } => Status::internal(msg),
            Error::Import(_) => Status::invalid_argument(msg),
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
        assert_eq!(Status::from(Error::Draining).code(), Code::Unavailable);
        let s: Status = Error::Auth(AuthError::NodeWide {
            who: "token a".into(),
            what: "drain",
        })
        .into();
        assert_eq!(s.code(), Code::PermissionDenied);
        let s: Status = Error::Auth(AuthError::Forbidden {
            who: "token a".into(),
            namespace: "b".into(),
        })
        .into();
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(s.message(), "token a may not use namespace b");
        let s: Status = Error::Auth(AuthError::UnknownToken).into();
        assert_eq!(s.code(), Code::Unauthenticated);
        let s: Status = Error::NotUndeliverable {
            namespace: "n".into(),
            action_id: "a".into(),
            state: "running",
        }
        .into();
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("the action is running"), "{s}");
        let s: Status = Error::NoImage {
            namespace: "n".into(),
            name: "docker.io/library/x:latest".into(),
        }
        .into();
        assert_eq!(s.code(), Code::NotFound);
    }
}
