//! The store: what must survive a crash of `isolated`, in an embedded
//! database (redb) under the state directory.
//!
//! One record per accepted action, keyed `<namespace>/<actionId>`, written
//! (and fsync'd) before `RunIsolate` answers OK, moved through the action's
//! states, carrying a cancel once one is asked for and the report once the
//! action finished (the outbox), and deleted once the flow engine
//! acknowledged that report (or an operator dropped it). A report the flow
//! engine refused past `report_give_up_secs` stays as it is, marked
//! undeliverable (parked), until an operator retries or drops it. Records
//! are protobuf, reusing the wire messages, so the format is versionable.
//!
//! Beside the actions, the recent-results history (issue 14): the newest
//! [`HISTORY_KEEP`] reported actions as the control API showed them, so
//! `isolatectl ls`/`get` show finished actions after a restart.
//!
//! The file gives its space back (issue 13): redb reuses freed pages but
//! never shrinks the file by itself, so a burst of large reports once left
//! a 1.6 GB file behind for good. The writer compacts it when it is idle
//! and the file is much larger than what it holds ([`worth_compacting`]).
//!
//! Does not decide anything: recovery (`recover`) reads it back.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::proto::control::{ActionInfo, ActionState};
use crate::proto::flow::ReportActionResultsRequest;
use crate::proto::isolate::RunIsolateRequest;

const ACTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("actions");
/// Reported actions (`ActionInfo`), keyed `<reported ms, 16 digits>/<key>`
/// so the oldest comes first.
const HISTORY: TableDefinition<&str, &[u8]> = TableDefinition::new("history");

/// How many reported actions the history keeps: as many as the control
/// API shows from memory (`actions::KEEP_REPORTED`), so a restart shows
/// what the node showed before it. With outputs capped at
/// [`HISTORY_OUTPUT_MAX`] that is at most 64 MiB of store, typically far
/// less (a report of a few KiB).
pub const HISTORY_KEEP: usize = crate::actions::KEEP_REPORTED;
/// Largest output a history record keeps (larger ones are marked
/// `output_dropped`): outputs may be 32 MiB, the history is for looking at.
pub const HISTORY_OUTPUT_MAX: usize = 64 << 10;

/// Why the store failed. Every variant is an I/O failure of the state
/// directory; callers treat them alike.
#[derive(Debug, Clone, thiserror::Error, displaydoc::Display)]
pub enum StoreError {
    /// cannot open the store {path}: {reason}
    Open { path: PathBuf, reason: String },
    /// cannot write the store: {0}
    Write(String),
    /// cannot read the store: {0}
    Read(String),
    /// record {key} in the store is corrupt: {reason}
    Corrupt { key: String, reason: String },
}

/// One accepted action as the store keeps it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredAction {
    /// The request as it arrived; registry credentials and the input are
    /// dropped once the task runs, so they do not stay on disk longer than
    /// needed (the input is in the action's data.in by then).
    #[prost(message, optional, tag = "1")]
    pub request: Option<RunIsolateRequest>,
    #[prost(enumeration = "ActionState", tag = "2")]
    pub state: i32,
    #[prost(int64, tag = "3")]
    pub accepted_at_ms: i64,
    #[prost(int64, tag = "4")]
    pub started_at_ms: i64,
    /// When the reaper must stop the task (Unix ms); set once it runs.
    #[prost(int64, tag = "5")]
    pub deadline_ms: i64,
    #[prost(string, tag = "6")]
    pub cancel_reason: String,
    /// The report, once finished: the outbox entry.
    #[prost(message, optional, tag = "7")]
    pub report: Option<ReportActionResultsRequest>,
    /// The flow engine refused the report past `report_give_up_secs`: it
    /// is parked, not sent again until an operator retries it.
    #[prost(bool, tag = "8")]
    pub undeliverable: bool,
    /// When the flow engine first refused the report permanently (Unix
    /// ms), what the give-up clock counts from; 0 while it has not.
    #[prost(int64, tag = "9")]
    pub first_refused_at_ms: i64,
    /// The flow engine's last refusal: gRPC code name and message (one line).
    #[prost(string, tag = "10")]
    pub last_refusal_code: String,
    #[prost(string, tag = "11")]
    pub last_refusal_message: String,
    /// The container (and task, snapshot, network, directory) the action
    /// runs in when it took a pre-created task (issue 16), stored before
    /// that task is started; empty: its action id.
    #[prost(string, tag = "12")]
    pub container_id: String,
}

