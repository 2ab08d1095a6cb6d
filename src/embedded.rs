//! The embedded containerd (`embedded_containerd`): a private containerd
//! from PATH that `isolated` configures, starts, waits for, restarts with
//! backoff when it dies, and stops on shutdown (SIGTERM, then SIGKILL).
//!
//! Everything of it lives under `<state_dir>/containerd`: the generated
//! config, root, state, sockets, `opt`, the runtimes' state (`runc/`,
//! `crun/`), its log and its pid file. Owns only that process and what its config says: the shims
//! it starts re-parent away from it by design (they outlive containerd so
//! that running actions survive a restart), and what runs in it is the
//! runner's business.
//!
//! Embedded means private (issue 14): a second containerd on the host with
//! the same namespace and container id must not meet this one anywhere.
//! What containerd keeps by itself is under its `root` and `state`. What
//! the runc v2 shim keeps is not: its runc root defaults to
//! `/run/containerd/runc/<namespace>` for every containerd on the host, and
//! containerd has no setting for it outside CRI (which is disabled here); it
//! is the `root` of the runc options a client gives with the container
//! (`engine::runtime`, given [`Embedded::dir`]), and containerd hands a
//! container's options to the shim when a task is created without options
//! of its own. The shim's
//! ttrpc socket stays under `/run/containerd/s/` (built into the shim), but
//! is named by a hash of containerd's own socket path, the namespace and the
//! id, so two containerds never share one.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::engine::Containerd;

/// How long a fresh containerd gets to answer its version call.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long containerd gets to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A containerd that ran this long before dying restarts without delay
/// growth: it was a crash, not a crash loop.
const STABLE: Duration = Duration::from_secs(60);
/// `sun_path` is 108 bytes with its terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// How long `containerd --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the embedded containerd could not be started.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum EmbeddedError {
    /// cannot prepare the embedded containerd's directory {path}: {source}
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// embedded containerd socket {path} is longer than a unix socket allows (107 bytes): choose a shorter state_dir
    SocketPath { path: PathBuf },
    /// cannot start containerd (is it installed and in PATH?): {0}
    Spawn(std::io::Error),
    /// cannot tell containerd's version from `containerd --version`: {0}
    Version(String),
    /// embedded containerd exited during start-up ({status}); its log is {log}
    Exited { status: String, log: PathBuf },
    /// embedded containerd did not answer on {socket} within {secs} s; its log is {log}
    NotReady {
        socket: PathBuf,
        secs: u64,
        log: PathBuf,
    },
}

/// Paths of one embedded containerd.
#[derive(Debug, Clone)]
struct Layout {
    dir: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    pid_file: PathBuf,
}

impl Layout {
    fn new(state_dir: &Path) -> Layout {
        let dir = Embedded::dir_of(state_dir);
        Layout {
            config: dir.join("config.toml"),
            socket: dir.join("containerd.sock"),
            log: dir.join("containerd.log"),
            pid_file: dir.join("containerd.pid"),
            dir,
        }
    }
}

/// The plugins that make up CRI. 1.x has one; 2.x split it into images,
/// runtime, the pod sandbox controller and the gRPC services, and disabling
/// only `grpc.v1.cri` still loads images and runtime (issue 14), which want
/// the host's CNI, `/etc/containerd/certs.d` and `/var/lib` paths. NRI,
/// loaded by default since 2.0, would listen on the host-wide
/// `/var/run/nri`. Measured with containerd 2.1.9 (Debian's): without CRI
/// the pod sandbox controller fails to load, and so does the gRPC service
/// of sandbox controllers without it (a warning each at every start), so
/// both are off too; `ctr plugins ls` then shows no plugin in error and
/// the log no warning. The generic shim sandbox controller stays.
const CRI_PLUGINS_1X: &[&str] = &["io.containerd.grpc.v1.cri"];
const CRI_PLUGINS_2X: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.cri.v1.images",
    "io.containerd.cri.v1.runtime",
    "io.containerd.podsandbox.controller.v1.podsandbox",
    "io.containerd.grpc.v1.sandbox-controllers",
    "io.containerd.nri.v1.nri",
];

