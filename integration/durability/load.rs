//! Many clients at once, and the bound on the queue (ISOLATE.md §2, issue 4).

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use direktiv_isolate::proto::control::{ActionState, CancelIsolateRequest};

use super::{expect_output, sleep_input, sleep_then_echo, FAST_GRACE};
use crate::core::{echo_spec, expect_error};
use crate::harness::private::{isolate_client, PrivateIsolated};
use crate::harness::{Ctx, FIRST_PULL, NOTHING_LEFT};
use crate::reaper::CODE_CANCELLED;

/// 500 echo actions sent by 32 clients, each on its own connection, at once, to an
/// isolated with the default limits (32 running): each actionId is reported exactly once,
/// with its own input as its output, counted at the flow receiver.
pub async fn five_hundred_from_32_clients(t: Ctx) -> Result<()> {
    const ACTIONS: usize = 500;
    const CLIENTS: usize = 32;
    const ALL_REPORTED: Duration = Duration::from_secs(240);
    let p = PrivateIsolated::start(t.env, &FAST_GRACE).await?;
    p.adopt(&t.ns);
    let res = async {
        let image = t.push(&echo_spec()).await?;
        let requests: Vec<_> = (0..ACTIONS)
            .map(|i| {
                let id = t.action_id(&format!("n{i}"));
                let mut req = t.request(&image.reference, &id);
                req.data = Some(format!("{i} of {ACTIONS}: {id}").into_bytes());
                req
            })
            .collect();
        let started = tokio::time::Instant::now();
        let clients = (0..CLIENTS).map(|c| {
            let mine: Vec<_> = requests.iter().skip(c).step_by(CLIENTS).cloned().collect();
            let socket = p.socket().to_path_buf();
            async move {
                let mut client = isolate_client(&socket).await?;
                for req in mine {
                    let id = req.action_id.clone().unwrap_or_default();
                    client
                        .run_isolate(req)
                        .await
                        .with_context(|| format!("client {c}: RunIsolate({id})"))?;
                }
                Ok::<_, anyhow::Error>(())
            }
        });
        futures::future::try_join_all(clients).await?;
        let accepted_in = started.elapsed();

        // One poll over all of them: 500 waiters each rescanning every report would cost
        // more than the daemon under test.
        let mut pending: HashSet<&str> = requests
            .iter()
            .filter_map(|r| r.action_id.as_deref())
            .collect();
        let deadline = started + ALL_REPORTED;
        while !pending.is_empty() {
            if tokio::time::Instant::now() >= deadline {
                let mut some: Vec<&&str> = pending.iter().take(10).collect();
                some.sort();
                bail!(
                    "{} of {ACTIONS} actions not reported within {ALL_REPORTED:?}, e.g. {some:?}",
                    pending.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            pending.retain(|id| t.env.flow.count(id) == 0);
        }
        let reported_in = started.elapsed();
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await?;

        let mut wrong = Vec::new();
        for req in &requests {
            let id = req.action_id.as_deref().unwrap_or_default();
            let reports = t.env.flow.reports(id);
            if reports.len() != 1 {
                wrong.push(format!("{id}: reported {} times", reports.len()));
            } else if let Err(e) =
                expect_output(&reports[0], req.data.as_deref().unwrap_or_default())
            {
                wrong.push(format!("{e:#}"));
            }
        }
        ensure!(
            wrong.is_empty(),
            "{} of {ACTIONS} actions not reported exactly once with their output:\n  {}",
            wrong.len(),
            wrong.join("\n  ")
        );
        eprintln!(
            "{}: {ACTIONS} actions accepted in {accepted_in:?}, all reported in {reported_in:?}",
            t.name
        );
        Ok(())
    }
    .await;
    res.map_err(|e| p.explain(e))
}

/// One slot and a queue of one: with an action running and one waiting, the next request
/// is RESOURCE_EXHAUSTED and leaves nothing behind (the same id is accepted later, once
/// there is room). The two accepted ones are reported as usual.
pub async fn queue_full_is_resource_exhausted(t: Ctx) -> Result<()> {
    let mut args = FAST_GRACE.to_vec();
    args.extend(["--max-running", "1", "--max-queued", "1"]);
    let p = PrivateIsolated::start(t.env, &args).await?;
    p.adopt(&t.ns);
    let res = async {
        let image = t.push(&sleep_then_echo()).await?;
        let [running, queued, refused] = ["running", "queued", "refused"].map(|l| t.action_id(l));
        let request = |id: &str, secs: u32| {
            let mut req = t.request(&image.reference, id);
            req.data = Some(sleep_input(secs, id));
            req.timeout = Some(300);
            req
        };
        p.accept(request(&running, 600)).await?;
        p.wait_state(&t.ns, &running, ActionState::Running, FIRST_PULL)
            .await?;
        let queued_req = request(&queued, 0);
        p.accept(queued_req.clone()).await?;
        let refused_req = request(&refused, 0);
        match p.run(refused_req.clone()).await {
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {}
            other => bail!(
                "with one action running and one queued (limits 1 and 1): expected RESOURCE_EXHAUSTED, got {other:?}"
            ),
        }
        ensure!(
            p.get(&t.ns, &queued).await?.state() == ActionState::Accepted,
            "the queued action does not wait"
        );

        // Make room: the running one is cancelled, the queued one runs.
        p.control()
            .await?
            .cancel_isolate(CancelIsolateRequest {
                namespace: t.ns.clone(),
                action_id: running.clone(),
                reason: "making room".into(),
            })
            .await?;
        let report = t.env.flow.wait_report(&running, FIRST_PULL).await?;
        expect_error(&report, CODE_CANCELLED)?;
        let report = t.env.flow.wait_report(&queued, FIRST_PULL).await?;
        expect_output(&report, queued_req.data.as_deref().unwrap_or_default())?;

        ensure!(
            t.env.flow.count(&refused) == 0,
            "the refused request was run and reported"
        );
        p.accept(refused_req.clone())
            .await
            .context("the refused id, resent once there is room")?;
        let report = t.env.flow.wait_report(&refused, FIRST_PULL).await?;
        expect_output(&report, refused_req.data.as_deref().unwrap_or_default())?;
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await?;
        super::ensure_reported_once(&t.env.flow, [&running, &queued, &refused])?;
        Ok(())
    }
    .await;
    res.map_err(|e| p.explain(e))
}