impl StoredAction {
    pub fn key(&self) -> String {
        let r = self.request.as_ref();
        key(
            r.and_then(|r| r.namespace.as_deref()).unwrap_or_default(),
            r.and_then(|r| r.action_id.as_deref()).unwrap_or_default(),
        )
    }
}

/// Namespaces and action ids cannot contain `/`, so the key is unambiguous.
pub fn key(namespace: &str, action_id: &str) -> String {
    format!("{namespace}/{action_id}")
}

/// How hard a write must be on disk before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// fsync'd: acceptance, the deadline, the outbox.
    Durable,
    /// Lost on power failure, harmlessly: a lost state change replays as an
    /// earlier state; a lost delete re-delivers a report (at least once).
    Lazy,
}

/// A change waiting for the writer.
enum Op {
    Put(String, Vec<u8>),
    Remove(String),
    /// Sets the cancel reason of the record, if there is one, in the same
    /// transaction that reads it: the runner's own writes of the record
    /// queue in the same writer, so neither undoes the other.
    Cancel(String, String),
    /// Removes the record and adds its history entry, in one transaction
    /// (a crash between the two would lose the entry or deliver twice),
    /// then trims the history to [`HISTORY_KEEP`].
    Retire {
        key: String,
        history_key: String,
        info: Vec<u8>,
    },
}

struct Job {
    op: Op,
    sync: Sync,
    done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// Changes go through one writer thread that commits whatever has queued
/// up in one transaction: under load many accepts share one fsync (group
/// commit), and redb's blocking commit never runs on an async worker.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// Shared with the writer, which takes it exclusively to compact.
    db: Arc<RwLock<Database>>,
    jobs: std::sync::Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    writer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Inner {
    /// Lets the writer finish what is queued and release the database, so
    /// the file can be opened again (by a restart in the same process).
    fn drop(&mut self) {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = w.join();
        }
    }
}

