//! The reaper: stops a task whose deadline passed or that was cancelled.
//! SIGTERM to every process of the task, SIGKILL after the grace period;
//! and if containerd cannot deliver the signals, the reaper kills the
//! task's processes itself, found through the task's cgroup.
//!
//! Owns the stopping, not the deadlines: the runner hands it a task whose
//! time is up.

use std::future::Future;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tracing::error;

use crate::engine::{ops, Engine};
use crate::runner::RunError;

/// How long SIGKILL through containerd gets before the reaper does it.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Signals the task and waits for `exit`; returns its exit code.
pub async fn stop<F>(
    engine: &dyn Engine,
    cns: &str,
    id: &str,
    cgroups_path: &str,
    grace: Duration,
    exit: &mut F,
) -> Result<u32, RunError>
where
    F: Future<Output = Result<u32, RunError>> + Unpin,
{
    if !ops::kill(engine, cns, id, Signal::SIGTERM).await {
        kill_cgroup(cgroups_path, Signal::SIGTERM);
    }
    if let Ok(code) = tokio::time::timeout(grace, &mut *exit).await {
        return code;
    }
    if !ops::kill(engine, cns, id, Signal::SIGKILL).await {
        kill_cgroup(cgroups_path, Signal::SIGKILL);
    }
    if let Ok(code) = tokio::time::timeout(KILL_WAIT, &mut *exit).await {
        return code;
    }
    // containerd took the signal but the task lives on (a wedged shim, or
    // containerd itself is down): do it here, then keep waiting.
    error!(
        task = id,
        "task survived SIGKILL through containerd; killing its processes directly"
    );
    kill_cgroup(cgroups_path, Signal::SIGKILL);
    exit.await
}

/// Signals every process in the task's cgroup (v1 `pids`/`memory` or v2).
/// Returns how many were signalled.
pub fn kill_cgroup(cgroups_path: &str, signal: Signal) -> usize {
    let rel = cgroups_path.trim_start_matches('/');
    let mut n = 0;
    for root in [
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup",
    ] {
        let procs = format!("{root}/{rel}/cgroup.procs");
        let Ok(text) = std::fs::read_to_string(&procs) else {
            continue;
        };
        for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            if nix::sys::signal::kill(Pid::from_raw(pid), signal).is_ok() {
                n += 1;
            }
        }
        break;
    }
    n
}
