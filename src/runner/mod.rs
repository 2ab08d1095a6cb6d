//! The runner: one accepted action from its data directory to its report
//! and the removal of everything it used.
//!
//! Phases, each a tracing span under the action's span: `pull`, `create`
//! (snapshot, spec, container, task), `wait` (start, then exit, timeout or
//! cancel), `collect` (exit status, OOM, files, logs), `cleanup` (release on
//! collect: as soon as the report is stored, ISOLATE.md §10), `report`.
//! The containerd call order follows containerd's own client
//! (CONTAINERD-NOTES.md): Wait before Start; the action's snapshot is a GC
//! root from its Prepare until its explicit removal.
//! Stopping a task at its deadline is the reaper's (`crate::reaper`); every
//! containerd call goes through `crate::engine`.
//!
//! This file owns the order of an action's life (`run`: fresh, resumed
//! after a restart, or only its report left to deliver; waiting for a slot;
//! retrying while containerd is away), and the task it runs in (`spawn`:
//! a panic in it becomes the action's internal error, issue 15). One job per file beside it: making
//! the task (`create`), watching it (`supervise`), reading what it left
//! (`collect`), giving everything back (`release`), delivering the report
//! or parking it (`deliver`), its output streams
//! (`stdio`), queue places (`queue`), the namespaces' shims
//! (`shim_keeper`), and why a run failed (`error`).

pub mod collect;
mod create;
mod deliver;
mod error;
#[cfg(test)]
mod lifecycle_tests;
pub mod pool;
pub mod queue;
mod release;
pub use release::Deferred;
pub mod shim_keeper;
pub mod stdio;
mod supervise;

pub use crate::lifecycle::Start;
pub use error::RunError;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, info_span, warn, Instrument};

use crate::actions::{now_ms, Handle};
use crate::config::Config;
use crate::disk::Disks;
use crate::engine::{Engine, EngineError, Runtimes};
use crate::image::ImageService;
use crate::network::{NetTarget, Networks};
use crate::proto::control::ActionState;
use crate::report::flow::Reporter;
use crate::report::{ErrorCode, Outcome, Report};
use crate::request::ActionRequest;
use crate::spec::SpecTemplate;
use crate::store::{Store, StoredAction, Sync};

use self::shim_keeper::{ShimHold, ShimKeepers};
use self::stdio::Stdio;

/// What the runner needs, shared by every action.
pub struct Runner {
    pub cfg: Arc<Config>,
    /// Every containerd call of the lifecycle.
    pub engine: Arc<dyn Engine>,
    /// Each namespace's OCI runtime (binary and state root), for its
    /// containers' runtime options and for freeing an id a create cut
    /// short left with the runtime.
    pub runtimes: Runtimes,
    pub images: Arc<ImageService>,
    pub template: SpecTemplate,
    pub reporter: Reporter,
    pub networks: Networks,
    /// Each action's filesystem of its size's disk limit.
    pub disks: Disks,
    pub store: Store,
    /// Each namespace's shim keeper, when `shim_group = "namespace"`.
    pub keepers: Option<ShimKeepers>,
    /// One permit per action allowed to run at once.
    pub slots: tokio::sync::Semaphore,
    /// Actions waiting for a permit.
    pub queued: queue::Queue,
    /// The memory and pids the running actions may have together.
    pub budget: queue::Budget,
    /// Whether the node takes work; once it drains, queued actions are left
    /// accepted for the next start (issue 17).
    pub readiness: Arc<crate::readiness::Readiness>,
    /// Pre-created tasks (issue 16).
    pub pool: pool::Pool,
    /// Where the host's cgroup hierarchies are (`engine::ops::CGROUP_MOUNT`;
    /// a temporary directory in unit tests), for removing what a create cut
    /// short left of an action's cgroup.
    pub cgroup_mount: PathBuf,
    /// Releases that met containerd away, done again once it is back.
    pub deferred: Deferred,
}

/// Where an action runs: the id of its container, task and snapshot, which
/// also names its network attachment, cgroup and directory
/// (`<state>/actions/<cns>/<id>`).
struct Place {
    oid: String,
    dir: PathBuf,
}

impl Place {
    fn new(cfg: &Config, cns: &str, oid: &str) -> Place {
        Place {
            oid: oid.to_string(),
            dir: cfg.actions_dir().join(cns).join(oid),
        }
    }
}

