//! `kill -9` of isolated with actions in flight, then a restart on the same state dir: the
//! running tasks are re-attached (containerd keeps them), the ones that never started are
//! started, one whose deadline passed meanwhile is stopped at once, and every one gets its
//! correct report exactly once.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use direktiv_isolate::proto::control::ActionState;

use super::{expect_output, sleep_input, sleep_then_echo, FAST_GRACE};
use crate::core::{expect_error, mentions_number};
use crate::harness::private::{now_ms, task_status, PrivateIsolated, TASK_RUNNING, TASK_STOPPED};
use crate::harness::{Ctx, ACTION, FIRST_PULL, NOTHING_LEFT};
use crate::reaper::CODE_TIMEOUT;

/// Two running actions when isolated is SIGKILLed: one that finishes its work after the
/// restart (its report is its output), one whose 2 s timeout expires while isolated is
/// down (killed at once after the restart and reported as timeout). Both tasks outlive the
/// daemon in containerd; after the restart both are reported once and nothing is left.
pub async fn sigkill_while_running(t: Ctx) -> Result<()> {
    let p = PrivateIsolated::start(t.env, &FAST_GRACE).await?;
    let cns = p.adopt(&t.ns);
    let res = async {
        let image = t.push(&sleep_then_echo()).await?;
        let work = t.action_id("work");
        let overdue = t.action_id("overdue");
        let mut req = t.request(&image.reference, &work);
        req.data = Some(sleep_input(4, &work));
        let work_input = req.data.clone().unwrap_or_default();
        p.accept(req).await?;
        let mut req = t.request(&image.reference, &overdue);
        req.data = Some(sleep_input(600, &overdue));
        req.timeout = Some(2);
        p.accept(req).await?;
        let work_before = p
            .wait_state(&t.ns, &work, ActionState::Running, FIRST_PULL)
            .await?;
        let overdue_info = p
            .wait_state(&t.ns, &overdue, ActionState::Running, FIRST_PULL)
            .await?;

        p.kill();
        ensure!(
            task_status(&t.env.containerd, &cns, &overdue).await? == Some(TASK_RUNNING),
            "the task of {overdue} did not survive isolated's death"
        );
        ensure!(
            task_status(&t.env.containerd, &cns, &work).await?.is_some(),
            "the task of {work} did not survive isolated's death"
        );
        // Let the deadline pass while nobody is watching it.
        let deadline_ms = overdue_info.started_at_ms + 2000;
        let wait_ms = (deadline_ms + 500 - now_ms()).max(0) as u64;
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        ensure!(
            task_status(&t.env.containerd, &cns, &overdue).await? == Some(TASK_RUNNING),
            "{overdue} stopped on its own"
        );

        let restarted_ms = now_ms();
        p.start_again().await?;
        // Re-attached, it keeps its original acceptance: never accepted after it started
        // (issue 14).
        let work_after = p.get(&t.ns, &work).await?;
        ensure!(
            work_after.accepted_at_ms == work_before.accepted_at_ms
                && work_after.accepted_at_ms <= work_after.started_at_ms
                && work_after.started_at_ms == work_before.started_at_ms,
            "after the restart {work} shows accepted at {} and started at {} (before: {} and {})",
            work_after.accepted_at_ms,
            work_after.started_at_ms,
            work_before.accepted_at_ms,
            work_before.started_at_ms
        );
        let report = t.env.flow.wait_report(&overdue, ACTION).await?;
        let took_ms = now_ms() - restarted_ms;
        let message = expect_error(&report, CODE_TIMEOUT)
            .context("an action whose deadline passed while isolated was down")?;
        ensure!(
            mentions_number(&message, 2),
            "errorMessage {message:?} does not name the 2 s timeout"
        );
        // Start-up, the 1 s grace period (SIGTERM is enough here) and the report.
        ensure!(
            took_ms <= 10_000,
            "the overdue action was reported {took_ms} ms after the restart, not at once"
        );
        let report = t.env.flow.wait_report(&work, ACTION).await?;
        expect_output(&report, &work_input)?;

        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await?;
        super::ensure_reported_once(&t.env.flow, [&work, &overdue])?;
        Ok(())
    }
    .await;
    res.map_err(|e| p.explain(e))
}

/// With room for two running actions: one that ends while isolated is down, one still
/// running at the restart, one accepted and queued that never started. After SIGKILL and
/// restart, all three are reported exactly once with their own output.
pub async fn sigkill_with_three_unfinished(t: Ctx) -> Result<()> {
    let mut args = FAST_GRACE.to_vec();
    args.extend(["--max-running", "2"]);
    let p = PrivateIsolated::start(t.env, &args).await?;
    let cns = p.adopt(&t.ns);
    let res = async {
        let image = t.push(&sleep_then_echo()).await?;
        let ids: Vec<String> = ["ends-while-down", "runs-on", "queued"]
            .iter()
            .map(|l| t.action_id(l))
            .collect();
        // The first must outlive the set-up of the other two, the second the first.
        let secs = [3, 8, 1];
        let mut inputs = Vec::new();
        for (i, (id, s)) in ids.iter().zip(secs).enumerate() {
            let mut req = t.request(&image.reference, id);
            req.data = Some(sleep_input(s, id));
            inputs.push(req.data.clone().unwrap_or_default());
            p.accept(req).await?;
            if i < 2 {
                // The third must find both slots taken.
                p.wait_state(&t.ns, id, ActionState::Running, FIRST_PULL)
                    .await?;
            }
        }
        let queued = p.get(&t.ns, &ids[2]).await?;
        ensure!(
            queued.state() == ActionState::Accepted,
            "the third action is not waiting for a slot: {queued:?}"
        );

        p.kill();
        ensure!(
            ids.iter().all(|id| t.env.flow.count(id) == 0),
            "an action was reported before isolated was killed"
        );
        // The first one's task ends with nobody to see it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match task_status(&t.env.containerd, &cns, &ids[0]).await? {
                Some(TASK_STOPPED) => break,
                Some(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                other => bail!("task of {} while isolated is down: {other:?}", ids[0]),
            }
        }
        ensure!(
            task_status(&t.env.containerd, &cns, &ids[1]).await? == Some(TASK_RUNNING),
            "{} is not running any more at the restart",
            ids[1]
        );
        ensure!(
            task_status(&t.env.containerd, &cns, &ids[2])
                .await?
                .is_none(),
            "{} has a task though it never got a slot",
            ids[2]
        );

        p.start_again().await?;
        for (id, input) in ids.iter().zip(&inputs) {
            let report = t.env.flow.wait_report(id, FIRST_PULL).await?;
            expect_output(&report, input)?;
        }
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await?;
        super::ensure_reported_once(&t.env.flow, &ids)?;
        Ok(())
    }
    .await;
    res.map_err(|e| p.explain(e))
}
