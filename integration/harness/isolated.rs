//! The daemon under test: one `isolated` process, its flags, its log file, its local
//! socket (which the harness's clients use) and the bearer token of its TCP listener, and
//! starting, stopping and restarting it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, Result};
use nix::sys::signal::Signal;

use super::process::{log_tail, wait_ready, ChildProcess};

/// Everything isolated is started with; a restart reuses it unchanged.
#[derive(Clone, Debug)]
pub struct IsolatedConfig {
    pub bind: SocketAddr,
    /// Its local socket: a daemon of its own needs a socket of its own.
    pub socket: PathBuf,
    /// A bearer token for every namespace that its TCP listener accepts (written to a
    /// tokens file beside the log); `None` when the trial's `extra_args` say how the TCP
    /// listener authenticates.
    pub tcp_token: Option<String>,
    /// `host:port` or a URI.
    pub flow_endpoint: String,
    pub containerd_socket: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    /// Appended to the standard flags, for tests that need a non-default setting.
    pub extra_args: Vec<String>,
}

impl IsolatedConfig {
    /// The standard set-up: the socket beside the log, TCP with a fresh token.
    pub fn new(
        bind: SocketAddr,
        flow_endpoint: impl ToString,
        containerd_socket: &Path,
        state_dir: PathBuf,
        log: PathBuf,
        extra_args: Vec<String>,
    ) -> Self {
        Self {
            bind,
            socket: log.with_extension("sock"),
            tcp_token: Some(format!("harness-{:016x}", rand::random::<u64>())),
            flow_endpoint: flow_endpoint.to_string(),
            containerd_socket: containerd_socket.to_path_buf(),
            state_dir,
            log,
            extra_args,
        }
    }

    /// The tokens file written for `tcp_token`.
    pub fn tokens_file(&self) -> PathBuf {
        self.log.with_extension("tokens.toml")
    }
}

pub struct Isolated {
    config: IsolatedConfig,
    process: Mutex<Option<ChildProcess>>,
}

impl Isolated {
    pub fn new(config: IsolatedConfig) -> Self {
        Self {
            config,
            process: Mutex::new(None),
        }
    }

    pub fn config(&self) -> &IsolatedConfig {
        &self.config
    }

    pub fn addr(&self) -> SocketAddr {
        self.config.bind
    }

    /// The local socket, trusted for every namespace.
    pub fn socket(&self) -> &Path {
        &self.config.socket
    }

    /// The TCP listener's token for every namespace, if the harness set one.
    pub fn token(&self) -> Option<&str> {
        self.config.tcp_token.as_deref()
    }

    pub fn log_path(&self) -> &Path {
        &self.config.log
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.lock().unwrap().as_ref().map(|p| p.pid())
    }

    /// Starts the process (if not running) and waits until its gRPC port accepts
    /// connections; fails with its log tail if it exits or the deadline passes first.
    pub async fn start(&self, timeout: Duration) -> Result<()> {
        let mut child = {
            let mut guard = self.process.lock().unwrap();
            if let Some(p) = guard.as_mut() {
                if p.exited().is_none() {
                    return Ok(());
                }
            }
            guard.take();
            let c = &self.config;
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_isolated"));
            if let Some(token) = &c.tcp_token {
                std::fs::write(c.tokens_file(), tokens_entry("harness", token, "[\"*\"]"))?;
                cmd.arg("--auth-tokens-file").arg(c.tokens_file());
            }
            cmd.arg("--bind")
                .arg(c.bind.to_string())
                .arg("--socket")
                .arg(&c.socket)
                .arg("--flow-endpoint")
                .arg(&c.flow_endpoint)
                .arg("--containerd-address")
                .arg(&c.containerd_socket)
                .arg("--state-dir")
                .arg(&c.state_dir)
                .arg("--log-format")
                .arg("text")
                .args(&c.extra_args);
            // The tests read this log when they fail; debug for the daemon itself, not for
            // the HTTP/2 stack under it.
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env(
                    "RUST_LOG",
                    "debug,h2=info,hyper=info,hyper_util=info,tower=info,tonic=info,rustls=info,reqwest=info,oci_client=info",
                );
            }
            // The log is a file; colour codes would only garble the failure output.
            cmd.env("NO_COLOR", "1");
            // Its environment settings must not come from the developer's shell.
            for (key, _) in std::env::vars_os() {
                let k = key.to_string_lossy();
                if k.starts_with("ISOLATED_") || k.starts_with("DIREKTIV_") {
                    cmd.env_remove(&key);
                }
            }
            ChildProcess::spawn("isolated", cmd, &c.log)?
        };
        // It serves both listeners once the socket answers.
        let socket = self.config.socket.clone();
        let res = wait_ready("isolated", &mut child, timeout, || {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(&socket).await?;
                Ok(())
            }
        })
        .await;
        // Keep the handle even on failure so the process is stopped and reaped with the
        // environment.
        *self.process.lock().unwrap() = Some(child);
        res
    }

    /// Fails with the log tail unless the process is alive.
    pub fn ensure_running(&self) -> Result<()> {
        match self.process.lock().unwrap().as_mut() {
            Some(p) => p.ensure_running(),
            None => Err(anyhow!("isolated is not started")),
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status, if it ran.
    pub fn stop(&self, grace: Duration) -> Option<ExitStatus> {
        let mut p = self.process.lock().unwrap().take()?;
        Some(p.stop(grace))
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&self) -> Option<ExitStatus> {
        let mut p = self.process.lock().unwrap().take()?;
        Some(p.kill())
    }

    /// Waits up to `timeout` for the process to exit on its own, polling; returns its exit
    /// status, or None if it still runs (it is then left running) or was never started.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let mut guard = self.process.lock().unwrap();
                let status = guard.as_mut()?.exited();
                if let Some(status) = status {
                    guard.take();
                    return Some(status);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` without waiting.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        match self.process.lock().unwrap().as_mut() {
            Some(p) => p.signal(signal),
            None => Err(anyhow!("isolated is not started")),
        }
    }

    pub async fn restart(&self, grace: Duration, timeout: Duration) -> Result<()> {
        self.stop(grace);
        self.start(timeout).await
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.config.log, lines)
    }

    /// The whole log, for assertions about what it must never contain.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.config.log).unwrap_or_default()).into_owned()
    }
}

/// A tokens-file entry accepting `secret` for `namespaces` (a TOML list).
pub fn tokens_entry(name: &str, secret: &str, namespaces: &str) -> String {
    use sha2::Digest;
    let hex: String = sha2::Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("[[token]]\nname = \"{name}\"\nsha256 = \"{hex}\"\nnamespaces = {namespaces}\n")
}
