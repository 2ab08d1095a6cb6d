//! A node's readiness and draining (issue 17): gRPC health of isolate.DirektivIsolate
//! follows what the node can take (queue full, containerd down), the capacity RPC says the
//! same with its counts and whether an image is cached, and a drain takes no new work,
//! lets running actions finish and keeps queued ones for the node's own next start, where
//! they run once.
//!
//! Each trial has an isolated of its own (and the first a containerd of its own: stopping
//! the shared one would break every trial alongside).

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use direktiv_isolate::proto::control::{ActionState, CapacityRequest, DrainRequest};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::{expect_output, sleep_input, sleep_then_echo, FAST_GRACE};
use crate::harness::private::{channel, PrivateContainerd, PrivateIsolated};
use crate::harness::{Ctx, ACTION, FIRST_PULL, NOTHING_LEFT};

/// Health is worked out every 200 ms and containerd pinged every second (src/readiness.rs);
/// this leaves room for a loaded machine.
const HEALTH_FOLLOWS: Duration = Duration::from_secs(10);
/// An isolatectl call that only asks the node.
const CTL: Duration = Duration::from_secs(20);

async fn health(socket: &Path) -> Result<ServingStatus> {
    let mut h = HealthClient::new(channel(socket).await?);
    Ok(h.check(HealthCheckRequest {
        service: "isolate.DirektivIsolate".into(),
    })
    .await
    .context("gRPC health check")?
    .into_inner()
    .status())
}

