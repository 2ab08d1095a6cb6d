//! Pre-created tasks (issue 16): for a (namespace, image digest, size) run
//! recently, a few actions' worth of snapshot, directory, network, container
//! and task, prepared up to "created, not started", so that the next action
//! of that key only has its input and argv put in place and its task
//! started. The created process is the launcher (`launch/isolate-launch.rs`,
//! built by `build.rs`, embedded here and written under the state dir at
//! start), which the action's Start lets exec the action's own process.
//!
//! This file owns the pool's bookkeeping (shelves of entries per key, their
//! target size from the recent rate, idle expiry, retiring an image's
//! entries when its tag moves, eviction on a full node) and the runner's
//! three moves on it: `fill` (in the background, never on an action's
//! path), `take` (an action adopts an entry: its record names the entry's
//! container before the task starts) and `evict`. It does not create or
//! remove anything itself: an entry is made by `create` like any action's
//! task (with the launcher as its process) and removed by `release` like
//! any action's; an entry the daemon did not live to remove is an orphan
//! for the start-up sweep (`crate::recover`), as it is in no store.
//!
//! Bounds: entries hold no running slot and only a parked process's share
//! of the budget ([`ENTRY_MEMORY_MIB`], [`ENTRY_PIDS`]); none is made while
//! the node has no free slot or a queue, and an action that finds the node
//! full evicts them all before it waits.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info, info_span, warn, Instrument};

use super::queue::OwnedBudgetHold;
use super::stdio::Stdio;
use super::{Action, Place, RunError, Runner};
use crate::actions::Handle;
use crate::config::Config;
use crate::image::Image;
use crate::request::ActionRequest;
use crate::spec;
use crate::store::{StoredAction, Sync};

/// The label of a pre-created task's container and snapshot: its key,
/// `<namespace>/<image digest>/<size>`, for operators; the sweep needs none
/// (an entry is in no store).
pub const LABEL_POOL: &str = "io.direktiv.isolate.pool";

/// Pre-created tasks' ids start with this; an action id cannot (it is
/// validated as an identifier, and the sweep needs no prefix either).
pub const POOL_ID_PREFIX: &str = "pool-";

/// The launcher, statically linked (`build.rs`).
pub const LAUNCHER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/isolate-launch"));

/// What a parked entry holds of the node's budget: one process, which
/// measured about 0.3 MiB resident (README "Performance").
pub const ENTRY_MEMORY_MIB: u64 = 1;
pub const ENTRY_PIDS: u64 = 1;

/// The rate the pool's size follows: uses of a key within this window.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Uses within [`RATE_WINDOW`] from which a key keeps two entries: an
/// action every other second or more often may find the one entry still
/// being made again.
const BUSY_USES: usize = 5;

/// Where a pool's entries differ from the next: every input of the create
/// that is not fixed for the daemon's life (network mode, runtime of the
/// namespace, base spec are). The command is not one: the launcher takes
/// it at take time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The containerd namespace.
    pub cns: String,
    /// The image record's name, for retiring a moved tag's entries.
    pub image: String,
    /// The image's manifest digest.
    pub digest: String,
    pub size: usize,
}

impl PoolKey {
    pub fn of(a: &Action, image: &Image) -> PoolKey {
        PoolKey {
            cns: a.cns.clone(),
            image: image.name.clone(),
            digest: image.manifest_digest.clone(),
            size: a.req.size.index(),
        }
    }

    /// An entry of `self` is stale when `newer` is the same image in the
    /// same namespace at another digest: its tag moved.
    fn retired_by(&self, newer: &PoolKey) -> bool {
        self.cns == newer.cns && self.image == newer.image && self.digest != newer.digest
    }
}

/// How many entries a key keeps: none once idle for `idle`, else one, or
/// two when busy, never more than `max`.
pub fn target(uses: &VecDeque<Instant>, now: Instant, max: usize, idle: Duration) -> usize {
    let Some(last) = uses.back() else {
        return 0;
    };
    if max == 0 || now.saturating_duration_since(*last) >= idle {
        return 0;
    }
    let recent = uses
        .iter()
        .filter(|t| now.saturating_duration_since(**t) < RATE_WINDOW)
        .count();
    let want = if recent >= BUSY_USES { 2 } else { 1 };
    want.min(max)
}

