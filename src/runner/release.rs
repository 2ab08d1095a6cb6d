//! Releasing what an action used (issue 12's "release on collect"): its
//! task, container and snapshot (through `engine::ops`, the one removal),
//! its network, its disk (`crate::disk`: unmounted once the task's rootfs
//! is, its image removed), data directory and spooled input, and its hold
//! on the namespace's shim;
//! every step tolerates what is gone, so it runs after any failure and
//! again after a crash.

use std::path::Path;

use tracing::{info_span, warn, Instrument};

use super::{Action, Runner};
use crate::engine::ops;
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
    pub async fn remove_leftovers(&self, cns: &str, id: &str, dir: &Path) {
        self.remove_task_parts(cns, id).await;
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
        self.remove_task_parts(&a.cns, a.id()).await;
    }

    async fn remove_task_parts(&self, cns: &str, id: &str) {
        ops::remove_action(&*self.engine, cns, id, &self.cfg.snapshotter).await;
        let cgroup = ops::action_cgroup(cns, id);
        for failed in ops::remove_cgroup(&self.cgroup_mount, &cgroup, true).await {
            warn!(error = %failed, "cannot remove the action's cgroup");
        }
    }
}
