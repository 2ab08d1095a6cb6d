//! The operations on containerd that more than one part of the daemon needs,
//! written once (issue 12): removing an action's objects (the runner's
//! cleanup, recovery's orphan sweep and the shim keepers all use it), the
//! one kill (every process of an action, on every runtime: issue 15),
//! waiting for an exit across containerd restarts, a task create that
//! recovers from what a create cut short by a crash leaves, and the size
//! of an image as its content store holds it.
//! Retries are here because containerd can refuse under I/O load
//! (containerd #9309) and a crash can leave a bundle or a runc container
//! (containerd #6860).

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tracing::warn;

use super::{Engine, EngineError, NewTask, OciRuntime};

/// The bytes of everything image target `digest` references, following
/// the garbage collector's `containerd.io/gc.ref.content.*` labels (an
/// index to its manifests, a manifest to its config and layers), each blob
/// counted once: what an `image rm` could give back. Blobs the store lacks
/// (another platform's) count nothing; a containerd failure is returned.
pub async fn image_size(e: &dyn Engine, cns: &str, digest: &str) -> Result<u64, EngineError> {
    const GC_CONTENT: &str = "containerd.io/gc.ref.content.";
    let mut seen = std::collections::HashSet::new();
    let mut todo = vec![digest.to_string()];
    let mut size = 0;
    while let Some(d) = todo.pop() {
        // Bounded: a store's blobs are finite and each is visited once.
        if !seen.insert(d.clone()) {
            continue;
        }
        match e.content_info(cns, &d).await {
            Ok(info) => {
                size += info.size;
                todo.extend(
                    info.labels
                        .into_iter()
                        .filter(|(k, _)| k.starts_with(GC_CONTENT))
                        .map(|(_, v)| v),
                );
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(size)
}

/// Tries for a removal or a task create before giving up.
const ATTEMPTS: u32 = 3;

/// Removes the task, container and active snapshot `id` of `cns`. Each step
/// tolerates what is already gone, so it can run after any failure, and
/// again after a crash. A task still running has nobody left to stop it, so
/// it is killed first, or it would outlive its action. Returns what failed
/// after its retries, and whether the task at least is gone (a task that
/// could not be deleted keeps its container): the caller tries again later.
pub async fn remove_action(
    e: &dyn Engine,
    cns: &str,
    id: &str,
    snapshotter: &str,
) -> Result<(), Unremoved> {
    // Not the container while its task is there: containerd would remove
    // the record and leave the task, which no sweep lists.
    try_delete_task(e, cns, id)
        .await
        .map_err(|error| Unremoved {
            task_gone: false,
            error,
        })?;
    let container = remove_container(e, cns, id).await;
    // An action's snapshot is a GC root: nothing but this removes it
    // before the next start-up sweep.
    let snapshot = retried("snapshot", || e.remove_snapshot(cns, snapshotter, id)).await;
    container.and(snapshot).map_err(|error| Unremoved {
        task_gone: true,
        error,
    })
}

/// What [`remove_action`] could not remove, and why.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Unremoved {
    /// The task is gone; only its container or snapshot stayed. What the
    /// task's rootfs wrote to (the action's disk and directory) is free.
    pub task_gone: bool,
    pub error: EngineError,
}

/// Deletes container `id` (no snapshot of its own: a shim keeper's).
pub async fn remove_container(e: &dyn Engine, cns: &str, id: &str) -> Result<(), EngineError> {
    retried("container", || e.delete_container(cns, id)).await
}

/// A removal tried [`ATTEMPTS`] times; gone already counts as done. The
/// last failure when every try failed.
async fn retried<F, Fut>(what: &str, mut call: F) -> Result<(), EngineError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), EngineError>>,
{
    let mut attempt = 1;
    loop {
        match call().await {
            Ok(()) => return Ok(()),
            Err(err) if err.is_not_found() => return Ok(()),
            Err(err) if attempt == ATTEMPTS => {
                warn!(attempt, error = %err, "cannot remove the {what}");
                return Err(err);
            }
            Err(err) => {
                warn!(attempt, error = %err, "cannot remove the {what}");
                tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await;
                attempt += 1;
            }
        }
    }
}

/// Deletes a task, which also ends its shim when it was the shim's last;
/// returns its exit status if there was a task. containerd refuses to
/// delete a running task: it is killed, then deleted.
pub async fn delete_task(e: &dyn Engine, cns: &str, id: &str) -> Option<u32> {
    try_delete_task(e, cns, id).await.ok().flatten()
}

/// [`delete_task`], with the last failure when every try failed.
async fn try_delete_task(e: &dyn Engine, cns: &str, id: &str) -> Result<Option<u32>, EngineError> {
    let mut attempt = 1;
    loop {
        match e.delete_task(cns, id).await {
            Ok(status) => return Ok(Some(status)),
            Err(err) if err.is_not_found() => return Ok(None),
            Err(err) if attempt == ATTEMPTS => {
                warn!(attempt, error = %err, "cannot delete the task");
                return Err(err);
            }
            Err(err) => {
                warn!(attempt, error = %err, "cannot delete the task; killing it first");
                kill_and_wait(e, cns, id).await;
                tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await;
                attempt += 1;
            }
        }
    }
}

/// SIGKILL to every process of the task, then up to 5 s for its exit.
async fn kill_and_wait(e: &dyn Engine, cns: &str, id: &str) {
    if kill(e, cns, id, Signal::SIGKILL).await {
        let _ = tokio::time::timeout(Duration::from_secs(5), e.wait_task(cns, id)).await;
    }
}

/// Signals the task through containerd (`all`: every process, where the
/// runtime does that). False when containerd could not be asked; a task
/// already gone counts as done.
async fn kill_through(e: &dyn Engine, cns: &str, id: &str, signal: Signal, all: bool) -> bool {
    match e.kill_task(cns, id, signal, all).await {
        Ok(()) => true,
        Err(err) if err.is_not_found() => true,
        Err(err) => {
            warn!(?signal, error = %err, "containerd cannot signal the task");
            false
        }
    }
}

/// SIGKILL (or another signal) to the task through containerd, `all` set:
/// enough for a kill, since the kernel kills every process of a PID
/// namespace whose init dies. False when containerd could not be asked.
pub async fn kill(e: &dyn Engine, cns: &str, id: &str, signal: Signal) -> bool {
    kill_through(e, cns, id, signal, true).await
}

/// The one stop signal of an action: `signal` to every process of it,
/// once each, on every runtime. runc before 1.2 signalled every process
/// of the cgroup for a Kill with `all`; runc >= 1.2 and crun signal only
/// the init of a container with its own PID namespace (runc 1.2.0's
/// changelog: `kill --all` is ignored then, since the kernel ends the rest
/// when the init exits), so a shell that ignores SIGTERM kept its children
/// from ever seeing it and the action took the whole grace period. So the
/// init gets the signal through containerd (without `all`, or runc 1.1
/// would deliver it twice), and every other member of the action's cgroup
/// (`cgroups_path`, v1 or v2) gets it from here. Without containerd, the
/// whole cgroup gets it from here. Returns whether containerd took it.
///
/// The init is told by its pid in its own PID namespace (1), not by asking
/// containerd: a task's State makes the shim run `runc state`, and fifty
/// actions timing out at once took seconds longer with it.
///
/// The other members are signalled first, the init through containerd
/// after: containerd's Kill waits in the namespace's shim behind whatever
/// it is doing (a pool refill's `runc create`: 4.7 s in a TCG guest), and
/// the children's signal need not wait with it. An init missed because
/// containerd could not be asked gets the signal from here after all.
pub async fn signal_all(
    e: &dyn Engine,
    cns: &str,
    id: &str,
    cgroups_path: &str,
    signal: Signal,
) -> bool {
    signal_cgroup(CGROUP_ROOTS, cgroups_path, signal, is_namespace_init);
    let through = kill_through(e, cns, id, signal, false).await;
    if !through {
        signal_cgroup(CGROUP_ROOTS, cgroups_path, signal, |pid| {
            !is_namespace_init(pid)
        });
    }
    through
}

/// Whether `pid` is the init (pid 1) of its PID namespace: the last
/// `NSpid` of /proc/<pid>/status.
fn is_namespace_init(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|ids| ids.split_whitespace().last().map(|i| i == "1"))
        })
        .unwrap_or(false)
}