/// The config isolated writes for its containerd of major version
/// `major`: the config version that release reads without migrating
/// (2 for 1.x; 3 for 2.x, which logs a migration warning at every start
/// for version 2), CRI disabled, and every path of it under `dir` so that
/// two isolated on one host do not share anything.
pub fn config_toml(dir: &Path, major: u32) -> String {
    let q = |p: PathBuf| toml::Value::String(p.display().to_string()).to_string();
    let (version, disabled) = match major {
        0 | 1 => (2, CRI_PLUGINS_1X),
        _ => (3, CRI_PLUGINS_2X),
    };
    let disabled: Vec<String> = disabled
        .iter()
        .map(|p| toml::Value::String(p.to_string()).to_string())
        .collect();
    format!(
        "# Generated by isolated (embedded_containerd) for containerd {major}.x; rewritten at every start.\n\
         version = {version}\n\
         root = {root}\n\
         state = {state}\n\
         disabled_plugins = [{disabled}]\n\n\
         [grpc]\n  address = {grpc}\n\n\
         [ttrpc]\n  address = {ttrpc}\n\n\
         [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt}\n",
        disabled = disabled.join(", "),
        root = q(dir.join("root")),
        state = q(dir.join("state")),
        grpc = q(dir.join("containerd.sock")),
        ttrpc = q(dir.join("containerd.sock.ttrpc")),
        opt = q(dir.join("opt")),
    )
}

/// The major version in `containerd --version`'s line, e.g.
/// `containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1`
/// or `containerd github.com/containerd/containerd/v2 v2.1.4 abc123`.
pub fn major_version(text: &str) -> Option<u32> {
    let mut words = text.split_whitespace();
    let module = words.find(|w| w.contains("containerd/containerd"));
    let version = match module {
        Some(_) => words.next(),
        // A build that prints only a version.
        None => text.split_whitespace().find(|w| {
            w.trim_start_matches('v')
                .starts_with(|c: char| c.is_ascii_digit())
        }),
    }?;
    version
        .trim_start_matches('v')
        .split(['.', '+', '~', '-'])
        .next()?
        .parse()
        .ok()
}

/// Asks the `containerd` in PATH for its version.
async fn containerd_major() -> Result<u32, EmbeddedError> {
    let out = tokio::time::timeout(
        VERSION_TIMEOUT,
        Command::new("containerd")
            .arg("--version")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| EmbeddedError::Version(format!("no answer within {VERSION_TIMEOUT:?}")))?
    .map_err(EmbeddedError::Spawn)?;
    let text = String::from_utf8_lossy(&out.stdout);
    major_version(&text).ok_or_else(|| EmbeddedError::Version(format!("{:?}", text.trim())))
}

/// A running, supervised containerd.
pub struct Embedded {
    layout: Layout,
    /// The pid of the current containerd process, 0 while none runs; shared
    /// with the supervisor, which replaces it on a restart.
    pid: Arc<AtomicI32>,
    stop: CancellationToken,
    supervisor: Option<tokio::task::JoinHandle<()>>,
}

impl Embedded {
    /// Writes the config, stops a containerd a crashed isolated left
    /// behind, starts a fresh one and waits until it answers.
    pub async fn start(state_dir: &Path) -> Result<Embedded, EmbeddedError> {
        let layout = Layout::new(state_dir);
        if layout.socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(EmbeddedError::SocketPath {
                path: layout.socket.clone(),
            });
        }
        let dir_err = |path: &Path| {
            let path = path.to_owned();
            move |source| EmbeddedError::Dir { path, source }
        };
        std::fs::create_dir_all(&layout.dir).map_err(dir_err(&layout.dir))?;
        let major = containerd_major().await?;
        std::fs::write(&layout.config, config_toml(&layout.dir, major))
            .map_err(dir_err(&layout.config))?;
        stop_leftover(&layout).await;

        let mut child = spawn(&layout)?;
        let pid = Arc::new(AtomicI32::new(child_pid(&child)));
        wait_ready(&layout, &mut child).await?;
        info!(socket = %layout.socket.display(), pid = pid.load(Ordering::Relaxed),
              major, "embedded containerd is up");

