//! Delivery of reports to the flow engine's `ReportActionResults`, at least
//! once: retried with capped exponential backoff and jitter until the flow
//! engine acknowledges. Does not store reports (durability is the store's).

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tracing::{debug, warn};

use crate::proto::flow::direktiv_flow_client::DirektivFlowClient;
use crate::proto::flow::ReportActionResultsRequest;

#[derive(Debug, thiserror::Error, displaydoc::Display)]
/// flow endpoint {endpoint:?} is not a valid address: {reason}
pub struct EndpointError {
    pub endpoint: String,
    pub reason: String,
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
    pub fn new(endpoint: &str, max_message: usize) -> Result<Self, EndpointError> {
        if is_none(endpoint) {
            return Ok(Reporter { client: None });
        }
        let uri = if endpoint.contains("://") {
            endpoint.to_string()
        } else {
            format!("http://{endpoint}")
        };
        let channel = Endpoint::from_shared(uri)
            .map_err(|e| EndpointError {
                endpoint: endpoint.to_string(),
                reason: e.to_string(),
            })?
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
                    warn!(attempt, code = ?e.code(), error = %e.message(), retry_in_ms = wait.as_millis() as u64,
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
        assert!(Reporter::new("127.0.0.1:7777", 1 << 20).is_ok());
        assert!(Reporter::new("http://flow:7777", 1 << 20).is_ok());
        assert!(Reporter::new("not a uri at all", 1 << 20).is_err());
        for none in ["none", "", " NONE "] {
            let r = Reporter::new(none, 1 << 20).unwrap();
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
