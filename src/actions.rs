//! The table of actions this daemon knows: each one's state as the control
//! API shows it, its cancel switch, its live output tails, and who may be
//! watching it, and the operator's retry or drop of a report the flow
//! engine would not take (undeliverable, parked). A (namespace, actionId)
//! pair is taken from acceptance until its report is acknowledged or
//! dropped; reported actions stay visible for a while (the newest
//! [`KEEP_REPORTED`], holding at most [`KEEP_REPORTED_BYTES`] of outputs
//! and log tails together) so an operator can still look at them.
//!
//! In memory only: what must survive a restart is the store's (the history
//! of reported actions among it, put back here by [`Actions::restore`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::lifecycle::advance;
use crate::proto::control::{ActionInfo, ActionState};
use crate::report::Outcome;
use crate::request::ActionRequest;

/// How many reported actions stay visible.
pub const KEEP_REPORTED: usize = 1000;
/// Most bytes of output and log tails the reported actions kept visible
/// hold together (issue 13): by count alone, 1000 actions with 32 MiB
/// outputs and two 1 MiB tails could pin 34 GB. 64 MiB keeps every one of
/// the 1000 when they are the usual few KiB, and the newest few when they
/// are huge; older ones go first, as they do by count. An action in flight
/// holds its own (its output is bounded by `max_report_bytes`, and is in
/// the store's outbox until delivered).
pub const KEEP_REPORTED_BYTES: usize = 64 << 20;

type Key = (String, String);

/// The tails of an action's stdout and stderr, shared by the reader that
/// fills them and the control API that shows them.
#[derive(Default)]
pub struct Logs {
    pub stdout: Mutex<Vec<u8>>,
    pub stderr: Mutex<Vec<u8>>,
}

impl Logs {
    pub fn snapshot(&self) -> (Vec<u8>, Vec<u8>) {
        let get = |m: &Mutex<Vec<u8>>| m.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (get(&self.stdout), get(&self.stderr))
    }
}

struct Entry {
    info: watch::Sender<ActionInfo>,
    cancel: CancellationToken,
    cancel_reason: Arc<Mutex<Option<String>>>,
    logs: Arc<Logs>,
    /// Left accepted, unstarted, for the next start by a draining node
    /// (issue 17): shown as accepted, not waited for by a stop.
    left: bool,
    command: Arc<Commands>,
}

/// What an operator asks of an undeliverable report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportCommandKind {
    /// Deliver it again now, with a fresh give-up clock.
    Retry,
    /// Remove it for good.
    Drop,
}

/// A command for the runner holding the parked report, answered with the
/// action as it is once the command is carried out (durably).
pub struct ReportCommand {
    pub kind: ReportCommandKind,
    pub done: tokio::sync::oneshot::Sender<ActionInfo>,
}

/// The one pending command of an entry and the runner's wake-up.
#[derive(Default)]
struct Commands {
    pending: Mutex<Option<ReportCommand>>,
    /// `notify_one` keeps a permit, so a command sent before the runner
    /// waits is not lost.
    ready: tokio::sync::Notify,
}

#[derive(Default)]
struct Table {
    entries: HashMap<Key, Entry>,
    /// Reported actions, oldest first, for eviction, with the bytes each
    /// holds.
    reported: VecDeque<(Key, usize)>,
    /// The sum of those bytes.
    reported_bytes: usize,
}

impl Table {
    /// Forgets that `key` is among the reported (it is claimed again).
    fn unreport(&mut self, key: &Key) {
        if let Some(pos) = self.reported.iter().position(|(k, _)| k == key) {
            if let Some((_, bytes)) = self.reported.remove(pos) {
                self.reported_bytes -= bytes;
            }
        }
    }
}

#[derive(Default)]
pub struct Actions {
    table: Mutex<Table>,
    /// Signalled whenever an action is reported, for shutdown to wait on.
    drained: tokio::sync::Notify,
}

/// A cancel whose reason is taken, to fire once it is durable.
pub struct Cancel {
    token: CancellationToken,
    /// As the report will say it.
    pub reason: String,
}

impl Cancel {
    pub fn fire(self) {
        self.token.cancel();
    }
}

