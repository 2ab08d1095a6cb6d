//! The flow engine's side of the result callback: a real tonic server implementing
//! `flow.DirektivFlow` that records every report, can refuse them for a while (all, or one
//! action's with a chosen gRPC code), and lets tests wait for a given action's report.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use direktiv_isolate::proto::flow::direktiv_flow_server::{DirektivFlow, DirektivFlowServer};
use direktiv_isolate::proto::flow::ReportActionResultsRequest;
use tokio::sync::{oneshot, watch};
use tonic::{Request, Response, Status};

/// Outputs may be up to 32 MiB (ISOLATE.md §4); leave room for the envelope.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// What the receiver says when it refuses a report with a code other than UNAVAILABLE:
/// two lines, as an engine's message may be, to see them shown on one.
pub const REFUSAL: &str = "instance has ended\nstep moved on (refused by the test)";

#[derive(Default)]
struct State {
    accepted: Vec<ReportActionResultsRequest>,
    refused: Vec<ReportActionResultsRequest>,
    unavailable_until: Option<Instant>,
    unavailable: bool,
    /// Action ids whose reports are refused, with the code they are answered with,
    /// whatever the global switch says.
    refused_actions: std::collections::HashMap<String, tonic::Code>,
}

#[derive(Clone)]
pub struct FlowReceiver {
    state: Arc<Mutex<State>>,
    /// Bumped on every call, accepted or refused, so waiters re-check.
    changed: watch::Sender<u64>,
    addr: SocketAddr,
    shutdown: Arc<Mutex<Option<oneshot::Sender<()>>>>,
}

struct Service {
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
}

#[tonic::async_trait]
impl DirektivFlow for Service {
    async fn report_action_results(
        &self,
        request: Request<ReportActionResultsRequest>,
    ) -> Result<Response<()>, Status> {
        let report = request.into_inner();
        let refuse = {
            let mut st = self.state.lock().unwrap();
            let refuse = report
                .action_id
                .as_ref()
                .and_then(|id| st.refused_actions.get(id).copied())
                .or_else(|| {
                    (st.unavailable || st.unavailable_until.is_some_and(|t| Instant::now() < t))
                        .then_some(tonic::Code::Unavailable)
                });
            if refuse.is_some() {
                st.refused.push(report);
            } else {
                st.accepted.push(report);
            }
            refuse
        };
        self.changed.send_modify(|n| *n += 1);
        match refuse {
            Some(tonic::Code::Unavailable) => Err(Status::unavailable(
                "flow receiver is switched off by the test",
            )),
            Some(code) => Err(Status::new(code, REFUSAL)),
            None => Ok(Response::new(())),
        }
    }
}

impl FlowReceiver {
    /// Serves on a fresh 127.0.0.1 port in the current tokio runtime.
    pub async fn start() -> Result<Self> {
        Self::start_with("127.0.0.1:0".parse()?, None).await
    }

    /// Serves over TLS only (with `tls`'s client CA, mutual TLS), as a flow engine
    /// behind its own certificates would.
    /// Serves on `addr` (a port a daemon already reports to, as a flow engine coming back).
    pub async fn start_on(addr: SocketAddr) -> Result<Self> {
        Self::start_with(addr, None).await
    }

    /// Takes messages of at most `max` bytes, as Direktiv's flow (grpc-go's
    /// default receive limit, 4 MiB) does.
    pub async fn start_limited(max: usize) -> Result<Self> {
        Self::start_with_limit("127.0.0.1:0".parse()?, None, max).await
    }

    pub async fn start_tls_on(
        addr: SocketAddr,
        tls: tonic::transport::ServerTlsConfig,
    ) -> Result<Self> {
        Self::start_with(addr, Some(tls)).await
    }

    async fn start_with(
        addr: SocketAddr,
        tls: Option<tonic::transport::ServerTlsConfig>,
    ) -> Result<Self> {
        Self::start_with_limit(addr, tls, MAX_MESSAGE).await
    }

