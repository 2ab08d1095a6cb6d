//! Releasing what an action used (issue 12's "release on collect"): its
//! task, container and snapshot (through `engine::ops`, the one removal),
//! its network, its disk (`crate::disk`: unmounted once the task's rootfs
//! is, its image removed), data directory and spooled input, and its hold
//! on the namespace's shim;
//! every step tolerates what is gone, so it runs after any failure and
//! again after a crash. A release that meets containerd away is done again
//! once it is back (`Deferred`, `redo_releases`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, info_span, warn, Instrument};

use super::{Action, Runner};
use crate::engine::{ops, EngineError};
use crate::network::NetTarget;

impl Runner {
    /// Everything the action used, once its result is collected: the same
    /// cleanup as after any failure, and its hold on the namespace's shim.
    pub(super) async fn release(&self, a: &Action) {
        self.cleanup(a).instrument(info_span!("cleanup")).await;
        // The task is gone from the namespace's shim.
        drop(a.shim.lock().unwrap_or_else(|p| p.into_inner()).take());
    }

    /// Removes the task, container, snapshot, cgroup, network, disk,
    /// directory and spooled input of an action.
    pub async fn cleanup(&self, a: &Action) {
        crate::inputs::remove(&a.input);
        self.remove_leftovers(&a.cns, a.id(), a.dir()).await;
    }

    /// The one cleanup of what action `id` of `cns` (directory `dir`) used
    /// on the node, for the runner's release and for the sweep's orphans
    /// alike. Each step tolerates what is already gone, so it can run
    /// after any failure and again after a crash.
    /// A containerd away (a release beside the delivery meets one stopped
    /// just after the report, say) leaves it all for [`Runner::redo_releases`]
    /// once containerd is back: the rest must not go before the task's
    /// delete has unmounted its rootfs.
    pub async fn remove_leftovers(&self, cns: &str, id: &str, dir: &Path) {
        if let Err(e) = self.remove_task_parts(cns, id).await {
            if e.is_unavailable() {
                warn!(error = %e, "containerd is away; releasing the action once it is back");
                self.deferred.add(cns, id, dir);
                return;
            }
        }
        let net = NetTarget {
            cns,
            action_id: id,
            dir,
        };
        self.networks.detach(&net).await;
        // After the task's delete unmounted the overlay that writes to it.
        self.disks.release(cns, id, dir);
        if let Err(e) = std::fs::remove_dir_all(dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(dir = %dir.display(), error = %e, "cannot remove action directory");
            }
        }
        // The namespace's directory goes with its last action (it fails,
        // harmlessly, while another is in it; `prepare_dir` copes with one
        // removed under it), so quiet tenants leave no empty dirs behind.
        if let Some(ns_dir) = dir.parent() {
            let _ = std::fs::remove_dir(ns_dir);
        }
    }

    /// What a pre-created task the action took holds, before the action
    /// makes a task of its own in its place (issue 16): its task, container,
    /// snapshot and network, and its hold on the shim; its directory and
    /// disk go with `prepare_dir`, and its spooled input stays.
    pub(super) async fn unplace(&self, a: &Action) {
        self.cleanup_containerd(a).await;
        self.networks.detach(&a.net()).await;
        drop(a.shim.lock().unwrap_or_else(|p| p.into_inner()).take());
    }

    /// The task's half of cleanup: task, container, snapshot, and what a
    /// create cut short left of its cgroup.
    pub async fn cleanup_containerd(&self, a: &Action) {
        // The caller creates it again or gives up; either way it tells a
        // containerd that was away itself.
        let _ = self.remove_task_parts(&a.cns, a.id()).await;
    }

    /// Task, container and snapshot, then (once they are gone) the cgroup.
    async fn remove_task_parts(&self, cns: &str, id: &str) -> Result<(), EngineError> {
        ops::remove_action(&*self.engine, cns, id, &self.cfg.snapshotter).await?;
        let cgroup = ops::action_cgroup(cns, id);
        for failed in ops::remove_cgroup(&self.cgroup_mount, &cgroup, true).await {
            warn!(error = %failed, "cannot remove the action's cgroup");
        }
        Ok(())
    }

    /// Releases again what met containerd away ([`Deferred`]), each time
    /// containerd answers again, for the daemon's life. What a stop leaves
    /// pending is the next start's sweep's: the action is no longer in the
    /// store by then, so all of it is an orphan.
    pub async fn redo_releases(self: Arc<Self>) {
        loop {
            self.deferred.wake.notified().await;
            loop {
                let pending = std::mem::take(&mut *self.deferred.lock());
                if pending.is_empty() {
                    break;
                }
                self.wait_for_containerd(Instant::now() + super::CONTAINERD_WAIT)
                    .await;
                info!(
                    count = pending.len(),
                    "releasing what containerd's absence left"
                );
                for (cns, id, dir) in pending {
                    self.remove_leftovers(&cns, &id, &dir)
                        .instrument(info_span!("cleanup", namespace = %cns, action_id = %id))
                        .await;
                }
                // Not a busy loop while containerd comes and goes.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Releases that met containerd away, for [`Runner::redo_releases`]:
/// (containerd namespace, id, directory) each.
#[derive(Default)]
pub struct Deferred {
    pending: Mutex<Vec<(String, String, PathBuf)>>,
    wake: tokio::sync::Notify,
}

impl Deferred {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, String, PathBuf)>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, cns: &str, id: &str, dir: &Path) {
        self.lock()
            .push((cns.to_string(), id.to_string(), dir.to_path_buf()));
        // A permit is kept when the loop is not waiting: no wake-up is lost.
        self.wake.notify_one();
    }

    /// How many wait for containerd now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
