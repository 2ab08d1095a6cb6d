//! One runc shim per tenant namespace, kept alive between actions.
//!
//! containerd's runc v2 shim hosts every container whose spec carries the
//! same `io.containerd.runc.v2.group` annotation, and exits when its last
//! container is deleted. Without help, grouping only races: the shim of the
//! last action exits while the next action's task is joining it (`ttrpc:
//! closed`), and a shim per action costs three Go processes (the shim, and
//! on its exit containerd's `shim delete` and its `runc delete --force`).
//! So each namespace gets a keeper: a container in the group whose task is
//! created and never started. Its only process is runc's init, parked
//! before it would exec, as nobody, with no capabilities, in namespaces and
//! a cgroup of its own (`runtime-spec/keeper.json`); it never runs anything
//! from an image. The keeper is created before the namespace's first action
//! joins, so the shim always belongs to it, and deleted once the namespace
//! has had no action for `shim_keep_secs`, or when isolated stops.
//!
//! A shim creates its tasks one at a time (runc create runs under the
//! shim's lock), so a namespace gets up to `shims_per_namespace` shims, each
//! with its keeper, and an action joins the one with the fewest actions
//! (the first on ties, so a quiet namespace uses one shim).
//!
//! A keeper runs under its namespace's runtime (`runtime_binary`: runc,
//! crun or a path; its runtime options are the actions'), and the group's
//! name carries the binary's name when it is not runc, so that there is a
//! keeper per namespace and binary: a namespace whose binary changed across
//! a restart starts a new shim instead of joining the old one.
//!
//! Owns the keepers only. The actions' own tasks are the runner's; a shim
//! that dies takes its namespace's running actions with it, which the
//! runner reports like any other lost task.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_client::services::v1::container::Runtime;
use oci_spec::runtime::{RootBuilder, Spec};
use tracing::{info, warn};

use crate::engine::{ops, Container, Engine, EngineError, NewTask, Runtimes, LABEL_MANAGED};
use crate::spec::SHIM_GROUP_ANNOTATION;

/// The keepers' container ids are this and `.<n>`, the shim's number in
/// its namespace. Longer than any action id may be (64), so never an
/// action's, and within containerd's 76.
pub const KEEPER_ID_PREFIX: &str =
    "isolated.shim-keeper.holds-the-shim-of-this-namespace.never-started";

/// Most shims per namespace; keeps keeper ids within containerd's limit.
pub const MAX_SHIMS_PER_NAMESPACE: usize = 99;

fn keeper_id(n: usize) -> String {
    format!("{KEEPER_ID_PREFIX}.{n}")
}

/// Marks the keeper among isolated's containers (which all carry
/// `LABEL_MANAGED`), so that the start-up sweep tells it from an action.
pub const LABEL_ROLE: &str = "io.direktiv.isolate.role";
pub const ROLE_SHIM_KEEPER: &str = "shim-keeper";

const KEEPER_SPEC: &str = include_str!("../../runtime-spec/keeper.json");

/// Why a keeper could not be created. The action then runs in a shim of
/// its own, so this is logged, never reported.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum KeeperError {
    /// cannot prepare the keeper's root {path}: {source}
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
    /// the keeper spec runtime-spec/keeper.json is invalid: {0}
    Spec(String),
    /// the shim keeper: {0}
    Engine(#[from] EngineError),
}

/// Namespaces' keepers, created on demand and removed when idle.
#[derive(Clone)]
pub struct ShimKeepers {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Arc<dyn Engine>,
    runtimes: Runtimes,
    runtime: String,
    keep: Duration,
    per_namespace: usize,
    spec: Spec,
    namespaces: Mutex<HashMap<String, Arc<[Arc<Slot>]>>>,
}

