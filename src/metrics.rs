//! Prometheus metrics: the one registry of the process, the small
//! functions the runner, the image service and the reporter call at their
//! phase boundaries, and the `/metrics` endpoint on its own bind.
//!
//! Owns only numbers. The gauges of actions waiting and running are not
//! kept here at all: they are counted from the action table at each scrape,
//! so they can never drift from what the control API shows. Does not decide
//! anything about actions.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::actions::Actions;
use crate::proto::control::ActionState;

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum MetricsError {
    /// cannot listen for metrics on {bind}: {source}
    Bind {
        bind: String,
        source: std::io::Error,
    },
    /// metrics_bind {value:?} is not an address (host:port): {reason}
    Address { value: String, reason: String },
}

/// A phase of an action whose duration is recorded.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    /// RunIsolate from its arrival to its answer, durable write included.
    Accept,
    /// A pull from a registry (cache hits are not pulls).
    Pull,
    /// Snapshot, spec, container and task creation.
    Start,
    /// From task start to its exit (or its stop).
    Run,
    /// From the first delivery attempt to the flow engine's acknowledgement.
    Report,
}

struct Metrics {
    registry: Registry,
    actions: Family<Vec<(String, String)>, Counter>,
    accept: Histogram,
    pull: Histogram,
    start: Histogram,
    run: Histogram,
    report: Histogram,
    bytes_pulled: Counter,
    auth_refusals: Family<Vec<(String, String)>, Counter>,
    waiting: Gauge,
    running: Gauge,
    pool_entries: Family<Vec<(String, String)>, Gauge>,
    pool_hits: Counter,
    pool_misses: Counter,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("isolated");
    let actions = Family::<Vec<(String, String)>, Counter>::default();
    registry.register(
        "actions",
        "Actions finished, by report error code (\"ok\" for success)",
        actions.clone(),
    );
    // 50 ms to ~27 min: a warm start is tens of milliseconds, a cold pull of
    // a big image on an edge link or a long action is minutes.
    let buckets = || exponential_buckets(0.05, 2.0, 16);
    let (pull, start, run, report) = (
        Histogram::new(buckets()),
        Histogram::new(buckets()),
        Histogram::new(buckets()),
        Histogram::new(buckets()),
    );
    let seconds = |r: &mut Registry, name: &str, help: &str, h: &Histogram| {
        r.register_with_unit(name, help, Unit::Seconds, h.clone());
    };
    // 0.25 ms to about 1.2 s in steps of 1.5: an accept is an fsync and a
    // little CPU, and its p99 is what a caller waits for.
    let accept = Histogram::new(exponential_buckets(0.00025, 1.5, 22));
    seconds(
        &mut registry,
        "accept_duration",
        "RunIsolate calls from arrival to answer, the durable write included",
        &accept,
    );
    seconds(
        &mut registry,
        "pull_duration",
        "Image pulls from a registry",
        &pull,
    );
    seconds(
        &mut registry,
        "start_duration",
        "Creation of an action's snapshot, container and task",
        &start,
    );
    seconds(
        &mut registry,
        "run_duration",
        "Actions from task start to exit",
        &run,
    );
    seconds(
        &mut registry,
        "report_duration",
        "Report delivery until the flow engine acknowledged it",
        &report,
    );
    let bytes_pulled = Counter::default();
    registry.register_with_unit(
        "pulled",
        "Layer bytes fetched from registries",
        Unit::Bytes,
        bytes_pulled.clone(),
    );
    let auth_refusals = Family::<Vec<(String, String)>, Counter>::default();
    registry.register(
        "auth_refusals",
        "Calls refused by authentication or authorization, by reason",
        auth_refusals.clone(),
    );
    let waiting = Gauge::default();
    registry.register(
        "actions_waiting",
        "Actions accepted and not yet running (queued or pulling)",
        waiting.clone(),
    );
    let running = Gauge::default();
    registry.register(
        "actions_running",
        "Actions whose task is running",
        running.clone(),
    );
    let pool_entries = Family::<Vec<(String, String)>, Gauge>::default();
    registry.register(
        "pool_entries",
        "Pre-created tasks waiting for an action (issue 16), by Direktiv namespace",
        pool_entries.clone(),
    );
    let (pool_hits, pool_misses) = (Counter::default(), Counter::default());
    registry.register(
        "pool_hits",
        "Actions that took a pre-created task",
        pool_hits.clone(),
    );
    registry.register(
        "pool_misses",
        "Actions with the pool on that found no pre-created task and created their own",
        pool_misses.clone(),
    );
    Metrics {
        registry,
        pool_entries,
        pool_hits,
        pool_misses,
        actions,
        accept,
        pull,
        start,
        run,
        report,
        bytes_pulled,
        auth_refusals,
        waiting,
        running,
    }
});

