//! The runner: one accepted action from its data directory to its report
//! and the removal of everything it used.
//!
//! Phases, each a tracing span under the action's span: `pull`, `create`
//! (snapshot, spec, container, task), `wait` (start, then exit, timeout or
//! cancel), `collect` (exit status, OOM, files, logs), `report`, `cleanup`.
//! The containerd call order follows containerd's own client
//! (CONTAINERD-NOTES.md): Wait before Start; the action's snapshot is a GC
//! root from its Prepare until its explicit removal.
//! Stopping a task at its deadline is the reaper's (`crate::reaper`).

pub mod collect;
pub mod shim_keeper;
pub mod stdio;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_client::services::v1::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest};
use containerd_client::services::v1::{
    container::Runtime, Container, CreateContainerRequest, CreateTaskRequest,
    DeleteContainerRequest, DeleteTaskRequest, GetRequest, KillRequest, StartRequest, WaitRequest,
};
use tonic::Code;
use tracing::{error, info, info_span, warn, Instrument};

use crate::actions::{now_ms, Handle};
use crate::config::Config;
use crate::containerd::{self as cd_mod, with_ns, Containerd};
use crate::image::{Image, ImageError, ImageService};
use crate::network::{NetTarget, NetworkError, Networks};
use crate::proto::control::ActionState;
use crate::proto::flow::ReportActionResultsRequest;
use crate::reaper;
use crate::report::flow::Reporter;
use crate::report::{ErrorCode, Outcome, Report, Stopped};
use crate::request::ActionRequest;
use crate::spec::{self, SpecError, SpecInput, SpecTemplate};
use crate::store::{Store, StoreError, StoredAction, Sync};

use self::shim_keeper::{ShimHold, ShimKeepers};
use self::stdio::Stdio;