/// Waits until health answers `want`, for at most HEALTH_FOLLOWS.
async fn wait_health(socket: &Path, want: ServingStatus, when: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + HEALTH_FOLLOWS;
    loop {
        let now = health(socket).await?;
        if now == want {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "health still {} {HEALTH_FOLLOWS:?} after {when}, not {}",
            now.as_str_name(),
            want.as_str_name()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// max_running 1 and max_queued 1: one running action and one queued fill the node, and
/// health says NOT_SERVING (capacity: the queue is full) until the queued one starts;
/// containerd stopped makes it NOT_SERVING too, and SERVING again once it is back.
pub async fn health_follows_capacity(t: Ctx) -> Result<()> {
    let mut cd = PrivateContainerd::start(t.env).await?;
    let mut args = FAST_GRACE.to_vec();
    args.extend(["--max-running", "1", "--max-queued", "1"]);
    let p = PrivateIsolated::start_on(t.env, &cd.socket(), &args).await?;
    let cns = p.adopt(&t.ns);
    cd.note_namespace(&cns);
    let res = async {
        let socket = p.socket().to_path_buf();
        wait_health(&socket, ServingStatus::Serving, "start").await?;
        let image = t.push(&sleep_then_echo()).await?;
        let first = t.action_id("first");
        let mut req = t.request(&image.reference, &first);
        req.data = Some(sleep_input(4, &first));
        p.accept(req).await?;
        p.wait_state(&t.ns, &first, ActionState::Running, FIRST_PULL)
            .await?;
        let cached = p
            .control()
            .await?
            .node_capacity(CapacityRequest {
                namespace: t.ns.clone(),
                image: image.reference.clone(),
            })
            .await?
            .into_inner();
        ensure!(
            cached.image_cached && cached.running == 1 && cached.free_running == 0,
            "capacity with one action running: {cached:?}"
        );
        // The budget shows the running action's share, its size's 256 MiB and 1024 pids,
        // beside at most precreate_max (2) pre-created tasks of 1 MiB and 1 pid each
        // (issue 16).
        let memory_used = cached.total_memory_mib - cached.free_memory_mib;
        let pids_used = cached.total_pids - cached.free_pids;
        ensure!(
            cached.total_memory_mib > 256
                && (256..=258).contains(&memory_used)
                && (1024..=1026).contains(&pids_used),
            "the node budget with one size-0 action running: {cached:?}"
        );
        let elsewhere = p
            .control()
            .await?
            .node_capacity(CapacityRequest {
                namespace: format!("{}-other", t.ns),
                image: image.reference.clone(),
            })
            .await?
            .into_inner();
        ensure!(
            !elsewhere.image_cached,
            "the image is said to be cached in a namespace that never ran it"
        );

        let second = t.action_id("second");
        let mut req = t.request(&image.reference, &second);
        req.data = Some(sleep_input(0, &second));
        let second_input = req.data.clone().unwrap_or_default();
        p.accept(req).await?;
        wait_health(&socket, ServingStatus::NotServing, "the queue filled").await?;
        let full = p
            .control()
            .await?
            .node_capacity(CapacityRequest::default())
            .await?
            .into_inner();
        ensure!(
            !full.serving && full.not_serving_reason.contains("queue is full") && full.queued == 1,
            "capacity with the queue full: {full:?}"
        );
        // Beyond capacity RunIsolate stays RESOURCE_EXHAUSTED.
        let third = t.action_id("third");
        let refused = p.run(t.request(&image.reference, &third)).await.err();
        ensure!(
            refused.as_ref().map(|s| s.code()) == Some(tonic::Code::ResourceExhausted),
            "a RunIsolate beyond capacity gave {refused:?}"
        );
        // The queued action starts once the first ends: the node serves again.
        wait_health(&socket, ServingStatus::Serving, "the queue emptied").await?;
        expect_output(
            &t.env.flow.wait_report(&second, ACTION).await?,
            &second_input,
        )?;
        t.env.flow.wait_report(&first, ACTION).await?;

        cd.stop();
        wait_health(&socket, ServingStatus::NotServing, "containerd stopped").await?;
        let down = p
            .control()
            .await?
            .node_capacity(CapacityRequest::default())
            .await?
            .into_inner();
        ensure!(
            down.not_serving_reason
                .contains("containerd does not answer"),
            "capacity with containerd down: {down:?}"
        );
        cd.start_again().await?;
        wait_health(&socket, ServingStatus::Serving, "containerd came back").await?;
        p.assert_nothing_left(cd.get()?, &t.ns, NOTHING_LEFT)
            .await?;
        super::ensure_reported_once(&t.env.flow, [&first, &second])?;
        Ok(())
    }
    .await;
    cd.conclude(p, res).await
}

/// One action runs and one waits (max_running 1) when `isolatectl drain` comes: health is
/// NOT_SERVING at once, RunIsolate is UNAVAILABLE, the running one finishes and is
/// reported, the queued one never starts (still accepted, nothing of it in containerd)
/// and `drain --wait` returns. After a restart the queued one runs and is reported once.
pub async fn drain_keeps_queued_work_for_the_restart(t: Ctx) -> Result<()> {
    let mut args = FAST_GRACE.to_vec();
    args.extend(["--max-running", "1"]);
    let p = PrivateIsolated::start(t.env, &args).await?;
    p.adopt(&t.ns);
    let res = async {
        let socket = p.socket().to_path_buf();
        let image = t.push(&sleep_then_echo()).await?;
        let running = t.action_id("running");
        let mut req = t.request(&image.reference, &running);
        req.data = Some(sleep_input(3, &running));
        let running_input = req.data.clone().unwrap_or_default();
        p.accept(req).await?;
        p.wait_state(&t.ns, &running, ActionState::Running, FIRST_PULL)
            .await?;
        let queued = t.action_id("queued");
        let mut req = t.request(&image.reference, &queued);
        req.data = Some(sleep_input(0, &queued));
        let queued_input = req.data.clone().unwrap_or_default();
        p.accept(req).await?;

        let out = crate::operator::ctl(&socket, &["drain"], CTL).await?;
        ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("draining"),
            "isolatectl drain: {}",
            crate::operator::shown(&out)
        );
        wait_health(&socket, ServingStatus::NotServing, "the drain").await?;
        let refused = p
            .run(t.request(&image.reference, &t.action_id("late")))
            .await
            .err();
        ensure!(
            refused.as_ref().map(|s| s.code()) == Some(tonic::Code::Unavailable),
            "RunIsolate on a draining node gave {refused:?}"
        );
        let health_out = crate::operator::ctl(&socket, &["health"], CTL).await?;
        ensure!(
            health_out.status.code() == Some(1)
                && String::from_utf8_lossy(&health_out.stdout).contains("NOT_SERVING: draining"),
            "isolatectl health on a draining node: {}",
            crate::operator::shown(&health_out)
        );

        let waited = p
            .control()
            .await?
            .drain(DrainRequest { wait: true })
            .await?
            .into_inner();
        ensure!(
            waited.running == 0 && waited.draining,
            "drain --wait returned with {waited:?}"
        );
        expect_output(
            &t.env.flow.wait_report(&running, ACTION).await?,
            &running_input,
        )?;
        let info = p.get(&t.ns, &queued).await?;
        ensure!(
            info.state() == ActionState::Accepted && info.started_at_ms == 0,
            "the queued action was started by a draining node: {info:?}"
        );
        ensure!(
            t.env.flow.count(&queued) == 0,
            "the queued action was reported by a draining node"
        );

        // Its own restart runs it, once.
        p.stop();
        p.start_again().await?;
        expect_output(
            &t.env.flow.wait_report(&queued, ACTION).await?,
            &queued_input,
        )?;
        wait_health(&socket, ServingStatus::Serving, "the restart").await?;
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await?;
        super::ensure_reported_once(&t.env.flow, [&running, &queued])?;
        Ok(())
    }
    .await;
    res.map_err(|e| p.explain(e))
}
