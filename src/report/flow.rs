//! The flow engine's `ReportActionResults`, and the rules for its answers
//! (ISOLATE.md §10): which refusals are transient (retried with capped
//! exponential backoff and jitter, without limit) and which permanent
//! (retried for `report_give_up_secs` from the first one, then parked), as
//! [`answer_of`], [`GiveUpClock`] and [`Backoff`]. An `https://` endpoint is
//! reached over TLS only (ISOLATE.md §9): verified against `flow_ca` or the
//! system's roots, with a client certificate when one is set, never falling
//! back to plaintext.
//! Does not store reports (durability is the store's) nor run the delivery
//! loop (the runner's `deliver`, which also waits for an operator).

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::proto::flow::direktiv_flow_client::DirektivFlowClient;
use crate::proto::flow::ReportActionResultsRequest;
use crate::text::error_chain;

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
}

/// What a refusal of the flow engine means for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The engine is away or busy: retried without limit.
    Transient,
    /// The engine refused this report (the instance ended, the step moved
    /// on): retried for `report_give_up_secs`, then parked.
    Permanent,
}

/// ISOLATE.md §10: UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED and
/// ABORTED are the engine (or the way to it) being away or busy; tonic
/// also reports no answer at all (connection refused or reset, a timeout
/// of ours) as UNAVAILABLE, CANCELLED or an UNKNOWN with transport words.
/// Any other code is the engine's word on this report.
pub fn answer_of(status: &tonic::Status) -> Answer {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted => {
            Answer::Transient
        }
        Code::Cancelled => Answer::Transient,
        Code::Unknown if no_answer(status) => Answer::Transient,
        _ => Answer::Permanent,
    }
}

/// tonic's words for a call that never got an answer from the engine.
fn no_answer(status: &tonic::Status) -> bool {
    let m = status.message();
    m.contains("transport error")
        || m.contains("connection")
        || m.contains("broken pipe")
        || m.contains("h2 protocol error")
}

/// A refusal as the control API and the log show it: the code's name and
/// the message (its sources too, for a TLS failure), on one line.
pub fn refusal_of(status: &tonic::Status) -> (String, String) {
    let mut message = status.message().to_string();
    if let Some(source) = std::error::Error::source(status) {
        message = format!("{message}: {}", error_chain(source));
    }
    (
        format!("{:?}", status.code()),
        crate::text::one_line(&message).into_owned(),
    )
}

/// The give-up clock of one report: counts from the first permanent
/// answer (kept across restarts by the store), and says to park once a
/// permanent answer comes `give_up` or more after it. A transient answer
/// never parks, however late: the engine did not say no.
#[derive(Debug, Clone, Copy)]
pub struct GiveUpClock {
    give_up: Duration,
    /// Unix ms of the first permanent answer; 0 while there was none.
    first_permanent_ms: i64,
}

/// What to do after a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Try again after at most this long (the give-up time, if that comes
    /// first: the last try is at the give-up time, not a backoff later).
    RetryWithin(Option<Duration>),
    /// Stop trying: the report is undeliverable.
    Park,
}

impl GiveUpClock {
    pub fn new(give_up: Duration, first_permanent_ms: i64) -> Self {
        GiveUpClock {
            give_up,
            first_permanent_ms: first_permanent_ms.max(0),
        }
    }

    /// When the clock started (Unix ms), 0 if it has not.
    pub fn started_at_ms(&self) -> i64 {
        self.first_permanent_ms
    }

    /// A fresh clock (an operator's retry).
    pub fn reset(&mut self) {
        self.first_permanent_ms = 0;
    }

    /// The verdict on an answer of kind `answer` at `now_ms`.
    pub fn after(&mut self, answer: Answer, now_ms: i64) -> Next {
        if answer == Answer::Transient {
            return Next::RetryWithin(None);
        }
        if self.first_permanent_ms == 0 {
            self.first_permanent_ms = now_ms;
        }
        let elapsed = Duration::from_millis((now_ms - self.first_permanent_ms).max(0) as u64);
        match self.give_up.checked_sub(elapsed) {
            Some(left) if !left.is_zero() => Next::RetryWithin(Some(left)),
            _ => Next::Park,
        }
    }
}

/// Capped exponential backoff with jitter between tries.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: FIRST_BACKOFF,
        }
    }
}

impl Backoff {
    /// The wait before the next try, at most `cap`.
    pub fn wait(&mut self, cap: Option<Duration>) -> Duration {
        let wait = jitter(self.next);
        self.next = (self.next * 2).min(MAX_BACKOFF);
        cap.map_or(wait, |c| wait.min(c))
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
    fn transient_and_permanent_codes() {
        use tonic::Status;
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Cancelled,
        ] {
            assert_eq!(
                answer_of(&Status::new(code, "x")),
                Answer::Transient,
                "{code:?}"
            );
        }
        for code in [
            Code::FailedPrecondition,
            Code::NotFound,
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::Internal,
            Code::Unimplemented,
            Code::AlreadyExists,
            Code::OutOfRange,
            Code::DataLoss,
        ] {
            assert_eq!(
                answer_of(&Status::new(code, "x")),
                Answer::Permanent,
                "{code:?}"
            );
        }
        // No answer at all, as tonic words it.
        assert_eq!(
            answer_of(&Status::unknown("transport error")),
            Answer::Transient
        );
        assert_eq!(
            answer_of(&Status::unknown("the engine's own unknown")),
            Answer::Permanent
        );
        let (code, message) = refusal_of(&Status::failed_precondition("instance\nended"));
        assert_eq!(code, "FailedPrecondition");
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn give_up_clock_counts_from_the_first_permanent_answer() {
        let mut c = GiveUpClock::new(Duration::from_secs(3), 0);
        // Transient answers never start it, nor park.
        assert_eq!(c.after(Answer::Transient, 1_000), Next::RetryWithin(None));
        assert_eq!(c.started_at_ms(), 0);
        assert_eq!(
            c.after(Answer::Permanent, 10_000),
            Next::RetryWithin(Some(Duration::from_secs(3)))
        );
        assert_eq!(c.started_at_ms(), 10_000);
        // A later one does not move the start; the wait is capped by what is left.
        assert_eq!(
            c.after(Answer::Permanent, 12_000),
            Next::RetryWithin(Some(Duration::from_secs(1)))
        );
        // Past the give-up time a transient answer is still retried...
        assert_eq!(c.after(Answer::Transient, 20_000), Next::RetryWithin(None));
        // ...a permanent one parks.
        assert_eq!(c.after(Answer::Permanent, 13_000), Next::Park);
        // Kept across a restart (the store's start), fresh after a retry.
        let mut c = GiveUpClock::new(Duration::from_secs(3), 10_000);
        assert_eq!(c.after(Answer::Permanent, 14_000), Next::Park);
        c.reset();
        assert_eq!(
            c.after(Answer::Permanent, 14_000),
            Next::RetryWithin(Some(Duration::from_secs(3)))
        );
        // No give-up time: the first permanent answer parks.
        let mut c = GiveUpClock::new(Duration::ZERO, 0);
        assert_eq!(c.after(Answer::Permanent, 1), Next::Park);
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_respects_a_deadline() {
        let mut b = Backoff::default();
        let first = b.wait(None);
        assert!(first <= FIRST_BACKOFF && first >= FIRST_BACKOFF / 2);
        for _ in 0..20 {
            assert!(b.wait(None) <= MAX_BACKOFF);
        }
        assert!(b.wait(Some(Duration::from_millis(5))) <= Duration::from_millis(5));
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(2));
            assert!(j >= Duration::from_secs(1) && j <= Duration::from_secs(2));
        }
    }
}
