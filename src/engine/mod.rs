//! The one boundary between the daemon's decisions and containerd (issue
//! 12). Every call the lifecycle makes on tasks, containers, snapshots and
//! namespaces goes through the [`Engine`] trait: the real implementation
//! ([`containerd::ContainerdEngine`]) speaks containerd's gRPC API, a fake
//! one (`fake`, in tests) keeps it all in memory so the lifecycle's branches
//! run in unit tests without root. containerd's failures are classified once,
//! into [`EngineError`] (`error`); the operations written once for everyone
//! (an action's removal, a kill, a task create that recovers from what a
//! crash left) are in `ops`; each namespace's OCI runtime under the runc v2
//! shim (binary, state root, the runtime options containers carry) is in
//! `runtime`.
//!
//! The image side (content, diff, image records, leases and the snapshots
//! layers are unpacked into) is [`store::ImageStore`], which `crate::image`
//! pulls and imports through; listing and removing images for an operator
//! (`isolatectl image ls|rm`) is on the trait.
//!
//! Does not decide anything about actions or images: which call comes when
//! is the runner's, the recovery's, the shim keepers' and the image
//! service's.

#[cfg(test)]
pub mod fake;

pub mod channel;
pub mod containerd;
pub mod error;
pub mod ops;
pub mod runtime;
pub mod store;

use std::collections::HashMap;

use nix::sys::signal::Signal;

pub use channel::{ConnectError, Containerd};
pub use containerd_client::services::v1::Container;
pub use containerd_client::types::Mount;
pub use error::EngineError;
pub use runtime::{OciRuntime, Runtimes};

/// Label every object isolated creates carries, so start-up can tell its
/// own leftovers from other tenants of the same containerd.
pub const LABEL_MANAGED: &str = "io.direktiv.isolate.managed";
pub const LABEL_NAMESPACE: &str = "io.direktiv.isolate.namespace";
pub const LABEL_ACTION_ID: &str = "io.direktiv.isolate.action-id";
pub const LABEL_INSTANCE_ID: &str = "io.direktiv.isolate.instance-id";
pub const LABEL_STEP: &str = "io.direktiv.isolate.step";

/// An object and its labels, as a listing returns it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Labelled {
    pub id: String,
    pub labels: HashMap<String, String>,
}

/// An image record of a namespace's image store.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageRecord {
    pub name: String,
    /// The digest and size of what it points at (a manifest or an index).
    pub digest: String,
    pub size: u64,
    pub labels: HashMap<String, String>,
    /// Unix ms; 0 when containerd did not say.
    pub updated_at_ms: i64,
}

/// A blob of a namespace's content store: its size and labels (the
/// garbage collector's references among them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContentInfo {
    pub size: u64,
    pub labels: HashMap<String, String>,
}

/// The label isolated puts on the image records it writes: `imported` or
/// `pulled`, for `isolatectl image ls`.
pub const LABEL_IMAGE_SOURCE: &str = "io.direktiv.isolate.source";

/// A snapshot to prepare on top of `parent` (a committed chain).
#[derive(Debug, Clone, Default)]
pub struct Prepare {
    pub snapshotter: String,
    pub key: String,
    pub parent: String,
    pub labels: HashMap<String, String>,
}

/// A task to create for a container: its root filesystem and where its
/// stdout and stderr go (FIFOs; empty for none).
#[derive(Debug, Clone, Default)]
pub struct NewTask {
    pub container_id: String,
    pub rootfs: Vec<Mount>,
    pub stdout: String,
    pub stderr: String,
}

/// containerd's view of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskInfo {
    pub pid: u32,
    pub status: TaskStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStatus {
    Created,
    Running,
    Stopped,
    Paused,
    Unknown,
}

/// containerd, as the lifecycle uses it. Every method names one containerd
/// call; failures come back classified.
#[tonic::async_trait]
pub trait Engine: Send + Sync {
    /// Whether containerd answers at all.
    async fn ping(&self) -> Result<(), EngineError>;
    /// The containerd namespaces that exist.
    async fn namespaces(&self) -> Result<Vec<String>, EngineError>;

    /// An active snapshot; its mounts are the container's root filesystem.
    async fn prepare_snapshot(&self, cns: &str, p: Prepare) -> Result<Vec<Mount>, EngineError>;
    async fn remove_snapshot(
        &self,
        cns: &str,
        snapshotter: &str,
        key: &str,
    ) -> Result<(), EngineError>;
    /// Snapshots carrying [`LABEL_MANAGED`], by name.
    async fn managed_snapshots(
        &self,
        cns: &str,
        snapshotter: &str,
    ) -> Result<Vec<Labelled>, EngineError>;

    async fn create_container(&self, cns: &str, c: Container) -> Result<(), EngineError>;
    async fn delete_container(&self, cns: &str, id: &str) -> Result<(), EngineError>;
    /// Sets `labels` on a container, keeping its others (a pre-created
    /// task's gets the action id of the action that took it, issue 16).
    async fn label_container(
        &self,
        cns: &str,
        id: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), EngineError>;
    /// Containers carrying [`LABEL_MANAGED`].
    async fn managed_containers(&self, cns: &str) -> Result<Vec<Labelled>, EngineError>;

    /// Creates the task (runc create: its init waits before exec); returns
    /// the pid of that init.
    async fn create_task(&self, cns: &str, t: NewTask) -> Result<u32, EngineError>;
    async fn start_task(&self, cns: &str, id: &str) -> Result<(), EngineError>;
    async fn task(&self, cns: &str, id: &str) -> Result<TaskInfo, EngineError>;
    /// Waits for the task's exit; returns its exit status.
    async fn wait_task(&self, cns: &str, id: &str) -> Result<u32, EngineError>;
    /// Signals the task's init, or with `all` every process of the task
    /// (runc before 1.2; runc >= 1.2 and crun signal only the init of a
    /// container with its own PID namespace either way, see
    /// `ops::signal_all`).
    async fn kill_task(
        &self,
        cns: &str,
        id: &str,
        signal: Signal,
        all: bool,
    ) -> Result<(), EngineError>;
    /// Deletes a stopped task; returns its exit status.
    async fn delete_task(&self, cns: &str, id: &str) -> Result<u32, EngineError>;

    /// The image records of a namespace.
    async fn images(&self, cns: &str) -> Result<Vec<ImageRecord>, EngineError>;
    /// Deletes an image record (its content goes with the next garbage
    /// collection, if nothing else references it).
    async fn delete_image(&self, cns: &str, name: &str) -> Result<(), EngineError>;
    /// A blob's size and labels.
    async fn content_info(&self, cns: &str, digest: &str) -> Result<ContentInfo, EngineError>;
}
