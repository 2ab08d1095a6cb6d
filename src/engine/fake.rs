//! An [`Engine`] in memory, for unit tests of the lifecycle without root or
//! containerd: containers, snapshots and tasks per namespace, tasks that
//! run until a test makes them exit or a signal kills them, containerd
//! going away and coming back, and failures injected per call, in the
//! classified kinds the real engine returns. Behaves like containerd where
//! the lifecycle depends on it: a running task cannot be deleted, a
//! container needs no task, names are unique per namespace.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nix::sys::signal::Signal;
use tokio::sync::watch;
use tonic::Code;

use super::{
    Container, ContentInfo, Engine, EngineError, ImageRecord, Labelled, Mount, NewTask, Prepare,
    TaskInfo, TaskStatus, LABEL_MANAGED,
};

/// A failure to inject into the next call of one operation.
#[derive(Debug, Clone)]
pub enum Fail {
    Unavailable,
    NotFound,
    AlreadyExists,
    ShimGone,
    LeakedBundle(PathBuf),
    RuncIdTaken,
    Other,
    /// The call panics (a bug in isolated, as the lifecycle sees it).
    Panic,
}

struct Task {
    pid: u32,
    status: TaskStatus,
    exit: watch::Sender<Option<u32>>,
}

#[derive(Default)]
struct Ns {
    containers: BTreeMap<String, Labelled>,
    snapshots: BTreeMap<String, Labelled>,
    tasks: BTreeMap<String, Task>,
    images: BTreeMap<String, ImageRecord>,
    content: BTreeMap<String, ContentInfo>,
}

#[derive(Default)]
struct State {
    namespaces: BTreeMap<String, Ns>,
    fails: HashMap<&'static str, VecDeque<Fail>>,
    /// containerd "down": every call is Unavailable until it is back.
    down: bool,
    next_pid: u32,
    calls: Vec<String>,
}

#[derive(Clone, Default)]
pub struct Fake {
    state: Arc<Mutex<State>>,
}

impl Fake {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next call of `op` (a method name of [`Engine`]) fails so.
    pub fn fail_next(&self, op: &'static str, fail: Fail) {
        self.lock().fails.entry(op).or_default().push_back(fail);
    }

    /// containerd unreachable (`true`) or back.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    /// A managed container `id`, as if created.
    pub fn container(&self, cns: &str, id: &str) {
        let mut st = self.lock();
        st.namespaces
            .entry(cns.into())
            .or_default()
            .containers
            .insert(
                id.into(),
                Labelled {
                    id: id.into(),
                    labels: [(LABEL_MANAGED.to_string(), "true".to_string())].into(),
                },
            );
    }

    /// An image record, as if pulled.
    pub fn image(&self, cns: &str, image: ImageRecord) {
        let mut st = self.lock();
        let n = st.namespaces.entry(cns.into()).or_default();
        n.images.insert(image.name.clone(), image);
    }

    /// A blob of the content store.
    pub fn blob(&self, cns: &str, digest: &str, info: ContentInfo) {
        let mut st = self.lock();
        let n = st.namespaces.entry(cns.into()).or_default();
        n.content.insert(digest.into(), info);
    }

    /// The running task `id` exits with `status`.
    pub fn exit(&self, cns: &str, id: &str, status: u32) {
        let mut st = self.lock();
        if let Some(t) = st.namespaces.get_mut(cns).and_then(|n| n.tasks.get_mut(id)) {
            t.status = TaskStatus::Stopped;
            t.exit.send_replace(Some(status));
        }
    }

    /// Task `id` exits and is deleted by containerd itself, as containerd
    /// 1.7 and 2.x do at their restart with a task that exited while they
    /// were down (set it down first: a wait under way then loses
    /// containerd).
    pub fn vanish(&self, cns: &str, id: &str) {
        let mut st = self.lock();
        if let Some(n) = st.namespaces.get_mut(cns) {
            n.tasks.remove(id);
        }
    }

    /// Every call so far, as `op cns/id`.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// What exists in `cns`: `container x`, `snapshot x`, `task x`.
    pub fn objects(&self, cns: &str) -> Vec<String> {
        let st = self.lock();
        let Some(n) = st.namespaces.get(cns) else {
            return Vec::new();
        };
        n.containers
            .keys()
            .map(|k| format!("container {k}"))
            .chain(n.snapshots.keys().map(|k| format!("snapshot {k}")))
            .chain(n.tasks.keys().map(|k| format!("task {k}")))
            .collect()
    }

    pub fn is_empty(&self, cns: &str) -> bool {
        self.objects(cns).is_empty()
    }

