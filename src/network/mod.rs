//! Per-action networking: the network namespace an action's container
//! joins and what configures it.
//!
//! Owns the namespace's lifetime (created before the container, released
//! after the report, also after a crash) and the files the container sees
//! as `/etc/resolv.conf` and `/etc/hosts`. With `network = "none"` the
//! runtime creates a fresh namespace with loopback only and nothing is done
//! here. Does not touch the OCI spec beyond the [`Attachment`] it returns.

use std::path::{Path, PathBuf};

use crate::config::Config;

/// Why an action's network could not be set up or released.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum NetworkError {
    /// network mode {0:?} is unknown: use cni or none
    Mode(String),
}

/// The network of one action, as the spec needs it.
#[derive(Debug, Default, Clone)]
pub struct Attachment {
    /// A namespace to join; `None` lets the runtime create a private one.
    pub netns: Option<PathBuf>,
    /// Host files bind-mounted read-only at the given container paths.
    pub files: Vec<(PathBuf, String)>,
}

/// Which action a network belongs to.
pub struct NetTarget<'a> {
    pub cns: &'a str,
    pub action_id: &'a str,
    /// The action's directory, for its generated files.
    pub dir: &'a Path,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    None,
}

/// Sets up and tears down action networks.
pub struct Networks {
    mode: Mode,
}

impl Networks {
    pub fn new(cfg: &Config) -> Result<Self, NetworkError> {
        let mode = match cfg.network.as_str() {
            "none" => Mode::None,
            other => return Err(NetworkError::Mode(other.to_string())),
        };
        Ok(Networks { mode })
    }

    /// Prepares the network of one action.
    pub async fn attach(&self, _t: &NetTarget<'_>) -> Result<Attachment, NetworkError> {
        match self.mode {
            Mode::None => Ok(Attachment::default()),
        }
    }

    /// Releases everything `attach` made. Idempotent, and works from the
    /// target alone, so it can run after a crash.
    pub async fn detach(&self, _t: &NetTarget<'_>) {
        match self.mode {
            Mode::None => {}
        }
    }
}