/// The report's message for a cancel with `reason` (possibly empty).
pub fn cancel_message(reason: &str) -> String {
    if reason.is_empty() {
        "action was cancelled".to_string()
    } else {
        format!("action was cancelled: {reason}")
    }
}

/// The runner's handle on its action's entry.
#[derive(Clone)]
pub struct Handle {
    actions: Arc<Actions>,
    key: Key,
    pub cancel: CancellationToken,
    cancel_reason: Arc<Mutex<Option<String>>>,
    pub logs: Arc<Logs>,
    command: Arc<Commands>,
}

/// A state as operators read it (isolatectl, error messages).
pub fn state_name(s: ActionState) -> &'static str {
    match s {
        ActionState::Unspecified => "unknown",
        ActionState::Accepted => "accepted",
        ActionState::Pulling => "pulling",
        ActionState::Running => "running",
        ActionState::Finished => "finished",
        ActionState::Reported => "reported",
        ActionState::Undeliverable => "undeliverable",
    }
}

/// What [`advance`] names in a refusal of the table's.
const TABLE: &str = "the control table";

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Whether the pair is taken: until the report is acknowledged or dropped.
fn taken(info: &ActionInfo) -> bool {
    info.state() != ActionState::Reported
}

/// Whether the action still needs this process: a parked report waits in
/// the store for an operator, not for a graceful stop.
fn in_flight(info: &ActionInfo) -> bool {
    !matches!(
        info.state(),
        ActionState::Reported | ActionState::Undeliverable
    )
}

impl Table {
    /// Keeps a reported action visible, evicting the oldest beyond
    /// [`KEEP_REPORTED`] entries or [`KEEP_REPORTED_BYTES`] of them.
    fn keep_reported(&mut self, key: Key, bytes: usize) {
        self.reported.push_back((key, bytes));
        self.reported_bytes += bytes;
        while self.reported.len() > KEEP_REPORTED || self.reported_bytes > KEEP_REPORTED_BYTES {
            let Some((old, bytes)) = self.reported.pop_front() else {
                break;
            };
            self.reported_bytes -= bytes;
            self.entries.remove(&old);
        }
    }
}