/// One action in the runner's hands.
pub struct Action {
    pub req: ActionRequest,
    /// The containerd namespace.
    pub cns: String,
    /// Its containerd objects, directory, network and cgroup, named by its
    /// own id (or, after a restart, by the pre-created task it had taken)...
    own: Place,
    /// ... or by the pre-created task it takes (issue 16), once it does.
    taken: std::sync::OnceLock<Place>,
    /// Its key in the pool, once it looked there: refilled again when it
    /// gives its running slot back.
    pool_key: std::sync::OnceLock<pool::PoolKey>,
    /// Where its input waits (`crate::inputs`), removed with the rest.
    pub input: PathBuf,
    /// Whether the input is there rather than in `req.data` (a record
    /// stored before inputs were spooled carries it inline).
    spooled: bool,
    pub handle: Handle,
    /// Its claim on the namespace's shim, from its task's creation until
    /// the task is deleted.
    shim: std::sync::Mutex<Option<ShimHold>>,
    /// Its place in the queue until it gets a running slot.
    queue_place: std::sync::Mutex<Option<queue::QueuePlace>>,
}

impl Action {
    pub fn new(cfg: &Config, req: ActionRequest, handle: Handle) -> Action {
        let cns = cfg.containerd_namespace(&req.namespace);
        let own = Place::new(cfg, &cns, &req.action_id);
        let input = crate::inputs::path(&cfg.inputs_dir(), &cns, &req.action_id);
        handle.set_containerd_namespace(&cns);
        Action {
            req,
            cns,
            own,
            taken: Default::default(),
            pool_key: Default::default(),
            input,
            spooled: false,
            handle,
            shim: Default::default(),
            queue_place: Default::default(),
        }
    }

    /// It runs in the container `oid` (a pre-created task it took before a
    /// restart, as its record says): recovery and cleanup find that one.
    pub fn in_container(mut self, cfg: &Config, oid: &str) -> Action {
        if !oid.is_empty() {
            self.own = Place::new(cfg, &self.cns, oid);
        }
        self
    }

    fn place(&self) -> &Place {
        self.taken.get().unwrap_or(&self.own)
    }

    /// The id of its container, task and snapshot (and network, cgroup and
    /// directory): its action id unless it runs in a pre-created task.
    pub fn id(&self) -> &str {
        &self.place().oid
    }

    /// `<state>/actions/<cns>/<id>`.
    pub fn dir(&self) -> &std::path::Path {
        &self.place().dir
    }

    /// The action waits in the queue with `place` until it runs.
    pub fn queued(self, place: queue::QueuePlace) -> Action {
        *self.queue_place.lock().unwrap_or_else(|p| p.into_inner()) = Some(place);
        self
    }

    /// Its input waits in the spool, not in `req.data`.
    pub fn spooled(mut self) -> Action {
        self.spooled = true;
        self
    }

    /// Writes the action's input to `dest` (its data.in).
    fn write_input(&self, dest: &std::path::Path) -> Result<(), RunError> {
        if self.spooled {
            return crate::inputs::copy_to(&self.input, dest).map_err(RunError::Input);
        }
        std::fs::write(dest, &self.req.data).map_err(|source| RunError::DataDir {
            path: dest.to_owned(),
            source,
        })
    }

    /// Gives its queue place back (it runs, or will not).
    fn leave_queue(&self) {
        drop(
            self.queue_place
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
    }

    fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    fn net(&self) -> NetTarget<'_> {
        NetTarget {
            cns: &self.cns,
            action_id: self.id(),
            dir: self.dir(),
        }
    }

    pub fn cgroups_path(&self) -> String {
        crate::engine::ops::action_cgroup(&self.cns, self.id())
    }
}

/// The message of a panic's payload (`panic!` gives a `&str` or a
/// `String`).
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => s.to_string(),
            Err(_) => "no message".to_string(),
        },
    }
}

/// When an action is released, against its report's delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Release {
    /// First: its processes may outlive its report otherwise.
    Before,
    /// At the same time: the report is stored, and needs nothing of it.
    Beside,
    /// Once delivered: the report is not stored, and only the task can give
    /// it again after a crash.
    After,
}

/// How long a fresh action waits for an unreachable containerd before it
/// is reported as an internal error.
const CONTAINERD_WAIT: Duration = Duration::from_secs(300);

