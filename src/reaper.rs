//! The reaper: stops a task whose deadline passed or that was cancelled.
//! SIGTERM to every process of the task, SIGKILL after the grace period
//! (both through `ops::signal_all`, which reaches every process on every
//! runtime, issue 15); and if the task outlives that, the reaper kills the
//! task's processes itself, found through the task's cgroup.
//!
//! Owns the stopping, not the deadlines: the runner hands it a task whose
//! time is up.

use std::future::Future;
use std::time::Duration;

use nix::sys::signal::Signal;
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
    ops::signal_all(engine, cns, id, cgroups_path, Signal::SIGTERM).await;
    if let Ok(code) = tokio::time::timeout(grace, &mut *exit).await {
        return code;
    }
    ops::signal_all(engine, cns, id, cgroups_path, Signal::SIGKILL).await;
    if let Ok(code) = tokio::time::timeout(KILL_WAIT, &mut *exit).await {
        return code;
    }
    // containerd took the signal but the task lives on (a wedged shim, or
    // containerd itself is down): do it here, then keep waiting.
    error!(
        task = id,
        "task survived SIGKILL through containerd; killing its processes directly"
    );
    ops::signal_cgroup(ops::CGROUP_ROOTS, cgroups_path, Signal::SIGKILL, |_| false);
    exit.await
}