    /// Records the call and says how it fails, if it does.
    fn enter(&self, op: &'static str, cns: &str, id: &str) -> Result<(), EngineError> {
        let mut st = self.lock();
        st.calls.push(format!("{op} {cns}/{id}"));
        if st.down {
            return Err(EngineError::Unavailable {
                what: op,
                message: "transport error".into(),
            });
        }
        let Some(fail) = st.fails.get_mut(op).and_then(|q| q.pop_front()) else {
            return Ok(());
        };
        let message = format!("injected {fail:?}");
        Err(match fail {
            Fail::Panic => {
                // Unlocked first: the test goes on using the fake.
                drop(st);
                panic!("injected panic in {op}");
            }
            Fail::Unavailable => EngineError::Unavailable { what: op, message },
            Fail::NotFound => EngineError::NotFound { what: op, message },
            Fail::AlreadyExists => EngineError::AlreadyExists { what: op, message },
            Fail::ShimGone => EngineError::ShimGone { what: op, message },
            Fail::LeakedBundle(bundle) => EngineError::LeakedBundle {
                what: op,
                bundle,
                message,
            },
            Fail::RuncIdTaken => EngineError::RuncIdTaken { what: op, message },
            Fail::Other => EngineError::Failed {
                what: op,
                code: Code::Internal,
                message,
            },
        })
    }
}

fn not_found(what: &'static str, id: &str) -> EngineError {
    EngineError::NotFound {
        what,
        message: format!("{id}: not found"),
    }
}

#[tonic::async_trait]
impl Engine for Fake {
    async fn ping(&self) -> Result<(), EngineError> {
        self.enter("ping", "", "")
    }

    async fn namespaces(&self) -> Result<Vec<String>, EngineError> {
        self.enter("namespaces", "", "")?;
        Ok(self.lock().namespaces.keys().cloned().collect())
    }

    async fn prepare_snapshot(&self, cns: &str, p: Prepare) -> Result<Vec<Mount>, EngineError> {
        self.enter("prepare_snapshot", cns, &p.key)?;
        let mut st = self.lock();
        let n = st.namespaces.entry(cns.into()).or_default();
        if n.snapshots.contains_key(&p.key) {
            return Err(EngineError::AlreadyExists {
                what: "prepare_snapshot",
                message: format!("snapshot {}: already exists", p.key),
            });
        }
        n.snapshots.insert(
            p.key.clone(),
            Labelled {
                id: p.key.clone(),
                labels: p.labels,
            },
        );
        Ok(vec![Mount {
            r#type: "bind".into(),
            source: format!("/fake/{cns}/{}", p.key),
            ..Default::default()
        }])
    }

    async fn remove_snapshot(&self, cns: &str, _: &str, key: &str) -> Result<(), EngineError> {
        self.enter("remove_snapshot", cns, key)?;
        let mut st = self.lock();
        st.namespaces
            .get_mut(cns)
            .and_then(|n| n.snapshots.remove(key))
            .map(|_| ())
            .ok_or_else(|| not_found("remove_snapshot", key))
    }

