//! Daemons of one trial's own, for the trials that kill, restart or starve them: an
//! `isolated` with its own state dir, port and containerd namespace prefix, and a
//! containerd of its own. The shared daemons the other trials use concurrently never see
//! them: a private isolated's start-up sweep only looks at namespaces under its own
//! prefix, and the shared isolated's only at `direktiv.`.
//!
//! Also what the reaper and durability trials observe from outside: the control API,
//! an action's processes in containerd and in /proc.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::Kind;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    GetRequest, ListContainersRequest, ListPidsRequest, ListTasksRequest,
};
use direktiv_isolate::client;
use direktiv_isolate::proto::control::isolate_control_client::IsolateControlClient;
use direktiv_isolate::proto::control::{ActionInfo, ActionRef, ActionState};
use direktiv_isolate::proto::isolate::direktiv_isolate_client::DirektivIsolateClient;
use direktiv_isolate::proto::isolate::RunIsolateRequest;
use tonic::transport::Channel;

use super::cleanup::{action_cgroups, is_keeper, namespace_cgroups};
use super::containerd::{list_snapshots, with_ns, Containerd};
use super::env::Env;
use super::isolated::{Isolated, IsolatedConfig};
use super::process::free_port;
use super::{mounts, stale};

const STARTUP: Duration = Duration::from_secs(60);
/// Inputs may be 32 MiB (ISOLATE.md §2).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Unix milliseconds now, comparable with the control API's `*_at_ms`.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A connection to isolated's local socket, as `isolatectl` makes it.
pub async fn channel(socket: &Path) -> Result<Channel> {
    Ok(client::connect(&client::Target::Socket(socket.to_path_buf())).await?)
}