impl Actions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the pair for a new action, or says it is in flight.
    pub fn claim(self: &Arc<Self>, req: &ActionRequest) -> Result<Handle, Error> {
        let key = (req.namespace.clone(), req.action_id.clone());
        let mut t = self.lock();
        if let Some(e) = t.entries.get(&key) {
            if taken(&e.info.borrow()) {
                return Err(Error::AlreadyExists {
                    namespace: req.namespace.clone(),
                    action_id: req.action_id.clone(),
                });
            }
            t.unreport(&key);
        }
        let info = ActionInfo {
            namespace: req.namespace.clone(),
            action_id: req.action_id.clone(),
            instance_id: req.instance_id.clone().unwrap_or_default(),
            step: req.step.unwrap_or_default(),
            image: req.image.clone(),
            size: req.size.index() as i32,
            timeout_seconds: req.timeout.as_secs() as i64,
            state: ActionState::Accepted as i32,
            accepted_at_ms: now_ms(),
            ..Default::default()
        };
        let entry = Entry {
            info: watch::Sender::new(info),
            cancel: CancellationToken::new(),
            cancel_reason: Arc::default(),
            logs: Arc::default(),
            command: Arc::default(),
            left: false,
        };
        let handle = Handle {
            actions: self.clone(),
            key: key.clone(),
            cancel: entry.cancel.clone(),
            cancel_reason: entry.cancel_reason.clone(),
            logs: entry.logs.clone(),
            command: entry.command.clone(),
        };
        t.entries.insert(key, entry);
        Ok(handle)
    }

    /// Puts the stored history (oldest first) back at start-up, before
    /// recovery claims the stored actions: an action of the store whose id
    /// the history has too (run again) replaces its entry.
    pub fn restore(&self, history: Vec<ActionInfo>) {
        let mut t = self.lock();
        for mut info in history {
            info.state = ActionState::Reported as i32;
            let key = (info.namespace.clone(), info.action_id.clone());
            // An id run twice: the newer (later) entry wins.
            if t.entries.contains_key(&key) {
                let mut freed = 0;
                t.reported.retain(|(k, bytes)| {
                    let keep = k != &key;
                    if !keep {
                        freed += bytes;
                    }
                    keep
                });
                t.reported_bytes -= freed;
            }
            let bytes = info.output.len();
            t.entries.insert(
                key.clone(),
                Entry {
                    info: watch::Sender::new(info),
                    cancel: CancellationToken::new(),
                    cancel_reason: Arc::default(),
                    logs: Arc::default(),
                    command: Arc::default(),
                    left: false,
                },
            );
            t.keep_reported(key, bytes);
        }
    }

    /// Hands an operator's command to the runner holding the action's
    /// undeliverable report; the answer comes once it is carried out. Only
    /// a parked report takes one, and one at a time.
    pub fn report_command(
        &self,
        namespace: &str,
        action_id: &str,
        kind: ReportCommandKind,
    ) -> Result<tokio::sync::oneshot::Receiver<ActionInfo>, Error> {
        let t = self.lock();
        let key = (namespace.to_string(), action_id.to_string());
        let e = t.entries.get(&key).ok_or_else(|| Error::NotFound {
            namespace: namespace.into(),
            action_id: action_id.into(),
        })?;
        let state = e.info.borrow().state();
        let mut pending = e.command.pending.lock().unwrap_or_else(|p| p.into_inner());
        if state != ActionState::Undeliverable || pending.is_some() {
            return Err(Error::NotUndeliverable {
                namespace: namespace.into(),
                action_id: action_id.into(),
                state: state_name(state),
            });
        }
        let (done, answer) = tokio::sync::oneshot::channel();
        *pending = Some(ReportCommand { kind, done });
        e.command.ready.notify_one();
        Ok(answer)
    }

    /// Actions accepted and not yet reported, but for those a draining
    /// node left for its next start.
    pub fn in_flight(&self) -> usize {
        self.lock()
            .entries
            .values()
            .filter(|e| !e.left && in_flight(&e.info.borrow()))
            .count()
    }

    /// Waits until no action is in flight.
    pub async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    pub fn get(&self, namespace: &str, action_id: &str) -> Option<ActionInfo> {
        let t = self.lock();
        t.entries
            .get(&(namespace.to_string(), action_id.to_string()))
            .map(|e| e.info.borrow().clone())
    }

    /// Actions of one namespace (or all) in one state (or all), oldest first.
    pub fn list(&self, namespace: Option<&str>, state: Option<ActionState>) -> Vec<ActionInfo> {
        let t = self.lock();
        let mut v: Vec<ActionInfo> = t
            .entries
            .values()
            .map(|e| e.info.borrow().clone())
            .filter(|i| namespace.is_none_or(|n| i.namespace == n))
            .filter(|i| state.is_none_or(|s| i.state() == s))
            .collect();
        v.sort_by_key(|i| (i.accepted_at_ms, i.action_id.clone()));
        v
    }

    pub fn watch(&self, namespace: &str, action_id: &str) -> Option<watch::Receiver<ActionInfo>> {
        let t = self.lock();
        t.entries
            .get(&(namespace.to_string(), action_id.to_string()))
            .map(|e| e.info.subscribe())
    }

    pub fn logs(&self, namespace: &str, action_id: &str) -> Option<(Vec<u8>, Vec<u8>)> {
        let t = self.lock();
        t.entries
            .get(&(namespace.to_string(), action_id.to_string()))
            .map(|e| e.logs.snapshot())
    }

    /// Cancels an action that has not finished yet, in two steps around
    /// the durable write (`control`): [`Actions::cancel`] takes the reason,
    /// so every later write of the record by the runner carries it, and
    /// the returned [`Cancel`] fires the switch once the store has it.
    pub fn cancel(
        &self,
        namespace: &str,
        action_id: &str,
        reason: &str,
    ) -> Result<(ActionInfo, Cancel), Error> {
        let t = self.lock();
        let key = (namespace.to_string(), action_id.to_string());
        let e = t.entries.get(&key).ok_or_else(|| Error::NotFound {
            namespace: namespace.into(),
            action_id: action_id.into(),
        })?;
        let info = e.info.borrow().clone();
        if matches!(info.state(), ActionState::Finished | ActionState::Reported) {
            return Err(Error::Finished {
                namespace: namespace.into(),
                action_id: action_id.into(),
            });
        }
        let reason = cancel_message(reason);
        let reason = e
            .cancel_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(reason)
            .clone();
        Ok((
            info,
            Cancel {
                token: e.cancel.clone(),
                reason,
            },
        ))
    }

    fn update(&self, key: &Key, f: impl FnOnce(&mut ActionInfo)) {
        let t = self.lock();
        if let Some(e) = t.entries.get(key) {
            e.info.send_modify(f);
        }
    }
}

