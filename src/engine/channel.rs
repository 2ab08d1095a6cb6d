//! The one long-lived channel to containerd and the request decoration every
//! call needs (namespace, lease), and the one call both of its users make
//! (removing a snapshot: an action's, or an extract an unpack left). Owns
//! nothing else. Its service clients and
//! `with_ns` are the engine's alone (`pub(super)`): outside `crate::engine`
//! nothing can build a containerd request, so every call goes through the
//! [`super::Engine`] trait or [`super::store::ImageStore`] (issue 12).

use std::path::Path;
use std::time::Duration;

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::RemoveSnapshotRequest;
use containerd_client::services::v1::{
    containers_client::ContainersClient, content_client::ContentClient, diff_client::DiffClient,
    images_client::ImagesClient, leases_client::LeasesClient, namespaces_client::NamespacesClient,
    tasks_client::TasksClient, version_client::VersionClient,
};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Why containerd could not be reached.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ConnectError {
    /// cannot connect to containerd at {path}: {reason}
    Connect { path: String, reason: String },
    /// containerd at {path} does not answer: {reason}
    Version { path: String, reason: String },
}

/// A cloneable handle on containerd; all clones share one HTTP/2 connection.
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
}

impl Containerd {
    /// Connects and asks containerd for its version, so a wrong socket is
    /// reported at start-up rather than at the first action.
    pub async fn connect(path: &Path) -> Result<(Containerd, String), ConnectError> {
        let shown = path.display().to_string();
        let channel =
            containerd_client::connect(path)
                .await
                .map_err(|e| ConnectError::Connect {
                    path: shown.clone(),
                    reason: crate::text::error_chain(&e),
                })?;
        let c = Containerd { channel };
        let version = tokio::time::timeout(
            Duration::from_secs(10),
            VersionClient::new(c.channel.clone()).version(()),
        )
        .await
        .map_err(|_| ConnectError::Version {
            path: shown.clone(),
            reason: "timed out after 10 s".into(),
        })?
        .map_err(|e| ConnectError::Version {
            path: shown,
            reason: e.message().to_string(),
        })?
        .into_inner();
        Ok((c, version.version))
    }

    /// A handle that connects on first use and is never used: for unit
    /// tests whose containerd calls go to the fake engine.
    #[cfg(test)]
    pub fn unconnected() -> Containerd {
        Containerd {
            channel: tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy(),
        }
    }

    /// Whether containerd answers at all.
    pub async fn ping(&self) -> Result<(), Status> {
        VersionClient::new(self.channel.clone())
            .version(())
            .await
            .map(|_| ())
    }

    pub(super) fn namespaces(&self) -> NamespacesClient<Channel> {
        NamespacesClient::new(self.channel.clone())
    }

    pub(super) fn containers(&self) -> ContainersClient<Channel> {
        ContainersClient::new(self.channel.clone())
    }
    pub(super) fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
    pub(super) fn diff(&self) -> DiffClient<Channel> {
        DiffClient::new(self.channel.clone())
    }
    pub(super) fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
    }
    pub(super) fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel.clone())
    }
    pub(super) fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }
    pub(super) fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.channel.clone())
    }

    /// Removes snapshot `key` of `snapshotter` (under `lease`, when the
    /// snapshot was made under one), classified as the call to `what`.
    pub(super) async fn remove_snapshot(
        &self,
        ns: &str,
        lease: Option<&str>,
        snapshotter: &str,
        key: &str,
        what: &'static str,
    ) -> Result<(), super::EngineError> {
        let req = RemoveSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            key: key.to_string(),
        };
        self.snapshots()
            .remove(with_ns(req, ns, lease))
            .await
            .map(|_| ())
            .map_err(super::error::classify(what))
    }
}

/// Wraps a message with the containerd namespace and, when given, a lease.
pub(super) fn with_ns<T>(msg: T, ns: &str, lease: Option<&str>) -> Request<T> {
    let mut req = Request::new(msg);
    let md = req.metadata_mut();
    // Namespaces and lease ids are validated identifiers, always valid ASCII.
    if let Ok(v) = MetadataValue::try_from(ns) {
        md.insert("containerd-namespace", v);
    }
    if let Some(lease) = lease.and_then(|l| MetadataValue::try_from(l).ok()) {
        md.insert("containerd-lease", lease);
    }
    req
}
