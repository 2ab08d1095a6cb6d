//! CancelIsolate in isolated's control service: SIGTERM, SIGKILL after the grace period, a
//! cancelled report, nothing left; clear errors for what cannot be cancelled.

use std::time::Duration;

use anyhow::{bail, ensure, Result};
use direktiv_isolate::proto::control::{ActionState, CancelIsolateRequest};

use super::{marker, processes_of, CODE_CANCELLED, DEFAULT_GRACE_S, SLACK_S};
use crate::core::expect_error;
use crate::harness::private::{ensure_processes_gone, now_ms, wait_state, wait_task_gone};
use crate::harness::{Ctx, Env, ImageSpec, FIRST_PULL, NOTHING_LEFT};

fn cancel_req(ns: &str, id: &str, reason: &str) -> CancelIsolateRequest {
    CancelIsolateRequest {
        namespace: ns.to_string(),
        action_id: id.to_string(),
        reason: reason.to_string(),
    }
}

/// A running action cancelled through the control API is reported as cancelled with the
/// reason given, within the grace period and a few seconds, and none of its processes is
/// left. Cancelling it again is FAILED_PRECONDITION; cancelling an id that was never run,
/// or this id in another namespace, is NOT_FOUND.
pub async fn cancel_running_action(t: Ctx) -> Result<()> {
    let image = t.push(&ImageSpec::with_script("sleep 600")).await?;
    let marker = marker("cancel");
    let id = t.action_id("cancel");
    let mut req = t.request(&image.reference, &id);
    req.command = Some(format!("/action.sh {marker}"));
    req.timeout = Some(300);
    t.run(req)
        .await
        .map_err(|s| anyhow::anyhow!("RunIsolate: {s}"))?;
    let mut control = t.env.control_client().await?;
    wait_state(&mut control, &t.ns, &id, ActionState::Running, FIRST_PULL).await?;
    let cns = Env::containerd_namespace(&t.ns);
    let seen = processes_of(&t.env.containerd, &cns, &id, 2, Duration::from_secs(10)).await?;

    let reason = format!("stopped by {}", t.name);
    let cancelled_at = now_ms();
    let info = control
        .cancel_isolate(cancel_req(&t.ns, &id, &reason))
        .await?
        .into_inner();
    ensure!(
        info.action_id == id && info.namespace == t.ns,
        "CancelIsolate answered about another action: {info:?}"
    );
    let bound_s = DEFAULT_GRACE_S + SLACK_S;
    let report = t
        .env
        .flow
        .wait_report(&id, Duration::from_secs(bound_s as u64 + 10))
        .await?;
    let took_ms = now_ms() - cancelled_at;
    ensure_processes_gone(&seen, &marker)?;
    // The task itself may be deleted just after the report.
    wait_task_gone(&t.env.containerd, &cns, &id, NOTHING_LEFT).await?;
    let message = expect_error(&report, CODE_CANCELLED)?;
    ensure!(
        message.contains(&reason),
        "errorMessage {message:?} does not carry the reason {reason:?}"
    );
    ensure!(
        took_ms <= bound_s * 1000,
        "reported {took_ms} ms after the cancel, more than grace + {SLACK_S} s"
    );

    match control
        .cancel_isolate(cancel_req(&t.ns, &id, "again"))
        .await
    {
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {}
        other => bail!("cancel of a finished action: expected FAILED_PRECONDITION, got {other:?}"),
    }
    let unknown = t.action_id("never-run");
    match control
        .cancel_isolate(cancel_req(&t.ns, &unknown, ""))
        .await
    {
        Err(s) if s.code() == tonic::Code::NotFound => {}
        other => bail!("cancel of an unknown action: expected NOT_FOUND, got {other:?}"),
    }
    let other_ns = t.namespace("other");
    match control.cancel_isolate(cancel_req(&other_ns, &id, "")).await {
        Err(s) if s.code() == tonic::Code::NotFound => {}
        other => bail!(
            "cancel of the id in a namespace it never ran in: expected NOT_FOUND, got {other:?}"
        ),
    }
    ensure!(
        t.env.flow.count(&id) == 1,
        "action {id} reported {} times",
        t.env.flow.count(&id)
    );
    Ok(())
}
