//! What a finished action must not leave behind (ISOLATE.md §6): containers, tasks and
//! non-committed snapshots in its containerd namespace, its cgroup, its data directories,
//! its disk (mount, loop device, image) and its network (namespace, attachment record,
//! IPAM lease); and the removal of the per-namespace cgroup directories after a run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::Kind;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{ListContainersRequest, ListTasksRequest};

use direktiv_isolate::runner::shim_keeper::KEEPER_ID_PREFIX;

use super::containerd::{list_snapshots, with_ns};
use super::env::Env;

impl Env {
    /// Everything that belongs to Direktiv namespace `ns` and should be gone once all its
    /// actions are reported; empty when clean. Committed snapshots (unpacked image layers)
    /// are the image cache and may stay.
    pub async fn leftovers(&self, ns: &str) -> Result<Vec<String>> {
        let cns = Self::containerd_namespace(ns);
        drop_pool(self.isolated.socket(), ns).await;
        self.leftovers_in(&cns, self.state_dir()).await
    }

    /// Like `leftovers`, for containerd namespace `cns` of the daemon whose state dir is
    /// `state_dir` (tests may run a second daemon with a prefix of its own).
    pub async fn leftovers_in(&self, cns: &str, state_dir: &Path) -> Result<Vec<String>> {
        let cns = cns.to_string();
        let channel = self.containerd.channel().await?;
        let mut left = Vec::new();

        let containers = ContainersClient::new(channel.clone())
            .list(with_ns(ListContainersRequest::default(), &cns))
            .await?
            .into_inner()
            .containers;
        left.extend(
            containers
                .iter()
                .filter(|c| !is_keeper(&c.id))
                .map(|c| format!("container {cns}/{}", c.id)),
        );

        let tasks = TasksClient::new(channel.clone())
            .list(with_ns(ListTasksRequest::default(), &cns))
            .await?
            .into_inner()
            .tasks;
        left.extend(
            tasks
                .iter()
                .filter(|t| !is_keeper(&t.id))
                .map(|t| format!("task {cns}/{} (pid {}, status {})", t.id, t.pid, t.status)),
        );

        let mut snaps = SnapshotsClient::new(channel);
        for s in list_snapshots(&mut snaps, &cns).await? {
            if s.kind != Kind::Committed as i32 {
                let kind = Kind::try_from(s.kind).map_or("unknown", |k| k.as_str_name());
                left.push(format!("snapshot {cns}/{} ({kind})", s.name));
            }
        }

        for cgroup in action_cgroups(&cns) {
            let name = cgroup.file_name().unwrap_or_default().to_string_lossy();
            if name.split_once('@').is_some_and(|(_, id)| is_keeper(id)) {
                continue;
            }
            left.push(format!("cgroup {}", cgroup.display()));
        }
        for cgroup in namespace_cgroups(&cns) {
            if let Ok(entries) = std::fs::read_dir(&cgroup) {
                for e in entries.flatten().filter(|e| e.path().is_dir()) {
                    left.push(format!("cgroup {}", e.path().display()));
                }
            }
        }

        let dir = state_dir.join("actions").join(&cns);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                left.push(format!("state dir entry {}", e.path().display()));
            }
        }
        // Inputs spooled for the namespace's actions (`direktiv_isolate::inputs`).
        if let Ok(entries) = std::fs::read_dir(state_dir.join("inputs")) {
            for e in entries.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{cns}@"))
                {
                    left.push(format!("spooled input {}", e.path().display()));
                }
            }
        }
        left.extend(disk_leftovers(state_dir, &cns));
        left.extend(network_leftovers(state_dir, &cns));
        Ok(left)
    }

    /// Polls until nothing of `ns` is left; at the deadline fails listing what is.
    pub async fn assert_nothing_left(&self, ns: &str, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut interval = Duration::from_millis(20);
        loop {
            let left = self.leftovers(ns).await?;
            if left.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "namespace {ns}: still left {timeout:?} after the test's last report:\n  {}",
                    left.join("\n  ")
                );
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_millis(500));
        }
    }
}

