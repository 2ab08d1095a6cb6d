//! The daemon under test: one `isolated` process, its flags, its log file, and starting,
//! stopping and restarting it.

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
    pub flow_endpoint: SocketAddr,
    pub containerd_socket: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    /// Appended to the standard flags, for tests that need a non-default setting.
    pub extra_args: Vec<String>,
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
            cmd.arg("--bind")
                .arg(c.bind.to_string())
                .arg("--flow-endpoint")
                .arg(c.flow_endpoint.to_string())
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
        let bind = self.config.bind;
        let res = wait_ready("isolated", &mut child, timeout, || async move {
            tokio::net::TcpStream::connect(bind).await?;
            Ok(())
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