impl Handle {
    /// A handle of no table: a pre-created task's (issue 16), which no
    /// operator lists as an action; what it is told goes nowhere.
    pub fn detached(namespace: &str, id: &str) -> Handle {
        Handle {
            actions: Arc::default(),
            key: (namespace.to_string(), id.to_string()),
            cancel: CancellationToken::new(),
            cancel_reason: Arc::default(),
            logs: Arc::default(),
            command: Arc::default(),
        }
    }

    pub fn set_state(&self, state: ActionState) {
        self.actions.update(&self.key, |i| {
            advance(&mut i.state, state, TABLE);
        });
    }

    /// The containerd namespace it runs in, for the control API.
    pub fn set_containerd_namespace(&self, cns: &str) {
        self.actions
            .update(&self.key, |i| i.containerd_namespace = cns.to_string());
    }

    /// When it was first accepted (a recovered action keeps its stored
    /// time, not the restart's: issue 14, accepted showed after started).
    pub fn set_accepted_at(&self, accepted_at_ms: i64) {
        if accepted_at_ms > 0 {
            self.actions
                .update(&self.key, |i| i.accepted_at_ms = accepted_at_ms);
        }
    }

    /// The action as the control API shows it now.
    pub fn info(&self) -> ActionInfo {
        self.actions
            .get(&self.key.0, &self.key.1)
            .unwrap_or_default()
    }

    /// The flow engine refused the report with `code` and `message`.
    pub fn refused(&self, code: &str, message: &str) {
        self.actions.update(&self.key, |i| {
            i.report_last_code = code.to_string();
            i.report_last_message = message.to_string();
        });
    }

    /// The report is parked (undeliverable) with the flow engine's last
    /// answer; a graceful stop no longer waits for it.
    pub fn parked(&self, code: &str, message: &str) {
        self.actions.update(&self.key, |i| {
            advance(&mut i.state, ActionState::Undeliverable, TABLE);
            i.report_last_code = code.to_string();
            i.report_last_message = message.to_string();
        });
        self.actions.drained.notify_waiters();
    }

    /// An operator retried the parked report: it is being delivered again.
    pub fn unparked(&self) {
        self.actions.update(&self.key, |i| {
            advance(&mut i.state, ActionState::Finished, TABLE);
        });
    }

    /// Waits for an operator's command on the parked report.
    pub async fn next_command(&self) -> ReportCommand {
        loop {
            let taken = self
                .command
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(c) = taken {
                return c;
            }
            self.command.ready.notified().await;
        }
    }

    /// The action as it is once done with: reported now, or its report
    /// dropped now (`dropped`), for the history and [`Handle::retired`].
    pub fn final_info(&self, dropped: bool) -> ActionInfo {
        let mut info = self.info();
        advance(&mut info.state, ActionState::Reported, TABLE);
        if dropped {
            info.dropped_at_ms = now_ms();
        } else {
            info.reported_at_ms = now_ms();
        }
        info
    }

    /// Running since `started_at_ms`, the time its deadline counts from,
    /// in containerd container `container`.
    pub fn set_running(&self, started_at_ms: i64, container: &str) {
        self.actions.update(&self.key, |i| {
            advance(&mut i.state, ActionState::Running, TABLE);
            i.started_at_ms = started_at_ms;
            i.container_id = container.to_string();
        });
    }