/// Where an action's cgroup is, relative path and all, in order: v1's
/// `pids` and `memory` hierarchies (one suffices, every controller holds
/// every process), then the v2 hierarchy. A hybrid host has both; the v1
/// path is the one runc and crun fill there.
pub const CGROUP_ROOTS: &[&str] = &[
    "/sys/fs/cgroup/pids",
    "/sys/fs/cgroup/memory",
    "/sys/fs/cgroup",
];

/// Signals every process listed in the `cgroup.procs` of `cgroups_path`
/// under the first of `roots` that has it, but those `skip` says were
/// signalled already. Returns how many were signalled.
pub fn signal_cgroup(
    roots: &[&str],
    cgroups_path: &str,
    signal: Signal,
    skip: impl Fn(u32) -> bool,
) -> usize {
    let rel = cgroups_path.trim_start_matches('/');
    for root in roots {
        let procs = Path::new(root).join(rel).join("cgroup.procs");
        let Ok(text) = std::fs::read_to_string(&procs) else {
            continue;
        };
        return text
            .lines()
            .filter_map(|l| l.trim().parse::<u32>().ok())
            .filter(|&pid| pid > 0 && !skip(pid))
            .filter(|&pid| nix::sys::signal::kill(Pid::from_raw(pid as i32), signal).is_ok())
            .count();
    }
    0
}

