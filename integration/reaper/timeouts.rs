//! Timeouts (ISOLATE.md §5): SIGTERM at the deadline, SIGKILL after the grace period, a
//! timeout report within timeout + grace + a few seconds, and no process left.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use direktiv_isolate::proto::control::ActionState;

use super::{marker, processes_of, CODE_TIMEOUT, DEFAULT_GRACE_S, SLACK_S};
use crate::core::{expect_error, mentions_number};
use crate::harness::private::{
    ensure_processes_gone, now_ms, wait_state, wait_task_gone, PrivateIsolated,
};
use crate::harness::{Ctx, Env, ImageSpec, FIRST_PULL, NOTHING_LEFT};

/// Runs a `sleep 600` action (a shell with `sleep` under it, the shell's command line
/// carrying a marker) with a 2 s timeout on the shared isolated and checks the report's
/// code, message and timing, and that its processes are gone once it is reported.
/// `ignore_term` makes both the shell and `sleep` ignore SIGTERM (an ignored signal stays
/// ignored across exec), so only SIGKILL after the grace period can end them.
async fn time_out(t: &Ctx, ignore_term: bool) -> Result<i64> {
    let script = if ignore_term {
        "trap '' TERM\nsleep 600"
    } else {
        "sleep 600"
    };
    time_out_script(t, script).await
}

/// [`time_out`] with the action's own script.
async fn time_out_script(t: &Ctx, script: &str) -> Result<i64> {
    const TIMEOUT_S: i64 = 2;
    ensure!(
        !t.env
            .isolated
            .config()
            .extra_args
            .iter()
            .any(|a| a.starts_with("--kill-grace")),
        "the shared isolated no longer runs with the default grace period these bounds assume"
    );
    let image = t.push(&ImageSpec::with_script(script)).await?;
    let marker = marker("timeout");
    let id = t.action_id("sleep");
    let mut req = t.request(&image.reference, &id);
    req.command = Some(format!("/action.sh {marker}"));
    req.timeout = Some(TIMEOUT_S);
    t.run(req)
        .await
        .map_err(|s| anyhow::anyhow!("RunIsolate: {s}"))?;

    let mut control = t.env.control_client().await?;
    let running = wait_state(&mut control, &t.ns, &id, ActionState::Running, FIRST_PULL).await?;
    let cns = Env::containerd_namespace(&t.ns);
    let seen = processes_of(&t.env.containerd, &cns, &id, 2, Duration::from_secs(10)).await?;
    ensure!(
        seen.iter().any(|p| p.cmdline.contains(&marker)),
        "no process of the task carries the marker: {seen:?}"
    );

    let bound_s = TIMEOUT_S + DEFAULT_GRACE_S + SLACK_S;
    let report = t
        .env
        .flow
        .wait_report(&id, Duration::from_secs(bound_s as u64 + 10))
        .await?;
    let took_ms = now_ms() - running.started_at_ms;
    // Gone before the report: the task is deleted before the report is made.
    ensure_processes_gone(&seen, &marker)?;
    // The task itself may be deleted just after the report.
    wait_task_gone(&t.env.containerd, &cns, &id, NOTHING_LEFT).await?;
    let message = expect_error(&report, CODE_TIMEOUT)?;
    ensure!(
        mentions_number(&message, TIMEOUT_S as u64),
        "errorMessage {message:?} does not name the 2 s timeout"
    );
    ensure!(
        took_ms <= bound_s * 1000,
        "reported {took_ms} ms after the task started, more than timeout + grace + {SLACK_S} s = {bound_s} s"
    );
    ensure!(
        took_ms >= TIMEOUT_S * 1000,
        "reported {took_ms} ms after the task started, before its {TIMEOUT_S} s timeout"
    );
    Ok(took_ms)
}

/// An action that sleeps past its 2 s timeout is reported as timeout within timeout +
/// grace + 2 s; SIGTERM alone ends it (a shell script dies of it: the reaper signals every
/// process, not only the init process that ignores it), so well before the grace period
/// runs out; and no process of it exists afterwards.
pub async fn sleeping_action_times_out(t: Ctx) -> Result<()> {
    let took_ms = time_out(&t, false).await?;
    ensure!(
        took_ms < (2 + DEFAULT_GRACE_S) * 1000,
        "SIGTERM did not end the action: reported after {took_ms} ms, i.e. only the SIGKILL after the {DEFAULT_GRACE_S} s grace period did"
    );
    Ok(())
}

