//! The reaper: stops a task whose deadline passed or that was cancelled.
//! SIGTERM to every process of the task, SIGKILL after the grace period;
//! and if containerd cannot deliver the signals, the reaper kills the
//! task's processes itself, found through the task's cgroup.
//!
//! Owns the stopping, not the deadlines: the runner hands it a task whose
//! time is up.

use std::future::Future;
use std::time::Duration;

use containerd_client::services::v1::KillRequest;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tonic::Code;
use tracing::{error, warn};

use crate::containerd::{with_ns, Containerd};
use crate::runner::RunError;

/// How long SIGKILL through containerd gets before the reaper does it.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Signals the task and waits for `exit`; returns its exit code.
pub async fn stop<F>(
    cd: &Containerd,
    cns: &str,
    id: &str,
    cgroups_path: &str,
    grace: Duration,
    exit: &mut F,
) -> Result<u32, RunError>
where
    F: Future<Output = Result<u32, RunError>> + Unpin,
{
    // `all`: the init process of a PID namespace ignores signals it has no
    // handler for, so only signalling every process makes SIGTERM mean
    // anything to a shell-script action.
    if !kill(cd, cns, id, Signal::SIGTERM).await {
        kill_cgroup(cgroups_path, Signal::SIGTERM);
    }
    if let Ok(code) = tokio::time::timeout(grace, &mut *exit).await {
        return code;
    }
    if !kill(cd, cns, id, Signal::SIGKILL).await {
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

/// Asks containerd to signal every process of the task. False when
/// containerd could not be asked (a task already gone counts as done).
async fn kill(cd: &Containerd, cns: &str, id: &str, signal: Signal) -> bool {
    let req = KillRequest {
        container_id: id.to_string(),
        exec_id: String::new(),
        signal: signal as u32,
        all: true,
    };
    match cd.tasks().kill(with_ns(req, cns, None)).await {
        Ok(_) => true,
        Err(e) if e.code() == Code::NotFound => true,
        Err(e) => {
            warn!(?signal, error = %e.message(), "containerd cannot signal the task");
            false
        }
    }
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