/// Records the duration of a phase when dropped, so a phase that ends by
/// an early return or an error is counted too.
#[must_use = "the phase is recorded when the timer is dropped"]
pub struct Timer {
    phase: Phase,
    started: Instant,
}

impl Drop for Timer {
    fn drop(&mut self) {
        let m = &*METRICS;
        let h = match self.phase {
            Phase::Accept => &m.accept,
            Phase::Pull => &m.pull,
            Phase::Start => &m.start,
            Phase::Run => &m.run,
            Phase::Report => &m.report,
        };
        h.observe(self.started.elapsed().as_secs_f64());
    }
}

/// Starts timing `phase`; the time is recorded when the result is dropped.
pub fn timer(phase: Phase) -> Timer {
    Timer {
        phase,
        started: Instant::now(),
    }
}

/// Counts a finished action under its report code (`None` is success).
///
/// The label takes the contract's codes, `ok`, and `action` for every code
/// an action's error.json chose: those are any string, and a series per
/// string would let an action grow the metrics without bound (and a code
/// with a newline forge lines in them).
pub fn action_finished(code: Option<&str>) {
    let label = match code {
        None => "ok",
        Some(c) => crate::report::ErrorCode::of(c).map_or("action", |c| c.as_str()),
    };
    METRICS
        .actions
        .get_or_create(&vec![("code".into(), label.to_string())])
        .inc();
}

/// Counts a call refused for `reason` (a fixed word: missing, malformed,
/// unknown_token, revoked, namespace, internal).
pub fn auth_refused(reason: &'static str) {
    METRICS
        .auth_refusals
        .get_or_create(&vec![("reason".into(), reason.to_string())])
        .inc();
}

/// The number of pre-created tasks of Direktiv namespace `namespace` now.
pub fn pool_entries(namespace: &str, n: usize) {
    METRICS
        .pool_entries
        .get_or_create(&vec![("namespace".into(), namespace.to_string())])
        .set(n as i64);
}

/// Counts an action that took a pre-created task (`hit`) or found none.
pub fn pool_take(hit: bool) {
    match hit {
        true => METRICS.pool_hits.inc(),
        false => METRICS.pool_misses.inc(),
    };
}

/// Counts layer bytes fetched from a registry.
pub fn bytes_pulled(bytes: i64) {
    METRICS.bytes_pulled.inc_by(bytes.max(0) as u64);
}

/// The OpenMetrics text of every metric, with the action gauges counted
/// from `actions` now.
pub fn render(actions: &Actions) -> String {
    let m = &*METRICS;
    let (mut waiting, mut running) = (0, 0);
    for info in actions.list(None, None) {
        match info.state() {
            ActionState::Accepted | ActionState::Pulling => waiting += 1,
            ActionState::Running => running += 1,
            _ => {}
        }
    }
    m.waiting.set(waiting);
    m.running.set(running);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &m.registry);
    out
}

/// Parses the `metrics_bind` setting: empty disables the endpoint.
pub fn parse_bind(value: &str) -> Result<Option<SocketAddr>, MetricsError> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    value
        .trim()
        .parse()
        .map(Some)
        .map_err(|e: std::net::AddrParseError| MetricsError::Address {
            value: value.to_string(),
            reason: e.to_string(),
        })
}

/// Binds `bind` now (so a taken port fails start-up) and serves `/metrics`
/// until `stop` is cancelled. HTTP/1.1 only, as Prometheus scrapes.
pub async fn serve(
    bind: SocketAddr,
    actions: Arc<Actions>,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, MetricsError> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|source| MetricsError::Bind {
            bind: bind.to_string(),
            source,
        })?;
    Ok(tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "metrics endpoint cannot accept");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let actions = actions.clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let actions = actions.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&req, &actions)) }
            });
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    debug!(%peer, error = %e, "metrics connection ended");
                }
            });
        }
    }))
}

fn respond<B>(req: &Request<B>, actions: &Actions) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(actions),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "only /metrics is served here\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        action_finished(Some("au.com.direktiv.error.exit"));
        action_finished(None);
        bytes_pulled(1234);
        drop(timer(Phase::Run));
        let text = render(&Actions::default());
        for want in [
            "isolated_actions_total{code=\"ok\"}",
            "isolated_actions_total{code=\"au.com.direktiv.error.exit\"}",
            "isolated_run_duration_seconds_count",
            "isolated_pulled_bytes_total",
            "isolated_actions_waiting 0",
            "isolated_actions_running 0",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
    }

    #[test]
    fn bind_setting() {
        assert_eq!(parse_bind("").unwrap(), None);
        assert!(parse_bind("127.0.0.1:9464").unwrap().is_some());
        assert!(parse_bind("nope").is_err());
    }
}