/// SIGTERM reaches every process of the action, not only its init (issue 15): the init
/// shell ignores TERM and waits for a child shell (with a `sleep` of its own) that does
/// not. The TERM at the timeout kills the child, the init's `wait` returns and the action
/// ends well before the grace period is over. Where only the init is signalled (runc >= 1.2
/// and crun, for a Kill with `all`, unless isolated signals the cgroup's other members
/// itself) it lasts until the SIGKILL after the grace period. The node tier runs the same
/// check with runc 1.3.6 and crun (`term_reaches_children`).
pub async fn sigterm_reaches_every_process(t: Ctx) -> Result<()> {
    let took_ms = time_out_script(
        &t,
        "/bin/sh -c 'sleep 600; :' &\ntrap '' TERM\nwait\necho after-term > /direktiv-data/data.out",
    )
    .await?;
    ensure!(
        took_ms < (2 + DEFAULT_GRACE_S) * 1000,
        "reported {took_ms} ms after the start: the child that dies of SIGTERM never got it, only the SIGKILL after the {DEFAULT_GRACE_S} s grace period ended the action"
    );
    Ok(())
}

/// An action that ignores SIGTERM is killed once the default 5 s grace period is over:
/// not before it (the grace period is honoured), not much after it, and nothing is left.
pub async fn sigterm_ignored_until_grace_ends(t: Ctx) -> Result<()> {
    let took_ms = time_out(&t, true).await?;
    // The deadline is taken a moment before `started_at`; allow for that.
    let floor = (2 + DEFAULT_GRACE_S) * 1000 - 300;
    ensure!(
        took_ms >= floor,
        "reported {took_ms} ms after the start: SIGKILL came before the {DEFAULT_GRACE_S} s grace period was over"
    );
    Ok(())
}

/// Fifty actions at once with timeouts of 1 to 5 s, every other one ignoring SIGTERM, on
/// an isolated with a 1 s grace period and a slot for each: every one is reported as
/// timeout with its own timeout, none before its deadline, none later than its timeout +
/// grace + 2 s after its start, and none leaves a process behind.
pub async fn fifty_staggered_timeouts(t: Ctx) -> Result<()> {
    const N: usize = 50;
    const GRACE_S: i64 = 1;
    // A pid budget for all fifty at their size's 1024 (issue 13's default keeps an eighth
    // of pid_max for the host, 28 actions at pid_max 32768): "a slot for each".
    let p = PrivateIsolated::start(
        t.env,
        &[
            "--kill-grace-secs",
            "1",
            "--max-running",
            "64",
            "--max-total-pids",
            "51200",
        ],
    )
    .await?;
    p.adopt(&t.ns);
    let res = async {
        let image = t
            .push(&ImageSpec::with_script(
                "if [ \"$(cat /direktiv-data/data.in)\" = ignore ]; then trap '' TERM; fi\nsleep 600",
            ))
            .await?;
        let marker = marker("fifty");
        let actions: Vec<(String, i64)> = (0..N)
            .map(|i| (t.action_id(&format!("st{i}")), 1 + (i % 5) as i64))
            .collect();
        let submits = actions.iter().enumerate().map(|(i, (id, timeout))| {
            let mut req = t.request(&image.reference, id);
            req.command = Some(format!("/action.sh {marker}"));
            req.timeout = Some(*timeout);
            req.data = Some(if i % 2 == 1 { b"ignore".to_vec() } else { b"term".to_vec() });
            p.accept(req)
        });
        futures::future::try_join_all(submits).await?;

        // Arrival times are taken as each report comes in, all waits running at once.
        let waits = actions.iter().map(|(id, _)| async move {
            let report = t.env.flow.wait_report(id, FIRST_PULL).await?;
            Ok::<_, anyhow::Error>((report, now_ms()))
        });
        let reports = futures::future::try_join_all(waits).await?;

        let mut late = Vec::new();
        for ((id, timeout), (report, arrived_ms)) in actions.iter().zip(&reports) {
            let message = expect_error(report, CODE_TIMEOUT)?;
            ensure!(
                mentions_number(&message, *timeout as u64),
                "{id}: errorMessage {message:?} does not name its {timeout} s timeout"
            );
            let info = p.get(&t.ns, id).await?;
            ensure!(info.started_at_ms > 0, "{id} never started: {info:?}");
            let took = arrived_ms - info.started_at_ms;
            let lived = info.finished_at_ms - info.started_at_ms;
            if lived < timeout * 1000 - 50 || took > (timeout + GRACE_S + SLACK_S) * 1000 {
                late.push(format!(
                    "{id}: timeout {timeout} s, finished after {lived} ms, reported after {took} ms"
                ));
            }
        }
        ensure!(
            late.is_empty(),
            "actions not reaped on time (bound: timeout + {GRACE_S} s grace + {SLACK_S} s):\n  {}",
            late.join("\n  ")
        );
        ensure_processes_gone(&[], &marker)?;
        p.assert_nothing_left(&t.env.containerd, &t.ns, crate::harness::NOTHING_LEFT)
            .await
            .context("after all fifty were reported")
    }
    .await;
    res.map_err(|e| p.explain(e))
}