    /// Cancels it at once with `message` (a report message, as stored):
    /// for an action whose cancel the store kept across a restart.
    pub fn cancel_now(&self, message: &str) {
        self.cancel_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| message.to_string());
        self.cancel.cancel();
    }

    /// The cancel's message once one was asked for (even before it fired),
    /// for the runner's writes of the record.
    pub fn pending_cancel(&self) -> Option<String> {
        self.cancel_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why the action was cancelled, once it was.
    pub fn cancel_reason(&self) -> String {
        self.cancel_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "action was cancelled".into())
    }

    pub fn finished(&self, outcome: &Outcome) {
        self.actions.update(&self.key, |i| {
            advance(&mut i.state, ActionState::Finished, TABLE);
            i.finished_at_ms = now_ms();
            match outcome {
                Outcome::Output(out) => i.output = out.clone(),
                Outcome::Failed { code, message } => {
                    i.error_code = code.clone();
                    i.error_message = message.clone();
                }
            }
        });
    }

    pub fn report_attempt(&self) {
        self.actions.update(&self.key, |i| i.report_attempts += 1);
    }

    /// The action was refused after its id was claimed (queue full, store
    /// failing): it never existed, so nothing of it stays.
    pub fn abandon(&self) {
        let mut t = self.actions.lock();
        t.entries.remove(&self.key);
        drop(t);
        self.actions.drained.notify_waiters();
    }

    /// A draining node left the action accepted and unstarted: the store
    /// has it for the next start, and a stop no longer waits for it.
    pub fn left_for_restart(&self) {
        if let Some(e) = self.actions.lock().entries.get_mut(&self.key) {
            e.left = true;
        }
        self.actions.drained.notify_waiters();
    }

    /// The report was acknowledged and the action cleaned up: the pair is
    /// free again, and the entry is kept for a while for operators.
    pub fn reported(&self) {
        self.retired(self.final_info(false));
    }

    /// The action is done with, shown as `info` ([`Handle::final_info`]):
    /// the pair is free again, and the entry is kept for a while.
    pub fn retired(&self, info: ActionInfo) {
        self.actions.update(&self.key, |i| *i = info);
        let mut t = self.actions.lock();
        let held = |m: &Mutex<Vec<u8>>| m.lock().unwrap_or_else(|p| p.into_inner()).len();
        let bytes = t.entries.get(&self.key).map_or(0, |e| {
            e.info.borrow().output.len() + held(&e.logs.stdout) + held(&e.logs.stderr)
        });
        t.keep_reported(self.key.clone(), bytes);
        drop(t);
        self.actions.drained.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use crate::proto::isolate::RunIsolateRequest;

    fn req(ns: &str, id: &str) -> ActionRequest {
        ActionRequest::validate(
            RunIsolateRequest {
                namespace: Some(ns.into()),
                action_id: Some(id.into()),
                image: Some("busybox".into()),
                ..Default::default()
            },
            &Limits::default(),
        )
        .unwrap()
    }

    #[test]
    fn lifecycle() {
        let a = Arc::new(Actions::default());
        let h = a.claim(&req("n", "x")).unwrap();
        assert!(matches!(
            a.claim(&req("n", "x")),
            Err(Error::AlreadyExists { .. })
        ));
        a.claim(&req("m", "x")).unwrap();
        assert_eq!(a.in_flight(), 2);
        h.set_running(1234, "pool-0a");
        let info = a.get("n", "x").unwrap();
        assert_eq!(info.state(), ActionState::Running);
        assert_eq!(info.started_at_ms, 1234);
        assert_eq!(info.container_id, "pool-0a");
        let (_, cancel) = a.cancel("n", "x", "by test").unwrap();
        // Taken, not fired: the runner's writes carry it until the store has it.
        assert!(!h.cancel.is_cancelled());
        assert_eq!(
            h.pending_cancel().as_deref(),
            Some("action was cancelled: by test")
        );
        cancel.fire();
        assert!(h.cancel.is_cancelled());
        assert_eq!(h.cancel_reason(), "action was cancelled: by test");
        h.finished(&Outcome::Output(b"o".to_vec()));
        assert!(matches!(
            a.cancel("n", "x", ""),
            Err(Error::Finished { .. })
        ));
        assert!(matches!(
            a.cancel("n", "zz", ""),
            Err(Error::NotFound { .. })
        ));
        h.reported();
        assert_eq!(a.in_flight(), 1);
        assert_eq!(a.list(Some("n"), Some(ActionState::Reported)).len(), 1);
        // Reported: the id may be used again.
        a.claim(&req("n", "x")).unwrap();
    }

    #[tokio::test]
    async fn only_a_parked_report_takes_a_command() {
        let a = Arc::new(Actions::default());
        let h = a.claim(&req("n", "x")).unwrap();
        h.finished(&Outcome::Output(vec![]));
        let refused = a.report_command("n", "x", ReportCommandKind::Retry);
        assert!(
            matches!(
                refused,
                Err(Error::NotUndeliverable {
                    state: "finished",
                    ..
                })
            ),
            "a report still being delivered"
        );
        assert!(matches!(
            a.report_command("n", "nope", ReportCommandKind::Drop),
            Err(Error::NotFound { .. })
        ));
        h.parked("FailedPrecondition", "instance ended");
        // Parked: no longer in flight (a stop does not wait), but the pair is taken.
        assert_eq!(a.in_flight(), 0);
        assert!(matches!(
            a.claim(&req("n", "x")),
            Err(Error::AlreadyExists { .. })
        ));
        let info = a.get("n", "x").unwrap();
        assert_eq!(info.state(), ActionState::Undeliverable);
        assert_eq!(info.report_last_code, "FailedPrecondition");
        // Sent before the runner waits: kept, and only one at a time.
        let answer = a.report_command("n", "x", ReportCommandKind::Drop).unwrap();
        assert!(a
            .report_command("n", "x", ReportCommandKind::Retry)
            .is_err());
        let command = h.next_command().await;
        assert_eq!(command.kind, ReportCommandKind::Drop);
        let done = h.final_info(true);
        assert!(done.dropped_at_ms > 0 && done.reported_at_ms == 0);
        h.retired(done.clone());
        command.done.send(done).unwrap();
        assert_eq!(answer.await.unwrap().state(), ActionState::Reported);
        a.claim(&req("n", "x")).unwrap();
    }

    #[test]
    fn restored_history_is_listed_and_its_ids_free() {
        let a = Arc::new(Actions::default());
        let old = |id: &str| ActionInfo {
            namespace: "n".into(),
            action_id: id.into(),
            state: ActionState::Reported as i32,
            accepted_at_ms: 5,
            output: b"kept".to_vec(),
            ..Default::default()
        };
        a.restore(vec![old("h1"), old("h2")]);
        assert_eq!(a.list(Some("n"), Some(ActionState::Reported)).len(), 2);
        assert_eq!(a.get("n", "h1").unwrap().output, b"kept");
        assert_eq!(a.in_flight(), 0);
        // Run again (recovery claims a stored action of that id): it replaces it.
        let h = a.claim(&req("n", "h1")).unwrap();
        h.set_accepted_at(3);
        assert_eq!(a.get("n", "h1").unwrap().accepted_at_ms, 3);
        assert_eq!(a.get("n", "h1").unwrap().state(), ActionState::Accepted);
        h.set_accepted_at(0);
        assert_eq!(a.get("n", "h1").unwrap().accepted_at_ms, 3, "0 is unknown");
    }

    #[test]
    fn reported_entries_are_evicted() {
        let a = Arc::new(Actions::default());
        for i in 0..KEEP_REPORTED + 5 {
            a.claim(&req("n", &format!("a{i}"))).unwrap().reported();
        }
        assert_eq!(a.list(None, None).len(), KEEP_REPORTED);
        assert!(a.get("n", "a0").is_none());
    }

    #[test]
    fn reported_entries_are_evicted_by_bytes_too() {
        let a = Arc::new(Actions::default());
        let big = vec![0u8; 10 << 20];
        for i in 0..10 {
            let h = a.claim(&req("n", &format!("b{i}"))).unwrap();
            h.finished(&Outcome::Output(big.clone()));
            h.logs
                .stderr
                .lock()
                .unwrap()
                .extend_from_slice(&[1; 1 << 20]);
            h.reported();
        }
        // Five of 11 MiB fit in 64 MiB; the oldest went first.
        let kept = a.list(None, None);
        assert_eq!(kept.len(), 5);
        assert_eq!(kept[0].action_id, "b5");
        assert!(a.get("n", "b4").is_none());
        // Claimed again: no longer counted as reported.
        a.claim(&req("n", "b9")).unwrap();
        assert_eq!(a.lock().reported_bytes, 4 * (11 << 20));
    }
}