/// Where every hierarchy of the host's cgroups is mounted (v1: one
/// directory per controller; v2: the tree itself; hybrid: both).
pub const CGROUP_MOUNT: &str = "/sys/fs/cgroup";

/// The parent of every action's cgroup, in every hierarchy.
const CGROUP_PARENT: &str = "isolated";

/// The cgroup of action (or pre-created task, or shim keeper) `id` of
/// containerd namespace `cns`: flat, one directory per action under one
/// fixed parent, since runc removes the action's own directory and a
/// per-namespace parent would be left behind in every controller. `@` is
/// in neither a namespace nor an id, so the name is unambiguous (and the
/// sweep reads it back, [`cgroup_orphans`]).
pub fn action_cgroup(cns: &str, id: &str) -> String {
    format!("/{CGROUP_PARENT}/{cns}@{id}")
}

/// The hierarchies under `mount`: the mount itself (v2) and each
/// directory in it (v1's controllers, a hybrid host's `unified`); on a v2
/// host those directories are child cgroups, in which an action's path
/// simply does not exist.
fn hierarchies(mount: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![mount.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(mount) {
        out.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    out
}

/// Removes what is left of cgroup `cgroups_path` in every hierarchy under
/// `mount`, once its task is deleted. The runtime removes it itself on a
/// delete; what it leaves is a create cut short: containerd stopped while
/// a pre-created task was being made left the entry's `cpuset` directory
/// alone, its task never known to containerd (issue 16, seen on 1.6.20).
/// A member still inside (a runtime's init whose create was cut short)
/// has nobody left to end it and is killed first, with `kill_members`
/// (the sweep, which knows no task of it, leaves a cgroup with members
/// alone). Returns what could not be removed, one line each.
pub async fn remove_cgroup(mount: &Path, cgroups_path: &str, kill_members: bool) -> Vec<String> {
    let rel = cgroups_path.trim_start_matches('/');
    let mut failed = Vec::new();
    for dir in hierarchies(mount).into_iter().map(|h| h.join(rel)) {
        if !dir.is_dir() {
            continue;
        }
        let mut last = None;
        for attempt in 0..20 {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    last = None;
                    break;
                }
                // Only a member still inside is waited out; any other
                // refusal (EACCES, a read-only mount) will not change.
                Err(e) if !kill_members || e.raw_os_error() != Some(nix::libc::EBUSY) => {
                    last = Some(e);
                    break;
                }
                Err(e) => {
                    if attempt == 0 {
                        let root = dir.parent().and_then(Path::parent).unwrap_or(mount);
                        let root = root.to_string_lossy();
                        signal_cgroup(&[root.as_ref()], cgroups_path, Signal::SIGKILL, |_| false);
                    }
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        if let Some(e) = last {
            failed.push(format!("cannot remove cgroup {}: {e}", dir.display()));
        }
    }
    failed
}

/// The (containerd namespace, id) of every action cgroup under `mount`
/// whose namespace starts with `prefix`, in any hierarchy, each once: for
/// the sweep, since a create cut short leaves a cgroup and nothing else.
pub fn cgroup_orphans(mount: &Path, prefix: &str) -> std::collections::HashSet<(String, String)> {
    let mut out = std::collections::HashSet::new();
    for parent in hierarchies(mount)
        .into_iter()
        .map(|h| h.join(CGROUP_PARENT))
    {
        let Ok(entries) = std::fs::read_dir(parent) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((cns, id)) = name.split_once('@') {
                if cns.starts_with(prefix) && !id.is_empty() {
                    out.insert((cns.to_string(), id.to_string()));
                }
            }
        }
    }
    out
}

/// The exit status of the task's init. A lost connection to containerd is
/// not an exit: the wait is made again until containerd answers. A task
/// that is not found once containerd is back exited while it was down:
/// containerd 1.6 kept such a task (stopped, its shim alive, #6771), 1.7
/// and 2.x delete it while they load their shims (the shim of a task
/// without processes is taken for one leaked by a create cut short,
/// #6860), and its exit status with it; that is [`EngineError::ExitLost`].
pub async fn wait_exit(e: &dyn Engine, cns: &str, id: &str) -> Result<u32, EngineError> {
    let mut backoff = Duration::from_millis(100);
    let mut lost = false;
    loop {
        match e.wait_task(cns, id).await {
            Ok(status) => return Ok(status),
            Err(err) if err.is_unavailable() => {
                warn!(error = %err, "lost the wait on the task, waiting again");
                lost = true;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(err) if lost && err.is_not_found() => {
                warn!(error = %err, "the task is gone after containerd came back");
                return Err(EngineError::ExitLost {
                    what: "wait for the task",
                });
            }
            Err(err) => return Err(err),
        }
    }
}

/// Creates a task, recovering from what containerd says is in the way:
/// a grouped shim on its way out (its last task just deleted) as the task
/// asks to join it, a bundle of the same id left by a create cut short
/// (`mkdir …: file exists`), or runc still holding the id. Returns the
/// init's pid.
pub async fn create_task(
    e: &dyn Engine,
    cns: &str,
    task: &NewTask,
    runtime: &OciRuntime,
) -> Result<u32, EngineError> {
    let id = task.container_id.as_str();
    let mut attempt = 1;
    loop {
        let err = match e.create_task(cns, task.clone()).await {
            Ok(pid) => return Ok(pid),
            Err(err) => err,
        };
        if attempt >= ATTEMPTS {
            return Err(err);
        }
        match &err {
            EngineError::ShimGone { .. } => {
                delete_task(e, cns, id).await;
            }
            EngineError::LeakedBundle { bundle, .. } => {
                delete_task(e, cns, id).await;
                remove_leaked_bundle(bundle, cns, id);
            }
            EngineError::RuncIdTaken { .. } => {
                delete_task(e, cns, id).await;
                remove_leaked_runc_container(runtime, cns, id).await;
            }
            _ => return Err(err),
        }
        warn!(attempt, error = %err, "creating the task again");
        tokio::time::sleep(Duration::from_millis(250 * attempt as u64)).await;
        attempt += 1;
    }
}

/// A task create cut short (isolated killed while containerd was starting
/// the shim, containerd #6860) can leave the task's bundle directory, and a
/// shim, without a task containerd knows: every later create of the id
/// fails with `mkdir <bundle>: file exists`. When the bundle is this
/// action's own (`…/io.containerd.runtime.v2.task/<cns>/<id>`), its shim is
/// killed, its rootfs unmounted and the directory removed.
pub fn remove_leaked_bundle(bundle: &Path, cns: &str, id: &str) {
    let own = bundle.ends_with(format!("{cns}/{id}"))
        && bundle
            .to_str()
            .is_some_and(|p| p.contains("/io.containerd.runtime.v2.task/"));
    if !own || !bundle.is_dir() {
        return;
    }
    warn!(bundle = %bundle.display(), "removing the bundle of a task whose creation was cut short");
    if let Ok(pid) = std::fs::read_to_string(bundle.join("shim.pid")) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    let rootfs = bundle.join("rootfs");
    let _ = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH);
    // Never delete through a mount that is still there: it would be the
    // action's snapshot, not the bundle.
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &Path| std::fs::symlink_metadata(p).map(|m| m.dev()).ok();
    if rootfs.exists() && dev(&rootfs) != dev(bundle) {
        warn!(bundle = %bundle.display(), "the leaked bundle's rootfs is still mounted; leaving it");
        return;
    }
    if let Err(err) = std::fs::remove_dir_all(bundle) {
        warn!(bundle = %bundle.display(), error = %err, "cannot remove the leaked bundle");
    }
}

/// The other half of a create cut short: runc created the container, but
/// containerd never recorded the task, so runc refuses the id. A forced
/// delete under the shim's root, by the namespace's binary (runc or crun,
/// whose `delete --force` is the same), kills what runs and frees the id.
async fn remove_leaked_runc_container(runtime: &OciRuntime, cns: &str, id: &str) {
    let root = runtime.root_of(cns);
    let binary = runtime.binary().to_string();
    warn!(root = %root.display(), %binary, "removing a container left with the runtime by a task create cut short");
    let out = tokio::process::Command::new(runtime.binary().command())
        .arg("--root")
        .arg(&root)
        .args(["delete", "--force", id])
        .output()
        .await;
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            warn!(%binary, stderr = %String::from_utf8_lossy(&o.stderr).trim(), "the runtime's delete failed")
        }
        Err(err) => warn!(%binary, error = %err, "cannot run the runtime"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fake::{Fail, Fake};
    use crate::engine::Engine;

    #[tokio::test]
    async fn image_size_follows_the_gc_references_once() {
        use crate::engine::ContentInfo;
        let f = Fake::default();
        let refs = |r: &[(&str, &str)]| {
            r.iter()
                .map(|(k, v)| (format!("containerd.io/gc.ref.content.{k}"), v.to_string()))
                .collect()
        };
        f.blob(
            "n",
            "index",
            ContentInfo {
                size: 1,
                labels: refs(&[("m.0", "manifest"), ("m.1", "absent")]),
            },
        );
        f.blob(
            "n",
            "manifest",
            ContentInfo {
                size: 10,
                labels: refs(&[("config", "config"), ("l.0", "layer"), ("l.1", "layer")]),
            },
        );
        f.blob(
            "n",
            "config",
            ContentInfo {
                size: 100,
                ..Default::default()
            },
        );
        f.blob(
            "n",
            "layer",
            ContentInfo {
                size: 1000,
                ..Default::default()
            },
        );
        assert_eq!(image_size(&f, "n", "index").await.unwrap(), 1111);
        f.set_down(true);
        assert!(image_size(&f, "n", "index")
            .await
            .unwrap_err()
            .is_unavailable());
    }

    #[test]
    fn only_our_own_leaked_bundle_is_removed() {
        let t = tempfile::tempdir().unwrap();
        let ours = t
            .path()
            .join("io.containerd.runtime.v2.task/direktiv.ns/act-1");
        let other = t
            .path()
            .join("io.containerd.runtime.v2.task/direktiv.ns/act-2");
        std::fs::create_dir_all(ours.join("rootfs")).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        remove_leaked_bundle(&other, "direktiv.ns", "act-1");
        assert!(other.exists(), "another action's bundle was removed");
        remove_leaked_bundle(&ours, "direktiv.ns", "act-1");
        assert!(!ours.exists(), "our leaked bundle is still there");
    }

    #[tokio::test]
    async fn a_task_create_after_a_leaked_bundle_is_retried() {
        let t = tempfile::tempdir().unwrap();
        let bundle = t
            .path()
            .join("io.containerd.runtime.v2.task/direktiv.ns/act-1");
        std::fs::create_dir_all(&bundle).unwrap();
        let fake = Fake::default();
        fake.container("direktiv.ns", "act-1");
        fake.fail_next("create_task", Fail::LeakedBundle(bundle.clone()));
        let task = NewTask {
            container_id: "act-1".into(),
            ..Default::default()
        };
        let pid = create_task(&fake, "direktiv.ns", &task, &OciRuntime::default())
            .await
            .unwrap();
        assert!(pid > 0);
        assert!(!bundle.exists(), "the leaked bundle was not removed");
        // Another failure is not retried.
        fake.delete_task("direktiv.ns", "act-1").await.unwrap();
        fake.fail_next("create_task", Fail::Other);
        assert!(
            create_task(&fake, "direktiv.ns", &task, &OciRuntime::default())
                .await
                .is_err()
        );
    }

    /// A cgroup whose members are a `sleep` of this test and the task's
    /// init (this process itself, which must not be signalled again).
    #[test]
    fn every_member_of_the_cgroup_but_the_init_is_signalled() {
        let t = tempfile::tempdir().unwrap();
        let cg = t.path().join("isolated/direktiv.ns@act-1");
        std::fs::create_dir_all(&cg).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap();
        let me = std::process::id();
        std::fs::write(cg.join("cgroup.procs"), format!("{me}\n{}\n", child.id())).unwrap();
        let missing = t.path().join("pids");
        let roots = [missing.to_str().unwrap(), t.path().to_str().unwrap()];
        let n = signal_cgroup(
            &roots,
            "/isolated/direktiv.ns@act-1",
            Signal::SIGTERM,
            |pid| pid == me,
        );
        assert_eq!(n, 1, "only the child is signalled");
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(Signal::SIGTERM as i32));
        assert_eq!(
            signal_cgroup(&roots, "/isolated/none", Signal::SIGTERM, |_| false),
            0
        );
    }

    /// A v1 layout in a temporary directory: an action's cgroup left in
    /// two controllers, another action's beside it, a v2-style tree.
    #[tokio::test]
    async fn a_leftover_cgroup_is_removed_in_every_hierarchy_and_found_by_the_sweep() {
        let t = tempfile::tempdir().unwrap();
        let path = action_cgroup("direktiv.ns", "pool-1");
        assert_eq!(path, "/isolated/direktiv.ns@pool-1");
        let cpuset = t.path().join("cpuset/isolated/direktiv.ns@pool-1");
        let pids = t.path().join("pids/isolated/direktiv.ns@pool-1");
        let other = t.path().join("pids/isolated/direktiv.ns@act-2");
        let foreign = t.path().join("pids/isolated/someone.else@x");
        for d in [&cpuset, &pids, &other, &foreign] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::create_dir_all(t.path().join("memory")).unwrap();
        let found = cgroup_orphans(t.path(), "direktiv.");
        let want: std::collections::HashSet<_> = [
            ("direktiv.ns".to_string(), "pool-1".to_string()),
            ("direktiv.ns".to_string(), "act-2".to_string()),
        ]
        .into();
        assert_eq!(found, want);
        assert!(remove_cgroup(t.path(), &path, true).await.is_empty());
        assert!(!cpuset.exists() && !pids.exists(), "left in a hierarchy");
        assert!(other.exists(), "another action's cgroup was removed");
        assert!(
            remove_cgroup(t.path(), &path, true).await.is_empty(),
            "gone counts as done"
        );

        // One that cannot go (here: not empty) is named, not hidden.
        std::fs::write(other.join("cgroup.procs"), "").unwrap();
        let failed = remove_cgroup(t.path(), &action_cgroup("direktiv.ns", "act-2"), false).await;
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].contains("direktiv.ns@act-2"), "{failed:?}");
    }

    #[tokio::test]
    async fn removal_kills_a_running_task_and_tolerates_what_is_gone() {
        let fake = Fake::default();
        fake.container("ns", "a");
        fake.create_task(
            "ns",
            NewTask {
                container_id: "a".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        fake.start_task("ns", "a").await.unwrap();
        remove_action(&fake, "ns", "a", "overlayfs").await.unwrap();
        assert!(fake.is_empty("ns"), "{:?}", fake.objects("ns"));
        // Again: everything is gone, nothing fails.
        remove_action(&fake, "ns", "a", "overlayfs").await.unwrap();
    }
}
