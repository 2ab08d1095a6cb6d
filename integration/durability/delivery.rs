//! At-least-once delivery (ISOLATE.md §3): a report the flow endpoint refuses is kept and
//! retried until acknowledged, by the same process or, after a crash, by the next one.

use std::time::Duration;

use anyhow::{ensure, Result};
use direktiv_isolate::proto::control::{ActionState, ListIsolatesRequest};

use super::{expect_output, FAST_GRACE};
use crate::core::echo_spec;
use crate::harness::private::{action_ref, PrivateIsolated};
use crate::harness::{Ctx, ImageSpec, ACTION, FIRST_PULL, NOTHING_LEFT};

/// The flow endpoint answers the action's report with UNAVAILABLE for 10 s: isolated keeps
/// retrying with backoff meanwhile, the operator sees the report pending (finished, not
/// reported, attempts counted), and the report arrives, once, after the endpoint is back.
///
/// Only this action's reports are refused, so the trials running alongside are not
/// delayed.
pub async fn flow_unavailable_for_10s(t: Ctx) -> Result<()> {
    const OUTAGE: Duration = Duration::from_secs(10);
    let flow = &t.env.flow;
    let image = t.push(&echo_spec()).await?;
    let id = t.action_id("outage");
    let mut req = t.request(&image.reference, &id);
    req.data = Some(format!("kept for {id}").into_bytes());
    let input = req.data.clone().unwrap_or_default();
    flow.refuse_action(&id, true);
    let res = async {
        t.run(req)
            .await
            .map_err(|s| anyhow::anyhow!("RunIsolate: {s}"))?;
        flow.wait_refused(&id, 1, FIRST_PULL).await?;
        let outage_ends = tokio::time::Instant::now() + OUTAGE;
        tokio::time::sleep_until(outage_ends).await;

        let refused = flow.refused_count(&id);
        ensure!(
            refused >= 3,
            "only {refused} delivery attempts in {OUTAGE:?} of outage: no retries with backoff"
        );
        let mut control = t.env.control_client().await?;
        let info = control
            .get_isolate(action_ref(&t.ns, &id))
            .await?
            .into_inner();
        ensure!(
            info.state() == ActionState::Finished && info.report_attempts as usize >= refused,
            "during the outage the action shows as {:?} with {} report attempts ({refused} refused)",
            info.state(),
            info.report_attempts
        );
        let pending = control
            .list_isolates(ListIsolatesRequest {
                namespace: t.ns.clone(),
                state: ActionState::Finished as i32,
            })
            .await?
            .into_inner()
            .actions;
        ensure!(
            pending.iter().any(|a| a.action_id == id),
            "ListIsolates(finished) does not show the undelivered report: {pending:?}"
        );
        ensure!(flow.count(&id) == 0, "a refused report counted as accepted");

        flow.refuse_action(&id, false);
        // Backoff is capped at 30 s (with jitter below it).
        let report = flow.wait_report(&id, Duration::from_secs(40)).await?;
        expect_output(&report, &input)?;
        t.env.assert_nothing_left(&t.ns, NOTHING_LEFT).await?;
        ensure!(
            flow.count(&id) == 1,
            "acknowledged {} times",
            flow.count(&id)
        );
        Ok(())
    }
    .await;
    flow.refuse_action(&id, false);
    res
}

