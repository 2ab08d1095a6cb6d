//! The test run's own containerd: which build it is (PATH's, or the one
//! `ISOLATED_TEST_CONTAINERD` names for the matrix), its generated config in the format that
//! build takes, start-up, gRPC clients for it, and the sweep that removes whatever a run left
//! in it before it is stopped. It does not fetch other builds (node/matrix-fetch.sh does).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::namespaces_client::NamespacesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    self, ListSnapshotsRequest, RemoveSnapshotRequest,
};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::services::v1::{
    DeleteContainerRequest, DeleteTaskRequest, KillRequest, ListContainersRequest,
    ListNamespacesRequest, ListTasksRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::Request;

use super::process::{wait_ready, ChildProcess};

/// The snapshotter isolated is told to use (ISOLATE.md §6).
pub const SNAPSHOTTER: &str = "overlayfs";

/// A directory with `containerd`, `containerd-shim-runc-v2` and optionally `ctr`: the run
/// uses that build instead of PATH's.
pub const TEST_CONTAINERD_VAR: &str = "ISOLATED_TEST_CONTAINERD";

/// Puts `ISOLATED_TEST_CONTAINERD`'s directory first on this process's PATH, so that
/// containerd, the shim containerd starts (found on containerd's PATH), `ctr` and isolated
/// (which inherits the environment) all use that build. Must run before any thread is
/// started: it changes the process environment. Returns the directory, if set.
pub fn use_test_containerd() -> Result<Option<PathBuf>> {
    let Some(dir) = std::env::var_os(TEST_CONTAINERD_VAR).filter(|d| !d.is_empty()) else {
        return Ok(None);
    };
    let dir = std::fs::canonicalize(&dir)
        .with_context(|| format!("{TEST_CONTAINERD_VAR}={}", Path::new(&dir).display()))?;
    for bin in ["containerd", "containerd-shim-runc-v2"] {
        anyhow::ensure!(
            dir.join(bin).is_file(),
            "{TEST_CONTAINERD_VAR}={} has no {bin}",
            dir.display()
        );
    }
    let mut paths = vec![dir.clone()];
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::set_var("PATH", std::env::join_paths(paths)?);
    Ok(Some(dir))
}

/// `containerd --version` of the build on PATH: the whole line, and the major version.
pub fn version() -> Result<(String, u32)> {
    let out = Command::new("containerd")
        .arg("--version")
        .output()
        .context("run containerd --version")?;
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // "containerd github.com/containerd/containerd/v2 2.1.9+unknown ..."
    let major = line
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.trim_start_matches('v').split('.').next()?.parse().ok())
        .with_context(|| format!("no version in `containerd --version`: {line:?}"))?;
    Ok((line, major))
}

/// The config of a containerd confined to `d`, in the format its major version reads
/// without migrating: containerd 2.x takes `version = 3` (a version 2 file is migrated in
/// memory at every start, with a warning) and split CRI into several plugins, each of which
/// must be disabled on its own; 1.6 and 1.7 take `version = 2` and one CRI plugin. CRI is
/// off because it would want CNI and the host's /var/lib paths.
pub fn config_for(major: u32, d: &Path) -> String {
    let d = d.display();
    let (version, disabled) = if major >= 2 {
        (
            3,
            r#"[
  "io.containerd.grpc.v1.cri",
  "io.containerd.cri.v1.images",
  "io.containerd.cri.v1.runtime",
  "io.containerd.podsandbox.controller.v1.podsandbox",
]"#,
        )
    } else {
        (2, r#"["io.containerd.grpc.v1.cri"]"#)
    };
    format!(
        r#"version = {version}
root = "{d}/root"
state = "{d}/state"
disabled_plugins = {disabled}

[grpc]
  address = "{d}/c.sock"

[ttrpc]
  address = "{d}/c.sock.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
    )
}

pub struct Containerd {
    process: std::sync::Mutex<ChildProcess>,
    socket: PathBuf,
    dir: PathBuf,
    /// `containerd --version` of the build that runs.
    version: String,
}