        let stop = CancellationToken::new();
        let supervisor = tokio::spawn(supervise(layout.clone(), child, pid.clone(), stop.clone()));
        Ok(Embedded {
            layout,
            pid,
            stop,
            supervisor: Some(supervisor),
        })
    }

    /// The directory of the embedded containerd of `state_dir`: the
    /// runtimes' state roots go under it too.
    pub fn dir_of(state_dir: &Path) -> PathBuf {
        state_dir.join("containerd")
    }

    /// The socket to give the containerd client.
    pub fn socket(&self) -> &Path {
        &self.layout.socket
    }

    /// Something that sends SIGTERM to the current containerd at once,
    /// without waiting or reaping: for an exit that cannot wait (a second
    /// Ctrl-C), so that no containerd is left running under the terminal.
    pub fn sigterm_hook(&self) -> impl Fn() + Send + Sync + 'static {
        let pid = self.pid.clone();
        move || {
            let pid = pid.load(Ordering::Relaxed);
            if pid > 0 {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
    }

    /// Stops containerd (SIGTERM, SIGKILL after a grace period) and reaps
    /// it. Shims of actions still running stay, as they do with a system
    /// containerd, for the next start to re-attach to.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(s) = self.supervisor.take() {
            let _ = s.await;
        }
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        // Reached without `shutdown` only when start-up failed after
        // containerd came up: the runtime may be gone before the
        // supervisor runs again, so ask containerd to stop right here.
        if self.supervisor.is_some() {
            self.stop.cancel();
            let pid = self.pid.load(Ordering::Relaxed);
            if pid > 0 {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
    }
}

fn child_pid(child: &Child) -> i32 {
    child.id().map(|p| p as i32).unwrap_or(0)
}

fn spawn(layout: &Layout) -> Result<Child, EmbeddedError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&layout.log)
        .map_err(|source| EmbeddedError::Dir {
            path: layout.log.clone(),
            source,
        })?;
    let log2 = log.try_clone().map_err(|source| EmbeddedError::Dir {
        path: layout.log.clone(),
        source,
    })?;
    let child = Command::new("containerd")
        .arg("--config")
        .arg(&layout.config)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Its own process group: a Ctrl-C in isolated's terminal must not
        // stop containerd before isolated has let its actions finish.
        .process_group(0)
        .spawn()
        .map_err(EmbeddedError::Spawn)?;
    if let Some(pid) = child.id() {
        // Only read back by the next start, to stop a leftover.
        let _ = std::fs::write(&layout.pid_file, pid.to_string());
    }
    Ok(child)
}

async fn wait_ready(layout: &Layout, child: &mut Child) -> Result<(), EmbeddedError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut interval = Duration::from_millis(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(EmbeddedError::Exited {
                status: status.to_string(),
                log: layout.log.clone(),
            });
        }
        if layout.socket.exists() && Containerd::connect(&layout.socket).await.is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            terminate(child).await;
            return Err(EmbeddedError::NotReady {
                socket: layout.socket.clone(),
                secs: READY_TIMEOUT.as_secs(),
                log: layout.log.clone(),
            });
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(Duration::from_millis(250));
    }
}

/// Restarts containerd whenever it exits, until `stop`; then stops it.
/// Never gives up: without containerd no action can run, and a restart
/// loop in the log says more than a daemon that serves only errors.
async fn supervise(layout: Layout, child: Child, pid: Arc<AtomicI32>, stop: CancellationToken) {
    let mut child = Some(child);
    let mut backoff = FIRST_BACKOFF;
    let mut started = Instant::now();
    loop {
        if let Some(c) = child.as_mut() {
            let status = tokio::select! {
                _ = stop.cancelled() => {
                    terminate(c).await;
                    pid.store(0, Ordering::Relaxed);
                    let _ = std::fs::remove_file(&layout.pid_file);
                    info!("embedded containerd stopped");
                    return;
                }
                status = c.wait() => status,
            };
            child = None;
            pid.store(0, Ordering::Relaxed);
            if started.elapsed() >= STABLE {
                backoff = FIRST_BACKOFF;
            }
            warn!(status = ?status.map(|s| s.to_string()), log = %layout.log.display(),
                  restart_in_ms = backoff.as_millis() as u64, "embedded containerd exited, restarting it");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        match spawn(&layout) {
            Ok(mut c) => {
                pid.store(child_pid(&c), Ordering::Relaxed);
                started = Instant::now();
                if let Err(e) = wait_ready(&layout, &mut c).await {
                    warn!(error = %e, "restarted containerd does not answer");
                }
                child = Some(c);
            }
            Err(e) => warn!(error = %e, "cannot restart the embedded containerd"),
        }
    }
}

/// SIGTERM, wait, SIGKILL; reaps the process either way.
async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
            return;
        }
        warn!(pid, "embedded containerd ignored SIGTERM, killing it");
    }
    let _ = child.kill().await;
}