impl Runner {
    /// Runs one action ([`Runner::run`]) in a task of its own. A panic in
    /// it (a bug) would otherwise end the task and leave the action in
    /// flight for good, answered by nobody: it becomes the action's
    /// `au.com.direktiv.error.internal` report, stored, released and
    /// delivered like any other.
    pub fn spawn(
        self: &Arc<Self>,
        action: Action,
        record: StoredAction,
        start: Start,
    ) -> tokio::task::JoinHandle<()> {
        let runner = self.clone();
        let (req, handle) = (action.req.clone(), action.handle.clone());
        let copy = record.clone();
        let run = tokio::spawn(runner.clone().run(action, record, start).in_current_span());
        tokio::spawn(
            async move {
                let Err(e) = run.await else {
                    return;
                };
                if !e.is_panic() {
                    return;
                }
                let why = panic_message(e.into_panic());
                let span = info_span!("action", namespace = %req.namespace,
                    instance_id = req.instance_id.as_deref().unwrap_or(""), action_id = %req.action_id);
                runner
                    .after_panic(req, handle, copy, why)
                    .instrument(span)
                    .await;
            }
            .in_current_span(),
        )
    }

    /// The report of an action whose task panicked: stored, then released
    /// and delivered by the one path of a report left to deliver.
    async fn after_panic(
        self: Arc<Self>,
        req: ActionRequest,
        handle: crate::actions::Handle,
        mut record: StoredAction,
        why: String,
    ) {
        error!(panic = %crate::text::one_line(&why), "the action's task panicked; reporting it as an internal error");
        let outcome = Outcome::failed(
            ErrorCode::Internal,
            format!("isolated failed while running the action (a bug: its task panicked: {why})"),
        );
        crate::metrics::action_finished(outcome.code());
        // The delivery path shows a report as recovery left it; this one is new.
        handle.finished(&outcome);
        let (report, _) = self.store_report(&req, &mut record, outcome).await;
        let action = Action::new(&self.cfg, req, handle);
        let again = tokio::spawn(
            self.run(action, record, Start::Deliver(report))
                .in_current_span(),
        );
        if let Err(e) = again.await {
            // Not tried a third time: the report is in the store (if the
            // write worked), and the next start delivers it.
            error!(error = %e, "delivering the internal error of a panicked action failed too");
        }
    }

    /// Runs, reports and cleans up one action. Never fails: every failure
    /// becomes the action's report.
    pub async fn run(self: Arc<Self>, action: Action, mut record: StoredAction, start: Start) {
        let span = info_span!(
            "action",
            namespace = %action.req.namespace,
            instance_id = action.req.instance_id.as_deref().unwrap_or(""),
            action_id = %action.req.action_id,
        );
        async {
            let (report, release) = match start {
                Start::Deliver(report) => {
                    // Shown as finished (or parked) by recovery already.
                    // Released before the crash, or not: either way nothing
                    // of the action may wait for the flow engine.
                    (report, Release::Beside)
                }
                Start::Fresh | Start::Resume { .. } => {
                    let started = Instant::now();
                    let outcome = match start {
                        Start::Resume { deadline_ms } => self.resume(&action, deadline_ms).await,
                        _ => match self.run_fresh(&action, &mut record).await {
                            Some(outcome) => outcome,
                            None => {
                                // Draining: never started, so nothing of it
                                // exists but its accepted record, which the
                                // next start runs (at most once: it was never
                                // started here, and no other node has it).
                                info!("draining: left queued, accepted, for the next start");
                                action.handle.left_for_restart();
                                return;
                            }
                        },
                    };
                    // Its slot is free again: its pool may grow now (none is made
                    // while the node is full).
                    if let Some(key) = action.pool_key.get() {
                        self.refill(key.clone());
                    }
                    let outcome = self.within_report_limit(&action, outcome);
                    action.handle.finished(&outcome);
                    crate::metrics::action_finished(outcome.code());
                    let ms = started.elapsed().as_millis() as u64;
                    match &outcome {
                        Outcome::Output(_) => info!(code = "ok", ms, "action finished"),
                        // At the default level with its message, escaped onto
                        // one line (ISOLATE.md §10): an operator sees why
                        // without turning on debug.
                        Outcome::Failed { code, message } => info!(
                            code = %crate::text::one_line(code),
                            error = %crate::text::one_line(message),
                            ms,
                            "action failed"
                        ),
                    }
                    // An internal error may leave the task's processes alive
                    // (its shim died, say): they are gone before it is
                    // reported, or the flow engine's retry could run beside
                    // them. Any other end had the task's init exit (or
                    // stopped by the reaper), and its PID namespace with it.
                    let settled = outcome.code() != Some(ErrorCode::Internal.as_str());
                    let (report, stored) =
                        self.store_report(&action.req, &mut record, outcome).await;
                    // Release on collect (ISOLATE.md §10): the result is in
                    // the store, so the task, container, snapshot, network
                    // and data dir go now, not when a flow engine that may be
                    // down for hours acknowledges. If the write failed, they
                    // stay until delivery: after a crash the stored running
                    // state re-attaches to the exited task and collects it
                    // again, which only works while it is there.
                    let release = match (stored, settled) {
                        (false, _) => Release::After,
                        (true, true) => Release::Beside,
                        (true, false) => Release::Before,
                    };
                    (report, release)
                }
            };
            if release == Release::Before {
                self.release(&action).await;
            }
            let deliver = self
                .deliver(&action, &mut record, &report)
                .instrument(info_span!("report"));
            // Beside the delivery, not before it (issue 16): the task's
            // delete, the snapshot's removal, the disk's umount and CNI's
            // DEL were the largest piece left on a pooled action's path to
            // its report (README "Performance"), and the report needs
            // nothing of them. Either finishes
            // whatever the other does: a delivery that waits hours for the
            // flow engine does not hold the release back.
            let delivered = if release == Release::Beside {
                let (delivered, ()) = tokio::join!(deliver, self.release(&action));
                delivered
            } else {
                deliver.await
            };
            let (info, dropped) = match delivered {
                deliver::Delivered::Acknowledged => (action.handle.final_info(false), None),
                deliver::Delivered::Dropped(command) => {
                    (action.handle.final_info(true), Some(command))
                }
            };
            // Out of the store and into its history in one write; the pair
            // is free only after that, so a new action of the same id is
            // not the one removed.
            // A drop is the operator's word, durable before it is answered;
            // a lost delete of a delivered one only delivers it again.
            let sync = if dropped.is_some() {
                Sync::Durable
            } else {
                Sync::Lazy
            };
            if let Err(e) = self.store.retire(&info, sync).await {
                warn!(error = %e, "cannot remove the delivered action from the store");
            }
            if release == Release::After {
                self.release(&action).await;
            }
            action.handle.retired(info.clone());
            if let Some(command) = dropped {
                let _ = command.done.send(info);
            }
        }
        .instrument(span)
        .await
    }