/// Whether an action would wait: no running slot free, or less of the
/// budget's memory or pids left than it needs (`free` and `needs` as
/// (MiB, pids)). Then every entry goes first: a pre-created task must never
/// keep a real action waiting.
pub fn node_is_full(free_slots: usize, free: (u64, u64), needs: (u64, u64)) -> bool {
    free_slots == 0 || free.0 < needs.0 || free.1 < needs.1
}

/// One pre-created task.
pub struct Entry {
    /// Its place and shim hold, as an action of no table (its handle is
    /// detached).
    action: Action,
    stdio: Stdio,
    memory: i64,
    _share: OwnedBudgetHold,
}

impl Entry {
    pub fn id(&self) -> &str {
        self.action.id()
    }
}

/// The entries of one key and what its size follows.
struct Shelf {
    entries: Vec<Entry>,
    /// Entries being made now.
    filling: usize,
    /// When actions of the key came, newest last, within the window (and the
    /// last one, for idleness).
    uses: VecDeque<Instant>,
    /// The image and a request of the key (its size, namespace, reference),
    /// for making more.
    image: Arc<Image>,
    req: ActionRequest,
    /// Its image's tag moved on; kept only while an entry is being made,
    /// which is then removed.
    retired: bool,
    /// Actions that found no entry while one was being made, each waiting
    /// for that one (at most one per entry being made), oldest first.
    waiting: VecDeque<tokio::sync::oneshot::Sender<Entry>>,
}

impl Shelf {
    fn note_use(&mut self, now: Instant) {
        self.uses.push_back(now);
        while self.uses.len() > 1
            && self
                .uses
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) >= RATE_WINDOW)
        {
            self.uses.pop_front();
        }
    }
}

/// What an action of a key finds in its pool.
enum Found {
    Entry(Box<Entry>),
    /// None yet, but one is being made, and it is this action's once made:
    /// sooner than a create of the action's own, which the namespace's
    /// shim would only run after that one anyway (it creates one task at a
    /// time).
    Coming(tokio::sync::oneshot::Receiver<Entry>),
    Nothing,
}

/// How long an action waits for the entry being made for it before it
/// creates its own: far longer than a create takes (about 35 ms here), so
/// it only ends a wait on a create that hangs.
const COMING_WAIT: Duration = Duration::from_secs(2);

/// The pool of one daemon.
pub struct Pool {
    max: usize,
    idle: Duration,
    /// The launcher on the host, bind-mounted into entries.
    launcher: PathBuf,
    shelves: Mutex<HashMap<PoolKey, Shelf>>,
    /// Set at a graceful stop: no more entries.
    closed: AtomicBool,
    /// Entries being made or removed in the background now, so that a drop
    /// can wait for them and leave nothing behind.
    /// By containerd namespace.
    busy: Arc<Mutex<HashMap<String, usize>>>,
}

/// One background make or removal in a containerd namespace, counted while
/// it runs.
struct Busy(Arc<Mutex<HashMap<String, usize>>>, String);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut busy = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = busy.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                busy.remove(&self.1);
            }
        }
    }
}

/// One key's entries, for operators (`isolatectl ls --pool`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolListing {
    pub key: PoolKey,
    pub namespace: String,
    pub entries: usize,
    pub target: usize,
}

