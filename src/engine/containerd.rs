//! The real [`Engine`]: containerd's gRPC API over the daemon's one
//! long-lived channel (`crate::containerd`), each call in its containerd
//! namespace, each failure classified. Owns the requests' shape and nothing
//! else: what to call and when is the callers'.

use containerd_client::services::v1::snapshots::{ListSnapshotsRequest, PrepareSnapshotRequest};
use containerd_client::services::v1::{
    CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest, DeleteImageRequest,
    DeleteTaskRequest, GetRequest, InfoRequest, KillRequest, ListContainersRequest,
    ListImagesRequest, ListNamespacesRequest, StartRequest, UpdateContainerRequest, WaitRequest,
};
use std::collections::HashMap;

use nix::sys::signal::Signal;

use super::channel::{with_ns, Containerd};
use super::error::classify;
use super::{
    Container, ContentInfo, Engine, EngineError, ImageRecord, Labelled, Mount, NewTask, Prepare,
    TaskInfo, TaskStatus, LABEL_MANAGED,
};

/// containerd, through the daemon's channel.
#[derive(Clone)]
pub struct ContainerdEngine {
    cd: Containerd,
}

impl ContainerdEngine {
    pub fn new(cd: Containerd) -> ContainerdEngine {
        ContainerdEngine { cd }
    }
}

fn managed_filter() -> String {
    format!("labels.\"{LABEL_MANAGED}\"==true")
}

#[tonic::async_trait]
impl Engine for ContainerdEngine {
    async fn ping(&self) -> Result<(), EngineError> {
        self.cd
            .ping()
            .await
            .map_err(classify("ask containerd for its version"))
    }

    async fn namespaces(&self) -> Result<Vec<String>, EngineError> {
        Ok(self
            .cd
            .namespaces()
            .list(ListNamespacesRequest::default())
            .await
            .map_err(classify("list containerd namespaces"))?
            .into_inner()
            .namespaces
            .into_iter()
            .map(|n| n.name)
            .collect())
    }

    async fn prepare_snapshot(&self, cns: &str, p: Prepare) -> Result<Vec<Mount>, EngineError> {
        let req = PrepareSnapshotRequest {
            snapshotter: p.snapshotter,
            key: p.key,
            parent: p.parent,
            labels: p.labels,
        };
        Ok(self
            .cd
            .snapshots()
            .prepare(with_ns(req, cns, None))
            .await
            .map_err(classify("prepare the action's snapshot"))?
            .into_inner()
            .mounts)
    }

    async fn remove_snapshot(
        &self,
        cns: &str,
        snapshotter: &str,
        key: &str,
    ) -> Result<(), EngineError> {
        self.cd
            .remove_snapshot(cns, None, snapshotter, key, "remove the action's snapshot")
            .await
    }

    async fn managed_snapshots(
        &self,
        cns: &str,
        snapshotter: &str,
    ) -> Result<Vec<Labelled>, EngineError> {
        let req = ListSnapshotsRequest {
            snapshotter: snapshotter.to_string(),
            filters: vec![managed_filter()],
        };
        let mut stream = self
            .cd
            .snapshots()
            .list(with_ns(req, cns, None))
            .await
            .map_err(classify("list snapshots"))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(page) = stream.message().await.map_err(classify("list snapshots"))? {
            out.extend(page.info.into_iter().map(|s| Labelled {
                id: s.name,
                labels: s.labels,
            }));
        }
        Ok(out)
    }

    async fn create_container(&self, cns: &str, c: Container) -> Result<(), EngineError> {
        let req = CreateContainerRequest { container: Some(c) };
        self.cd
            .containers()
            .create(with_ns(req, cns, None))
            .await
            .map(|_| ())
            .map_err(classify("create the container"))
    }

    async fn delete_container(&self, cns: &str, id: &str) -> Result<(), EngineError> {
        let req = DeleteContainerRequest { id: id.to_string() };
        self.cd
            .containers()
            .delete(with_ns(req, cns, None))
            .await
            .map(|_| ())
            .map_err(classify("delete the container"))
    }