/// One shim of a namespace and its keeper.
struct Slot {
    cns: String,
    n: usize,
    /// The group annotation of this shim's tasks.
    group: String,
    /// Actions that chose this shim and have not deleted their task yet.
    holds: AtomicUsize,
    /// Bumped by every hold, so an idle timer knows whether the shim was
    /// used while it slept.
    generation: AtomicU64,
    /// The keeper's parked process, if it exists; held while the keeper is
    /// created or removed.
    keeper: tokio::sync::Mutex<Option<Parked>>,
}

/// The keeper's process (runc's init, parked) and its parent, the shim,
/// each told from a later process with the same pid by its start time.
struct Parked {
    pid: u32,
    started: Option<u64>,
    shim: Option<u32>,
}

impl Parked {
    fn new(pid: u32) -> Parked {
        let stat = stat(pid);
        Parked {
            pid,
            started: stat.map(|s| s.started),
            shim: stat.map(|s| s.parent),
        }
    }

    /// False once the shim died. The parked process outlives it (orphaned,
    /// containerd's clean-up of the dead shim does not kill it), and the
    /// next action would start a shim of its own, which exits under the
    /// actions that join it later.
    fn running(&self) -> bool {
        let now = stat(self.pid);
        self.started.is_some()
            && now.map(|s| s.started) == self.started
            && now.map(|s| s.parent) == self.shim
    }