    async fn managed_snapshots(&self, cns: &str, _: &str) -> Result<Vec<Labelled>, EngineError> {
        self.enter("managed_snapshots", cns, "")?;
        let st = self.lock();
        Ok(st
            .namespaces
            .get(cns)
            .map(|n| n.snapshots.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn create_container(&self, cns: &str, c: Container) -> Result<(), EngineError> {
        self.enter("create_container", cns, &c.id)?;
        let mut st = self.lock();
        let n = st.namespaces.entry(cns.into()).or_default();
        if n.containers.contains_key(&c.id) {
            return Err(EngineError::AlreadyExists {
                what: "create_container",
                message: format!("container {}: already exists", c.id),
            });
        }
        n.containers.insert(
            c.id.clone(),
            Labelled {
                id: c.id,
                labels: c.labels,
            },
        );
        Ok(())
    }

    async fn label_container(
        &self,
        cns: &str,
        id: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), EngineError> {
        self.enter("label_container", cns, id)?;
        let mut st = self.lock();
        let c = st
            .namespaces
            .get_mut(cns)
            .and_then(|n| n.containers.get_mut(id))
            .ok_or_else(|| not_found("label_container", id))?;
        c.labels.extend(labels);
        Ok(())
    }

    async fn delete_container(&self, cns: &str, id: &str) -> Result<(), EngineError> {
        self.enter("delete_container", cns, id)?;
        let mut st = self.lock();
        let n = st
            .namespaces
            .get_mut(cns)
            .ok_or_else(|| not_found("delete_container", id))?;
        if n.tasks.contains_key(id) {
            return Err(EngineError::Failed {
                what: "delete_container",
                code: Code::FailedPrecondition,
                message: format!("cannot delete container {id}: it has a task"),
            });
        }
        n.containers
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| not_found("delete_container", id))
    }

    async fn managed_containers(&self, cns: &str) -> Result<Vec<Labelled>, EngineError> {
        self.enter("managed_containers", cns, "")?;
        let st = self.lock();
        Ok(st
            .namespaces
            .get(cns)
            .map(|n| n.containers.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn create_task(&self, cns: &str, t: NewTask) -> Result<u32, EngineError> {
        self.enter("create_task", cns, &t.container_id)?;
        let mut st = self.lock();
        st.next_pid += 1;
        let pid = 1000 + st.next_pid;
        let n = st.namespaces.entry(cns.into()).or_default();
        if !n.containers.contains_key(&t.container_id) {
            return Err(not_found("create_task", &t.container_id));
        }
        if n.tasks.contains_key(&t.container_id) {
            return Err(EngineError::AlreadyExists {
                what: "create_task",
                message: format!("task {}: already exists", t.container_id),
            });
        }
        n.tasks.insert(
            t.container_id,
            Task {
                pid,
                status: TaskStatus::Created,
                exit: watch::Sender::new(None),
            },
        );
        Ok(pid)
    }

    async fn start_task(&self, cns: &str, id: &str) -> Result<(), EngineError> {
        self.enter("start_task", cns, id)?;
        let mut st = self.lock();
        let t = st
            .namespaces
            .get_mut(cns)
            .and_then(|n| n.tasks.get_mut(id))
            .ok_or_else(|| not_found("start_task", id))?;
        t.status = TaskStatus::Running;
        Ok(())
    }

    async fn task(&self, cns: &str, id: &str) -> Result<TaskInfo, EngineError> {
        self.enter("task", cns, id)?;
        let st = self.lock();
        st.namespaces
            .get(cns)
            .and_then(|n| n.tasks.get(id))
            .map(|t| TaskInfo {
                pid: t.pid,
                status: t.status,
            })
            .ok_or_else(|| not_found("task", id))
    }

    async fn wait_task(&self, cns: &str, id: &str) -> Result<u32, EngineError> {
        self.enter("wait_task", cns, id)?;
        let mut rx = {
            let st = self.lock();
            st.namespaces
                .get(cns)
                .and_then(|n| n.tasks.get(id))
                .map(|t| t.exit.subscribe())
                .ok_or_else(|| not_found("wait_task", id))?
        };
        loop {
            if let Some(status) = *rx.borrow_and_update() {
                return Ok(status);
            }
            if rx.changed().await.is_err() {
                // The task was deleted under the wait: by containerd while
                // the connection is gone, or by a call.
                if self.lock().down {
                    return Err(EngineError::Unavailable {
                        what: "wait_task",
                        message: "transport error".into(),
                    });
                }
                return Err(not_found("wait_task", id));
            }
        }
    }

    async fn kill_task(
        &self,
        cns: &str,
        id: &str,
        signal: Signal,
        _all: bool,
    ) -> Result<(), EngineError> {
        self.enter("kill_task", cns, id)?;
        let mut st = self.lock();
        let t = st
            .namespaces
            .get_mut(cns)
            .and_then(|n| n.tasks.get_mut(id))
            .ok_or_else(|| not_found("kill_task", id))?;
        if t.status != TaskStatus::Stopped {
            t.status = TaskStatus::Stopped;
            t.exit.send_replace(Some(128 + signal as u32));
        }
        Ok(())
    }

    async fn delete_task(&self, cns: &str, id: &str) -> Result<u32, EngineError> {
        self.enter("delete_task", cns, id)?;
        let mut st = self.lock();
        let n = st
            .namespaces
            .get_mut(cns)
            .ok_or_else(|| not_found("delete_task", id))?;
        match n.tasks.get(id) {
            None => Err(not_found("delete_task", id)),
            Some(t) if t.status == TaskStatus::Running => Err(EngineError::Failed {
                what: "delete_task",
                code: Code::FailedPrecondition,
                message: "task must be stopped before deletion: running".into(),
            }),
            Some(_) => {
                let t = n.tasks.remove(id).expect("looked up above");
                let status = (*t.exit.borrow()).unwrap_or(0);
                Ok(status)
            }
        }
    }

    async fn images(&self, cns: &str) -> Result<Vec<ImageRecord>, EngineError> {
        self.enter("images", cns, "")?;
        let st = self.lock();
        Ok(st
            .namespaces
            .get(cns)
            .map(|n| n.images.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn delete_image(&self, cns: &str, name: &str) -> Result<(), EngineError> {
        self.enter("delete_image", cns, name)?;
        let mut st = self.lock();
        st.namespaces
            .get_mut(cns)
            .and_then(|n| n.images.remove(name))
            .map(|_| ())
            .ok_or_else(|| not_found("delete_image", name))
    }

    async fn content_info(&self, cns: &str, digest: &str) -> Result<ContentInfo, EngineError> {
        self.enter("content_info", cns, digest)?;
        let st = self.lock();
        st.namespaces
            .get(cns)
            .and_then(|n| n.content.get(digest).cloned())
            .ok_or_else(|| not_found("content_info", digest))
    }
}