/// A finished action whose report the flow endpoint refuses, then isolated SIGKILLed: the
/// restarted isolated delivers the stored report (it does not run the action again) once
/// the endpoint takes it, and cleans up after it.
pub async fn stored_report_survives_sigkill(t: Ctx) -> Result<()> {
    let flow = &t.env.flow;
    let p = PrivateIsolated::start(t.env, &FAST_GRACE).await?;
    p.adopt(&t.ns);
    let id = t.action_id("outbox");
    flow.refuse_action(&id, true);
    let res = async {
        let image = t.push(&echo_spec()).await?;
        let mut req = t.request(&image.reference, &id);
        req.data = Some(format!("stored for {id}").into_bytes());
        let input = req.data.clone().unwrap_or_default();
        p.accept(req).await?;
        flow.wait_refused(&id, 1, FIRST_PULL).await?;
        let before = p.get(&t.ns, &id).await?;
        ensure!(
            before.state() == ActionState::Finished && before.started_at_ms > 0,
            "the refused action is {before:?}"
        );

        p.kill();
        let refused = flow.refused_count(&id);
        p.start_again().await?;
        // The new process tries on its own, from the store.
        flow.wait_refused(&id, refused + 1, Duration::from_secs(30))
            .await?;
        let after = p.get(&t.ns, &id).await?;
        ensure!(
            after.state() == ActionState::Finished && after.started_at_ms == 0,
            "after the restart the action is {after:?}: its stored report should be pending, the action not run again"
        );

        flow.refuse_action(&id, false);
        let report = flow.wait_report(&id, Duration::from_secs(40)).await?;
        expect_output(&report, &input)?;
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await?;
        ensure!(
            flow.count(&id) == 1,
            "acknowledged {} times",
            flow.count(&id)
        );
        Ok(())
    }
    .await;
    flow.refuse_action(&id, false);
    res.map_err(|e| p.explain(e))
}

/// A flow engine that takes 4 MiB messages, as Direktiv's grpc-go server does: a 3 MiB
/// output arrives exactly; a 5 MiB one is reported at once as the io error naming both
/// sizes, not refused by the engine and retried forever (ISOLATE.md §10).
pub async fn reports_fit_a_4_mib_flow_engine(t: Ctx) -> Result<()> {
    let flow = crate::harness::flow::FlowReceiver::start_limited(4 << 20).await?;
    let endpoint = flow.addr().to_string();
    let p = PrivateIsolated::start(t.env, &["--flow-endpoint", &endpoint]).await?;
    p.adopt(&t.ns);
    let res = async {
        let image = t
            .push(&ImageSpec::with_script(
                "read n < /direktiv-data/data.in\nhead -c \"$n\" /dev/zero | tr '\\0' x > /direktiv-data/data.out",
            ))
            .await?;
        let fits = t.action_id("fits");
        let mut req = t.request(&image.reference, &fits);
        req.data = Some(format!("{}", 3 << 20).into_bytes());
        p.accept(req).await?;
        let report = flow.wait_report(&fits, FIRST_PULL).await?;
        let out = crate::core::expect_success(&report)?;
        ensure!(
            out.len() == 3 << 20 && out.iter().all(|b| *b == b'x'),
            "the 3 MiB output arrived as {} bytes",
            out.len()
        );
        let big = t.action_id("big");
        let mut req = t.request(&image.reference, &big);
        req.data = Some(format!("{}", 5 << 20).into_bytes());
        let sent = std::time::Instant::now();
        p.accept(req).await?;
        let report = flow.wait_report(&big, ACTION).await?;
        let message = crate::core::expect_error(&report, "au.com.direktiv.error.io")?;
        ensure!(
            message.contains(&(5u64 << 20).to_string()) && message.contains(&(4u64 << 20).to_string()),
            "the io error does not name both sizes: {message:?}"
        );
        ensure!(
            sent.elapsed() < Duration::from_secs(30) && flow.refused_count(&big) == 0,
            "the oversized report took {:?}",
            sent.elapsed()
        );
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await
    }
    .await;
    flow.shutdown();
    res.map_err(|e| p.explain(e))
}

/// A private isolated that gives a permanently refused report up after `secs`.
async fn giving_up_after(t: &Ctx, secs: &str) -> Result<PrivateIsolated> {
    let p = PrivateIsolated::start(t.env, &["--report-give-up-secs", secs]).await?;
    p.adopt(&t.ns);
    Ok(p)
}