    /// Kills the parked process if it is still the one created.
    fn kill(&self) {
        if self.started.is_some() && stat(self.pid).map(|s| s.started) == self.started {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[derive(Clone, Copy)]
struct Stat {
    parent: u32,
    started: u64,
}

/// Fields 4 (ppid) and 22 (start time) of /proc/<pid>/stat, counted after
/// the command name (which may hold spaces and parentheses).
fn stat(pid: u32) -> Option<Stat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    Some(Stat {
        parent: fields.get(1)?.parse().ok()?,
        started: fields.get(19)?.parse().ok()?,
    })
}

/// One action's claim on a shim of its namespace; released (on drop) after
/// the action's task is deleted.
pub struct ShimHold {
    inner: Arc<Inner>,
    slot: Arc<Slot>,
}

impl ShimKeepers {
    /// `state_dir/shim-keeper` becomes the keepers' read-only root: empty
    /// but for `/keeper`, a file runc checks exists before it parks.
    pub fn new(
        engine: Arc<dyn Engine>,
        runtimes: Runtimes,
        runtime: &str,
        state_dir: &Path,
        keep: Duration,
        per_namespace: usize,
    ) -> Result<ShimKeepers, KeeperError> {
        let root = state_dir.join("shim-keeper");
        prepare_root(&root).map_err(|source| KeeperError::Root {
            path: root.clone(),
            source,
        })?;
        let mut spec: Spec =
            serde_json::from_str(KEEPER_SPEC).map_err(|e| KeeperError::Spec(e.to_string()))?;
        let root = RootBuilder::default()
            .path(root)
            .readonly(true)
            .build()
            .map_err(|e| KeeperError::Spec(e.to_string()))?;
        spec.set_root(Some(root));
        Ok(ShimKeepers {
            inner: Arc::new(Inner {
                engine,
                runtimes,
                runtime: runtime.to_string(),
                keep,
                per_namespace: per_namespace.clamp(1, MAX_SHIMS_PER_NAMESPACE),
                spec,
                namespaces: Mutex::default(),
            }),
        })
    }

    /// Chooses a shim of namespace `cns` for one action, makes sure its
    /// keeper runs, and claims it. `None` when the keeper cannot be
    /// created: the action then goes without a group, in a shim of its own.
    pub async fn hold(&self, cns: &str) -> Option<ShimHold> {
        let slots = self.inner.slots(cns);
        let slot = slots
            .iter()
            .min_by_key(|s| s.holds.load(Ordering::SeqCst))?
            .clone();
        // Counted before the keeper is made sure of, so that an idle timer
        // that wakes meanwhile leaves it be.
        slot.holds.fetch_add(1, Ordering::SeqCst);
        slot.generation.fetch_add(1, Ordering::SeqCst);
        let mut keeper = slot.keeper.lock().await;
        if let Some(lost) = keeper.take_if(|k| !k.running()) {
            warn!(namespace = %cns, keeper = slot.n, "the namespace's shim died; creating its keeper again");
            lost.kill();
            self.inner.remove(cns, &keeper_id(slot.n)).await;
        }
        if keeper.is_none() {
            match self.inner.create(&slot).await {
                Ok(parked) => *keeper = Some(parked),
                Err(e) => {
                    drop(keeper);
                    slot.holds.fetch_sub(1, Ordering::SeqCst);
                    warn!(namespace = %cns, error = %e, "no shim keeper; the action gets a shim of its own");
                    return None;
                }
            }
        }
        drop(keeper);
        Some(ShimHold {
            inner: self.inner.clone(),
            slot,
        })
    }

    /// Removes the keepers of namespaces with no action in them: at
    /// shutdown, so an idle node keeps no shims.
    pub async fn remove_idle(&self) {
        let all: Vec<Arc<Slot>> = self
            .inner
            .namespaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flat_map(|slots| slots.iter().cloned())
            .collect();
        for slot in all {
            let mut keeper = slot.keeper.lock().await;
            if slot.holds.load(Ordering::SeqCst) == 0 {
                if let Some(parked) = keeper.take() {
                    self.inner.remove(&slot.cns, &keeper_id(slot.n)).await;
                    // An orphan if the shim died: nobody else would end it.
                    parked.kill();
                }
            }
        }
    }

    /// Removes keeper `id` left by an earlier run of isolated (found by the
    /// start-up sweep, before any action runs). Tasks still running in its
    /// shim keep the shim.
    pub async fn remove_stale(&self, cns: &str, id: &str) {
        info!(namespace = %cns, keeper = %id, "removing the shim keeper of an earlier run");
        self.inner.remove(cns, id).await;
    }
}

impl Inner {
    fn slots(&self, cns: &str) -> Arc<[Arc<Slot>]> {
        self.namespaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(cns.to_string())
            .or_insert_with(|| {
                (0..self.per_namespace)
                    .map(|n| {
                        Arc::new(Slot {
                            cns: cns.to_string(),
                            n,
                            // A keeper per namespace and binary: the
                            // binary's tag keeps a shim of another binary
                            // (before a restart that changed it) apart.
                            group: format!(
                                "isolated-{cns}{}-{n}",
                                self.runtimes.of(cns).group_tag()
                            ),
                            holds: AtomicUsize::new(0),
                            generation: AtomicU64::new(0),
                            keeper: Default::default(),
                        })
                    })
                    .collect()
            })
            .clone()
    }

    async fn create(&self, slot: &Slot) -> Result<Parked, KeeperError> {
        let (cns, id) = (slot.cns.as_str(), keeper_id(slot.n));
        let mut spec = self.spec.clone();
        if let Some(linux) = spec.linux_mut() {
            linux.set_cgroups_path(Some(crate::engine::ops::action_cgroup(cns, &id).into()));
        }
        spec.annotations_mut()
            .get_or_insert_with(Default::default)
            .insert(SHIM_GROUP_ANNOTATION.to_string(), slot.group());
        let spec = crate::spec::to_any(&spec).map_err(|e| KeeperError::Spec(e.to_string()))?;
        let container = Container {
            id: id.clone(),
            labels: HashMap::from([
                (LABEL_MANAGED.to_string(), "true".to_string()),
                (LABEL_ROLE.to_string(), ROLE_SHIM_KEEPER.to_string()),
            ]),
            runtime: Some(Runtime {
                name: self.runtime.clone(),
                options: self.runtimes.of(cns).options(),
            }),
            spec: Some(spec),
            ..Default::default()
        };
        match self.engine.create_container(cns, container.clone()).await {
            Err(e) if e.is_already_exists() => {
                // A keeper whose removal failed, or one of an earlier run.
                self.remove(cns, &id).await;
                self.engine.create_container(cns, container).await?;
            }
            other => other?,
        }
        // No rootfs mounts and no stdio: the keeper's root is a read-only
        // directory of isolated's, and its init never writes.
        let task = NewTask {
            container_id: id.clone(),
            ..Default::default()
        };
        let pid = match ops::create_task(&*self.engine, cns, &task, self.runtimes.of(cns)).await {
            Ok(pid) => pid,
            Err(e) => {
                self.remove(cns, &id).await;
                return Err(e.into());
            }
        };
        info!(namespace = %cns, keeper = slot.n, pid, "shim keeper created");
        Ok(Parked::new(pid))
    }

    /// Deletes the keeper's task (its shim exits with it when no action is
    /// left in it) and container.
    async fn remove(&self, cns: &str, id: &str) {
        ops::delete_task(&*self.engine, cns, id).await;
        // A keeper left by containerd's absence is the next start's to sweep.
        let _ = ops::remove_container(&*self.engine, cns, id).await;
    }
}

impl Slot {
    /// The group annotation of this shim's tasks.
    fn group(&self) -> String {
        self.group.clone()
    }
}

impl ShimHold {
    /// The group annotation the action's task carries.
    pub fn group(&self) -> String {
        self.slot.group()
    }
}

impl Drop for ShimHold {
    /// The last action out starts the idle timer; a hold taken meanwhile
    /// (a new generation) cancels it.
    fn drop(&mut self) {
        // Given back at once, so that a shutdown right after sees it idle.
        if self.slot.holds.fetch_sub(1, Ordering::SeqCst) > 1 {
            return;
        }
        let (inner, slot) = (self.inner.clone(), self.slot.clone());
        let generation = slot.generation.load(Ordering::SeqCst);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            tokio::time::sleep(inner.keep).await;
            let mut keeper = slot.keeper.lock().await;
            if keeper.is_some()
                && slot.holds.load(Ordering::SeqCst) == 0
                && slot.generation.load(Ordering::SeqCst) == generation
            {
                inner.remove(&slot.cns, &keeper_id(slot.n)).await;
                if let Some(parked) = keeper.take() {
                    parked.kill();
                }
                info!(namespace = %slot.cns, keeper = slot.n, "shim keeper removed after its shim went idle");
            }
        });
    }
}

