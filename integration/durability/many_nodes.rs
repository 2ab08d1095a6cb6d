//! Many nodes behind one flow engine (issue 17): three isolated, each with a containerd of
//! its own, and a client that balances as gRPC's `round_robin` with health checking does
//! (what Direktiv's Go client does with `dns:///`): it keeps a health watch on
//! `isolate.DirektivIsolate` per node, sends each action to the next node that is SERVING,
//! and moves to the next one when a node is unreachable.
//!
//! 300 actions: one node is full (health NOT_SERVING) for a while and gets nothing, one is
//! killed with SIGKILL mid-run and restarted later; every action is reported exactly once
//! with its own output, the killed node's accepted ones after it is back, and nothing is
//! left on any node.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use direktiv_isolate::proto::control::{ActionState, CancelIsolateRequest};
use direktiv_isolate::proto::isolate::RunIsolateRequest;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::{expect_output, sleep_input, sleep_then_echo, FAST_GRACE};
use crate::harness::private::{channel, isolate_client, PrivateContainerd, PrivateIsolated};
use crate::harness::{Ctx, ACTION, FIRST_PULL, NOTHING_LEFT};

const ACTIONS: usize = 300;
/// How long one action may take to find a node that takes it.
const PLACED_WITHIN: Duration = Duration::from_secs(30);

/// One node as the client sees it: its address and what its health watch last said.
struct Node {
    socket: PathBuf,
    serving: watch::Receiver<bool>,
    /// Actions this client placed on it.
    placed: AtomicUsize,
}

/// The client's balancer: round robin over the nodes whose health says SERVING.
struct RoundRobin {
    nodes: Vec<Node>,
    next: AtomicUsize,
    stop: tokio_util::sync::CancellationToken,
}

/// Keeps `tx` in step with the node's health, as grpc-go's health-checking client does:
/// a Watch stream, re-opened after a broken one; unreachable counts as not serving.
async fn watch_health(
    socket: PathBuf,
    tx: watch::Sender<bool>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let stream = async {
            let mut h = HealthClient::new(channel(&socket).await?);
            let s = h
                .watch(HealthCheckRequest {
                    service: "isolate.DirektivIsolate".into(),
                })
                .await?
                .into_inner();
            anyhow::Ok(s)
        };
        if let Ok(mut s) = stream.await {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    m = s.next() => match m {
                        Some(Ok(r)) => { let _ = tx.send(r.status() == ServingStatus::Serving); }
                        _ => break,
                    },
                }
            }
        }
        let _ = tx.send(false);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

impl RoundRobin {
    fn new(sockets: &[&Path]) -> Arc<Self> {
        let stop = tokio_util::sync::CancellationToken::new();
        let nodes = sockets
            .iter()
            .map(|s| {
                let (tx, rx) = watch::channel(false);
                tokio::spawn(watch_health(s.to_path_buf(), tx, stop.clone()));
                Node {
                    socket: s.to_path_buf(),
                    serving: rx,
                    placed: AtomicUsize::new(0),
                }
            })
            .collect();
        Arc::new(RoundRobin {
            nodes,
            next: AtomicUsize::new(0),
            stop,
        })
    }