    async fn label_container(
        &self,
        cns: &str,
        id: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), EngineError> {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let req = UpdateContainerRequest {
            container: Some(Container {
                id: id.to_string(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        };
        self.cd
            .containers()
            .update(with_ns(req, cns, None))
            .await
            .map(|_| ())
            .map_err(classify("label the container"))
    }

    async fn managed_containers(&self, cns: &str) -> Result<Vec<Labelled>, EngineError> {
        let req = ListContainersRequest {
            filters: vec![managed_filter()],
        };
        Ok(self
            .cd
            .containers()
            .list(with_ns(req, cns, None))
            .await
            .map_err(classify("list containers"))?
            .into_inner()
            .containers
            .into_iter()
            .map(|c| Labelled {
                id: c.id,
                labels: c.labels,
            })
            .collect())
    }

    async fn create_task(&self, cns: &str, t: NewTask) -> Result<u32, EngineError> {
        let req = CreateTaskRequest {
            container_id: t.container_id,
            rootfs: t.rootfs,
            stdout: t.stdout,
            stderr: t.stderr,
            ..Default::default()
        };
        Ok(self
            .cd
            .tasks()
            .create(with_ns(req, cns, None))
            .await
            .map_err(classify("create the task"))?
            .into_inner()
            .pid)
    }

    async fn start_task(&self, cns: &str, id: &str) -> Result<(), EngineError> {
        let req = StartRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        };
        self.cd
            .tasks()
            .start(with_ns(req, cns, None))
            .await
            .map(|_| ())
            .map_err(classify("start the task"))
    }

    async fn task(&self, cns: &str, id: &str) -> Result<TaskInfo, EngineError> {
        let req = GetRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        };
        let p = self
            .cd
            .tasks()
            .get(with_ns(req, cns, None))
            .await
            .map_err(classify("find the task"))?
            .into_inner()
            .process
            .unwrap_or_default();
        use containerd_client::types::v1::Status;
        let status = match Status::try_from(p.status).unwrap_or(Status::Unknown) {
            Status::Created => TaskStatus::Created,
            Status::Running => TaskStatus::Running,
            Status::Stopped => TaskStatus::Stopped,
            Status::Paused | Status::Pausing => TaskStatus::Paused,
            Status::Unknown => TaskStatus::Unknown,
        };
        Ok(TaskInfo { pid: p.pid, status })
    }

    async fn wait_task(&self, cns: &str, id: &str) -> Result<u32, EngineError> {
        let req = WaitRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        };
        Ok(self
            .cd
            .tasks()
            .wait(with_ns(req, cns, None))
            .await
            .map_err(classify("wait for the task"))?
            .into_inner()
            .exit_status)
    }

    async fn kill_task(
        &self,
        cns: &str,
        id: &str,
        signal: Signal,
        all: bool,
    ) -> Result<(), EngineError> {
        let req = KillRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
            signal: signal as u32,
            all,
        };
        self.cd
            .tasks()
            .kill(with_ns(req, cns, None))
            .await
            .map(|_| ())
            .map_err(classify("signal the task"))
    }

    async fn delete_task(&self, cns: &str, id: &str) -> Result<u32, EngineError> {
        let req = DeleteTaskRequest {
            container_id: id.to_string(),
        };
        Ok(self
            .cd
            .tasks()
            .delete(with_ns(req, cns, None))
            .await
            .map_err(classify("delete the task"))?
            .into_inner()
            .exit_status)
    }

    async fn images(&self, cns: &str) -> Result<Vec<ImageRecord>, EngineError> {
        let images = self
            .cd
            .images()
            .list(with_ns(ListImagesRequest::default(), cns, None))
            .await
            .map_err(classify("list images"))?
            .into_inner()
            .images;
        Ok(images
            .into_iter()
            .map(|i| {
                let (digest, size) = i
                    .target
                    .map(|t| (t.digest, t.size.max(0) as u64))
                    .unwrap_or_default();
                ImageRecord {
                    name: i.name,
                    digest,
                    size,
                    labels: i.labels,
                    updated_at_ms: i
                        .updated_at
                        .or(i.created_at)
                        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
                        .unwrap_or(0),
                }
            })
            .collect())
    }

    async fn delete_image(&self, cns: &str, name: &str) -> Result<(), EngineError> {
        let req = DeleteImageRequest {
            name: name.to_string(),
            // The collection runs on its own; an operator's call need not
            // wait for it.
            sync: false,
            target: None,
        };
        self.cd
            .images()
            .delete(with_ns(req, cns, None))
            .await
            .map(|_| ())
            .map_err(classify("delete the image"))
    }

    async fn content_info(&self, cns: &str, digest: &str) -> Result<ContentInfo, EngineError> {
        let req = InfoRequest {
            digest: digest.to_string(),
        };
        let info = self
            .cd
            .content()
            .info(with_ns(req, cns, None))
            .await
            .map_err(classify("read a blob's info"))?
            .into_inner()
            .info
            .unwrap_or_default();
        Ok(ContentInfo {
            size: info.size.max(0) as u64,
            labels: info.labels,
        })
    }
}