/// The flow engine refuses two reports with FAILED_PRECONDITION (the instance ended):
/// with `report_give_up_secs` 3 their retries stop after 3 s and they are parked, listed
/// undeliverable with the engine's answer on one line, while another action's report flows.
/// A parked report survives SIGKILL and is not sent again by the next process; `report
/// drop` without `--yes` and without a terminal refuses; `report retry` delivers it once
/// the engine takes it; `report drop --yes` removes the other for good (ISOLATE.md §10).
pub async fn refused_report_is_parked_then_retried_or_dropped(t: Ctx) -> Result<()> {
    use crate::harness::flow::REFUSAL;
    use crate::operator::{ctl, shown};
    const GIVE_UP: Duration = Duration::from_secs(3);
    let flow = &t.env.flow;
    let p = giving_up_after(&t, "3").await?;
    let kept = t.action_id("kept");
    let dropped = t.action_id("dropped");
    for id in [&kept, &dropped] {
        flow.refuse_action_with(id, Some(tonic::Code::FailedPrecondition));
    }
    let res = async {
        let image = t.push(&echo_spec()).await?;
        let mut req = t.request(&image.reference, &kept);
        req.data = Some(format!("parked then delivered: {kept}").into_bytes());
        let input = req.data.clone().unwrap_or_default();
        p.accept(req).await?;
        p.accept(t.request(&image.reference, &dropped)).await?;
        flow.wait_refused(&kept, 1, FIRST_PULL).await?;
        let first_refused = std::time::Instant::now();

        // Others flow meanwhile.
        let other = t.action_id("other");
        p.accept(t.request(&image.reference, &other)).await?;
        flow.wait_report(&other, ACTION).await?;

        let parked = p
            .wait_state(&t.ns, &kept, ActionState::Undeliverable, Duration::from_secs(30))
            .await?;
        let parked_after = first_refused.elapsed();
        let refused = flow.refused_count(&kept);
        ensure!(
            parked.state() == ActionState::Undeliverable,
            "{kept} is {:?}, not undeliverable",
            parked.state()
        );
        // The first refusal was seen here after isolated got it: allow for that.
        ensure!(
            parked_after + Duration::from_millis(500) >= GIVE_UP && refused >= 3,
            "parked {parked_after:?} after the first refusal, after {refused} tries: retried too little"
        );
        ensure!(
            parked.report_last_code == "FailedPrecondition"
                && parked.report_last_message.contains("instance has ended")
                && !parked.report_last_message.contains('\n'),
            "the engine's last answer is shown as {:?} {:?} (it said {REFUSAL:?})",
            parked.report_last_code,
            parked.report_last_message
        );
        p.wait_state(&t.ns, &dropped, ActionState::Undeliverable, Duration::from_secs(30))
            .await?;

        let out = ctl(
            p.socket(),
            &["ls", "-n", &t.ns, "--state", "undeliverable"],
            ACTION,
        )
        .await?;
        let listed = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.code() == Some(0)
                && listed.contains(&kept)
                && listed.contains(&dropped)
                && !listed.contains(&other)
                && listed.contains("FailedPrecondition: instance has ended"),
            "ls --state undeliverable: {}",
            shown(&out)
        );

        // Kept across a crash, and not sent again by the next process.
        p.kill();
        p.start_again().await?;
        let after = p.get(&t.ns, &kept).await?;
        ensure!(
            after.state() == ActionState::Undeliverable
                && after.report_last_code == "FailedPrecondition",
            "after SIGKILL and a restart {kept} is {:?} with last answer {:?}",
            after.state(),
            after.report_last_code
        );
        ensure!(
            flow.refused_count(&kept) == refused,
            "{} tries after the report was parked",
            flow.refused_count(&kept) - refused
        );

        // No terminal to ask on and no --yes: nothing is dropped.
        let out = ctl(p.socket(), &["report", "drop", "-n", &t.ns, &kept], ACTION).await?;
        ensure!(
            out.status.code() == Some(2) && String::from_utf8_lossy(&out.stderr).contains("--yes"),
            "report drop without --yes or a terminal: {}",
            shown(&out)
        );
        ensure!(p.get(&t.ns, &kept).await?.state() == ActionState::Undeliverable);

        flow.refuse_action_with(&kept, None);
        let out = ctl(p.socket(), &["report", "retry", "-n", &t.ns, &kept], ACTION).await?;
        ensure!(out.status.code() == Some(0), "report retry: {}", shown(&out));
        let report = flow.wait_report(&kept, ACTION).await?;
        expect_output(&report, &input)?;
        p.wait_state(&t.ns, &kept, ActionState::Reported, ACTION).await?;

        let out = ctl(
            p.socket(),
            &["report", "drop", "--yes", "-n", &t.ns, &dropped],
            ACTION,
        )
        .await?;
        ensure!(out.status.code() == Some(0), "report drop --yes: {}", shown(&out));
        let gone = p.get(&t.ns, &dropped).await?;
        ensure!(
            gone.state() == ActionState::Reported && gone.dropped_at_ms > 0,
            "a dropped report shows as {gone:?}"
        );
        // Gone for good: not retried, not parked again after a restart.
        let out = ctl(p.socket(), &["report", "retry", "-n", &t.ns, &dropped], ACTION).await?;
        ensure!(
            out.status.code() == Some(1)
                && String::from_utf8_lossy(&out.stderr).contains("not undeliverable"),
            "report retry of a dropped report: {}",
            shown(&out)
        );
        p.stop();
        p.start_again().await?;
        let undeliverable = p
            .control()
            .await?
            .list_isolates(ListIsolatesRequest {
                namespace: t.ns.clone(),
                state: ActionState::Undeliverable as i32,
            })
            .await?
            .into_inner()
            .actions;
        ensure!(
            undeliverable.is_empty(),
            "after a restart still undeliverable: {undeliverable:?}"
        );
        ensure!(
            flow.count(&kept) == 1 && flow.count(&dropped) == 0,
            "acknowledged {} and {} times",
            flow.count(&kept),
            flow.count(&dropped)
        );
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await
    }
    .await;
    for id in [&kept, &dropped] {
        flow.refuse_action_with(id, None);
    }
    res.map_err(|e| p.explain(e))
}