    /// The one write of a finished action: its report, from its outcome,
    /// stored durably with the record moved to finished. Returns the report
    /// and whether it is stored (if not, it is still delivered from memory;
    /// only a crash before delivery would lose it).
    async fn store_report(
        &self,
        req: &ActionRequest,
        record: &mut StoredAction,
        outcome: Outcome,
    ) -> (crate::proto::flow::ReportActionResultsRequest, bool) {
        let report = Report {
            instance_id: req.instance_id.clone(),
            step: req.step,
            action_id: req.action_id.clone(),
            outcome,
        }
        .to_wire();
        crate::lifecycle::advance(
            &mut record.state,
            ActionState::Finished,
            "the stored record",
        );
        record.report = Some(report.clone());
        let stored = self.store.put(record, Sync::Durable).await;
        if let Err(e) = &stored {
            error!(error = %e, "cannot store the report");
        }
        (report, stored.is_ok())
    }

    /// The outcome as a report the flow engine will take: a report larger
    /// than `max_report_bytes` (counted as the encoded request; Direktiv's
    /// gRPC server refuses more than 4 MiB, forever) becomes the io error
    /// naming both sizes (ISOLATE.md §10).
    fn within_report_limit(&self, a: &Action, outcome: Outcome) -> Outcome {
        let report = Report {
            instance_id: a.req.instance_id.clone(),
            step: a.req.step,
            action_id: a.req.action_id.clone(),
            outcome,
        };
        let size = prost::Message::encoded_len(&report.to_wire());
        let limit = self.cfg.max_report_bytes;
        if size <= limit {
            return report.outcome;
        }
        let what = match &report.outcome {
            Outcome::Output(out) => format!("data.out ({} bytes)", out.len()),
            Outcome::Failed { .. } => "error.json's message".to_string(),
        };
        Outcome::failed(
            ErrorCode::Io,
            format!(
                "the report would be {size} bytes, more than max_report_bytes ({limit} bytes) the flow engine takes: {what} is too large"
            ),
        )
    }

    /// The memory limit of the action's size, in MiB.
    fn memory_mib(&self, a: &Action) -> u64 {
        self.cfg.size_memory_mib[a.req.size.index()]
    }

