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
//! Stopping a task at its deadline is the reaper's (`crate::reaper`).

pub mod collect;
#[cfg(test)]
mod lifecycle_tests;
pub mod queue;
pub mod shim_keeper;
pub mod stdio;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_client::services::v1::container::Runtime;
use tracing::{error, info, info_span, warn, Instrument};

use crate::actions::{now_ms, Handle};
use crate::config::Config;
use crate::engine::{self, ops, Container, Engine, EngineError, NewTask, Prepare, RuncRoot};
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
    /// {0}
    Engine(#[from] EngineError),
    /// {0}
    Store(#[from] StoreError),
    /// {0}
    Network(#[from] NetworkError),
}

impl RunError {
    /// Whether containerd could not be reached (as opposed to refusing).
    pub fn containerd_unavailable(&self) -> bool {
        match self {
            RunError::Engine(e) => e.is_unavailable(),
            RunError::Image(ImageError::Internal { .. }) => true,
            _ => false,
        }
    }

    /// The report code: the image's fault, the data dir's, or ours.
    pub fn code(&self) -> ErrorCode {
        match self {
            RunError::DataDir { .. } => ErrorCode::Io,
            RunError::Network(_) => ErrorCode::Network,
            RunError::Image(ImageError::Internal { .. }) => ErrorCode::Internal,
            RunError::Image(_) => ErrorCode::Image,
            RunError::Spec(SpecError::NoCommand | SpecError::User { .. }) => ErrorCode::Image,
            RunError::Spec(_) | RunError::Engine(_) | RunError::Store(_) => ErrorCode::Internal,
        }
    }
}

/// What the runner needs, shared by every action.
pub struct Runner {
    pub cfg: Arc<Config>,
    /// Every containerd call of the lifecycle.
    pub engine: Arc<dyn Engine>,
    /// Where the runc shim keeps runc's state, for freeing an id a create
    /// cut short left with runc.
    pub runc: RuncRoot,
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
    pub queued: queue::Queue,
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
    /// Its place in the queue until it gets a running slot.
    queue_place: std::sync::Mutex<Option<queue::QueuePlace>>,
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
            queue_place: Default::default(),
        }
    }

    /// The action waits in the queue with `place` until it runs.
    pub fn queued(self, place: queue::QueuePlace) -> Action {
        *self.queue_place.lock().unwrap_or_else(|p| p.into_inner()) = Some(place);
        self
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
            let mut released = false;
            let report = match start {
                Start::Deliver(report) => {
                    action.handle.finished(&Outcome::from_wire(&report));
                    // Released before the crash, or not: either way nothing
                    // of the action may wait for the flow engine.
                    self.release(&action).await;
                    released = true;
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
                    let stored = self.store.put(&record, Sync::Durable).await;
                    if let Err(e) = &stored {
                        // Still delivered from memory; only a crash before
                        // delivery would lose it now.
                        error!(error = %e, "cannot store the report");
                    }
                    // Release on collect (ISOLATE.md §10): the result is in
                    // the store, so the task, container, snapshot, network
                    // and data dir go now, not when a flow engine that may be
                    // down for hours acknowledges. If the write failed, they
                    // stay until delivery: after a crash the stored running
                    // state re-attaches to the exited task and collects it
                    // again, which only works while it is there.
                    if stored.is_ok() {
                        self.release(&action).await;
                        released = true;
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
            if !released {
                self.release(&action).await;
            }
            action.handle.reported();
        }
        .instrument(span)
        .await
    }

    /// A new action: waits for a slot, then runs it. While containerd is
    /// unreachable before the task started, it waits and tries again rather
    /// than report a failure that is nobody's fault.
    async fn run_fresh(&self, a: &Action, record: &mut StoredAction) -> Outcome {
        // The queue place was taken when the action was accepted; it is
        // given back once a slot is had, or the action is cancelled while it
        // waits (or was before a restart: `biased`, so that wins).
        let permit = tokio::select! {
            biased;
            _ = a.handle.cancel.cancelled() => {
                a.leave_queue();
                return Outcome::failed(ErrorCode::Cancelled, a.handle.cancel_reason());
            }
            p = self.slots.acquire() => p,
        };
        a.leave_queue();
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

        // Wait is registered before Start so that an instant exit is seen.
        let mut exit = self.wait_exit(a);
        self.engine
            .start_task(&a.cns, a.id())
            .instrument(info_span!("start"))
            .await?;
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
        // A cancel asked for meanwhile is in the store: keep it there.
        record.cancel_reason = a.handle.pending_cancel().unwrap_or_default();
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
        if let Err(e) = self.engine.task(&a.cns, a.id()).await {
            let e = RunError::Engine(e);
            return Outcome::failed(
                e.code(),
                format!("cannot re-attach to the action's task after a restart: {e}"),
            );
        }
        info!("re-attached to the running task");
        let stdio = Stdio::reopen(&a.dir, a.handle.logs.clone());
        // Its deadline was stored as start + timeout: the start it shows is
        // the task's, not this restart's.
        a.handle
            .set_running(deadline_ms - a.req.timeout.as_millis() as i64);
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
                let code = reaper::stop(&*self.engine, &a.cns, a.id(), &a.cgroups_path(), grace, exit).await?;
                Ok((code, Some(Stopped::Timeout(a.req.timeout))))
            }
            _ = a.handle.cancel.cancelled() => {
                info!("cancelled, stopping the task");
                let code = reaper::stop(&*self.engine, &a.cns, a.id(), &a.cgroups_path(), grace, exit).await?;
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
        let prepare = Prepare {
            snapshotter: self.cfg.snapshotter.clone(),
            key: a.id().to_string(),
            parent: image.top_chain.clone().unwrap_or_default(),
            labels: snapshot_labels,
        };
        let mounts = match self.engine.prepare_snapshot(&a.cns, prepare.clone()).await {
            Err(e) if e.is_already_exists() => {
                // Left by a run of this action that died before its report:
                // start from a clean slate.
                self.cleanup_containerd(a).await;
                self.engine.prepare_snapshot(&a.cns, prepare).await?
            }
            other => other?,
        };

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
                options: None,
            }),
            spec: Some(spec::to_any(&spec)?),
            snapshotter: self.cfg.snapshotter.clone(),
            snapshot_key: a.id().to_string(),
            ..Default::default()
        };
        self.engine.create_container(&a.cns, container).await?;

        let stdio =
            Stdio::open(&a.dir, a.handle.logs.clone()).map_err(|source| RunError::DataDir {
                path: a.dir.clone(),
                source,
            })?;
        let task = NewTask {
            container_id: a.id().to_string(),
            rootfs: mounts,
            stdout: stdio.stdout.display().to_string(),
            stderr: stdio.stderr.display().to_string(),
        };
        ops::create_task(&*self.engine, &a.cns, &task, &self.runc).await?;
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

    /// Everything the action used, once its result is collected: the same
    /// cleanup as after any failure, and its hold on the namespace's shim.
    async fn release(&self, a: &Action) {
        self.cleanup(a).instrument(info_span!("cleanup")).await;
        // The task is gone from the namespace's shim.
        drop(a.shim.lock().unwrap_or_else(|p| p.into_inner()).take());
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
        ops::remove_action(&*self.engine, &a.cns, a.id(), &self.cfg.snapshotter).await;
    }

    /// The task's exit, as a future to select on; registered before the
    /// task starts.
    fn wait_exit(
        &self,
        a: &Action,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<u32, RunError>> + Send>> {
        let (engine, cns, id) = (self.engine.clone(), a.cns.clone(), a.id().to_string());
        Box::pin(async move { Ok(ops::wait_exit(&*engine, &cns, &id).await?) })
    }
}

fn action_labels(a: &Action) -> std::collections::HashMap<String, String> {
    let mut l = std::collections::HashMap::from([
        (engine::LABEL_MANAGED.to_string(), "true".to_string()),
        (engine::LABEL_NAMESPACE.to_string(), a.req.namespace.clone()),
        (engine::LABEL_ACTION_ID.to_string(), a.req.action_id.clone()),
    ]);
    if let Some(i) = &a.req.instance_id {
        l.insert(engine::LABEL_INSTANCE_ID.to_string(), i.clone());
    }
    if let Some(s) = a.req.step {
        l.insert(engine::LABEL_STEP.to_string(), s.to_string());
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