    /// Sends `req` to the next serving node; returns which node took it.
    async fn place(&self, req: &RunIsolateRequest) -> Result<usize> {
        let deadline = tokio::time::Instant::now() + PLACED_WITHIN;
        let mut last_error = String::from("no node was serving");
        loop {
            for _ in 0..self.nodes.len() {
                let i = self.next.fetch_add(1, Ordering::SeqCst) % self.nodes.len();
                let node = &self.nodes[i];
                if !*node.serving.borrow() {
                    continue;
                }
                let sent = async {
                    let mut c = isolate_client(&node.socket).await?;
                    c.run_isolate(req.clone())
                        .await
                        .map_err(anyhow::Error::from)
                };
                match sent.await {
                    Ok(_) => {
                        node.placed.fetch_add(1, Ordering::SeqCst);
                        return Ok(i);
                    }
                    // Not accepted there (unreachable, draining, full): the next node.
                    Err(e) => last_error = format!("node {i}: {e:#}"),
                }
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "action {} found no node in {PLACED_WITHIN:?}: {last_error}",
                req.action_id()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_serving(&self, i: usize, want: bool) -> Result<()> {
        let mut rx = self.nodes[i].serving.clone();
        tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| *s == want))
            .await
            .with_context(|| format!("node {i}'s health never became serving={want}"))?
            .context("health watch ended")?;
        Ok(())
    }
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn three_nodes_round_robin(t: Ctx) -> Result<()> {
    let mut cds = Vec::new();
    for _ in 0..3 {
        cds.push(PrivateContainerd::start(t.env).await?);
    }
    let mut nodes = Vec::new();
    for (i, cd) in cds.iter_mut().enumerate() {
        let mut args = FAST_GRACE.to_vec();
        // Node 2 is small, so that one long action fills it.
        if i == 2 {
            args.extend(["--max-running", "1", "--max-queued", "1"]);
        } else {
            args.extend(["--max-running", "4"]);
        }
        let p = PrivateIsolated::start_on(t.env, &cd.socket(), &args).await?;
        cd.note_namespace(&p.adopt(&t.ns));
        nodes.push(p);
    }
    let res =
        async {
            let sockets: Vec<&Path> = nodes.iter().map(|p| p.socket()).collect();
            let rr = RoundRobin::new(&sockets);
            for i in 0..3 {
                rr.wait_serving(i, true).await?;
            }
            let image = t.push(&sleep_then_echo()).await?;
            let mut sent: Vec<(String, Vec<u8>, usize)> = Vec::new();
            let send = |n: usize, secs: u32| {
                let id = t.action_id(&format!("a{n}"));
                let mut req = t.request(&image.reference, &id);
                req.data = Some(sleep_input(secs, &id));
                (id, req)
            };

            // Node 2 filled: one long action runs there, one waits; health says NOT_SERVING
            // until the long one is cancelled.
            let mut fill = Vec::new();
            for k in 0..2 {
                let id = t.action_id(&format!("fill{k}"));
                let mut req = t.request(&image.reference, &id);
                req.data = Some(sleep_input(if k == 0 { 600 } else { 0 }, &id));
                nodes[2].accept(req.clone()).await?;
                fill.push((id, req.data.unwrap_or_default()));
            }
            rr.wait_serving(2, false).await?;
            let full_before = rr.nodes[2].placed.load(Ordering::SeqCst);
            for n in 0..100 {
                let (id, req) = send(n, 0);
                let node = rr.place(&req).await?;
                ensure!(node != 2, "{id} was sent to the full node");
                sent.push((id, req.data.unwrap_or_default(), node));
            }
            ensure!(rr.nodes[2].placed.load(Ordering::SeqCst) == full_before);

            // Node 1 dies with what it accepted (long enough to be running).
            for n in 100..104 {
                let (id, req) = send(n, 3);
                nodes[1].accept(req.clone()).await?;
                sent.push((id, req.data.unwrap_or_default(), 1));
            }
            let last_on_1 = sent.last().map(|s| s.0.clone()).unwrap_or_default();
            nodes[1]
                .wait_state(&t.ns, &last_on_1, ActionState::Running, FIRST_PULL)
                .await?;
            nodes[1].kill();
            let killed_at = rr.nodes[1].placed.load(Ordering::SeqCst);
            // The others take the new work at once: every action placed, none on node 1.
            for n in 104..250 {
                let (id, req) = send(n, 0);
                let node = rr.place(&req).await?;
                ensure!(node != 1, "{id} was placed on the killed node");
                sent.push((id, req.data.unwrap_or_default(), node));
            }
            ensure!(rr.nodes[1].placed.load(Ordering::SeqCst) == killed_at);

            // Node 1 back: its accepted actions are reported, and it takes work again; node 2
            // serves again once its long action is cancelled.
            nodes[1].start_again().await?;
            rr.wait_serving(1, true).await?;
            nodes[2]
                .control()
                .await?
                .cancel_isolate(CancelIsolateRequest {
                    namespace: t.ns.clone(),
                    action_id: fill[0].0.clone(),
                    reason: "the node was full long enough".into(),
                })
                .await?;
            rr.wait_serving(2, true).await?;
            for n in 250..ACTIONS - 2 {
                let (id, req) = send(n, 0);
                let node = rr.place(&req).await?;
                sent.push((id, req.data.unwrap_or_default(), node));
            }
            for i in 0..3 {
                let on = sent.iter().filter(|s| s.2 == i).count();
                eprintln!("many nodes: node {i} took {on} of {} actions", sent.len());
                ensure!(on > 0, "node {i} took no action");
            }
            for (id, input, node) in &sent {
                let report =
                    t.env.flow.wait_report(id, ACTION).await.with_context(|| {
                        format!("{id} (placed on node {node}) was never reported")
                    })?;
                expect_output(&report, input)?;
            }
            let cancelled = t.env.flow.wait_report(&fill[0].0, ACTION).await?;
            crate::core::expect_error(&cancelled, "au.com.direktiv.error.cancelled")?;
            expect_output(
                &t.env.flow.wait_report(&fill[1].0, ACTION).await?,
                &fill[1].1,
            )?;
            ensure!(
                sent.len() + fill.len() == ACTIONS,
                "{} actions sent",
                sent.len() + fill.len()
            );
            super::ensure_reported_once(
                &t.env.flow,
                sent.iter()
                    .map(|s| s.0.as_str())
                    .chain(fill.iter().map(|f| f.0.as_str())),
            )?;
            for (p, cd) in nodes.iter().zip(&cds) {
                p.assert_nothing_left(cd.get()?, &t.ns, NOTHING_LEFT)
                    .await?;
            }
            Ok(())
        }
        .await;
    let res = match res {
        Ok(()) => Ok(()),
        Err(e) => Err(nodes.iter().fold(e, |e, p| p.explain(e))),
    };
    drop(nodes);
    let mut swept = Vec::new();
    for cd in cds {
        swept.extend(cd.shutdown().await?);
    }
    res?;
    if !swept.is_empty() {
        bail!(
            "the private containerds still held:\n  {}",
            swept.join("\n  ")
        );
    }
    Ok(())
}