    /// A new action: waits for a slot, then runs it. While containerd is
    /// unreachable before the task started, it waits and tries again rather
    /// than report a failure that is nobody's fault. `None` when the node
    /// drains before the action had a slot: it stays accepted, unstarted.
    async fn run_fresh(self: &Arc<Self>, a: &Action, record: &mut StoredAction) -> Option<Outcome> {
        // A full node drops its pre-created tasks before an action waits
        // (issue 16): their memory and pids are the actions'.
        let (memory, pids) = self.budget.available();
        if pool::node_is_full(
            self.slots.available_permits(),
            (memory as u64, pids as u64),
            (self.memory_mib(a), self.template.pids_limit()),
        ) {
            self.evict_pool();
        }
        // The queue place was taken when the action was accepted; it is
        // given back once a slot and the action's share of the node's
        // memory and pids are had, or the action is cancelled while it
        // waits (or was before a restart: `biased`, so that wins).
        let permit = tokio::select! {
            biased;
            _ = a.handle.cancel.cancelled() => {
                a.leave_queue();
                return Some(Outcome::failed(ErrorCode::Cancelled, a.handle.cancel_reason()));
            }
            _ = self.readiness.draining().cancelled() => {
                a.leave_queue();
                return None;
            }
            p = async {
                let slot = self.slots.acquire().await?;
                let share = self.budget.take(self.memory_mib(a), self.template.pids_limit()).await?;
                Ok::<_, tokio::sync::AcquireError>((slot, share))
            } => p,
        };
        a.leave_queue();
        let _permit = match permit {
            Ok(p) => p,
            Err(_) => {
                return Some(Outcome::failed(
                    ErrorCode::Internal,
                    "isolated is shutting down",
                ))
            }
        };
        let give_up = Instant::now() + CONTAINERD_WAIT;
        loop {
            match self.attempt(a, record).await {
                Ok(outcome) => return Some(outcome),
                Err(e)
                    if e.containerd_unavailable()
                        && record.state() != ActionState::Running
                        && Instant::now() < give_up =>
                {
                    warn!(error = %e, "containerd is unreachable; waiting for it before trying again");
                    self.cleanup_containerd(a).await;
                    self.wait_for_containerd(give_up).await;
                }
                Err(RunError::Engine(EngineError::Exec {
                    path,
                    reason,
                    exit_code,
                    ..
                })) => {
                    return Some(Outcome::failed(
                        ErrorCode::Exit,
                        format!("action exited with code {exit_code}: {path}: {reason}"),
                    ))
                }
                Err(e) => return Some(Outcome::failed(e.code(), e.to_string())),
            }
        }
    }

