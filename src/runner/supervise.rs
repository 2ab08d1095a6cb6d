//! Supervising a started task: its exit, its deadline or its cancel,
//! whichever comes first; the stop itself is the reaper's
//! (`crate::reaper`). The exit is waited for across containerd restarts,
//! and an exit containerd lost while it was down is stood for by the
//! result files the action left (issue 15).

use std::time::Duration;

use tracing::{info, warn};

use super::{Action, RunError, Runner};
use crate::actions::now_ms;
use crate::engine::{ops, EngineError};
use crate::reaper;
use crate::report::Stopped;

impl Runner {
    /// Waits for the task's exit, its deadline or its cancellation, and
    /// returns the exit code and why isolated stopped it, if it did.
    pub(super) async fn supervise<F>(
        &self,
        a: &Action,
        deadline_ms: i64,
        exit: &mut F,
    ) -> Result<(u32, Option<Stopped>), RunError>
    where
        F: std::future::Future<Output = Result<u32, RunError>> + Unpin,
    {
        let _timer = crate::metrics::timer(crate::metrics::Phase::Run);
        let left = Duration::from_millis((deadline_ms - now_ms()).max(0) as u64);
        let deadline = tokio::time::Instant::now() + left;
        let grace = self.cfg.kill_grace();
        tokio::select! {
            code = &mut *exit => match code {
                Err(RunError::Engine(EngineError::ExitLost { .. })) if has_result(a) => {
                    warn!("the task's exit status was lost while containerd was down (containerd >= 1.7 deletes such a task at its restart); the result files the action left stand for it, as of an exit 0");
                    Ok((0, None))
                }
                code => Ok((code?, None)),
            },
            _ = tokio::time::sleep_until(deadline) => {
                warn!(timeout_s = a.req.timeout.as_secs(), "deadline passed, stopping the task");
                let code = reaper::stop(&*self.engine, &a.cns, a.id(), &a.cgroups_path(), grace, exit).await?;
                Ok((code, Some(Stopped::Timeout(a.req.timeout))))
            }
            _ = a.handle.cancel.cancelled() => {
                info!("cancelled, stopping the task");
                let code = reaper::stop(&*self.engine, &a.cns, a.id(), &a.cgroups_path(), grace, exit).await?;
                Ok((code, Some(Stopped::Cancelled(a.handle.cancel_reason()))))
            }
        }
    }

    /// The task's exit, as a future to select on; registered before the
    /// task starts.
    pub(super) fn wait_exit(
        &self,
        a: &Action,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<u32, RunError>> + Send>> {
        let (engine, cns, id) = (self.engine.clone(), a.cns.clone(), a.id().to_string());
        Box::pin(async move { Ok(ops::wait_exit(&*engine, &cns, &id).await?) })
    }
}

/// Whether the action left a result file (`data.out` or `error.json`, of
/// any kind: `collect` judges them). Its exit status, if containerd lost
/// it, is then taken as 0: `error.json` counts whatever the status, and an
/// action that wrote `data.out` and then failed is the one case reported
/// wrongly, as its output instead of an exit error.
fn has_result(a: &Action) -> bool {
    let data = a.data_dir();
    ["data.out", "error.json"]
        .iter()
        .any(|f| std::fs::symlink_metadata(data.join(f)).is_ok())
}
