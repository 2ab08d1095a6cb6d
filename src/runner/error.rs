//! Why an action could not be run to its end, and which report code each
//! failure is (ISOLATE.md §4's table: the image's fault, the data dir's, the
//! network's, or ours). Decides nothing else.

use std::path::PathBuf;

use crate::disk::DiskError;
use crate::engine::EngineError;
use crate::image::ImageError;
use crate::network::NetworkError;
use crate::report::ErrorCode;
use crate::spec::SpecError;
use crate::store::StoreError;

/// Why an action could not be run to its end. Each names what failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum RunError {
    /// cannot prepare the action's data directory {path}: {source}
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// {0}
    Input(#[from] crate::inputs::InputError),
    /// {0}
    Image(#[from] ImageError),
    /// {0}
    Spec(#[from] SpecError),
    /// {0}
    Engine(#[from] EngineError),
    /// {0}
    Store(#[from] StoreError),
    /// {0}
    Network(#[from] NetworkError),
    /// {0}
    Disk(#[from] DiskError),
}

impl RunError {
    /// Whether containerd could not be reached (as opposed to refusing).
    pub fn containerd_unavailable(&self) -> bool {
        match self {
            RunError::Engine(e) => e.is_unavailable(),
            RunError::Image(ImageError::Internal { .. }) => true,
            _ => false,
        }
    }

    /// The report code: the image's fault, the data dir's, or ours.
    pub fn code(&self) -> ErrorCode {
        match self {
            RunError::DataDir { .. } | RunError::Input(_) => ErrorCode::Io,
            RunError::Network(_) => ErrorCode::Network,
            RunError::Image(ImageError::Internal { .. }) => ErrorCode::Internal,
            RunError::Image(_) => ErrorCode::Image,
            RunError::Spec(SpecError::NoCommand | SpecError::User { .. }) => ErrorCode::Image,
            // The node's filesystem, loop devices or e2fsprogs failing:
            // nothing the action did.
            RunError::Spec(_) | RunError::Engine(_) | RunError::Store(_) | RunError::Disk(_) => {
                ErrorCode::Internal
            }
        }
    }
}