    async fn wait_for_containerd(&self, until: Instant) {
        let mut backoff = Duration::from_millis(200);
        while Instant::now() < until {
            if self.engine.ping().await.is_ok() {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One try: pull, create, start, supervise, collect.
    async fn attempt(
        self: &Arc<Self>,
        a: &Action,
        record: &mut StoredAction,
    ) -> Result<Outcome, RunError> {
        a.handle.set_state(ActionState::Pulling);
        // Pulling is shown, not stored: recovery treats it like accepted
        // (start again), so writing it would buy nothing.
        crate::lifecycle::advance(&mut record.state, ActionState::Pulling, "the stored record");
        let image = self
            .images
            .ensure(&a.cns, &a.req.reference, &a.req.registries)
            .instrument(info_span!("pull", image = %a.req.image))
            .await
            .map_err(|e| e.in_namespace(&a.req.namespace))?;
        if a.handle.cancel.is_cancelled() {
            return Ok(Outcome::failed(
                ErrorCode::Cancelled,
                a.handle.cancel_reason(),
            ));
        }
        // The image was resolved, and checked against the request's
        // credentials, as without the pool: only the create is skipped.
        let taken = self.take(a, &image, record).await?;
        let pooled = taken.is_some();
        let (mut stdio, mut memory) = match taken {
            Some(taken) => taken,
            None => {
                // Back after containerd went away with a pre-created task
                // taken: its leftovers go first (they could not while it was
                // down).
                if a.taken.get().is_some() {
                    self.unplace(a).await;
                }
                self.prepare_dir(a).await?;
                self.create(a, &image, None)
                    .instrument(info_span!("create"))
                    .await?
            }
        };
        stdio.release();

        // Wait is registered before Start so that an instant exit is seen.
        let mut exit = self.wait_exit(a);
        let start = self
            .engine
            .start_task(&a.cns, a.id())
            .instrument(info_span!("start"));
        let started = match pooled {
            false => start.await,
            true => {
                // Beside the start, not before it: the container names the
                // action it runs for operators (`ctr c ls`), as an unpooled
                // one does by its id.
                let label = self.engine.label_container(
                    &a.cns,
                    a.id(),
                    std::collections::HashMap::from([(
                        crate::engine::LABEL_ACTION_ID.to_string(),
                        a.req.action_id.clone(),
                    )]),
                );
                let (started, labelled) = tokio::join!(start, label);
                if let Err(e) = labelled {
                    warn!(error = %e, "cannot label the pre-created task with its action");
                }
                started
            }
        };
        match started {
            Ok(()) => {}
            Err(e) if pooled && !e.is_unavailable() => {
                // Its shim died while it waited, say: the action gets a task
                // of its own, in the entry's place, as a retry would.
                warn!(error = %e, "the pre-created task did not start; creating the action's own");
                drop(exit);
                drop(stdio);
                self.unplace(a).await;
                self.prepare_dir(a).await?;
                (stdio, memory) = self
                    .create(a, &image, None)
                    .instrument(info_span!("create"))
                    .await?;
                stdio.release();
                exit = self.wait_exit(a);
                self.engine
                    .start_task(&a.cns, a.id())
                    .instrument(info_span!("start"))
                    .await?;
            }
            Err(e) => return Err(e.into()),
        }
        // Its key's pool is refilled now, behind the action's own Start in
        // the namespace's shim rather than before it (`take`).
        if let Some(key) = a.pool_key.get() {
            self.refill(key.clone());
        }
        let started_ms = now_ms();
        let deadline_ms = started_ms + a.req.timeout.as_millis() as i64;
        crate::lifecycle::advance(&mut record.state, ActionState::Running, "the stored record");
        record.started_at_ms = started_ms;
        record.deadline_ms = deadline_ms;
        // The credentials did their job; they need not stay on disk. Nor
        // does the input (up to 32 MiB, rewritten by every later put): it is
        // in data.in, and a running action is re-attached, never run again.
        if let Some(r) = record.request.as_mut() {
            r.registries.clear();
            r.data = None;
        }
        // A cancel asked for meanwhile is in the store: keep it there.
        record.cancel_reason = a.handle.pending_cancel().unwrap_or_default();
        if let Err(e) = self.store.put(record, Sync::Durable).await {
            // The task runs; losing the deadline only matters after a crash.
            error!(error = %e, "cannot store the running state");
        }
        // Shown as running only once stored as running: an action the
        // control API calls running is re-attached, deadline and all, by
        // the next start after a crash (before, it is started again).
        a.handle.set_running(started_ms, a.id());
        let (code, stopped) = self
            .supervise(a, deadline_ms, &mut exit)
            .instrument(info_span!("wait"))
            .await?;
        if let Some(e) = self.launch_failure(a, code) {
            return Err(e);
        }
        Ok(collect::collect(self, a, stdio, code, stopped, memory)
            .instrument(info_span!("collect"))
            .await
            .outcome())
    }

    /// An action whose task was started by an earlier run of isolated:
    /// waits for it (or stops it, if its deadline passed meanwhile) and
    /// collects it like any other.
    async fn resume(&self, a: &Action, deadline_ms: i64) -> Outcome {
        // The task already runs, so it never waits for a slot; it takes one
        // (and its share of the budget) if there is one, so new actions see
        // the node as busy as it is.
        let _permit = self.slots.try_acquire().ok();
        let _share = self
            .budget
            .try_take(self.memory_mib(a), self.template.pids_limit());
        if let Err(e) = self.engine.task(&a.cns, a.id()).await {
            let e = RunError::Engine(e);
            return Outcome::failed(
                e.code(),
                format!("cannot re-attach to the action's task after a restart: {e}"),
            );
        }
        info!("re-attached to the running task");
        let stdio = Stdio::reopen(a.dir(), a.handle.logs.clone());
        // Its deadline was stored as start + timeout: the start it shows is
        // the task's, not this restart's.
        a.handle
            .set_running(deadline_ms - a.req.timeout.as_millis() as i64, a.id());
        let mut exit = self.wait_exit(a);
        let waited = self
            .supervise(a, deadline_ms, &mut exit)
            .instrument(info_span!("wait"))
            .await;
        match waited {
            Ok((code, stopped)) => {
                let memory = (self.cfg.size_memory_mib[a.req.size.index()] as i64) << 20;
                collect::collect(self, a, stdio, code, stopped, memory)
                    .instrument(info_span!("collect"))
                    .await
                    .outcome()
            }
            Err(e) => Outcome::failed(e.code(), e.to_string()),
        }
    }
}
