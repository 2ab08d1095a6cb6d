//! Delivery of reports to the flow engine's `ReportActionResults`, at least
//! once: retried with capped exponential backoff and jitter until the flow
//! engine acknowledges. An `https://` endpoint is reached over TLS only
//! (ISOLATE.md §9): verified against `flow_ca` or the system's roots, with a
//! client certificate when one is set, never falling back to plaintext.
//! Does not store reports (durability is the store's).

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tracing::{debug, warn};

use crate::containerd::error_chain;
use crate::proto::flow::direktiv_flow_client::DirektivFlowClient;
use crate::proto::flow::ReportActionResultsRequest;

#[derive(Debug, thiserror::Error, displaydoc::Display)]
/// flow endpoint {endpoint:?} is not a valid address: {reason}
pub struct EndpointError {
    pub endpoint: String,
    pub reason: String,
}

/// TLS settings of the flow client (`flow_ca`, `flow_client_cert`,
/// `flow_client_key`); used only for an `https://` endpoint.
#[derive(Debug, Clone, Default)]
pub struct FlowTls {
    pub ca: Option<PathBuf>,
    pub identity: Option<(PathBuf, PathBuf)>,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of the flow engine, sharing one lazily connected channel.
#[derive(Clone)]
pub struct Reporter {
    /// `None` when no flow engine is configured: a node run by hand (or by
    /// `isolatectl run`) keeps results for the control API only, and a
    /// report retried forever against nobody would keep every finished
    /// action's directory and id.
    client: Option<DirektivFlowClient<Channel>>,
}

/// Whether the `flow_endpoint` setting says there is no flow engine.
pub fn is_none(endpoint: &str) -> bool {
    let e = endpoint.trim();
    e.is_empty() || e.eq_ignore_ascii_case("none")
}

impl Reporter {
    pub fn new(endpoint: &str, max_message: usize, tls: &FlowTls) -> Result<Self, EndpointError> {
        if is_none(endpoint) {
            return Ok(Reporter { client: None });
        }
        let endpoint = endpoint.trim();
        let fail = |reason: String| EndpointError {
            endpoint: endpoint.to_string(),
            reason,
        };
        let uri = if endpoint.contains("://") {
            endpoint.to_string()
        } else {
            format!("http://{endpoint}")
        };
        let mut ep = Endpoint::from_shared(uri.clone()).map_err(|e| fail(e.to_string()))?;
        match ep.uri().scheme_str() {
            Some("https") => {
                let config = crate::auth::tls::client_config(
                    tls.ca.as_deref(),
                    tls.identity
                        .as_ref()
                        .map(|(c, k)| (c.as_path(), k.as_path())),
                    ["flow_ca", "flow_client_cert", "flow_client_key"],
                )
                .map_err(|e| fail(e.to_string()))?;
                ep = ep.tls_config(config).map_err(|e| fail(error_chain(&e)))?;
            }
            Some("http") => {}
            other => {
                return Err(fail(format!(
                    "scheme {:?} is neither http nor https",
                    other.unwrap_or("")
                )))
            }
        }
        let channel = ep
            .connect_timeout(Duration::from_secs(5))
            .timeout(ATTEMPT_TIMEOUT)
            .connect_lazy();
        Ok(Reporter {
            client: Some(
                DirektivFlowClient::new(channel)
                    .max_encoding_message_size(max_message)
                    .max_decoding_message_size(max_message),
            ),
        })
    }

    /// One attempt; without a flow engine, delivered at once.
    pub async fn send(&self, report: &ReportActionResultsRequest) -> Result<(), tonic::Status> {
        let Some(client) = &self.client else {
            return Ok(());
        };
        client
            .clone()
            .report_action_results(report.clone())
            .await
            .map(|_| ())
    }

    /// Sends until acknowledged, calling `on_attempt` before each try.
    /// Never gives up: a report is never dropped.
    pub async fn deliver(&self, report: &ReportActionResultsRequest, on_attempt: impl Fn()) {
        let _timer = crate::metrics::timer(crate::metrics::Phase::Report);
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1u32;
        loop {
            on_attempt();
            match self.send(report).await {
                Ok(()) => {
                    debug!(attempt, "report acknowledged");
                    return;
                }
                Err(e) => {
                    let wait = jitter(backoff);
                    // The chain, not just the message: a TLS failure's reason
                    // (unknown issuer, name mismatch) is in its sources.
                    warn!(attempt, code = ?e.code(), error = %error_chain(&e), retry_in_ms = wait.as_millis() as u64,
                          "flow endpoint did not take the report");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    attempt += 1;
                }
            }
        }
    }
}

/// Between half and all of `d`, so reports held back by one outage do not
/// all come back in the same instant.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints() {
        let tls = FlowTls::default();
        assert!(Reporter::new("127.0.0.1:7777", 1 << 20, &tls).is_ok());
        assert!(Reporter::new("http://flow:7777", 1 << 20, &tls).is_ok());
        assert!(Reporter::new("https://flow:7777", 1 << 20, &tls).is_ok());
        assert!(Reporter::new("not a uri at all", 1 << 20, &tls).is_err());
        assert!(Reporter::new("ftp://flow:7777", 1 << 20, &tls).is_err());
        let missing = FlowTls {
            ca: Some("/nonexistent/ca.pem".into()),
            identity: None,
        };
        let e = Reporter::new("https://flow:7777", 1 << 20, &missing)
            .err()
            .unwrap();
        assert!(e.to_string().contains("flow_ca"), "{e}");
        for none in ["none", "", " NONE "] {
            let r = Reporter::new(none, 1 << 20, &tls).unwrap();
            assert!(r.client.is_none());
            r.send(&ReportActionResultsRequest::default())
                .await
                .unwrap();
        }
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(2));
            assert!(j >= Duration::from_secs(1) && j <= Duration::from_secs(2));
        }
    }
}
