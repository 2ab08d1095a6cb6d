//! Release on collect and the durable cancel (issue 12; ISOLATE.md §10): while the flow
//! engine is down, a finished action keeps nothing but its stored report (no task,
//! container, snapshot, network namespace, IP lease or data dir), and every report arrives
//! once when the engine is back; a cancel acknowledged just before isolated is SIGKILLed is
//! carried out after the restart.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use direktiv_isolate::proto::control::{ActionState, CancelIsolateRequest};

use super::{ensure_reported_once, expect_output, sleep_input, sleep_then_echo, FAST_GRACE};
use crate::core::expect_error;
use crate::harness::cni::TestNet;
use crate::harness::flow::FlowReceiver;
use crate::harness::private::{task_status, PrivateIsolated, TASK_RUNNING};
use crate::harness::process::free_port;
use crate::harness::{Ctx, ImageSpec, ACTION, FIRST_PULL};
use crate::network::Daemon;
use crate::reaper::CODE_CANCELLED;

/// How long after an action's end its objects may still exist while its report is
/// undelivered: the release runs right after the result is stored.
const RELEASED_WITHIN: Duration = Duration::from_secs(10);

pub async fn flow_down_releases_everything(t: Ctx) -> Result<()> {
    let net = TestNet::create(t.env.dir())?;
    let res = flow_down(&t, &net).await;
    let failed = net.remove();
    res?;
    ensure!(failed.is_empty(), "removing the test bridge: {failed:?}");
    Ok(())
}

async fn flow_down(t: &Ctx, net: &TestNet) -> Result<()> {
    // Nobody listens on the flow port until the end: connections are refused, as with a
    // flow engine that is down.
    let flow_addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let daemon = Daemon::start(
        t.env,
        "flow-down",
        vec![
            "--cni-conf-dir".into(),
            net.conf_dir.display().to_string(),
            "--flow-endpoint".into(),
            flow_addr.to_string(),
        ],
    )
    .await?;
    let image = t.push(&sleep_then_echo()).await?;
    let mut ids = Vec::new();
    for i in 0..10 {
        let id = t.action_id(&format!("down{i}"));
        let mut req = t.request(&image.reference, &id);
        req.data = Some(sleep_input(1 + i % 3, &id));
        daemon.run(req).await?;
        ids.push(id);
    }
    let mut control = crate::harness::private::control_client(daemon.isolated.socket()).await?;
    for id in &ids {
        crate::harness::private::wait_state(
            &mut control,
            &t.ns,
            id,
            ActionState::Finished,
            FIRST_PULL,
        )
        .await?;
    }
    // All ten have ended, none is reported: nothing of them may be left but the report.
    daemon
        .assert_nothing_left_within(t.env, &t.ns, RELEASED_WITHIN)
        .await
        .context("while the flow engine is down")?;
    for id in &ids {
        let info = control
            .get_isolate(crate::harness::private::action_ref(&t.ns, id))
            .await?
            .into_inner();
        ensure!(
            info.state() == ActionState::Finished && info.report_attempts >= 1,
            "{id} is {:?} after {} attempts, before the flow engine is back",
            info.state(),
            info.report_attempts
        );
    }
    // The engine comes back: each report arrives, once, with its output.
    let flow = FlowReceiver::start_on(flow_addr).await?;
    let res = async {
        for id in &ids {
            let report = flow.wait_report(id, Duration::from_secs(60)).await?;
            let secs = report
                .output
                .as_deref()
                .and_then(|o| o.first())
                .map(|b| (b - b'0') as u32)
                .unwrap_or(0);
            expect_output(&report, &sleep_input(secs, id))?;
        }
        for id in &ids {
            crate::harness::private::wait_state(
                &mut control,
                &t.ns,
                id,
                ActionState::Reported,
                ACTION,
            )
            .await?;
        }
        ensure_reported_once(&flow, &ids)?;
        daemon.assert_nothing_left(t.env, &t.ns).await
    }
    .await;
    flow.shutdown();
    res
}

pub async fn cancel_survives_sigkill(t: Ctx) -> Result<()> {
    let p = PrivateIsolated::start(t.env, &FAST_GRACE).await?;
    let cns = p.adopt(&t.ns);
    let res = async {
        // Ignores SIGTERM, so the stop it is given after the cancel outlasts the SIGKILL
        // of the daemon right behind it.
        let image = t
            .push(&ImageSpec::with_script(
                "trap '' TERM\nwhile true; do sleep 1; done",
            ))
            .await?;
        let id = t.action_id("cancelled");
        let mut req = t.request(&image.reference, &id);
        req.timeout = Some(600);
        p.accept(req).await?;
        p.wait_state(&t.ns, &id, ActionState::Running, FIRST_PULL)
            .await?;
        let reason = format!("stopped by {}", t.name);
        p.control()
            .await?
            .cancel_isolate(CancelIsolateRequest {
                namespace: t.ns.clone(),
                action_id: id.clone(),
                reason: reason.clone(),
            })
            .await
            .context("CancelIsolate")?;
        p.kill();
        ensure!(
            task_status(&t.env.containerd, &cns, &id).await? == Some(TASK_RUNNING),
            "the task ended before isolated was killed: the restart would have nothing to cancel"
        );
        p.start_again().await?;
        let report = t.env.flow.wait_report(&id, ACTION).await?;
        let message = expect_error(&report, CODE_CANCELLED)
            .context("a cancel acknowledged before a SIGKILL")?;
        ensure!(
            message.contains(&reason),
            "errorMessage {message:?} lacks the reason {reason:?}"
        );
        p.assert_nothing_left(&t.env.containerd, &t.ns, crate::harness::NOTHING_LEFT)
            .await?;
        ensure_reported_once(&t.env.flow, [&id])
    }
    .await;
    res.map_err(|e| p.explain(e))
}