    async fn start_with_limit(
        addr: SocketAddr,
        tls: Option<tonic::transport::ServerTlsConfig>,
        max: usize,
    ) -> Result<Self> {
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls)?;
        }
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let (changed, _) = watch::channel(0u64);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let svc = DirektivFlowServer::new(Service {
            state: state.clone(),
            changed: changed.clone(),
        })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
        // As Direktiv's flow (a Go gRPC server: Go sets TCP_NODELAY) would.
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tokio::spawn(async move {
            let res = builder
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(e) = res {
                eprintln!("harness: flow receiver stopped with an error: {e}");
            }
        });
        Ok(Self {
            state,
            changed,
            addr,
            shutdown: Arc::new(Mutex::new(Some(stop_tx))),
        })
    }

    /// What isolated's `--flow-endpoint` is set to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for the first accepted report of `action_id`; at the deadline fails listing
    /// everything that did arrive.
    pub async fn wait_report(
        &self,
        action_id: &str,
        timeout: Duration,
    ) -> Result<ReportActionResultsRequest> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            if let Some(r) = self.reports(action_id).into_iter().next() {
                return Ok(r);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => bail!("flow receiver closed while waiting for {action_id}"),
                Err(_) => bail!(
                    "no report for action {action_id} within {timeout:?}; received so far: {}",
                    self.summary()
                ),
            }
        }
    }

    /// Waits until `n` reports of `action_id` arrived (one id in several namespaces).
    pub async fn wait_reports(
        &self,
        action_id: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<ReportActionResultsRequest>> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            let got = self.reports(action_id);
            if got.len() >= n {
                return Ok(got);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => bail!("flow receiver closed while waiting for {action_id}"),
                Err(_) => bail!(
                    "{} of {n} reports for {action_id} within {timeout:?}",
                    got.len()
                ),
            }
        }
    }

    /// Accepted reports for `action_id`, in arrival order.
    pub fn reports(&self, action_id: &str) -> Vec<ReportActionResultsRequest> {
        let st = self.state.lock().unwrap();
        st.accepted
            .iter()
            .filter(|r| r.action_id.as_deref() == Some(action_id))
            .cloned()
            .collect()
    }

    /// How many reports for `action_id` were accepted (delivery is exactly once towards a
    /// receiver that always acknowledges).
    pub fn count(&self, action_id: &str) -> usize {
        self.reports(action_id).len()
    }

    /// How many reports for `action_id` were refused.
    pub fn refused_count(&self, action_id: &str) -> usize {
        let st = self.state.lock().unwrap();
        st.refused
            .iter()
            .filter(|r| r.action_id.as_deref() == Some(action_id))
            .count()
    }

    /// Answers reports of `action_id` with UNAVAILABLE until switched back. Unlike the
    /// global switches this leaves the trials running in parallel alone.
    pub fn refuse_action(&self, action_id: &str, on: bool) {
        self.refuse_action_with(action_id, on.then_some(tonic::Code::Unavailable));
    }

    /// Answers reports of `action_id` with `code` (and [`REFUSAL`]) until called with
    /// None.
    pub fn refuse_action_with(&self, action_id: &str, code: Option<tonic::Code>) {
        let mut st = self.state.lock().unwrap();
        match code {
            Some(code) => {
                st.refused_actions.insert(action_id.to_string(), code);
            }
            None => {
                st.refused_actions.remove(action_id);
            }
        }
    }

    /// Answers every report with UNAVAILABLE until switched back. This delays the reports
    /// of every trial running in parallel too.
    pub fn set_unavailable(&self, on: bool) {
        self.state.lock().unwrap().unavailable = on;
    }

    /// Answers every report with UNAVAILABLE for `duration` from now (affects parallel
    /// trials too).
    pub fn unavailable_for(&self, duration: Duration) {
        self.state.lock().unwrap().unavailable_until = Some(Instant::now() + duration);
    }

    /// Waits until at least `n` reports for `action_id` have been refused.
    pub async fn wait_refused(&self, action_id: &str, n: usize, timeout: Duration) -> Result<()> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            if self.refused_count(action_id) >= n {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                bail!(
                    "action {action_id}: {} refused deliveries within {timeout:?}, wanted {n}",
                    self.refused_count(action_id)
                );
            }
        }
    }

    /// One line per accepted report: action id, error code, output size.
    pub fn summary(&self) -> String {
        let st = self.state.lock().unwrap();
        if st.accepted.is_empty() {
            return format!("nothing ({} refused)", st.refused.len());
        }
        let lines: Vec<String> = st
            .accepted
            .iter()
            .map(|r| {
                format!(
                    "{} [{}] output {} bytes",
                    r.action_id.as_deref().unwrap_or("<no actionId>"),
                    r.error_code.as_deref().unwrap_or("ok"),
                    r.output.as_ref().map_or(0, |o| o.len())
                )
            })
            .collect();
        format!("\n  {}", lines.join("\n  "))
    }

    pub fn shutdown(&self) {
        if let Some(tx) = self.shutdown.lock().unwrap().take() {
            let _ = tx.send(());
        }
    }
}