/// Why an action could not be run to its end. Each names what failed.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum RunError {
    /// cannot prepare the action's data directory {path}: {source}
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// {0}
    Image(#[from] ImageError),
    /// {0}
    Spec(#[from] SpecError),
    /// containerd failed to {what}: {message}
    Containerd {
        what: &'static str,
        message: String,
        code: Code,
    },
    /// {0}
    Store(#[from] StoreError),
    /// {0}
    Network(#[from] NetworkError),
}

impl RunError {
    fn containerd(what: &'static str) -> impl FnOnce(tonic::Status) -> RunError {
        move |s| RunError::Containerd {
            what,
            message: s.message().to_string(),
            code: s.code(),
        }
    }

    /// Whether containerd could not be reached (as opposed to refusing).
    pub fn containerd_unavailable(&self) -> bool {
        matches!(
            self,
            RunError::Containerd {
                code: Code::Unavailable,
                ..
            } | RunError::Image(ImageError::Internal { .. })
        )
    }

    /// The report code: the image's fault, the data dir's, or ours.
    pub fn code(&self) -> ErrorCode {
        match self {
            RunError::DataDir { .. } => ErrorCode::Io,
            RunError::Network(_) => ErrorCode::Network,
            RunError::Image(ImageError::Internal { .. }) => ErrorCode::Internal,
            RunError::Image(_) => ErrorCode::Image,
            RunError::Spec(SpecError::NoCommand | SpecError::User { .. }) => ErrorCode::Image,
            RunError::Spec(_) | RunError::Containerd { .. } | RunError::Store(_) => {
                ErrorCode::Internal
            }
        }
    }
}

/// What the runner needs, shared by every action.
pub struct Runner {
    pub cfg: Arc<Config>,
    pub cd: Containerd,
    pub images: Arc<ImageService>,
    pub template: SpecTemplate,
    pub reporter: Reporter,
    pub networks: Networks,
    pub store: Store,
    /// Each namespace's shim keeper, when `shim_group = "namespace"`.
    pub keepers: Option<ShimKeepers>,
    /// One permit per action allowed to run at once.
    pub slots: tokio::sync::Semaphore,
    /// Actions waiting for a permit.
    pub queued: AtomicUsize,
}

/// One action in the runner's hands.
pub struct Action {
    pub req: ActionRequest,
    /// The containerd namespace.
    pub cns: String,
    /// `<state>/actions/<cns>/<actionId>`.
    pub dir: PathBuf,
    pub handle: Handle,
    /// Its claim on the namespace's shim, from its task's creation until
    /// the task is deleted.
    shim: std::sync::Mutex<Option<ShimHold>>,
}

impl Action {
    pub fn new(cfg: &Config, req: ActionRequest, handle: Handle) -> Action {
        let cns = cfg.containerd_namespace(&req.namespace);
        let dir = cfg.actions_dir().join(&cns).join(&req.action_id);
        Action {
            req,
            cns,
            dir,
            handle,
            shim: Default::default(),
        }
    }

    fn id(&self) -> &str {
        &self.req.action_id
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn net(&self) -> NetTarget<'_> {
        NetTarget {
            cns: &self.cns,
            action_id: &self.req.action_id,
            dir: &self.dir,
        }
    }

    pub fn cgroups_path(&self) -> String {
        // Flat, one directory per action under one fixed parent: runc
        // removes the action's own directory, and a per-namespace parent
        // would be left behind in every controller. `@` is in neither a
        // namespace nor an action id, so the name is unambiguous.
        format!("/isolated/{}@{}", self.cns, self.req.action_id)
    }
}

/// Where a run starts: a new action, one recovered after a restart whose
/// task may still be running, or one whose report is still to deliver.
pub enum Start {
    Fresh,
    Resume { deadline_ms: i64 },
    Deliver(ReportActionResultsRequest),
}

/// How long a fresh action waits for an unreachable containerd before it
/// is reported as an internal error.
const CONTAINERD_WAIT: Duration = Duration::from_secs(300);

impl Runner {
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
            let report = match start {
                Start::Deliver(report) => {
                    action.handle.finished(&Outcome::from_wire(&report));
                    report
                }
                Start::Fresh | Start::Resume { .. } => {
                    let started = Instant::now();
                    let outcome = match start {
                        Start::Resume { deadline_ms } => self.resume(&action, deadline_ms).await,
                        _ => self.run_fresh(&action, &mut record).await,
                    };
                    action.handle.finished(&outcome);
                    crate::metrics::action_finished(outcome.code());
                    info!(
                        code = outcome.code().unwrap_or("ok"),
                        ms = started.elapsed().as_millis() as u64,
                        "action finished"
                    );
                    let report = Report {
                        instance_id: action.req.instance_id.clone(),
                        step: action.req.step,
                        action_id: action.req.action_id.clone(),
                        outcome,
                    }
                    .to_wire();
                    record.state = ActionState::Finished as i32;
                    record.report = Some(report.clone());
                    if let Err(e) = self.store.put(&record, Sync::Durable).await {
                        // Still delivered from memory; only a crash before
                        // delivery would lose it now.
                        error!(error = %e, "cannot store the report");
                    }
                    report
                }
            };
            self.reporter
                .deliver(&report, || action.handle.report_attempt())
                .instrument(info_span!("report"))
                .await;
            if let Err(e) = self
                .store
                .remove(&action.req.namespace, &action.req.action_id, Sync::Lazy)
                .await
            {
                warn!(error = %e, "cannot remove the delivered action from the store");
            }
            self.cleanup(&action)
                .instrument(info_span!("cleanup"))
                .await;
            // The task is gone from the namespace's shim.
            drop(action.shim.lock().unwrap_or_else(|p| p.into_inner()).take());
            action.handle.reported();
        }
        .instrument(span)
        .await
    }

    /// A new action: waits for a slot, then runs it. While containerd is
    /// unreachable before the task started, it waits and tries again rather
    /// than report a failure that is nobody's fault.
    async fn run_fresh(&self, a: &Action, record: &mut StoredAction) -> Outcome {
        // The queue place was reserved when the action was accepted
        // (`reserve_queue_place`); it is given back once a slot is had, or
        // the action is cancelled while it waits.
        let permit = tokio::select! {
            p = self.slots.acquire() => p,
            _ = a.handle.cancel.cancelled() => {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                return Outcome::failed(ErrorCode::Cancelled, a.handle.cancel_reason());
            }
        };
        self.queued.fetch_sub(1, Ordering::SeqCst);
        let _permit = match permit {
            Ok(p) => p,
            Err(_) => return Outcome::failed(ErrorCode::Internal, "isolated is shutting down"),
        };
        let give_up = Instant::now() + CONTAINERD_WAIT;
        loop {
            match self.attempt(a, record).await {
                Ok(outcome) => return outcome,
                Err(e)
                    if e.containerd_unavailable()
                        && record.state() != ActionState::Running
                        && Instant::now() < give_up =>
                {
                    warn!(error = %e, "containerd is unreachable; waiting for it before trying again");
                    self.cleanup_containerd(a).await;
                    self.wait_for_containerd(give_up).await;
                }
                Err(e) => return Outcome::failed(e.code(), e.to_string()),
            }
        }
    }

    /// Takes a place in the queue for a new action, or says the queue is
    /// full. Check and take are one atomic step, so concurrent requests
    /// cannot overshoot the limit.
    pub fn reserve_queue_place(&self, max: usize) -> Result<(), usize> {
        self.queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                (q < max).then_some(q + 1)
            })
            .map(|_| ())
    }

    async fn wait_for_containerd(&self, until: Instant) {
        let mut backoff = Duration::from_millis(200);
        while Instant::now() < until {
            if self.cd.ping().await.is_ok() {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One try: pull, create, start, supervise, collect.
    async fn attempt(&self, a: &Action, record: &mut StoredAction) -> Result<Outcome, RunError> {
        prepare_dir(a)?;
        a.handle.set_state(ActionState::Pulling);
        // Pulling is shown, not stored: recovery treats it like accepted
        // (start again), so writing it would buy nothing.
        record.state = ActionState::Pulling as i32;
        let image = self
            .images
            .ensure(&a.cns, &a.req.reference, &a.req.registries)
            .instrument(info_span!("pull", image = %a.req.image))
            .await?;
        if a.handle.cancel.is_cancelled() {
            return Ok(Outcome::failed(
                ErrorCode::Cancelled,
                a.handle.cancel_reason(),
            ));
        }
        let (mut stdio, memory) = self
            .create(a, &image)
            .instrument(info_span!("create"))
            .await?;
        stdio.release();

        let start = StartRequest {
            container_id: a.id().to_string(),
            exec_id: String::new(),
        };
        // Wait is registered before Start so that an instant exit is seen.
        let mut exit = Box::pin(wait_exit(
            self.cd.clone(),
            a.cns.clone(),
            a.id().to_string(),
        ));
        self.cd
            .tasks()
            .start(with_ns(start, &a.cns, None))
            .instrument(info_span!("start"))
            .await
            .map_err(RunError::containerd("start the task"))?;
        let started_ms = now_ms();
        let deadline_ms = started_ms + a.req.timeout.as_millis() as i64;
        record.state = ActionState::Running as i32;
        record.started_at_ms = started_ms;
        record.deadline_ms = deadline_ms;
        // The credentials did their job; they need not stay on disk. Nor
        // does the input (up to 32 MiB, rewritten by every later put): it is
        // in data.in, and a running action is re-attached, never run again.
        if let Some(r) = record.request.as_mut() {
            r.registries.clear();
            r.data = None;
        }
        if let Err(e) = self.store.put(record, Sync::Durable).await {
            // The task runs; losing the deadline only matters after a crash.
            error!(error = %e, "cannot store the running state");
        }
        // Shown as running only once stored as running: an action the
        // control API calls running is re-attached, deadline and all, by
        // the next start after a crash (before, it is started again).
        a.handle.set_running(started_ms);
        let (code, stopped) = self
            .supervise(a, deadline_ms, &mut exit)
            .instrument(info_span!("wait"))
            .await?;
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
        // if there is one, so new actions see the node as busy as it is.
        let _permit = self.slots.try_acquire().ok();
        let get = GetRequest {
            container_id: a.id().to_string(),
            exec_id: String::new(),
        };
        if let Err(e) = self.cd.tasks().get(with_ns(get, &a.cns, None)).await {
            let e = RunError::containerd("find the action's task after a restart")(e);
            return Outcome::failed(e.code(), e.to_string());
        }
        info!("re-attached to the running task");
        let stdio = Stdio::reopen(&a.dir, a.handle.logs.clone());
        // Its deadline was stored as start + timeout: the start it shows is
        // the task's, not this restart's.
        a.handle
            .set_running(deadline_ms - a.req.timeout.as_millis() as i64);
        let mut exit = Box::pin(wait_exit(
            self.cd.clone(),
            a.cns.clone(),
            a.id().to_string(),
        ));
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

    /// Waits for the task's exit, its deadline or its cancellation, and
    /// returns the exit code and why isolated stopped it, if it did.
    async fn supervise<F>(
        &self,
        a: &Action,
        deadline_ms: i64,
        exit: &mut F,
    ) -> Result<(u32, Option<Stopped>), RunError>
    where
        F: std::future::Future<Output = Result<u32, RunError>> + Unpin,
    {
        let _timer = crate::metrics::timer(crate::metrics::Phase::Run);
        let left = Duration::from_millis((deadline_ms - now_ms()).max(0) as u64);
        let deadline = tokio::time::Instant::now() + left;
        let grace = self.cfg.kill_grace();
        tokio::select! {
            code = &mut *exit => Ok((code?, None)),
            _ = tokio::time::sleep_until(deadline) => {
                warn!(timeout_s = a.req.timeout.as_secs(), "deadline passed, stopping the task");
                let code = reaper::stop(&self.cd, &a.cns, a.id(), &a.cgroups_path(), grace, exit).await?;
                Ok((code, Some(Stopped::Timeout(a.req.timeout))))
            }
            _ = a.handle.cancel.cancelled() => {
                info!("cancelled, stopping the task");
                let code = reaper::stop(&self.cd, &a.cns, a.id(), &a.cgroups_path(), grace, exit).await?;
                Ok((code, Some(Stopped::Cancelled(a.handle.cancel_reason()))))
            }
        }
    }

    /// Snapshot, spec, container and task, in that order.
    ///
    /// No lease: the one thing a lease would protect is the active snapshot
    /// between its Prepare and the container that then references it, and
    /// the snapshot's own `gc.root` label does that for two fewer metadata
    /// transactions (each an fsync in containerd) per action. Cleanup and
    /// the start-up sweep remove the snapshot explicitly either way.
    async fn create(&self, a: &Action, image: &Image) -> Result<(Stdio, i64), RunError> {
        let _timer = crate::metrics::timer(crate::metrics::Phase::Start);
        let labels = action_labels(a);
        let mut snapshot_labels = labels.clone();
        snapshot_labels.insert(
            "containerd.io/gc.root".to_string(),
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        );
        let prepare = PrepareSnapshotRequest {
            snapshotter: self.cfg.snapshotter.clone(),
            key: a.id().to_string(),
            parent: image.top_chain.clone().unwrap_or_default(),
            labels: snapshot_labels,
        };
        let prepared = self
            .cd
            .snapshots()
            .prepare(with_ns(prepare.clone(), &a.cns, None))
            .await;
        let prepared = match prepared {
            Err(e) if e.code() == Code::AlreadyExists => {
                // Left by a run of this action that died before its report:
                // start from a clean slate.
                self.cleanup_containerd(a).await;
                self.cd
                    .snapshots()
                    .prepare(with_ns(prepare, &a.cns, None))
                    .await
            }
            other => other,
        };
        let mounts = prepared
            .map_err(RunError::containerd("prepare the action's snapshot"))?
            .into_inner()
            .mounts;

        let image_user = image
            .config
            .config()
            .as_ref()
            .and_then(|c| c.user().clone())
            .unwrap_or_default();
        let user = if image_user.is_empty() {
            spec::resolve_user("", None, None)?
        } else {
            let passwd = read_from_rootfs(&mounts, "etc/passwd");
            let group = read_from_rootfs(&mounts, "etc/group");
            spec::resolve_user(&image_user, passwd.as_deref(), group.as_deref())?
        };
        // The action's user must be able to write its results.
        let data_dir = a.data_dir();
        nix::unistd::chown(
            &data_dir,
            Some(nix::unistd::Uid::from_raw(user.uid)),
            Some(nix::unistd::Gid::from_raw(user.gid)),
        )
        .map_err(|e| RunError::DataDir {
            path: data_dir.clone(),
            source: e.into(),
        })?;

        let net = self
            .networks
            .attach(&a.net())
            .instrument(info_span!("network"))
            .await?;
        let shim_group = self.join_shim(a).await;
        let size = a.req.size.index();
        let memory = (self.cfg.size_memory_mib[size] as i64) << 20;
        let step = a.req.step.map(|s| s.to_string()).unwrap_or_default();
        let input = SpecInput {
            image: &image.config,
            argv: a.req.argv.as_deref(),
            env: vec![
                ("DIREKTIV_DIR".into(), spec::DATA_MOUNT.into()),
                ("DIREKTIV_NAMESPACE".into(), a.req.namespace.clone()),
                (
                    "DIREKTIV_INSTANCE_ID".into(),
                    a.req.instance_id.clone().unwrap_or_default(),
                ),
                ("DIREKTIV_ACTION_ID".into(), a.req.action_id.clone()),
                ("DIREKTIV_STEP".into(), step),
            ],
            user,
            data_dir: &data_dir,
            memory_bytes: memory,
            cpus: self.cfg.size_cpus[size],
            cgroups_path: a.cgroups_path(),
            shim_group,
            netns: net.netns,
            files: net.files,
        };
        let spec = self.template.build(&input)?;
        let container = Container {
            id: a.id().to_string(),
            labels,
            image: image.name.clone(),
            runtime: Some(Runtime {
                name: self.cfg.runtime.clone(),
                options: crate::embedded::runtime_options(),
            }),
            spec: Some(spec::to_any(&spec)?),
            snapshotter: self.cfg.snapshotter.clone(),
            snapshot_key: a.id().to_string(),
            ..Default::default()
        };
        let create = CreateContainerRequest {
            container: Some(container),
        };
        self.cd
            .containers()
            .create(with_ns(create, &a.cns, None))
            .await
            .map_err(RunError::containerd("create the container"))?;

        let stdio =
            Stdio::open(&a.dir, a.handle.logs.clone()).map_err(|source| RunError::DataDir {
                path: a.dir.clone(),
                source,
            })?;
        let task = CreateTaskRequest {
            container_id: a.id().to_string(),
            rootfs: mounts,
            stdout: stdio.stdout.display().to_string(),
            stderr: stdio.stderr.display().to_string(),
            ..Default::default()
        };
        let mut attempt = 1;
        loop {
            match self
                .cd
                .tasks()
                .create(with_ns(task.clone(), &a.cns, None))
                .await
            {
                Ok(_) => break,
                // A grouped shim can be exiting (its last task just deleted)
                // as this task asks to join it; a second try starts a new one.
                // Likewise a task of the same id deleted a moment ago (a run cut
                // short by a crash, cleaned up just now) whose bundle containerd
                // is still removing: `mkdir …: file exists`.
                Err(e)
                    if attempt < 3
                        && (shim_went_away(&e)
                            || e.message().contains("file exists")
                            || e.message()
                                .contains("container with given ID already exists")) =>
                {
                    delete_task(&self.cd, &a.cns, a.id()).await;
                    remove_leaked_bundle(e.message(), &a.cns, a.id());
                    if e.message()
                        .contains("container with given ID already exists")
                    {
                        remove_leaked_runc_container(&a.cns, a.id()).await;
                    }
                    tokio::time::sleep(Duration::from_millis(250 * attempt)).await;
                    warn!(attempt, error = %e.message(), "shim went away under us; creating the task again");
                    attempt += 1;
                }
                Err(e) => return Err(RunError::containerd("create the task")(e)),
            }
        }
        Ok((stdio, memory))
    }

    /// The shim group the action's task joins: its namespace's, held open
    /// by the keeper, or none (a shim of its own).
    async fn join_shim(&self, a: &Action) -> Option<String> {
        let keepers = self.keepers.as_ref()?;
        let held = a
            .shim
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(ShimHold::group);
        if held.is_some() {
            return held;
        }
        let hold = keepers.hold(&a.cns).instrument(info_span!("shim")).await?;
        let group = hold.group();
        *a.shim.lock().unwrap_or_else(|p| p.into_inner()) = Some(hold);
        Some(group)
    }

    /// Removes the task, container, snapshot and directory of an action.
    /// Each step tolerates what is already gone, so it can run after any
    /// failure and again after a crash.
    pub async fn cleanup(&self, a: &Action) {
        self.cleanup_containerd(a).await;
        self.networks.detach(&a.net()).await;
        if let Err(e) = std::fs::remove_dir_all(&a.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(dir = %a.dir.display(), error = %e, "cannot remove action directory");
            }
        }
    }

    /// The containerd half of cleanup: task, container, snapshot.
    pub async fn cleanup_containerd(&self, a: &Action) {
        delete_task(&self.cd, &a.cns, a.id()).await;
        removed("container", || async move {
            let del = DeleteContainerRequest {
                id: a.id().to_string(),
            };
            self.cd
                .containers()
                .delete(with_ns(del, &a.cns, None))
                .await
        })
        .await;
        // The snapshot is a GC root (see `create`): nothing but this removes it
        // before the next start-up sweep.
        removed("snapshot", || async move {
            let rm = RemoveSnapshotRequest {
                snapshotter: self.cfg.snapshotter.clone(),
                key: a.id().to_string(),
            };
            self.cd.snapshots().remove(with_ns(rm, &a.cns, None)).await
        })
        .await;
    }
}

/// A removal from containerd, tried three times, because containerd can
/// refuse under I/O load (containerd #9309); gone already counts as done.
async fn removed<T, F, Fut>(what: &str, mut call: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    for attempt in 1..=3u32 {
        match call().await {
            Ok(_) => return,
            Err(e) if e.code() == Code::NotFound => return,
            Err(e) => {
                warn!(attempt, error = %e.message(), "cannot remove the action's {what}");
                tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await;
            }
        }
    }
}

/// containerd's words for a task create that met a shim on its way out
/// (its last task just deleted): a new try starts a new shim.
pub(crate) fn shim_went_away(e: &tonic::Status) -> bool {
    e.message().contains("failed to start shim") || e.message().contains("ttrpc: closed")
}

/// Deletes a task, which also ends its shim; retried because containerd
/// can time out under I/O load (containerd #9309). A task that is still
/// running here has nobody left to stop it (an orphan of an earlier life,
/// or a run cut short by a crash before it was stored as running, now
/// started again): containerd refuses to delete it, so it is killed first,
/// or it would outlive its action, holding its cgroup and shim forever.
pub async fn delete_task(cd: &Containerd, cns: &str, id: &str) -> Option<u32> {
    for attempt in 1..=3 {
        let del = DeleteTaskRequest {
            container_id: id.to_string(),
        };
        match cd.tasks().delete(with_ns(del, cns, None)).await {
            Ok(r) => return Some(r.into_inner().exit_status),
            Err(e) if e.code() == Code::NotFound => return None,
            Err(e) => {
                warn!(attempt, error = %e.message(), "cannot delete task; killing it first");
                kill_and_wait(cd, cns, id).await;
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
        }
    }
    None
}

/// A task create cut short (isolated killed while containerd was starting
/// the shim, containerd #6860) can leave the task's bundle directory, and a
/// shim, behind without a task containerd knows: every later create of the
/// same id then fails with `mkdir <bundle>: file exists`, and Tasks.Delete
/// says NotFound. The bundle is named in the error; when it is this
/// action's own (`…/io.containerd.runtime.v2.task/<cns>/<id>`), its shim is
/// killed, its rootfs unmounted and the directory removed, so the next try
/// can create the task.
fn remove_leaked_bundle(message: &str, cns: &str, id: &str) {
    let Some(path) = message
        .split("mkdir ")
        .nth(1)
        .and_then(|rest| rest.split(": file exists").next())
    else {
        return;
    };
    let bundle = Path::new(path);
    let own = bundle.ends_with(format!("{cns}/{id}"))
        && path.contains("/io.containerd.runtime.v2.task/")
        && !path.contains("/../");
    if !own || !bundle.is_dir() {
        return;
    }
    warn!(bundle = %bundle.display(), "removing the bundle of a task whose creation was cut short");
    if let Ok(pid) = std::fs::read_to_string(bundle.join("shim.pid")) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let rootfs = bundle.join("rootfs");
    let _ = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH);
    // Never delete through a mount that is still there: it would be the
    // action's snapshot, not the bundle.
    use std::os::unix::fs::MetadataExt;
    let dev = |p: &Path| std::fs::symlink_metadata(p).map(|m| m.dev()).ok();
    if rootfs.exists() && dev(&rootfs) != dev(bundle) {
        warn!(bundle = %bundle.display(), "the leaked bundle's rootfs is still mounted; leaving it");
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(bundle) {
        warn!(bundle = %bundle.display(), error = %e, "cannot remove the leaked bundle");
    }
}

/// The other half of a create cut short: runc created the container, but
/// containerd never recorded the task, so runc refuses the id. The runc v2
/// shim keeps runc's state under `/run/containerd/runc/<namespace>`; a
/// forced delete there kills what runs and frees the id.
async fn remove_leaked_runc_container(cns: &str, id: &str) {
    warn!("removing a runc container left by a task create cut short");
    let out = tokio::process::Command::new("runc")
        .arg("--root")
        .arg(format!("/run/containerd/runc/{cns}"))
        .args(["delete", "--force", id])
        .output()
        .await;
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => warn!(stderr = %String::from_utf8_lossy(&o.stderr).trim(), "runc delete failed"),
        Err(e) => warn!(error = %e, "cannot run runc"),
    }
}

/// SIGKILL to every process of the task, then up to 5 s for its exit.
async fn kill_and_wait(cd: &Containerd, cns: &str, id: &str) {
    let kill = KillRequest {
        container_id: id.to_string(),
        exec_id: String::new(),
        signal: nix::sys::signal::Signal::SIGKILL as u32,
        all: true,
    };
    if cd.tasks().kill(with_ns(kill, cns, None)).await.is_err() {
        return;
    }
    let wait = WaitRequest {
        container_id: id.to_string(),
        exec_id: String::new(),
    };
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        cd.tasks().wait(with_ns(wait, cns, None)),
    )
    .await;
}

/// The exit code of the task's init process. A dropped connection to
/// containerd is not an exit: the wait is made again until it answers.
async fn wait_exit(cd: Containerd, cns: String, id: String) -> Result<u32, RunError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let req = WaitRequest {
            container_id: id.clone(),
            exec_id: String::new(),
        };
        match cd.tasks().wait(with_ns(req, &cns, None)).await {
            Ok(r) => return Ok(r.into_inner().exit_status),
            Err(e)
                if matches!(
                    e.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ) =>
            {
                warn!(error = %e.message(), "lost the wait on the task, waiting again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(RunError::containerd("wait for the task")(e)),
        }
    }
}

fn action_labels(a: &Action) -> std::collections::HashMap<String, String> {
    let mut l = std::collections::HashMap::from([
        (cd_mod::LABEL_MANAGED.to_string(), "true".to_string()),
        (cd_mod::LABEL_NAMESPACE.to_string(), a.req.namespace.clone()),
        (cd_mod::LABEL_ACTION_ID.to_string(), a.req.action_id.clone()),
    ]);
    if let Some(i) = &a.req.instance_id {
        l.insert(cd_mod::LABEL_INSTANCE_ID.to_string(), i.clone());
    }
    if let Some(s) = a.req.step {
        l.insert(cd_mod::LABEL_STEP.to_string(), s.to_string());
    }
    l
}

/// A fresh data directory holding exactly the request's bytes as data.in.
fn prepare_dir(a: &Action) -> Result<(), RunError> {
    let data = a.data_dir();
    let io = |source| RunError::DataDir {
        path: data.clone(),
        source,
    };
    if a.dir.exists() {
        // Left by an earlier action of the same id that crashed: its
        // content must not leak into this one.
        std::fs::remove_dir_all(&a.dir).map_err(io)?;
    }
    std::fs::create_dir_all(&data).map_err(io)?;
    std::fs::write(data.join("data.in"), &a.req.data).map_err(io)?;
    Ok(())
}

/// Reads a file of the image from the snapshot's mounts without mounting
/// them: the upper directory first, then the lower ones, top to bottom.
/// The image is untrusted, so no symlink is followed on the way: a link in
/// place of `etc` or `passwd` could point anywhere on the host.
fn read_from_rootfs(mounts: &[containerd_client::types::Mount], rel: &str) -> Option<String> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for m in mounts {
        if m.r#type == "bind" {
            dirs.push(PathBuf::from(&m.source));
        }
        for o in &m.options {
            if let Some(u) = o.strip_prefix("upperdir=") {
                dirs.push(PathBuf::from(u));
            }
        }
        for o in &m.options {
            if let Some(l) = o.strip_prefix("lowerdir=") {
                dirs.extend(l.split(':').map(PathBuf::from));
            }
        }
    }
    let (parent_rel, name) = rel.rsplit_once('/').unwrap_or(("", rel));
    for base in dirs {
        let mut parent = base.clone();
        let mut ok = true;
        for c in parent_rel.split('/').filter(|c| !c.is_empty()) {
            parent.push(c);
            if !std::fs::symlink_metadata(&parent).is_ok_and(|m| m.is_dir()) {
                ok = false;
                break;
            }
        }
        if !ok || std::fs::symlink_metadata(parent.join(name)).is_err() {
            continue;
        }
        // The topmost layer that has the name decides, even if what it has
        // is a whiteout or a link: then the image has no usable file.
        return collect::read_result_file(&parent, name, 1 << 20)
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn overlay(lower: &[&Path], upper: &Path) -> Vec<containerd_client::types::Mount> {
        let lower: Vec<String> = lower.iter().map(|p| p.display().to_string()).collect();
        vec![containerd_client::types::Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![
                format!("upperdir={}", upper.display()),
                format!("lowerdir={}", lower.join(":")),
            ],
        }]
    }

    #[test]
    fn only_our_own_leaked_bundle_is_removed() {
        let t = tempfile::tempdir().unwrap();
        let ours = t
            .path()
            .join("io.containerd.runtime.v2.task/direktiv.ns/act-1");
        let other = t
            .path()
            .join("io.containerd.runtime.v2.task/direktiv.ns/act-2");
        std::fs::create_dir_all(ours.join("rootfs")).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        let msg = |p: &Path| format!("failed to start shim: mkdir {}: file exists", p.display());
        remove_leaked_bundle(&msg(&other), "direktiv.ns", "act-1");
        assert!(other.exists(), "another action's bundle was removed");
        remove_leaked_bundle("some other error", "direktiv.ns", "act-1");
        assert!(ours.exists());
        remove_leaked_bundle(&msg(&ours), "direktiv.ns", "act-1");
        assert!(!ours.exists(), "our leaked bundle is still there");
    }

    #[test]
    fn rootfs_files_come_from_the_topmost_layer_and_never_through_links() {
        let t = tempfile::tempdir().unwrap();
        let (l1, l2, up) = (
            t.path().join("l1"),
            t.path().join("l2"),
            t.path().join("up"),
        );
        for d in [&l1, &l2, &up] {
            std::fs::create_dir_all(d.join("etc")).unwrap();
        }
        std::fs::write(l2.join("etc/passwd"), "bottom").unwrap();
        std::fs::write(l1.join("etc/passwd"), "top").unwrap();
        assert_eq!(
            read_from_rootfs(&overlay(&[&l1, &l2], &up), "etc/passwd").as_deref(),
            Some("top")
        );
        std::os::unix::fs::symlink("/etc/hostname", up.join("etc/passwd")).unwrap();
        assert_eq!(
            read_from_rootfs(&overlay(&[&l1, &l2], &up), "etc/passwd"),
            None
        );
        let evil = t.path().join("evil");
        std::fs::create_dir_all(&evil).unwrap();
        std::os::unix::fs::symlink("/etc", evil.join("etc")).unwrap();
        assert_eq!(
            read_from_rootfs(&overlay(&[&evil], &up.join("none")), "etc/hostname"),
            None
        );
    }
}