/// A client of isolated's own control service on its local `socket`.
pub async fn control_client(socket: &Path) -> Result<IsolateControlClient<Channel>> {
    Ok(IsolateControlClient::new(channel(socket).await?)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// A client of `DirektivIsolate` on the local `socket`, on a connection of its own.
pub async fn isolate_client(socket: &Path) -> Result<DirektivIsolateClient<Channel>> {
    Ok(DirektivIsolateClient::new(channel(socket).await?)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

impl Env {
    /// A client of the shared isolated's control service.
    pub async fn control_client(&self) -> Result<IsolateControlClient<Channel>> {
        control_client(self.isolated.socket()).await
    }
}

pub fn action_ref(ns: &str, action_id: &str) -> ActionRef {
    ActionRef {
        namespace: ns.to_string(),
        action_id: action_id.to_string(),
    }
}

/// Follows WatchIsolate until the action is in `state` or a later one; at the deadline
/// fails naming the last state seen.
pub async fn wait_state(
    control: &mut IsolateControlClient<Channel>,
    ns: &str,
    action_id: &str,
    state: ActionState,
    timeout: Duration,
) -> Result<ActionInfo> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = None;
    let watched = async {
        let mut stream = control
            .watch_isolate(action_ref(ns, action_id))
            .await
            .with_context(|| format!("WatchIsolate({ns}/{action_id})"))?
            .into_inner();
        while let Some(info) = stream.message().await? {
            if info.state >= state as i32 {
                return Ok(info);
            }
            last = Some(info.state());
        }
        bail!("the watch of {ns}/{action_id} ended before {state:?}")
    };
    match tokio::time::timeout_at(deadline, watched).await {
        Ok(r) => r,
        Err(_) => bail!("{ns}/{action_id} not {state:?} within {timeout:?}; last state {last:?}"),
    }
}

/// A process as seen once: its pid and start time, so a reused pid is not taken for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenProcess {
    pub pid: i32,
    start: String,
    pub cmdline: String,
}

impl SeenProcess {
    /// The process at `pid` now, unless it is gone or a zombie.
    pub fn now(pid: i32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        if fields.first() == Some(&"Z") {
            return None;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        Some(Self {
            pid,
            start: fields.get(19)?.to_string(),
            cmdline: String::from_utf8_lossy(&cmdline).replace('\0', " "),
        })
    }

    /// Whether this very process (same pid, same start) still exists.
    pub fn alive(&self) -> bool {
        Self::now(self.pid).is_some_and(|p| p.start == self.start)
    }
}

/// Every live process whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<SeenProcess> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid as u32 != std::process::id())
        .filter_map(SeenProcess::now)
        .filter(|p| p.cmdline.contains(marker))
        .collect()
}

/// The container action `id` runs in: its own, or the pre-created task it took (issue
/// 16), which isolated labels with the action's id when it starts it; `id` when there is
/// neither (it is gone, or not made yet).
pub async fn container_of(containerd: &Containerd, cns: &str, id: &str) -> Result<String> {
    let label = direktiv_isolate::engine::LABEL_ACTION_ID;
    let containers = ContainersClient::new(containerd.channel().await?)
        .list(with_ns(
            ListContainersRequest {
                filters: vec![format!("labels.\"{label}\"=={id}")],
            },
            cns,
        ))
        .await
        .with_context(|| format!("list the containers of {cns}"))?
        .into_inner()
        .containers;
    if containers.iter().any(|c| c.id == id) {
        return Ok(id.to_string());
    }
    Ok(containers
        .into_iter()
        .next()
        .map_or_else(|| id.to_string(), |c| c.id))
}

/// The processes of a task as containerd lists them (host pids).
pub async fn task_processes(
    containerd: &Containerd,
    cns: &str,
    id: &str,
) -> Result<Vec<SeenProcess>> {
    let id = &container_of(containerd, cns, id).await?;
    let pids = TasksClient::new(containerd.channel().await?)
        .list_pids(with_ns(
            ListPidsRequest {
                container_id: id.to_string(),
            },
            cns,
        ))
        .await
        .with_context(|| format!("ListPids of {cns}/{id}"))?
        .into_inner()
        .processes;
    Ok(pids
        .iter()
        .filter_map(|p| SeenProcess::now(p.pid as i32))
        .collect())
}

/// Fails if any of `seen` or any process with `marker` in its command line still exists.
pub fn ensure_processes_gone(seen: &[SeenProcess], marker: &str) -> Result<()> {
    let mut alive: Vec<String> = seen
        .iter()
        .filter(|p| p.alive())
        .map(|p| format!("pid {} ({})", p.pid, p.cmdline))
        .collect();
    alive.extend(
        processes_with(marker)
            .into_iter()
            .map(|p| format!("pid {} ({}) carries the marker", p.pid, p.cmdline)),
    );
    if !alive.is_empty() {
        bail!(
            "processes of the action still exist:\n  {}",
            alive.join("\n  ")
        );
    }
    Ok(())
}

/// Task `id`'s init as containerd's `Tasks.Get` shows it; `None` when there is no task.
async fn task_get(
    containerd: &Containerd,
    cns: &str,
    id: &str,
) -> Result<Option<containerd_client::types::v1::Process>> {
    let id = &container_of(containerd, cns, id).await?;
    let got = TasksClient::new(containerd.channel().await?)
        .get(with_ns(
            GetRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            },
            cns,
        ))
        .await;
    match got {
        Ok(r) => Ok(r.into_inner().process),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(anyhow!("get task {cns}/{id}: {s}")),
    }
}

/// The task's status in containerd (`containerd.v1.types.Status`: 2 running, 3 stopped),
/// or None when it has no task.
pub async fn task_status(containerd: &Containerd, cns: &str, id: &str) -> Result<Option<i32>> {
    Ok(task_get(containerd, cns, id).await?.map(|p| p.status))
}

/// The pid of task `id`'s init as containerd knows it: the one process of a task that
/// lives as long as the task (a `ListPids` entry may be gone, its pid reused, by the time
/// it is read, and comes in pid order, not the init first).
pub async fn task_init_pid(containerd: &Containerd, cns: &str, id: &str) -> Result<u32> {
    task_get(containerd, cns, id)
        .await?
        .map(|p| p.pid)
        .filter(|&pid| pid > 0)
        .ok_or_else(|| anyhow!("task {cns}/{id} has no init process"))
}

/// Polls until containerd has no task `id` in `cns`.
pub async fn wait_task_gone(
    containerd: &Containerd,
    cns: &str,
    id: &str,
    timeout: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while let Some(status) = task_status(containerd, cns, id).await? {
        if tokio::time::Instant::now() >= deadline {
            bail!("task {cns}/{id} still in containerd (status {status}) after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

pub const TASK_RUNNING: i32 = 2;
pub const TASK_STOPPED: i32 = 3;

/// What an action of containerd namespace `cns` may leave behind in `containerd` (a
/// private one) and on the host, for the daemon whose state dir is `state_dir`.
pub async fn leftovers_in(
    env: &Env,
    containerd: &Containerd,
    cns: &str,
    state_dir: &Path,
) -> Result<Vec<String>> {
    // The host side (cgroups, data dirs, network state) and the shared containerd's side,
    // which for a private containerd's namespace is empty.
    let mut left = env.leftovers_in(cns, state_dir).await?;
    if containerd.socket() == env.containerd.socket() {
        return Ok(left);
    }
    let channel = containerd.channel().await?;
    let containers = ContainersClient::new(channel.clone())
        .list(with_ns(ListContainersRequest::default(), cns))
        .await?
        .into_inner()
        .containers;
    left.extend(
        containers
            .iter()
            .filter(|c| !is_keeper(&c.id))
            .map(|c| format!("container {cns}/{}", c.id)),
    );
    let tasks = TasksClient::new(channel.clone())
        .list(with_ns(ListTasksRequest::default(), cns))
        .await?
        .into_inner()
        .tasks;
    left.extend(
        tasks
            .iter()
            .filter(|t| !is_keeper(&t.id) && !is_keeper(&t.container_id))
            .map(|t| format!("task {cns}/{} (pid {})", t.id, t.pid)),
    );
    let mut snaps = SnapshotsClient::new(channel);
    for s in list_snapshots(&mut snaps, cns).await? {
        if s.kind != Kind::Committed as i32 {
            left.push(format!("snapshot {cns}/{}", s.name));
        }
    }
    Ok(left)
}

/// The directory of `pid`'s cgroup in the v1 hierarchy of `controller` (e.g. "pids").
pub fn cgroup_of(pid: i32, controller: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == controller).then(|| {
            Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(path.trim_start_matches('/'))
        })
    })
}

/// A fresh directory under the run's temp dir (so the run's teardown and the next run's
/// stale-run sweep cover it too).
fn private_dir(env: &Env, kind: &str) -> Result<PathBuf> {
    let dir = env
        .dir()
        .join(format!("{kind}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

/// Unmounts what is left under `dir` and removes it.
fn remove_private_dir(dir: &Path) {
    mounts::unmount_under(dir);
    mounts::detach_loops_under(dir);
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            eprintln!("harness: could not remove {}: {e}", dir.display());
        }
    }
}

/// An isolated of the trial's own: own state dir, own port, own namespace prefix, the
/// shared flow receiver, and the shared containerd unless given one.
pub struct PrivateIsolated {
    env: &'static Env,
    dir: PathBuf,
    prefix: String,
    isolated: Isolated,
}

impl PrivateIsolated {
    /// Starts one on the shared containerd with `extra_args` (e.g. `--kill-grace-secs 1`).
    pub async fn start(env: &'static Env, extra_args: &[&str]) -> Result<Self> {
        Self::start_on(env, env.containerd.socket(), extra_args).await
    }

    /// Starts one on the containerd at `socket`.
    pub async fn start_on(env: &'static Env, socket: &Path, extra_args: &[&str]) -> Result<Self> {
        let p = Self::new(env, socket, extra_args)?;
        p.start_again().await?;
        Ok(p)
    }

    /// Prepares one without starting it, so a trial can plant things before its first
    /// start.
    pub fn new(env: &'static Env, socket: &Path, extra_args: &[&str]) -> Result<Self> {
        Self::new_with(env, socket, extra_args, |_| {})
    }

    /// Starts one on the shared containerd whose config `configure` changes first (its
    /// socket, its TCP token).
    pub async fn start_with(
        env: &'static Env,
        extra_args: &[&str],
        configure: impl FnOnce(&mut IsolatedConfig),
    ) -> Result<Self> {
        let p = Self::new_with(env, env.containerd.socket(), extra_args, configure)?;
        p.start_again().await?;
        Ok(p)
    }

    fn new_with(
        env: &'static Env,
        socket: &Path,
        extra_args: &[&str],
        configure: impl FnOnce(&mut IsolatedConfig),
    ) -> Result<Self> {
        let dir = private_dir(env, "pi")?;
        // Not `direktiv.`: the shared isolated, if restarted, sweeps every namespace under
        // its prefix, and this one sweeps only its own.
        let prefix = format!("pi{:08x}.", rand::random::<u32>());
        let mut args: Vec<String> = vec![
            "--namespace-prefix".into(),
            prefix.clone(),
            // The default metrics port may be taken by the shared isolated or a developer's.
            "--metrics-bind=".into(),
            // A CNI network would need a bridge and subnet of its own (`cni::TestNet`); the
            // trials using private daemons are not about the network.
            "--network".into(),
            "none".into(),
        ];
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let mut config = IsolatedConfig::new(
            format!("127.0.0.1:{}", free_port()?).parse()?,
            env.flow.addr(),
            socket,
            dir.join("state"),
            dir.join("isolated.log"),
            args,
        );
        configure(&mut config);
        let isolated = Isolated::new(config);
        Ok(Self {
            env,
            dir,
            prefix,
            isolated,
        })
    }

    /// (Re)starts the process on the same state dir and port.
    pub async fn start_again(&self) -> Result<()> {
        self.isolated
            .start(STARTUP)
            .await
            .context("start the private isolated")
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&self) {
        self.isolated.kill();
    }

    /// SIGTERM, and wait for it to exit.
    pub fn stop(&self) {
        self.isolated.stop(Duration::from_secs(15));
    }

    /// Sends `signal` to the process without waiting.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        self.isolated.signal(signal)
    }

    /// Waits up to `timeout` for the process to exit; None if it still runs.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.isolated.wait_exit(timeout).await
    }

    pub fn pid(&self) -> Option<u32> {
        self.isolated.pid()
    }

    /// Its arguments (the harness's standard ones come first, see `Isolated::start`).
    pub fn config(&self) -> &IsolatedConfig {
        self.isolated.config()
    }

    pub fn addr(&self) -> SocketAddr {
        self.isolated.addr()
    }

    pub fn socket(&self) -> &Path {
        self.isolated.socket()
    }

    /// The TCP listener's token for every namespace.
    pub fn token(&self) -> Option<&str> {
        self.isolated.token()
    }

    /// Its directory (state dir, log, socket, tokens file).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn log_text(&self) -> String {
        self.isolated.log_text()
    }

    pub fn state_dir(&self) -> &Path {
        &self.isolated.config().state_dir
    }

    fn containerd_socket(&self) -> &Path {
        &self.isolated.config().containerd_socket
    }

    /// The containerd namespace this daemon uses for Direktiv namespace `ns`, recorded for
    /// the run's clean-up (runc state and cgroup directories).
    pub fn adopt(&self, ns: &str) -> String {
        let cns = self.cns(ns);
        stale::record_namespace(self.env.dir(), &cns);
        cns
    }

    pub fn cns(&self, ns: &str) -> String {
        format!(
            "{}{}",
            self.prefix,
            direktiv_isolate::request::containerd_name(ns)
        )
    }

    pub async fn run(&self, req: RunIsolateRequest) -> Result<(), tonic::Status> {
        let mut client = isolate_client(self.isolated.socket())
            .await
            .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
        client.run_isolate(req).await.map(|_| ())
    }

    /// RunIsolate that must be accepted.
    pub async fn accept(&self, req: RunIsolateRequest) -> Result<()> {
        let id = req.action_id.clone().unwrap_or_default();
        self.run(req)
            .await
            .map_err(|s| anyhow!("RunIsolate({id}) on the private isolated: {s}"))
    }

    pub async fn control(&self) -> Result<IsolateControlClient<Channel>> {
        control_client(self.isolated.socket()).await
    }

    pub async fn get(&self, ns: &str, action_id: &str) -> Result<ActionInfo> {
        Ok(self
            .control()
            .await?
            .get_isolate(action_ref(ns, action_id))
            .await
            .with_context(|| format!("GetIsolate({ns}/{action_id})"))?
            .into_inner())
    }

    pub async fn wait_state(
        &self,
        ns: &str,
        action_id: &str,
        state: ActionState,
        timeout: Duration,
    ) -> Result<ActionInfo> {
        wait_state(&mut self.control().await?, ns, action_id, state, timeout).await
    }

    /// The containerd this daemon talks to, as a harness client.
    pub async fn leftovers(&self, containerd: &Containerd, ns: &str) -> Result<Vec<String>> {
        super::cleanup::drop_pool(self.socket(), ns).await;
        leftovers_in(self.env, containerd, &self.cns(ns), self.state_dir()).await
    }

    /// Polls until nothing of `ns` is left in `containerd`, the cgroups and this daemon's
    /// state dir.
    pub async fn assert_nothing_left(
        &self,
        containerd: &Containerd,
        ns: &str,
        timeout: Duration,
    ) -> Result<()> {
        debug_assert_eq!(containerd.socket(), self.containerd_socket());
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = self.leftovers(containerd, ns).await?;
            if left.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "namespace {} of the private isolated: still left after {timeout:?}:\n  {}",
                    self.cns(ns),
                    left.join("\n  ")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `err` followed by this daemon's log tail, for a failing trial.
    pub fn explain(&self, err: anyhow::Error) -> anyhow::Error {
        anyhow!(
            "{err:#}\n\n--- private isolated log {} (last 40 lines) ---\n{}",
            self.isolated.log_path().display(),
            self.isolated.log_tail(40)
        )
    }

    /// Whether the process is up; fails with its log tail if it died.
    pub fn ensure_running(&self) -> Result<()> {
        self.isolated.ensure_running()
    }
}

impl Drop for PrivateIsolated {
    fn drop(&mut self) {
        self.isolated.stop(Duration::from_secs(15));
        // Its refusals of lifecycle moves fail the trial as the shared daemon's do.
        super::note_refusals(&self.isolated.log_text());
        if std::env::var_os("ISOLATE_TEST_KEEP").is_none() {
            remove_private_dir(&self.dir);
        }
    }
}

/// A containerd of the trial's own, which it may stop and start again.
pub struct PrivateContainerd {
    dir: PathBuf,
    containerd: Option<Containerd>,
    namespaces: Vec<String>,
}

impl PrivateContainerd {
    pub async fn start(env: &Env) -> Result<Self> {
        let dir = private_dir(env, "pc")?;
        let containerd = Containerd::start(&dir, STARTUP)
            .await
            .context("start a private containerd")?;
        Ok(Self {
            dir,
            containerd: Some(containerd),
            namespaces: Vec::new(),
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("c.sock")
    }

    /// Notes a containerd namespace used in it, whose task processes are killed if the
    /// trial fails before everything was removed.
    pub fn note_namespace(&mut self, cns: &str) {
        self.namespaces.push(cns.to_string());
    }

    pub fn get(&self) -> Result<&Containerd> {
        self.containerd
            .as_ref()
            .ok_or_else(|| anyhow!("the private containerd is stopped"))
    }

    pub fn pid(&self) -> Option<u32> {
        self.containerd.as_ref().map(|c| c.pid())
    }

    /// SIGTERM and wait: the shims and their tasks live on, as on a real node.
    pub fn stop(&mut self) {
        if let Some(c) = self.containerd.take() {
            c.stop(Duration::from_secs(20));
        }
    }

    /// Starts it again on the same root, state and socket.
    pub async fn start_again(&mut self) -> Result<()> {
        if self.containerd.is_none() {
            self.containerd = Some(
                Containerd::start(&self.dir, STARTUP)
                    .await
                    .context("restart the private containerd")?,
            );
        }
        Ok(())
    }

    /// Removes everything left in it, stops it and its shims, and removes its directory.
    /// Returns what had to be removed: a leak of the trial.
    /// The end of a trial on this containerd and `isolated` on it: the trial's result
    /// (with the daemon's log if it failed), the daemon stopped, then this containerd
    /// swept and stopped; a trial that passed fails if the sweep found anything.
    pub async fn conclude(self, isolated: PrivateIsolated, res: Result<()>) -> Result<()> {
        let res = res.map_err(|e| isolated.explain(e));
        drop(isolated);
        let swept = self.shutdown().await?;
        res?;
        anyhow::ensure!(
            swept.is_empty(),
            "the private containerd still held:\n  {}",
            swept.join("\n  ")
        );
        Ok(())
    }

    pub async fn shutdown(mut self) -> Result<Vec<String>> {
        let swept = match &self.containerd {
            Some(c) => c.sweep().await?,
            None => Vec::new(),
        };
        self.finish();
        Ok(swept)
    }

    fn finish(&mut self) {
        self.stop();
        for pid in stale::shims_of(&self.dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // A killed shim leaves its task's processes to init.
        for cns in &self.namespaces {
            for pids in action_cgroups(cns)
                .into_iter()
                .chain(namespace_cgroups(cns))
                .filter(|d| d.starts_with("/sys/fs/cgroup/pids"))
            {
                kill_cgroup_tree(&pids);
            }
        }
        if std::env::var_os("ISOLATE_TEST_KEEP").is_none() {
            remove_private_dir(&self.dir);
        }
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        if self.containerd.is_some() || self.dir.exists() {
            self.finish();
        }
    }
}

/// SIGKILL to every process in a cgroup directory and the ones below it.
fn kill_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                kill_cgroup_tree(&e.path());
            }
        }
    }
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}