impl Containerd {
    /// Writes a config confined to `dir` and starts containerd on it. The CRI plugin is
    /// disabled: it would want CNI and the host's /var/lib paths.
    pub async fn start(dir: &Path, timeout: Duration) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("c.sock");
        let config = dir.join("config.toml");
        let (version, major) = version()?;
        eprintln!("harness: {version}");
        std::fs::write(&config, config_for(major, dir))?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config);
        let mut child = ChildProcess::spawn("containerd", cmd, &dir.join("containerd.log"))?;
        wait_ready("containerd", &mut child, timeout, || {
            let socket = socket.clone();
            async move {
                let channel = containerd_client::connect(&socket).await?;
                VersionClient::new(channel).version(()).await?;
                Ok(())
            }
        })
        .await?;
        Ok(Self {
            process: std::sync::Mutex::new(child),
            socket,
            dir: dir.to_path_buf(),
            version,
        })
    }

    /// `containerd --version` of the build that runs.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    /// containerd's `state` directory (task bundles live under it).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn pid(&self) -> u32 {
        self.process.lock().unwrap().pid()
    }

    pub async fn channel(&self) -> Result<Channel> {
        containerd_client::connect(&self.socket)
            .await
            .with_context(|| format!("connect to containerd at {}", self.socket.display()))
    }

    /// `ctr` aimed at this containerd and containerd namespace.
    pub fn ctr(&self, namespace: &str) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(namespace);
        cmd
    }

    pub async fn namespaces(&self) -> Result<Vec<String>> {
        let resp = NamespacesClient::new(self.channel().await?)
            .list(ListNamespacesRequest::default())
            .await?;
        Ok(resp
            .into_inner()
            .namespaces
            .into_iter()
            .map(|n| n.name)
            .collect())
    }

    /// The warnings containerd logged about its config (a version it migrates, a
    /// deprecated or unknown key): each is a sign that the config written here is not the
    /// one this build wants.
    pub fn config_warnings(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("level=warning") || l.contains("level=error"))
            .filter(|l| {
                let l = l.to_ascii_lowercase();
                // Not "config" alone: 1.6 warns that devmapper is "not configured", which
                // says nothing about the file.
                ["migrat", "deprecat", "unknown"]
                    .iter()
                    .any(|w| l.contains(w))
            })
            .map(str::to_string)
            .collect()
    }

    /// Kills and deletes every task, deletes every container and removes every snapshot
    /// that is not a committed image layer, in every namespace. Returns what it removed:
    /// anything in that list is a leak of the run. Shims exit once their task is deleted,
    /// so this is also what stops them.
    pub async fn sweep(&self) -> Result<Vec<String>> {
        let channel = self.channel().await?;
        let mut removed = Vec::new();
        for ns in self.namespaces().await? {
            let mut tasks = TasksClient::new(channel.clone());
            let listed = tasks
                .list(with_ns(ListTasksRequest::default(), &ns))
                .await?
                .into_inner()
                .tasks;
            for task in listed {
                // containerd 1.6 leaves ListTasks' container_id empty; the id is the container's.
                let id = task.id.clone();
                let _ = tasks
                    .kill(with_ns(
                        KillRequest {
                            container_id: id.clone(),
                            exec_id: String::new(),
                            signal: 9,
                            all: true,
                        },
                        &ns,
                    ))
                    .await;
                let mut deleted = false;
                for _ in 0..100 {
                    let req = DeleteTaskRequest {
                        container_id: id.clone(),
                    };
                    match tasks.delete(with_ns(req, &ns)).await {
                        Ok(_) => {
                            deleted = true;
                            break;
                        }
                        Err(s) if s.code() == tonic::Code::NotFound => {
                            deleted = true;
                            break;
                        }
                        // Still running until the kill lands.
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                removed.push(format!(
                    "task {ns}/{id} (pid {}){}",
                    task.pid,
                    if deleted { "" } else { " [delete failed]" }
                ));
            }

            let mut containers = ContainersClient::new(channel.clone());
            let listed = containers
                .list(with_ns(ListContainersRequest::default(), &ns))
                .await?
                .into_inner()
                .containers;
            for c in listed {
                let res = containers
                    .delete(with_ns(DeleteContainerRequest { id: c.id.clone() }, &ns))
                    .await;
                removed.push(format!(
                    "container {ns}/{}{}",
                    c.id,
                    if res.is_ok() { "" } else { " [delete failed]" }
                ));
            }

            let mut snaps = SnapshotsClient::new(channel.clone());
            for info in list_snapshots(&mut snaps, &ns).await? {
                if info.kind == snapshots::Kind::Committed as i32 {
                    continue;
                }
                let res = snaps
                    .remove(with_ns(
                        RemoveSnapshotRequest {
                            snapshotter: SNAPSHOTTER.into(),
                            key: info.name.clone(),
                        },
                        &ns,
                    ))
                    .await;
                removed.push(format!(
                    "snapshot {ns}/{}{}",
                    info.name,
                    if res.is_ok() { "" } else { " [remove failed]" }
                ));
            }
        }
        Ok(removed)
    }

    pub fn stop(&self, grace: Duration) {
        self.process.lock().unwrap().stop(grace);
    }
}

/// Attaches the containerd namespace header.
pub fn with_ns<T>(message: T, namespace: &str) -> Request<T> {
    let mut req = Request::new(message);
    req.metadata_mut().insert(
        "containerd-namespace",
        namespace.parse().expect("namespace is valid ASCII"),
    );
    req
}

pub async fn list_snapshots(
    client: &mut SnapshotsClient<Channel>,
    namespace: &str,
) -> Result<Vec<snapshots::Info>> {
    let req = ListSnapshotsRequest {
        snapshotter: SNAPSHOTTER.into(),
        ..Default::default()
    };
    let mut stream = client.list(with_ns(req, namespace)).await?.into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await? {
        out.extend(msg.info);
    }
    Ok(out)
}