impl Pool {
    /// The pool `cfg` asks for; with `precreate_max > 0` the launcher is
    /// written to `<state_dir>/launch/` (a new file renamed into place, so
    /// entries of an earlier run keep the one they mount).
    pub fn new(cfg: &Config) -> std::io::Result<Pool> {
        let launcher = cfg.state_dir.join("launch").join("isolate-launch");
        if cfg.precreate_max > 0 {
            use std::os::unix::fs::PermissionsExt;
            let dir = cfg.state_dir.join("launch");
            std::fs::create_dir_all(&dir)?;
            let part = dir.join(".isolate-launch.part");
            std::fs::write(&part, LAUNCHER)?;
            std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o755))?;
            std::fs::rename(&part, &launcher)?;
        }
        Ok(Pool {
            max: cfg.precreate_max,
            idle: Duration::from_secs(cfg.precreate_idle_secs),
            launcher,
            shelves: Default::default(),
            closed: AtomicBool::new(false),
            busy: Arc::default(),
        })
    }

    fn busy(&self, cns: &str) -> Busy {
        *self
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(cns.to_string())
            .or_default() += 1;
        Busy(self.busy.clone(), cns.to_string())
    }

    /// Whether anything of `cns`'s pool (or any, for `None`) is being made
    /// or removed in the background.
    fn is_busy(&self, cns: Option<&str>) -> bool {
        let busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        match cns {
            Some(cns) => busy.contains_key(cns),
            None => !busy.is_empty(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.max > 0 && !self.closed.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Shelf>> {
        self.shelves.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes an action of `key` and hands it an entry if there is one (or
    /// the one being made), with the entries of the image's older digests,
    /// now retired.
    fn pop(&self, key: &PoolKey, image: &Arc<Image>, req: &ActionRequest) -> (Found, Vec<Entry>) {
        let now = Instant::now();
        let mut shelves = self.lock();
        let mut retired = Vec::new();
        shelves.retain(|k, s| {
            if k.retired_by(key) {
                retired.append(&mut s.entries);
                // One being made is removed when it comes back.
                s.retired = true;
                return s.filling > 0;
            }
            true
        });
        let shelf = shelves.entry(key.clone()).or_insert_with(|| Shelf {
            entries: Vec::new(),
            filling: 0,
            uses: VecDeque::new(),
            image: image.clone(),
            req: req.clone(),
            retired: false,
            waiting: VecDeque::new(),
        });
        shelf.retired = false;
        shelf.note_use(now);
        let found = match shelf.entries.pop() {
            Some(entry) => Found::Entry(Box::new(entry)),
            None if shelf.filling > shelf.waiting.len() => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                shelf.waiting.push_back(tx);
                Found::Coming(rx)
            }
            None => Found::Nothing,
        };
        drop(shelves);
        self.count(&req.namespace);
        (found, retired)
    }

    /// A made entry back: kept on its shelf, or handed back when the shelf
    /// was retired, dropped or the pool closed meanwhile.
    fn shelve(&self, key: &PoolKey, entry: Entry) -> Option<Entry> {
        let mut shelves = self.lock();
        let Some(s) = shelves.get_mut(key) else {
            return Some(entry);
        };
        s.filling -= 1;
        if !self.enabled() || s.retired {
            s.waiting.clear();
            shelves.retain(|k, s| !(k == key && s.retired && s.filling == 0));
            return Some(entry);
        }
        // The action waiting for it, if it still waits.
        let mut entry = entry;
        while let Some(tx) = s.waiting.pop_front() {
            match tx.send(entry) {
                Ok(()) => return None,
                Err(back) => entry = back,
            }
        }
        s.entries.push(entry);
        let ns = s.req.namespace.clone();
        drop(shelves);
        self.count(&ns);
        None
    }

    /// A make that failed or was not started: no longer counted as being
    /// made.
    fn unfill(&self, key: &PoolKey) {
        if let Some(s) = self.lock().get_mut(key) {
            s.filling = s.filling.saturating_sub(1);
            // Those waiting for it create their own.
            while s.waiting.len() > s.filling {
                s.waiting.pop_front();
            }
        }
    }

    /// Every entry (of containerd namespace `cns`, when given); with
    /// `forget`, the keys too (none is refilled before its next action);
    /// with `close`, the pool closed for good.
    fn take_all(&self, cns: Option<&str>, forget: bool, close: bool) -> Vec<Entry> {
        if close {
            self.closed.store(true, Ordering::SeqCst);
        }
        let mut all = Vec::new();
        let mut namespaces = Vec::new();
        let mut shelves = self.lock();
        let of = |k: &PoolKey| cns.is_none_or(|c| c == k.cns);
        for (_, s) in shelves.iter_mut().filter(|(k, _)| of(k)) {
            namespaces.push(s.req.namespace.clone());
            all.append(&mut s.entries);
        }
        if forget {
            shelves.retain(|k, _| !of(k));
        }
        drop(shelves);
        for ns in namespaces {
            self.count(&ns);
        }
        all
    }

    /// The entries of keys idle for `precreate_idle_secs`, and such keys
    /// forgotten.
    fn expire(&self, now: Instant) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut namespaces = Vec::new();
        self.lock().retain(|_, s| {
            if target(&s.uses, now, self.max, self.idle) > 0 {
                return true;
            }
            if !s.entries.is_empty() {
                namespaces.push(s.req.namespace.clone());
            }
            out.append(&mut s.entries);
            s.filling > 0
        });
        for ns in namespaces {
            self.count(&ns);
        }
        out
    }

    /// Sets the metric of `namespace`'s entries.
    fn count(&self, namespace: &str) {
        let n: usize = self
            .lock()
            .values()
            .filter(|s| s.req.namespace == namespace)
            .map(|s| s.entries.len())
            .sum();
        crate::metrics::pool_entries(namespace, n);
    }

    /// Each key's entries now.
    pub fn list(&self) -> Vec<PoolListing> {
        let now = Instant::now();
        let mut v: Vec<PoolListing> = self
            .lock()
            .iter()
            .map(|(k, s)| PoolListing {
                key: k.clone(),
                namespace: s.req.namespace.clone(),
                entries: s.entries.len(),
                target: target(&s.uses, now, self.max, self.idle),
            })
            .collect();
        v.sort_by(|a, b| (&a.namespace, &a.key.image).cmp(&(&b.namespace, &b.key.image)));
        v
    }
}

/// The launch file (`launch/isolate-launch.rs` reads it): a magic line,
/// argc, then the arguments and the environment, each NUL-terminated.
pub fn launch_file(argv: &[String], env: &[String]) -> Vec<u8> {
    let mut out = b"isolate-launch 1\0".to_vec();
    out.extend_from_slice(argv.len().to_string().as_bytes());
    out.push(0);
    for s in argv.iter().chain(env) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }
    out
}

/// The `DIREKTIV_*` variables of an action's process.
pub(super) fn direktiv_env(req: &ActionRequest) -> Vec<(String, String)> {
    vec![
        ("DIREKTIV_DIR".into(), spec::DATA_MOUNT.into()),
        ("DIREKTIV_NAMESPACE".into(), req.namespace.clone()),
        (
            "DIREKTIV_INSTANCE_ID".into(),
            req.instance_id.clone().unwrap_or_default(),
        ),
        ("DIREKTIV_ACTION_ID".into(), req.action_id.clone()),
        (
            "DIREKTIV_STEP".into(),
            req.step.map(|s| s.to_string()).unwrap_or_default(),
        ),
    ]
}

impl Runner {
    /// The action takes a pre-created task of its key if there is one:
    /// its input and launch file go into the entry's data directory, the
    /// entry's place, shim hold and streams become the action's, and its
    /// record names the entry's container before the task is started.
    /// `None`: the action creates its own (and the pool is refilled either
    /// way, in the background, once the action's task is started).
    pub(super) async fn take(
        self: &Arc<Self>,
        a: &Action,
        image: &Arc<Image>,
        record: &mut StoredAction,
    ) -> Result<Option<(Stdio, i64)>, RunError> {
        // One recovered in a task of its own, or back after containerd
        // went away mid-create, runs where it was.
        if !self.pool.enabled() || a.taken.get().is_some() || a.own.oid != a.req.action_id {
            return Ok(None);
        }
        // What the create would have refused, refused the same way, before
        // an entry is spent.
        let (argv, env) =
            self.template
                .process(&image.config, a.req.argv.as_deref(), &direktiv_env(&a.req))?;
        let key = PoolKey::of(a, image);
        let _ = a.pool_key.set(key.clone());
        let (found, retired) = self.pool.pop(&key, image, &a.req);
        for e in retired {
            info!(
                entry = e.id(),
                "the image's tag moved to another digest; retiring its pre-created task"
            );
            self.discard(e);
        }
        let entry = match found {
            Found::Entry(entry) => Some(*entry),
            Found::Coming(mut rx) => match tokio::time::timeout(COMING_WAIT, &mut rx).await {
                Ok(Ok(entry)) => {
                    debug!("took the pre-created task that was being made");
                    Some(entry)
                }
                // Its make failed.
                Ok(Err(_)) => None,
                // It takes too long: the action makes its own, and the late
                // entry goes on the shelf (closed first, so that one sent
                // just now is not lost with the receiver).
                Err(_) => {
                    rx.close();
                    rx.try_recv().ok()
                }
            },
            Found::Nothing => None,
        };
        // Refilled once the action's task is started (`attempt`), not now: a
        // shim creates one task at a time and a Start waits behind a Create
        // in the same shim (its service lock), so a refill begun here put a
        // whole `runc create` before the action's own Start or Create.
        crate::metrics::pool_take(entry.is_some());
        let Some(entry) = entry else {
            return Ok(None);
        };
        let place = Place::new(&self.cfg, &a.cns, entry.id());
        let data = place.dir.join("data");
        let _ = a.taken.set(place);
        *a.shim.lock().unwrap_or_else(|p| p.into_inner()) = entry
            .action
            .shim
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        entry.stdio.redirect(a.handle.logs.clone());
        debug!(entry = a.id(), "took a pre-created task");
        a.write_input(&data.join("data.in"))?;
        let launch = data.join(spec::LAUNCH_FILE);
        std::fs::write(&launch, launch_file(&argv, &env)).map_err(|source| RunError::DataDir {
            path: launch,
            source,
        })?;
        // Named before its task starts, so that after a crash recovery and
        // the sweep know the container as the action's. Lazy: a crash that
        // loses this write before the running state's durable one finds
        // the action accepted, not running, and runs it again in a task of
        // its own, the entry's swept, just as a crash between Start and
        // that write does without the pool.
        record.container_id = a.id().to_string();
        if let Err(e) = self.store.put(record, Sync::Lazy).await {
            warn!(error = %e, "cannot store the action's pre-created task");
        }
        Ok(Some((entry.stdio, entry.memory)))
    }

    /// The launcher's words when the action's program could not be
    /// executed (`launch/isolate-launch.rs`): the error runc gives at create
    /// for it, so that it is reported the same.
    pub(super) fn launch_failure(&self, a: &Action, code: u32) -> Option<RunError> {
        if a.taken.get().is_none() || !(code == 126 || code == 127) {
            return None;
        }
        let failed = a.data_dir().join(format!("{}-failed", spec::LAUNCH_FILE));
        let message = std::fs::read_to_string(failed).ok()?;
        crate::engine::error::exec_error("create the task", &message).map(RunError::Engine)
    }

    /// Makes entries for `key` in the background until it has its target,
    /// one at a time, while the node has room.
    pub(super) fn refill(self: &Arc<Self>, key: PoolKey) {
        let runner = self.clone();
        let busy = self.pool.busy(&key.cns);
        tokio::spawn(
            async move {
                let _busy = busy;
                while let Some((req, image)) = runner.next_fill(&key) {
                    let made = match runner.budget.try_take_owned(ENTRY_MEMORY_MIB, ENTRY_PIDS) {
                        Some(share) => runner.precreate(req, &image, share).await,
                        None => Err(None),
                    };
                    match made {
                        Ok(entry) => {
                            if let Some(unwanted) = runner.pool.shelve(&key, entry) {
                                // Retired (its tag moved), dropped or closed
                                // meanwhile.
                                runner.release(&unwanted.action).await;
                                return;
                            }
                        }
                        Err(why) => {
                            runner.pool.unfill(&key);
                            if let Some(e) = why {
                                warn!(error = %e, "cannot pre-create a task");
                            }
                            return;
                        }
                    }
                }
            }
            .instrument(info_span!("pool")),
        );
    }

    /// The request and image of the next entry `key` is to get, counted as
    /// being made; `None` when it has its target or the node no room.
    fn next_fill(&self, key: &PoolKey) -> Option<(ActionRequest, Arc<Image>)> {
        if !self.pool.enabled()
            || self.slots.available_permits() == 0
            || self.queued.waiting() > 0
            || self.readiness.draining().is_cancelled()
        {
            return None;
        }
        let mut shelves = self.pool.lock();
        let s = shelves.get_mut(key)?;
        let want = target(&s.uses, Instant::now(), self.pool.max, self.pool.idle);
        if s.retired || s.filling > 0 || s.entries.len() >= want {
            return None;
        }
        s.filling += 1;
        Some((s.req.clone(), s.image.clone()))
    }

    /// One entry: an action of no table, under an id of its own, created by
    /// the one create with the launcher as its process; removed again by
    /// the one release when that fails.
    async fn precreate(
        &self,
        mut req: ActionRequest,
        image: &Image,
        share: OwnedBudgetHold,
    ) -> Result<Entry, Option<RunError>> {
        let oid = format!("{POOL_ID_PREFIX}{:016x}", rand::random::<u64>());
        req.action_id = oid.clone();
        req.instance_id = None;
        req.step = None;
        req.argv = None;
        req.data = Vec::new();
        req.registries.clear();
        let handle = Handle::detached(&req.namespace, &oid);
        let action = Action::new(&self.cfg, req, handle);
        let made = async {
            self.prepare_dir(&action).await?;
            self.create(&action, image, Some(&self.pool.launcher)).await
        }
        .await;
        match made {
            Ok((stdio, memory)) => {
                debug!(entry = %oid, "pre-created a task");
                Ok(Entry {
                    action,
                    stdio,
                    memory,
                    _share: share,
                })
            }
            Err(e) => {
                // containerd went away mid-create: what it made is removed once it is
                // back (this make stays counted as busy meanwhile, so a drop waits).
                if e.containerd_unavailable() {
                    self.wait_for_containerd(Instant::now() + super::CONTAINERD_WAIT)
                        .await;
                }
                self.release(&action).await;
                Err(Some(e))
            }
        }
    }

    /// Removes an entry in the background, by the one release.
    fn discard(self: &Arc<Self>, entry: Entry) {
        let runner = self.clone();
        let busy = self.pool.busy(&entry.action.cns);
        tokio::spawn(
            async move {
                let _busy = busy;
                // Removed while containerd is away: again once it is back
                // (`Runner::redo_releases`).
                runner.release(&entry.action).await;
            }
            .in_current_span(),
        );
    }

    /// Removes entries and waits for it.
    async fn remove_entries(&self, entries: Vec<Entry>) -> usize {
        let n = entries.len();
        futures::future::join_all(entries.iter().map(|e| self.release(&e.action))).await;
        n
    }

    /// A full node: every entry goes, so that their memory and pids are
    /// the actions'.
    pub(super) fn evict_pool(self: &Arc<Self>) {
        let all = self.pool.take_all(None, false, false);
        if !all.is_empty() {
            info!(
                count = all.len(),
                "the node is full; removing its pre-created tasks"
            );
        }
        for e in all {
            self.discard(e);
        }
    }

    /// Every entry removed, now (`isolatectl ls --pool --drop`; the test
    /// harness before it checks that nothing is left). Returns how many.
    /// Entries being made or removed meanwhile are waited for (and the
    /// made ones removed), so that nothing of the pool is left when it
    /// answers.
    /// Only containerd namespace `cns`'s, when given.
    pub async fn drop_pool(&self, cns: Option<&str>) -> usize {
        self.empty_pool(cns, false).await
    }

    /// A graceful stop: no more entries, and every one removed.
    pub async fn close_pool(&self) {
        let n = self.empty_pool(None, true).await;
        if n > 0 {
            info!(count = n, "removed the pre-created tasks");
        }
    }

    async fn empty_pool(&self, cns: Option<&str>, close: bool) -> usize {
        let give_up = Instant::now() + Duration::from_secs(60);
        let mut n = 0;
        loop {
            let all = self.pool.take_all(cns, true, close);
            n += self.remove_entries(all).await;
            if !self.pool.is_busy(cns) || Instant::now() > give_up {
                // A make that ended after the take above removed its own.
                n += self
                    .remove_entries(self.pool.take_all(cns, true, close))
                    .await;
                return n;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Lets idle keys' entries go, until the pool closes.
    pub async fn expire_pool(self: Arc<Self>) {
        let every = (self.pool.idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
        while !self.pool.closed.load(Ordering::SeqCst) {
            tokio::time::sleep(every).await;
            for e in self.pool.expire(Instant::now()) {
                debug!(
                    entry = e.id(),
                    "its image was idle; removing the pre-created task"
                );
                self.discard(e);
            }
        }
    }

    /// The host path of the launcher.
    pub fn launcher(&self) -> &Path {
        &self.pool.launcher
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(image: &str, digest: &str) -> PoolKey {
        PoolKey {
            cns: "direktiv.ns".into(),
            image: image.into(),
            digest: digest.into(),
            size: 0,
        }
    }

    #[test]
    fn a_moved_tag_retires_only_its_own_image() {
        let old = key("docker.io/x:1", "sha256:a");
        assert!(old.retired_by(&key("docker.io/x:1", "sha256:b")));
        assert!(!old.retired_by(&key("docker.io/x:1", "sha256:a")));
        assert!(!old.retired_by(&key("docker.io/y:1", "sha256:b")));
        let mut other_ns = key("docker.io/x:1", "sha256:b");
        other_ns.cns = "direktiv.other".into();
        assert!(!old.retired_by(&other_ns));
    }

    #[test]
    fn keys_differ_by_every_input_of_the_create() {
        let a = key("x", "sha256:a");
        let mut b = a.clone();
        b.size = 1;
        assert_ne!(a, b);
        let mut c = a.clone();
        c.cns = "direktiv.other".into();
        assert_ne!(a, c);
    }

    #[test]
    fn size_follows_the_recent_rate_and_idleness() {
        let now = Instant::now();
        let idle = Duration::from_secs(60);
        let mut uses = VecDeque::new();
        assert_eq!(target(&uses, now, 2, idle), 0, "never used: none");
        uses.push_back(now);
        assert_eq!(target(&uses, now, 2, idle), 1);
        assert_eq!(target(&uses, now, 0, idle), 0, "precreate_max = 0: off");
        for _ in 0..BUSY_USES {
            uses.push_back(now);
        }
        assert_eq!(target(&uses, now, 2, idle), 2, "busy: two");
        assert_eq!(target(&uses, now, 1, idle), 1, "never above precreate_max");
        let later = now + RATE_WINDOW + Duration::from_secs(1);
        assert_eq!(target(&uses, later, 2, idle), 1, "the rate fell: one");
        assert_eq!(target(&uses, now + idle, 2, idle), 0, "idle: none");
    }

    #[test]
    fn a_full_node_is_one_an_action_would_wait_on() {
        assert!(!node_is_full(1, (512, 2048), (256, 1024)));
        assert!(node_is_full(0, (512, 2048), (256, 1024)), "no slot");
        assert!(node_is_full(1, (255, 2048), (256, 1024)), "not its memory");
        assert!(node_is_full(1, (512, 1023), (256, 1024)), "not its pids");
        assert!(!node_is_full(1, (256, 1024), (256, 1024)), "exactly enough");
    }

    #[test]
    fn the_launcher_execs_the_request_and_fails_like_runc() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let launcher = t.path().join("launch");
        std::fs::write(&launcher, LAUNCHER).unwrap();
        std::fs::set_permissions(&launcher, std::fs::Permissions::from_mode(0o755)).unwrap();
        let run = |argv: &[&str], env: &[&str]| {
            let file = t.path().join("file");
            let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
            let env: Vec<String> = env.iter().map(|s| s.to_string()).collect();
            std::fs::write(&file, launch_file(&argv, &env)).unwrap();
            let out = std::process::Command::new(&launcher)
                .arg(&file)
                .env("LEAK", "yes")
                .env("HOME", "/home/of-the-user")
                .output()
                .unwrap();
            assert!(!file.exists(), "the launch file is removed before the exec");
            let failed = t.path().join("file-failed");
            let why = std::fs::read_to_string(&failed).ok();
            let _ = std::fs::remove_file(&failed);
            (out, why)
        };
        let (out, why) = run(
            &["sh", "-c", "echo \"$0|$1|$X|${LEAK:-none}\"", "a b", ""],
            &["PATH=/usr/bin:/bin", "X=1=2"],
        );
        assert_eq!(why, None);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a b||1=2|none\n");
        assert!(out.status.success());

        // In its order, not sorted; HOME as runc gave it when the request has none.
        let (out, _) = run(&["env"], &["PATH=/usr/bin:/bin", "Z=1", "A=2"]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "PATH=/usr/bin:/bin\nZ=1\nA=2\nHOME=/home/of-the-user\n"
        );
        let (out, _) = run(&["env"], &["HOME=/mine", "PATH=/usr/bin:/bin"]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "HOME=/mine\nPATH=/usr/bin:/bin\n"
        );

        let (out, why) = run(&["/no/such"], &["PATH=/bin"]);
        assert_eq!(out.status.code(), Some(127));
        assert!(
            out.stderr.is_empty(),
            "nothing on stderr, as without the pool"
        );
        let e = crate::engine::error::exec_error("x", &why.unwrap()).unwrap();
        assert!(e.to_string().contains("/no/such"), "{e}");

        let (out, why) = run(&["no-such-program"], &["PATH=/bin"]);
        assert_eq!(out.status.code(), Some(127));
        assert!(why.unwrap().contains("executable file not found in $PATH"));

        let file = t.path().join("junk");
        std::fs::write(&file, b"junk").unwrap();
        let out = std::process::Command::new(&launcher)
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(125));
        assert!(String::from_utf8_lossy(&out.stderr).contains("malformed"));
        let out = std::process::Command::new(&launcher)
            .arg(t.path().join("missing"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(125));
        assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the launch file"));
    }
}
