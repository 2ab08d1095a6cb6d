//! containerd restarted under a running action (issue 4): the shim and the task live on,
//! isolated reconnects, the action completes and is reported with its real result, and an
//! action accepted while containerd was down runs once it is back.
//!
//! The trial has a containerd and an isolated of its own: restarting the shared containerd
//! would break every trial running alongside.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use direktiv_isolate::proto::control::ActionState;

use super::{expect_output, sleep_input, sleep_then_echo, FAST_GRACE};
use crate::harness::private::{task_processes, PrivateContainerd, PrivateIsolated};
use crate::harness::{Ctx, ACTION, FIRST_PULL, NOTHING_LEFT};

/// containerd is stopped while the action sleeps, stays down until the action's processes
/// have ended (so its exit happens with no containerd to see it), and is started again.
pub async fn containerd_restart_while_running(t: Ctx) -> Result<()> {
    let mut cd = PrivateContainerd::start(t.env).await?;
    let p = PrivateIsolated::start_on(t.env, &cd.socket(), &FAST_GRACE).await?;
    let cns = p.adopt(&t.ns);
    cd.note_namespace(&cns);
    let res = async {
        let image = t.push(&sleep_then_echo()).await?;
        let id = t.action_id("across");
        let mut req = t.request(&image.reference, &id);
        req.data = Some(sleep_input(3, &id));
        let input = req.data.clone().unwrap_or_default();
        p.accept(req).await?;
        p.wait_state(&t.ns, &id, ActionState::Running, FIRST_PULL)
            .await?;
        let processes = task_processes(cd.get()?, &cns, &id).await?;
        ensure!(!processes.is_empty(), "the running task has no processes");

        cd.stop();
        ensure!(
            processes.iter().any(|p| p.alive()),
            "the task's processes died with containerd"
        );
        // Accepted with containerd down: it waits for containerd rather than fail.
        let late = t.action_id("while-down");
        let mut req = t.request(&image.reference, &late);
        req.data = Some(sleep_input(0, &late));
        let late_input = req.data.clone().unwrap_or_default();
        p.accept(req).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while processes.iter().any(|p| p.alive()) {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "the action's processes did not end on their own"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            t.env.flow.count(&id) == 0 && t.env.flow.count(&late) == 0,
            "reported while containerd was down: {}",
            t.env.flow.summary()
        );
        p.ensure_running()
            .context("isolated died while containerd was down")?;

        cd.start_again().await?;
        let report = t.env.flow.wait_report(&id, ACTION).await?;
        expect_output(&report, &input)?;
        let report = t.env.flow.wait_report(&late, ACTION).await?;
        expect_output(&report, &late_input)?;
        p.assert_nothing_left(cd.get()?, &t.ns, NOTHING_LEFT)
            .await?;
        super::ensure_reported_once(&t.env.flow, [&id, &late])?;
        Ok(())
    }
    .await;
    cd.conclude(p, res).await
}