/// Most changes one transaction takes, so one slow batch cannot grow
/// without bound.
const MAX_BATCH: usize = 512;

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            path: path.to_owned(),
            reason,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        }
        let db = Database::create(path).map_err(|e| open_err(e.to_string()))?;
        // Records may hold registry credentials until the pull is done.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| open_err(e.to_string()))?;
        let txn = db.begin_write().map_err(|e| open_err(e.to_string()))?;
        txn.open_table(ACTIONS)
            .map_err(|e| open_err(e.to_string()))?;
        txn.open_table(HISTORY)
            .map_err(|e| open_err(e.to_string()))?;
        txn.commit().map_err(|e| open_err(e.to_string()))?;
        let db = Arc::new(RwLock::new(db));
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let writer_db = db.clone();
        let file = path.to_owned();
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer(writer_db, &file, rx))
            .map_err(|e| open_err(e.to_string()))?;
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                jobs: std::sync::Mutex::new(Some(jobs)),
                writer: std::sync::Mutex::new(Some(handle)),
            }),
        })
    }

    /// Inserts or replaces a record.
    pub async fn put(&self, record: &StoredAction, sync: Sync) -> Result<(), StoreError> {
        let bytes = prost::Message::encode_to_vec(record);
        self.submit(Op::Put(record.key(), bytes), sync).await
    }

    pub async fn remove(
        &self,
        namespace: &str,
        action_id: &str,
        sync: Sync,
    ) -> Result<(), StoreError> {
        self.remove_key(&key(namespace, action_id), sync).await
    }

    /// Records durably that the action is to be cancelled, so a crash right
    /// after the cancel was acknowledged still ends in a cancelled report.
    /// A record that is gone (the action finished meanwhile) is left alone.
    pub async fn cancel(
        &self,
        namespace: &str,
        action_id: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.submit(
            Op::Cancel(key(namespace, action_id), reason.to_string()),
            Sync::Durable,
        )
        .await
    }

    /// The action is done with (reported, or its report dropped): its
    /// record goes, `info` (as the control API shows it now) joins the
    /// history, an output above [`HISTORY_OUTPUT_MAX`] left out.
    pub async fn retire(&self, info: &ActionInfo, sync: Sync) -> Result<(), StoreError> {
        let key = key(&info.namespace, &info.action_id);
        let mut info = info.clone();
        if info.output.len() > HISTORY_OUTPUT_MAX {
            info.output = Vec::new();
            info.output_dropped = true;
        }
        let at = info.reported_at_ms.max(info.dropped_at_ms).max(0);
        let op = Op::Retire {
            history_key: format!("{at:016}/{key}"),
            key,
            info: prost::Message::encode_to_vec(&info),
        };
        self.submit(op, sync).await
    }

    /// The history, oldest first. A record that does not decode is skipped:
    /// the history is for looking at, and one bad entry must not stop a
    /// start.
    pub fn load_history(&self) -> Result<Vec<ActionInfo>, StoreError> {
        let r = |e: &dyn std::fmt::Display| StoreError::Read(e.to_string());
        let db = self.inner.db.read().unwrap_or_else(|p| p.into_inner());
        let txn = db.begin_read().map_err(|e| r(&e))?;
        let table = txn.open_table(HISTORY).map_err(|e| r(&e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| r(&e))? {
            let (_, v) = row.map_err(|e| r(&e))?;
            if let Ok(info) = <ActionInfo as prost::Message>::decode(v.value()) {
                out.push(info);
            }
        }
        Ok(out)
    }

    pub async fn remove_key(&self, key: &str, sync: Sync) -> Result<(), StoreError> {
        self.submit(Op::Remove(key.to_string()), sync).await
    }

    async fn submit(&self, op: Op, sync: Sync) -> Result<(), StoreError> {
        let (done, result) = tokio::sync::oneshot::channel();
        let sent = match self
            .inner
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            Some(jobs) => jobs.send(Job { op, sync, done }).is_ok(),
            None => false,
        };
        if !sent {
            return Err(StoreError::Write("the store's writer has stopped".into()));
        }
        result
            .await
            .map_err(|_| StoreError::Write("the store's writer has stopped".into()))?
    }

    /// Every record, for recovery at start-up.
    pub fn load_all(&self) -> Result<Vec<StoredAction>, StoreError> {
        let r = |e: &dyn std::fmt::Display| StoreError::Read(e.to_string());
        let db = self.inner.db.read().unwrap_or_else(|p| p.into_inner());
        let txn = db.begin_read().map_err(|e| r(&e))?;
        let table = txn.open_table(ACTIONS).map_err(|e| r(&e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| r(&e))? {
            let (k, v) = row.map_err(|e| r(&e))?;
            let rec: StoredAction =
                prost::Message::decode(v.value()).map_err(|e| StoreError::Corrupt {
                    key: k.value().to_string(),
                    reason: e.to_string(),
                })?;
            out.push(rec);
        }
        Ok(out)
    }
}

