//! Releasing what an action used (issue 12's "release on collect"): its
//! task, container and snapshot (through `engine::ops`, the one removal),
//! its network, its disk (`crate::disk`: unmounted once the task's rootfs
//! is, its image removed), data directory and spooled input, and its hold
//! on the namespace's shim;
//! every step tolerates what is gone, so it runs after any failure and
//! again after a crash. A release whose task cannot be removed (containerd
//! away, or a shim that refuses the delete) is kept whole and done again
//! (`Deferred`, `redo_releases`): nothing of it goes before its task does.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
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
    /// A task that cannot be removed leaves it all for
    /// [`Runner::redo_releases`] (a container or snapshot that stayed,
    /// only themselves): the rest must not go before the task's
    /// delete has unmounted its rootfs (the overlay writes to the disk and
    /// the directory), and a container and snapshot no sweep of a running
    /// daemon looks for would stay until its next start.
    pub async fn remove_leftovers(&self, cns: &str, id: &str, dir: &Path) {
        if let Err(e) = self.try_remove_leftovers(cns, id, dir).await {
            self.defer(cns, id, dir, 0, &e);
        }
    }

    /// Keeps a release whose task could not be removed for
    /// [`Runner::redo_releases`]; `failures` are the earlier refusals.
    fn defer(&self, cns: &str, id: &str, dir: &Path, failures: u32, e: &EngineError) {
        let (failures, wait) = if e.is_unavailable() {
            warn!(error = %e, "containerd is away; releasing the action once it is back");
            (failures, AWAY_RETRY)
        } else {
            let wait = refused_retry(failures);
            warn!(
                error = %e,
                retry_in_ms = wait.as_millis() as u64,
                "cannot remove the action's task; its release is tried again"
            );
            (failures + 1, wait)
        };
        self.deferred.add(Pending {
            cns: cns.to_string(),
            id: id.to_string(),
            dir: dir.to_path_buf(),
            failures,
            due: Instant::now() + wait,
        });
    }

    /// [`Runner::remove_leftovers`], but what containerd could not remove
    /// is the caller's: nothing else is touched while the task is there.
    async fn try_remove_leftovers(
        &self,
        cns: &str,
        id: &str,
        dir: &Path,
    ) -> Result<(), EngineError> {
        let parts = self.remove_task_parts(cns, id).await;
        if let Err(u) = &parts {
            if !u.task_gone {
                return parts.map_err(|u| u.error);
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
        // A container or snapshot that stayed is tried again, with the
        // rest, which finds itself gone.
        parts.map_err(|u| u.error)
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
    async fn remove_task_parts(&self, cns: &str, id: &str) -> Result<(), ops::Unremoved> {
        ops::remove_action(&*self.engine, cns, id, &self.cfg.snapshotter).await?;
        let cgroup = ops::action_cgroup(cns, id);
        for failed in ops::remove_cgroup(&self.cgroup_mount, &cgroup, true).await {
            warn!(error = %failed, "cannot remove the action's cgroup");
        }
        Ok(())
    }

    /// Releases again what [`Deferred`] holds, each once it is due, for
    /// the daemon's life: after containerd answers again for those that met
    /// it away, with a growing pause for a task containerd refuses to
    /// delete. What a stop leaves pending is the next start's sweep's: the
    /// action is no longer in the store by then, so all of it is an orphan.
    pub async fn redo_releases(self: Arc<Self>) {
        loop {
            match self.deferred.next_due() {
                None => self.deferred.wake.notified().await,
                Some(due) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(due) => {}
                        () = self.deferred.wake.notified() => {}
                    }
                }
            }
            let due = self.deferred.take_due(Instant::now());
            if due.is_empty() {
                continue;
            }
            self.wait_for_containerd(std::time::Instant::now() + super::CONTAINERD_WAIT)
                .await;
            info!(
                count = due.len(),
                "releasing what could not be released before"
            );
            for p in due {
                let span = info_span!("cleanup", namespace = %p.cns, action_id = %p.id);
                let tried = self
                    .try_remove_leftovers(&p.cns, &p.id, &p.dir)
                    .instrument(span.clone())
                    .await;
                if let Err(e) = tried {
                    span.in_scope(|| self.defer(&p.cns, &p.id, &p.dir, p.failures, &e));
                }
            }
        }
    }
}

/// The pause before a release that met containerd away is tried again
/// (after containerd answers): not a busy loop while it comes and goes.
const AWAY_RETRY: Duration = Duration::from_millis(500);

/// The pause before a release whose task containerd refused to delete
/// (after `ops::remove_action`'s own kills and tries) is tried again, its
/// `failures`-th time: 1 s doubling to 5 min, so a wedged shim costs a
/// warning every few minutes, not a loop, and one that recovers is
/// released soon after.
fn refused_retry(failures: u32) -> Duration {
    (Duration::from_secs(1) * 2u32.saturating_pow(failures.min(9))).min(Duration::from_secs(300))
}

/// A release kept for [`Runner::redo_releases`].
#[derive(Debug)]
pub struct Pending {
    cns: String,
    id: String,
    dir: PathBuf,
    /// How often containerd refused the task's removal (not counting
    /// containerd away).
    failures: u32,
    due: Instant,
}

/// Releases whose task could not be removed, for [`Runner::redo_releases`].
#[derive(Default)]
pub struct Deferred {
    pending: Mutex<Vec<Pending>>,
    wake: tokio::sync::Notify,
}

impl Deferred {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, p: Pending) {
        self.lock().push(p);
        // A permit is kept when the loop is not waiting: no wake-up is lost.
        self.wake.notify_one();
    }

    /// When the next kept release is due.
    fn next_due(&self) -> Option<Instant> {
        self.lock().iter().map(|p| p.due).min()
    }

    /// The kept releases due by `now`, taken out.
    fn take_due(&self, now: Instant) -> Vec<Pending> {
        let mut pending = self.lock();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut *pending)
            .into_iter()
            .partition(|p| p.due <= now);
        *pending = later;
        due
    }

    /// How many are kept now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_release_waits_longer_each_time_up_to_five_minutes() {
        let waits: Vec<u64> = (0..12).map(|f| refused_retry(f).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
    }
}
