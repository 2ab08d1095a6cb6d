//! Delivering an action's stored report (ISOLATE.md §3, §10): tried until
//! the flow engine acknowledges it; a permanent refusal starts the give-up
//! clock (kept in the store), and past `report_give_up_secs` the report is
//! parked as undeliverable, durably, until an operator retries it (a fresh
//! clock) or drops it (`isolatectl report retry|drop`). Never dropped
//! without that command.
//!
//! Owns the loop and its store writes; the rules (which answer is which,
//! when to give up, how long to wait) are `report::flow`'s, the commands'
//! hand-over is `actions`'.

use tracing::{info, warn};

use super::{Action, Runner};
use crate::actions::{now_ms, ReportCommand, ReportCommandKind};
use crate::proto::flow::ReportActionResultsRequest;
use crate::report::flow::{answer_of, refusal_of, Answer, Backoff, GiveUpClock, Next};
use crate::store::{StoredAction, Sync};

/// How a delivery ended.
pub(super) enum Delivered {
    Acknowledged,
    /// An operator dropped the parked report; answered once it is retired.
    Dropped(ReportCommand),
}

impl Runner {
    pub(super) async fn deliver(
        &self,
        a: &Action,
        record: &mut StoredAction,
        report: &ReportActionResultsRequest,
    ) -> Delivered {
        let mut clock = GiveUpClock::new(self.cfg.report_give_up(), record.first_refused_at_ms);
        loop {
            if !record.undeliverable {
                if self.until_parked(a, record, report, &mut clock).await {
                    return Delivered::Acknowledged;
                }
            } else {
                // Parked before a restart: it waits for the operator again.
                a.handle
                    .parked(&record.last_refusal_code, &record.last_refusal_message);
            }
            let command = a.handle.next_command().await;
            match command.kind {
                ReportCommandKind::Drop => {
                    info!("undeliverable report dropped by an operator");
                    return Delivered::Dropped(command);
                }
                ReportCommandKind::Retry => {
                    clock.reset();
                    record.undeliverable = false;
                    record.first_refused_at_ms = 0;
                    if let Err(e) = self.store.put(record, Sync::Durable).await {
                        warn!(error = %e, "cannot store the retried report's state");
                    }
                    a.handle.unparked();
                    info!("undeliverable report retried by an operator");
                    let _ = command.done.send(a.handle.info());
                }
            }
        }
    }

    /// Tries until the report is acknowledged (true) or parked (false).
    async fn until_parked(
        &self,
        a: &Action,
        record: &mut StoredAction,
        report: &ReportActionResultsRequest,
        clock: &mut GiveUpClock,
    ) -> bool {
        let _timer = crate::metrics::timer(crate::metrics::Phase::Report);
        let mut backoff = Backoff::default();
        let mut attempt = 1u32;
        loop {
            a.handle.report_attempt();
            let status = match self.reporter.send(report).await {
                Ok(()) => {
                    tracing::debug!(attempt, "report acknowledged");
                    return true;
                }
                Err(status) => status,
            };
            let answer = answer_of(&status);
            let (code, message) = refusal_of(&status);
            a.handle.refused(&code, &message);
            record.last_refusal_code = code.clone();
            record.last_refusal_message = message.clone();
            let first = clock.started_at_ms() == 0;
            let cap = match clock.after(answer, now_ms()) {
                Next::RetryWithin(cap) => cap,
                Next::Park => {
                    record.undeliverable = true;
                    record.first_refused_at_ms = clock.started_at_ms();
                    // Durable: a parked report is the operator's to decide
                    // on, and must still be there after a crash.
                    if let Err(e) = self.store.put(record, Sync::Durable).await {
                        warn!(error = %e, "cannot store the undeliverable report's state");
                    }
                    a.handle.parked(&code, &message);
                    warn!(attempt, %code, error = %message,
                          give_up_secs = self.cfg.report_give_up_secs,
                          "the flow engine keeps refusing the report; parked as undeliverable (isolatectl report retry|drop)");
                    return false;
                }
            };
            if first && answer == Answer::Permanent {
                // The clock's start survives a restart, so a refused report
                // is not given a new hour by every restart.
                record.first_refused_at_ms = clock.started_at_ms();
                if let Err(e) = self.store.put(record, Sync::Lazy).await {
                    warn!(error = %e, "cannot store when the flow engine first refused the report");
                }
            }
            let wait = backoff.wait(cap);
            warn!(attempt, %code, error = %message, permanent = answer == Answer::Permanent,
                  retry_in_ms = wait.as_millis() as u64,
                  "flow endpoint did not take the report");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}