/// Removes the pre-created tasks (issue 16) of Direktiv namespace `ns` of the daemon on
/// `socket`, waiting for those
/// being made: they wait for the next action by design, so a check that nothing of the
/// finished actions is left asks the daemon to drop them first and then finds everything
/// else gone, exactly. A daemon that is not up has none (a graceful stop removes them; the
/// next start sweeps those of a crash).
pub async fn drop_pool(socket: &Path, ns: &str) {
    use direktiv_isolate::proto::control::ListPoolRequest;
    if let Ok(mut c) = super::private::control_client(socket).await {
        let req = ListPoolRequest {
            drop: true,
            namespace: ns.to_string(),
        };
        let _ = c.list_pool(req).await;
    }
}

/// A namespace's shim keeper is no action's leftover: it stays, by design, until the
/// namespace has been idle for `shim_keep_secs` (the shim_keeper trials check that).
pub fn is_keeper(id: &str) -> bool {
    id.starts_with(KEEPER_ID_PREFIX)
}

/// The actions' disks of containerd namespace `cns` under `state_dir` (ISOLATE.md §8):
/// their mounts at the action directories, their images, and the loop devices backed by
/// them (a device outlives its image's removal while anything still holds it).
pub fn disk_leftovers(state_dir: &Path, cns: &str) -> Vec<String> {
    let mut left: Vec<String> = super::mounts::mounts_under(&state_dir.join("actions").join(cns))
        .into_iter()
        .map(|m| format!("mount {}", m.display()))
        .collect();
    let images = state_dir.join("disks").join(cns);
    if let Ok(entries) = std::fs::read_dir(&images) {
        for e in entries.flatten() {
            left.push(format!("disk image {}", e.path().display()));
        }
    }
    for (dev, file) in super::mounts::loops_under(&images) {
        left.push(format!("loop device {dev} ({})", file.display()));
    }
    left
}

/// The network state isolated keeps under `state_dir` for containerd namespace `cns`:
/// pinned network namespaces, attachment records, and host-local IPAM leases (whose
/// files hold the CNI container id, `<cns>--<actionId>`).
pub fn network_leftovers(state_dir: &Path, cns: &str) -> Vec<String> {
    let mut left = Vec::new();
    for sub in ["netns", "cni/attachments"] {
        if let Ok(entries) = std::fs::read_dir(state_dir.join(sub).join(cns)) {
            for e in entries.flatten() {
                left.push(format!("network state {}", e.path().display()));
            }
        }
    }
    let owner = format!("{cns}--");
    if let Ok(networks) = std::fs::read_dir(state_dir.join("cni/ipam")) {
        for net in networks.flatten() {
            for lease in std::fs::read_dir(net.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let held = std::fs::read_to_string(lease.path()).unwrap_or_default();
                if held.starts_with(&owner) {
                    left.push(format!("IPAM lease {}", lease.path().display()));
                }
            }
        }
    }
    left
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Cgroup directories named after containerd namespace `cns`, in every hierarchy (v1
/// controllers or the v2 tree), wherever below the root isolated puts them.
pub fn namespace_cgroups(cns: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, name: &str, depth: usize, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if e.file_name() == name {
                out.push(path);
            } else if depth > 0 {
                walk(&path, name, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new(CGROUP_ROOT), cns, 3, &mut out);
    out
}

/// Per-action cgroup directories of containerd namespace `cns`: isolated names them
/// `<cns>@<actionId>` under one parent of its own.
pub fn action_cgroups(cns: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, prefix: &str, depth: usize, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if e.file_name().to_string_lossy().starts_with(prefix) {
                out.push(e.path());
            } else if depth > 0 {
                walk(&e.path(), prefix, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new(CGROUP_ROOT), &format!("{cns}@"), 3, &mut out);
    out
}

/// Removes the (empty) cgroup directories of containerd namespace `cns`; a cgroup that
/// still has processes refuses, and is returned.
pub fn remove_namespace_cgroups(cns: &str) -> Vec<String> {
    fn rmdir_tree(dir: &Path, failed: &mut Vec<String>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    rmdir_tree(&e.path(), failed);
                }
            }
        }
        if let Err(e) = std::fs::remove_dir(dir) {
            failed.push(format!("cgroup {}: {e}", dir.display()));
        }
    }
    let mut failed = Vec::new();
    for dir in action_cgroups(cns) {
        if std::fs::remove_dir(&dir).is_err() {
            failed.push(format!("cgroup {}", dir.display()));
        }
    }
    for dir in namespace_cgroups(cns) {
        rmdir_tree(&dir, &mut failed);
    }
    failed
}