/// The writer thread: one transaction per batch of queued changes, made
/// durable if any of them asks for it; and, once removals have happened
/// and nothing is queued, a look at whether the file should be compacted.
fn writer(db: Arc<RwLock<Database>>, path: &Path, rx: std::sync::mpsc::Receiver<Job>) {
    let mut removed = false;
    let mut last_look = Instant::now() - COMPACT_EVERY;
    loop {
        let first = if removed {
            // Idle, or a look is due: compact off the request path, between
            // batches, never inside one an accept waits for.
            match rx.recv_timeout(COMPACT_EVERY.saturating_sub(last_look.elapsed())) {
                Ok(job) => Some(job),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => break,
            }
        };
        let Some(first) = first else {
            removed = false;
            last_look = Instant::now();
            let mut db = db.write().unwrap_or_else(|p| p.into_inner());
            compact_if_worth_it(&mut db, path);
            continue;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // A delivered report is retired (its record removed, its history
        // entry added): that frees pages as a plain removal does.
        removed |= batch
            .iter()
            .any(|j| matches!(j.op, Op::Remove(_) | Op::Retire { .. }));
        let durable = batch.iter().any(|j| j.sync == Sync::Durable);
        let result = commit(
            &db.read().unwrap_or_else(|p| p.into_inner()),
            &batch,
            durable,
        );
        for job in batch {
            let _ = job.done.send(result.clone());
        }
    }
}

/// At most one look at the file's size per this long, after removals: a
/// look is a write transaction's statistics (a walk of the trees), so not
/// after every delivered report under load.
const COMPACT_EVERY: Duration = Duration::from_secs(2);
/// A file this small is left alone: redb's own overhead is a few MiB, and
/// compacting it would give back next to nothing.
const COMPACT_MIN_FILE: u64 = 16 << 20;
/// Compact when the file is this many times what its live pages take: a
/// quarter live means the copy compaction makes is small next to what it
/// gives back, and a store with steady traffic (which reuses its free
/// pages) is not compacted over and over.
const COMPACT_RATIO: u64 = 4;

/// Most live bytes a compaction moves: writes wait while it runs, and its
/// time goes with what it moves (measured under a load average of 30:
/// 33 MiB live took 5 s, 12 KiB 22 ms), so a store holding more than this
/// waits until its reports are delivered.
const COMPACT_MAX_LIVE: u64 = 8 << 20;

/// Whether a file of `file` bytes, `live` of them in use, is worth it.
fn worth_compacting(file: u64, live: u64) -> bool {
    file > COMPACT_MIN_FILE && live <= COMPACT_MAX_LIVE && file > live.saturating_mul(COMPACT_RATIO)
}

fn compact_if_worth_it(db: &mut Database, path: &Path) {
    let Ok(file) = std::fs::metadata(path).map(|m| m.len()) else {
        return;
    };
    if file <= COMPACT_MIN_FILE {
        return;
    }
    let live = (|| -> Result<u64, String> {
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        let stats = txn.stats().map_err(|e| e.to_string())?;
        txn.abort().map_err(|e| e.to_string())?;
        // What the records and the trees over them take; pages freed by
        // lazy (non-durable) commits still count as allocated until a
        // durable one, which compaction makes.
        Ok(stats.stored_bytes() + stats.metadata_bytes())
    })();
    let live = match live {
        Ok(live) => live,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the store's statistics");
            return;
        }
    };
    if !worth_compacting(file, live) {
        return;
    }
    let started = Instant::now();
    match db.compact() {
        Ok(_) => {
            let after = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            tracing::info!(
                before = file,
                after,
                ms = started.elapsed().as_millis() as u64,
                "compacted the store"
            );
        }
        Err(e) => tracing::warn!(error = %e, "cannot compact the store"),
    }
}

