//! The reaper: stops a task whose deadline passed or that was cancelled.
//! SIGTERM to every process of the task, then SIGKILL after the grace
//! period. Owns no deadlines yet beyond the one it is handed.

use std::future::Future;
use std::time::Duration;

use containerd_client::services::v1::KillRequest;
use tonic::Code;
use tracing::warn;

use crate::containerd::{with_ns, Containerd};
use crate::runner::RunError;

/// Signals the task and waits for `exit`; returns its exit code.
pub async fn stop<F>(
    cd: &Containerd,
    cns: &str,
    id: &str,
    grace: Duration,
    exit: &mut F,
) -> Result<u32, RunError>
where
    F: Future<Output = Result<u32, RunError>> + Unpin,
{
    // `all`: the init process of a PID namespace ignores signals it has no
    // handler for, so only signalling every process makes SIGTERM mean
    // anything to a shell-script action.
    kill(cd, cns, id, libc_sig::SIGTERM).await;
    if let Ok(code) = tokio::time::timeout(grace, &mut *exit).await {
        return code;
    }
    kill(cd, cns, id, libc_sig::SIGKILL).await;
    exit.await
}

async fn kill(cd: &Containerd, cns: &str, id: &str, signal: u32) {
    let req = KillRequest {
        container_id: id.to_string(),
        exec_id: String::new(),
        signal,
        all: true,
    };
    if let Err(e) = cd.tasks().kill(with_ns(req, cns, None)).await {
        if e.code() != Code::NotFound {
            warn!(signal, error = %e.message(), "cannot signal the task");
        }
    }
}

mod libc_sig {
    pub const SIGTERM: u32 = nix::sys::signal::Signal::SIGTERM as u32;
    pub const SIGKILL: u32 = nix::sys::signal::Signal::SIGKILL as u32;
}