/// UNAVAILABLE is transient: a report the engine answers so is retried well past
/// `report_give_up_secs` (2 s here), never parked, and delivered once the engine takes it.
pub async fn transient_refusal_is_retried_past_the_give_up_time(t: Ctx) -> Result<()> {
    const GIVE_UP: Duration = Duration::from_secs(2);
    let flow = &t.env.flow;
    let p = giving_up_after(&t, "2").await?;
    let id = t.action_id("transient");
    flow.refuse_action_with(&id, Some(tonic::Code::Unavailable));
    let res = async {
        let image = t.push(&echo_spec()).await?;
        let mut req = t.request(&image.reference, &id);
        req.data = Some(format!("retried: {id}").into_bytes());
        let input = req.data.clone().unwrap_or_default();
        p.accept(req).await?;
        flow.wait_refused(&id, 1, FIRST_PULL).await?;
        let first = std::time::Instant::now();
        // Refusals keep coming past twice the give-up time.
        while first.elapsed() < 2 * GIVE_UP {
            let n = flow.refused_count(&id);
            flow.wait_refused(&id, n + 1, Duration::from_secs(40))
                .await?;
        }
        let info = p.get(&t.ns, &id).await?;
        ensure!(
            info.state() == ActionState::Finished && info.report_last_code == "Unavailable",
            "{:?} after {:?} of UNAVAILABLE (last answer {:?}): a transient answer must not park",
            info.state(),
            first.elapsed(),
            info.report_last_code
        );
        flow.refuse_action_with(&id, None);
        let report = flow.wait_report(&id, Duration::from_secs(40)).await?;
        expect_output(&report, &input)?;
        ensure!(
            flow.count(&id) == 1,
            "acknowledged {} times",
            flow.count(&id)
        );
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await
    }
    .await;
    flow.refuse_action_with(&id, None);
    res.map_err(|e| p.explain(e))
}
