//! The one long-lived channel to containerd and the request decoration every
//! call needs (namespace, lease). Owns nothing else: the lifecycle's calls
//! go through `crate::engine`, which uses this channel; the image service
//! speaks to the content, diff and image services over it directly.

use std::path::Path;
use std::time::Duration;

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::{
    containers_client::ContainersClient, content_client::ContentClient, diff_client::DiffClient,
    events_client::EventsClient, images_client::ImagesClient, leases_client::LeasesClient,
    namespaces_client::NamespacesClient, tasks_client::TasksClient, version_client::VersionClient,
};
use containerd_client::services::v1::{CreateRequest, DeleteRequest};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

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

pub use crate::engine::{
    LABEL_ACTION_ID, LABEL_INSTANCE_ID, LABEL_MANAGED, LABEL_NAMESPACE, LABEL_STEP,
};

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
                    reason: error_chain(&e),
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

    pub fn namespaces(&self) -> NamespacesClient<Channel> {
        NamespacesClient::new(self.channel.clone())
    }

    pub fn containers(&self) -> ContainersClient<Channel> {
        ContainersClient::new(self.channel.clone())
    }
    pub fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
    pub fn diff(&self) -> DiffClient<Channel> {
        DiffClient::new(self.channel.clone())
    }
    pub fn events(&self) -> EventsClient<Channel> {
        EventsClient::new(self.channel.clone())
    }
    pub fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
    }
    pub fn leases(&self) -> LeasesClient<Channel> {
        LeasesClient::new(self.channel.clone())
    }
    pub fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }
    pub fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.channel.clone())
    }

    /// Creates a lease that expires on its own after a day, so a crash
    /// between create and delete leaks nothing forever.
    pub async fn lease(&self, ns: &str) -> Result<String, Status> {
        let id = format!("isolated-{:016x}", rand::random::<u64>());
        let expire = humantime::format_rfc3339_seconds(
            std::time::SystemTime::now() + Duration::from_secs(86400),
        )
        .to_string();
        let req = CreateRequest {
            id: id.clone(),
            labels: [("containerd.io/gc.expire".to_string(), expire)].into(),
        };
        self.leases().create(with_ns(req, ns, None)).await?;
        Ok(id)
    }

    /// Deletes a lease; failure only delays garbage collection, so it is
    /// logged, not returned.
    pub async fn drop_lease(&self, ns: &str, lease: &str) {
        let req = DeleteRequest {
            id: lease.to_string(),
            sync: false,
        };
        if let Err(e) = self.leases().delete(with_ns(req, ns, None)).await {
            if e.code() != Code::NotFound {
                tracing::warn!(lease, error = %e.message(), "cannot delete lease");
            }
        }
    }
}

/// Wraps a message with the containerd namespace and, when given, a lease.
pub fn with_ns<T>(msg: T, ns: &str, lease: Option<&str>) -> Request<T> {
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

/// The whole source chain of an error on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = inner.source();
    }
    s
}