/// A containerd started by an isolated that then died without stopping
/// it still holds the socket and the root: it is stopped before a fresh
/// one starts. Only a process whose command line names this config is
/// touched, so a recycled pid is left alone.
async fn stop_leftover(layout: &Layout) {
    let Some(pid) = std::fs::read_to_string(&layout.pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let config = layout.config.display().to_string();
    let ours = cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == config.as_bytes());
    if !ours {
        return;
    }
    warn!(
        pid,
        "stopping the embedded containerd a previous isolated left running"
    );
    let target = Pid::from_raw(pid);
    let _ = kill(target, Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if kill(target, None).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = kill(target, Signal::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disabled(v: &toml::Table) -> Vec<&str> {
        v["disabled_plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect()
    }

    #[test]
    fn config_keeps_everything_under_the_state_dir() {
        for major in [1, 2] {
            let text = config_toml(Path::new("/var/lib/isolated/containerd"), major);
            let v: toml::Table = text.parse().unwrap();
            assert_eq!(
                v["grpc"]["address"].as_str(),
                Some("/var/lib/isolated/containerd/containerd.sock")
            );
            assert_eq!(
                v["ttrpc"]["address"].as_str(),
                Some("/var/lib/isolated/containerd/containerd.sock.ttrpc")
            );
            for (k, want) in [("root", "root"), ("state", "state")] {
                assert_eq!(
                    v[k].as_str(),
                    Some(format!("/var/lib/isolated/containerd/{want}").as_str())
                );
            }
            assert_eq!(
                v["plugins"]["io.containerd.internal.v1.opt"]["path"].as_str(),
                Some("/var/lib/isolated/containerd/opt")
            );
        }
    }

    #[test]
    fn config_version_and_cri_follow_the_containerd_release() {
        let v1: toml::Table = config_toml(Path::new("/s"), 1).parse().unwrap();
        assert_eq!(v1["version"].as_integer(), Some(2), "1.x reads version 2");
        assert_eq!(disabled(&v1), ["io.containerd.grpc.v1.cri"]);
        let v2: toml::Table = config_toml(Path::new("/s"), 2).parse().unwrap();
        assert_eq!(
            v2["version"].as_integer(),
            Some(3),
            "2.x migrates version 2 with a warning"
        );
        let off = disabled(&v2);
        for plugin in [
            "io.containerd.grpc.v1.cri",
            "io.containerd.cri.v1.images",
            "io.containerd.cri.v1.runtime",
            "io.containerd.podsandbox.controller.v1.podsandbox",
            "io.containerd.grpc.v1.sandbox-controllers",
            "io.containerd.nri.v1.nri",
        ] {
            assert!(off.contains(&plugin), "{plugin} stays enabled on 2.x");
        }
        // A later major is read as 2.x is.
        assert_eq!(config_toml(Path::new("/s"), 3), {
            config_toml(Path::new("/s"), 2).replace("containerd 2.x", "containerd 3.x")
        });
    }

    #[test]
    fn versions_are_read_from_what_containerd_prints() {
        for (text, want) in [
            (
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3\n",
                Some(1),
            ),
            (
                "containerd github.com/containerd/containerd/v2 2.1.9+unknown \n",
                Some(2),
            ),
            (
                "containerd github.com/containerd/containerd/v2 v2.0.4 1a43cb6a1035441f9aca8f5666a9b3ef9e70ab20\n",
                Some(2),
            ),
            ("containerd github.com/containerd/containerd v1.7.24 61f9fd88\n", Some(1)),
            ("containerd version 2.2.0\n", Some(2)),
            ("", None),
            ("containerd github.com/containerd/containerd unknown\n", None),
        ] {
            assert_eq!(major_version(text), want, "{text:?}");
        }
    }

    #[tokio::test]
    async fn too_long_a_socket_path_is_refused() {
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        assert!(matches!(
            Embedded::start(&long).await,
            Err(EmbeddedError::SocketPath { .. })
        ));
    }
}