fn prepare_root(root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for d in ["dev", "proc"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let keeper = root.join("keeper");
    if !keeper.exists() {
        std::fs::write(&keeper, b"")?;
    }
    std::fs::set_permissions(&keeper, std::fs::Permissions::from_mode(0o555))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeper_id_is_no_action_id() {
        let limits = crate::config::Limits {
            max_input_bytes: 1024,
            ..Default::default()
        };
        let req = crate::proto::isolate::RunIsolateRequest {
            namespace: Some("ns".into()),
            action_id: Some(keeper_id(MAX_SHIMS_PER_NAMESPACE)),
            image: Some("busybox".into()),
            ..Default::default()
        };
        assert!(crate::request::ActionRequest::validate(req, &limits).is_err());
        // But a containerd identifier (at most 76 characters).
        assert!(keeper_id(MAX_SHIMS_PER_NAMESPACE).len() <= 76);
    }

    #[test]
    fn a_process_is_told_from_its_pid_reused() {
        let me = Parked::new(std::process::id());
        assert!(me.running());
        let reused = Parked {
            started: me.started.map(|s| s + 1),
            ..Parked::new(std::process::id())
        };
        assert!(!reused.running());
        let orphaned = Parked {
            shim: me.shim.map(|p| p + 1),
            ..Parked::new(std::process::id())
        };
        assert!(!orphaned.running());
        assert!(!Parked::new(u32::MAX).running());
    }

    #[test]
    fn keeper_spec_parses() {
        let spec: Spec = serde_json::from_str(KEEPER_SPEC).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &["/keeper".to_string()]);
        assert_eq!(p.user().uid(), 65534);
        assert!(p.no_new_privileges().unwrap_or(false));
    }
}