fn commit(db: &Database, batch: &[Job], durable: bool) -> Result<(), StoreError> {
    let w = |e: &dyn std::fmt::Display| StoreError::Write(e.to_string());
    let mut txn = db.begin_write().map_err(|e| w(&e))?;
    if !durable {
        txn.set_durability(Durability::None).map_err(|e| w(&e))?;
    }
    {
        let mut table = txn.open_table(ACTIONS).map_err(|e| w(&e))?;
        let mut history = txn.open_table(HISTORY).map_err(|e| w(&e))?;
        for job in batch {
            match &job.op {
                Op::Put(k, v) => table.insert(k.as_str(), v.as_slice()).map(|_| ()),
                Op::Remove(k) => table.remove(k.as_str()).map(|_| ()),
                Op::Retire {
                    key,
                    history_key,
                    info,
                } => {
                    table.remove(key.as_str()).map_err(|e| w(&e))?;
                    history
                        .insert(history_key.as_str(), info.as_slice())
                        .map_err(|e| w(&e))?;
                    use redb::ReadableTableMetadata;
                    let len = history.len().map_err(|e| w(&e))? as usize;
                    for _ in HISTORY_KEEP..len {
                        if history.pop_first().map_err(|e| w(&e))?.is_none() {
                            break;
                        }
                    }
                    Ok(())
                }
                Op::Cancel(k, reason) => {
                    let current = table
                        .get(k.as_str())
                        .map_err(|e| w(&e))?
                        .map(|v| v.value().to_vec());
                    let Some(bytes) = current else { continue };
                    let mut rec: StoredAction =
                        prost::Message::decode(bytes.as_slice()).map_err(|e| w(&e))?;
                    if rec.state() == ActionState::Finished {
                        // Its report is written: too late to cancel.
                        continue;
                    }
                    rec.cancel_reason = reason.clone();
                    let bytes = prost::Message::encode_to_vec(&rec);
                    table.insert(k.as_str(), bytes.as_slice()).map(|_| ())
                }
            }
            .map_err(|e| w(&e))?;
        }
    }
    txn.commit().map_err(|e| w(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ns: &str, id: &str, state: ActionState) -> StoredAction {
        StoredAction {
            request: Some(RunIsolateRequest {
                namespace: Some(ns.into()),
                action_id: Some(id.into()),
                data: Some(vec![0, 1, 255]),
                ..Default::default()
            }),
            state: state as i32,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn concurrent_writes_are_all_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("store.redb")).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let sync = if i % 2 == 0 {
                    Sync::Durable
                } else {
                    Sync::Lazy
                };
                s.put(&rec("n", &format!("a{i}"), ActionState::Accepted), sync)
                    .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(s.load_all().unwrap().len(), 200);
    }

    #[test]
    fn compaction_thresholds() {
        assert!(!worth_compacting(10 << 20, 0), "a small file is left alone");
        assert!(worth_compacting(1 << 30, 1 << 20));
        assert!(!worth_compacting(100 << 20, 30 << 20), "30% live is kept");
        assert!(
            !worth_compacting(1 << 30, 100 << 20),
            "100 MiB live is not moved while writes wait"
        );
    }

    #[tokio::test]
    async fn space_is_given_back_after_a_burst() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let s = Store::open(&path).unwrap();
        let size = || std::fs::metadata(&path).unwrap().len();
        let mut big = rec("n", "x", ActionState::Finished);
        big.report = Some(ReportActionResultsRequest {
            output: Some(vec![7; 4 << 20]),
            ..Default::default()
        });
        for i in 0..20 {
            let mut r = big.clone();
            r.request.as_mut().unwrap().action_id = Some(format!("a{i}"));
            s.put(&r, Sync::Durable).await.unwrap();
        }
        s.put(&rec("n", "keep", ActionState::Accepted), Sync::Durable)
            .await
            .unwrap();
        let burst = size();
        assert!(burst > 80 << 20, "the burst took {burst} bytes");
        for i in 0..20 {
            s.remove("n", &format!("a{i}"), Sync::Lazy).await.unwrap();
        }
        let removed = Instant::now();
        let deadline = removed + Duration::from_secs(20);
        while size() > COMPACT_MIN_FILE && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let after = size();
        eprintln!(
            "store: {burst} bytes after the burst, {after} {:?} after the removals",
            removed.elapsed()
        );
        assert!(
            after <= COMPACT_MIN_FILE,
            "still {after} bytes after a burst of {burst}"
        );
        // Still usable, and nothing live was lost.
        s.put(&rec("n", "more", ActionState::Accepted), Sync::Durable)
            .await
            .unwrap();
        let keys: Vec<String> = s
            .load_all()
            .unwrap()
            .iter()
            .map(StoredAction::key)
            .collect();
        assert_eq!(keys, ["n/keep", "n/more"]);
    }

    #[tokio::test]
    async fn retired_actions_join_the_bounded_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let info = |id: &str, at: i64, output: Vec<u8>| ActionInfo {
            namespace: "n".into(),
            action_id: id.into(),
            state: ActionState::Reported as i32,
            reported_at_ms: at,
            output,
            ..Default::default()
        };
        {
            let s = Store::open(&path).unwrap();
            s.put(&rec("n", "a", ActionState::Finished), Sync::Durable)
                .await
                .unwrap();
            s.retire(&info("a", 10, b"out".to_vec()), Sync::Durable)
                .await
                .unwrap();
            s.retire(
                &info("big", 11, vec![b'x'; HISTORY_OUTPUT_MAX + 1]),
                Sync::Lazy,
            )
            .await
            .unwrap();
            assert!(
                s.load_all().unwrap().is_empty(),
                "the record left the outbox"
            );
        }
        let s = Store::open(&path).unwrap();
        let history = s.load_history().unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[0].action_id, "a");
        assert_eq!(history[0].output, b"out");
        assert!(history[1].output.is_empty() && history[1].output_dropped);
        // Bounded: the oldest go first.
        for i in 0..HISTORY_KEEP as i64 {
            s.retire(&info(&format!("h{i}"), 100 + i, vec![]), Sync::Lazy)
                .await
                .unwrap();
        }
        let history = s.load_history().unwrap();
        assert_eq!(history.len(), HISTORY_KEEP);
        assert_eq!(history[0].action_id, "h0");
        assert_eq!(
            history[HISTORY_KEEP - 1].action_id,
            format!("h{}", HISTORY_KEEP - 1)
        );
    }

    #[tokio::test]
    async fn parked_reports_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let s = Store::open(&path).unwrap();
            let mut r = rec("n", "p", ActionState::Finished);
            r.undeliverable = true;
            r.first_refused_at_ms = 42;
            r.last_refusal_code = "FailedPrecondition".into();
            r.last_refusal_message = "instance ended".into();
            s.put(&r, Sync::Durable).await.unwrap();
        }
        let all = Store::open(&path).unwrap().load_all().unwrap();
        assert!(all[0].undeliverable);
        assert_eq!(all[0].first_refused_at_ms, 42);
        assert_eq!(all[0].last_refusal_code, "FailedPrecondition");
    }

    #[tokio::test]
    async fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let s = Store::open(&path).unwrap();
            s.put(&rec("n", "a", ActionState::Accepted), Sync::Durable)
                .await
                .unwrap();
            s.put(&rec("n", "b", ActionState::Running), Sync::Durable)
                .await
                .unwrap();
            let mut done = rec("n", "b", ActionState::Finished);
            done.report = Some(ReportActionResultsRequest {
                action_id: Some("b".into()),
                output: Some(b"out".to_vec()),
                ..Default::default()
            });
            s.put(&done, Sync::Durable).await.unwrap();
            s.put(&rec("m", "c", ActionState::Accepted), Sync::Lazy)
                .await
                .unwrap();
            s.remove("m", "c", Sync::Durable).await.unwrap();
        }
        let s = Store::open(&path).unwrap();
        let mut all = s.load_all().unwrap();
        all.sort_by_key(|r| r.key());
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].key(), "n/a");
        assert_eq!(all[0].request.as_ref().unwrap().data, Some(vec![0, 1, 255]));
        assert_eq!(all[1].state(), ActionState::Finished);
        assert_eq!(
            all[1].report.as_ref().unwrap().output,
            Some(b"out".to_vec())
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
