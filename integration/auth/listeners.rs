//! The two listeners themselves: the local socket's owner, mode and group, as a
//! non-root user finds them; the settings that must keep the TCP listener from starting
//! (one line, non-zero exit); and the two deliberate exceptions, an open listener and
//! the socket alone.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use direktiv_isolate::proto::control::ListIsolatesRequest;
use tonic_health::pb::health_check_response::ServingStatus;

use super::{clients, health, tcp};
use crate::harness::isolated::tokens_entry;
use crate::harness::private::PrivateIsolated;
use crate::harness::process::free_port;
use crate::harness::Ctx;
use crate::operator::{ctl, shown};

/// `nobody` / `nogroup` on Debian.
const NOBODY: u32 = 65534;

/// A directory anyone may traverse (the run's temp dir is root's alone, which would
/// refuse a non-root user before the socket's own mode is even looked at), removed when
/// dropped.
struct OpenDir(PathBuf);

impl OpenDir {
    fn new() -> Result<OpenDir> {
        let dir = PathBuf::from(format!("/tmp/isolated-sock-{:08x}", rand::random::<u32>()));
        std::fs::create_dir(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        Ok(OpenDir(dir))
    }
}

impl Drop for OpenDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `isolatectl --socket SOCKET ls` as uid/gid 65534 with no other groups.
fn ls_as_nobody(ctl: &Path, socket: &Path) -> Result<std::process::Output> {
    Command::new("setpriv")
        .arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .arg("--clear-groups")
        .arg(ctl)
        .arg("--socket")
        .arg(socket)
        .arg("ls")
        .env_remove("ISOLATECTL_ADDR")
        .stdin(Stdio::null())
        .output()
        .context("run setpriv (util-linux)")
}

pub async fn local_socket_is_for_root_or_its_group(t: Ctx) -> Result<()> {
    let open = OpenDir::new()?;
    // A copy nobody can execute: the build's own may sit under a private directory.
    let ctl_copy = open.0.join("isolatectl");
    std::fs::copy(env!("CARGO_BIN_EXE_isolatectl"), &ctl_copy)?;
    std::fs::set_permissions(&ctl_copy, std::fs::Permissions::from_mode(0o755))?;

    let root_only = open.0.join("root.sock");
    let p = PrivateIsolated::start_with(t.env, &[], |c| c.socket = root_only.clone()).await?;
    let meta = std::fs::metadata(&root_only)?;
    ensure!(
        meta.permissions().mode() & 0o777 == 0o600 && meta.uid() == 0,
        "the socket is mode {:o}, uid {}, not 0600 root's",
        meta.permissions().mode() & 0o777,
        meta.uid()
    );
    let out = ls_as_nobody(&ctl_copy, &root_only)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2) && stderr.contains("Permission denied"),
        "nobody opened the root-only socket: {}",
        shown(&out)
    );
    let out = ctl(&root_only, &["ls"], Duration::from_secs(30)).await?;
    ensure!(out.status.success(), "root's ls: {}", shown(&out));
    drop(p);
    ensure!(
        !root_only.exists(),
        "the socket is left after a graceful stop"
    );

    let grouped = open.0.join("group.sock");
    let p = PrivateIsolated::start_with(t.env, &["--socket-group", "nogroup"], |c| {
        c.socket = grouped.clone()
    })
    .await?;
    let meta = std::fs::metadata(&grouped)?;
    ensure!(
        meta.permissions().mode() & 0o777 == 0o660 && meta.gid() == NOBODY,
        "with socket_group the socket is mode {:o}, gid {}",
        meta.permissions().mode() & 0o777,
        meta.gid()
    );
    let out = ls_as_nobody(&ctl_copy, &grouped)?;
    ensure!(
        out.status.success(),
        "a member of socket_group could not use the socket: {}",
        shown(&out)
    );
    ensure!(
        p.log_text().contains("serving the local socket"),
        "no start-up line names the socket"
    );
    Ok(())
}

/// Runs `isolated` with `args` until it exits (it must, within 60 s); returns its exit
/// code and its last stderr line.
fn start_must_fail(t: &Ctx, args: &[&str]) -> Result<(Option<i32>, String)> {
    let dir = t
        .env
        .dir()
        .join(format!("refused-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_isolated"));
    cmd.arg("--containerd-address")
        .arg(t.env.containerd.socket())
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--socket")
        .arg(dir.join("s.sock"))
        .args([
            "--metrics-bind",
            "",
            "--network",
            "none",
            "--flow-endpoint",
            "none",
        ])
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("ISOLATED_") || k.starts_with("DIREKTIV_") {
            cmd.env_remove(&key);
        }
    }
    let mut child = cmd.spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(anyhow!("isolated {args:?} started instead of refusing"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut stderr)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let last = stderr.lines().last().unwrap_or("").to_string();
    ensure!(
        !dir.join("s.sock").exists(),
        "a refused start left its socket"
    );
    Ok((status.code(), last))
}

pub async fn unsafe_listeners_do_not_start(t: Ctx) -> Result<()> {
    let dir = t
        .env
        .dir()
        .join(format!("bad-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    let good = dir.join("good.toml");
    std::fs::write(&good, tokens_entry("ops", "secret-1", "[\"*\"]"))?;
    let bad = dir.join("bad-tokens.toml");
    std::fs::write(
        &bad,
        "[[token]]\nname = \"x\"\nsha256 = \"not hex\"\nnamespaces = [\"*\"]\n",
    )?;
    let junk = dir.join("junk-cert.pem");
    std::fs::write(&junk, "-----BEGIN NOTHING-----\n")?;
    let port = free_port()?.to_string();
    let loopback = format!("127.0.0.1:{port}");
    let anywhere = format!("0.0.0.0:{port}");
    let (good, bad, junk) = (
        good.display().to_string(),
        bad.display().to_string(),
        junk.display().to_string(),
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--bind", &loopback], "has no authentication"),
        (
            vec!["--bind", &anywhere, "--auth-tokens-file", &good],
            "plaintext",
        ),
        (
            vec!["--bind", &loopback, "--auth-tokens-file", &bad],
            "bad-tokens.toml",
        ),
        (
            vec![
                "--bind",
                &loopback,
                "--tls-cert",
                &junk,
                "--tls-key",
                &junk,
                "--auth-tokens-file",
                &good,
            ],
            "junk-cert.pem",
        ),
        (
            vec![
                "--bind",
                &loopback,
                "--tls-client-ca",
                &junk,
                "--auth-tokens-file",
                &good,
            ],
            "tls_client_ca",
        ),
    ];
    for (args, needle) in cases {
        let (code, line) = start_must_fail(&t, &args)?;
        ensure!(
            code.is_some_and(|c| c != 0) && line.starts_with("isolated: ") && line.contains(needle),
            "isolated {args:?}: exit {code:?}, last line {line:?}; wanted one naming {needle:?}"
        );
        ensure!(
            !line.contains("secret-1"),
            "a secret in the start-up error: {line}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

pub async fn open_and_socket_only_listeners(t: Ctx) -> Result<()> {
    // allow_unauthenticated: served open, and said so at start.
    let p =
        PrivateIsolated::start_with(t.env, &["--allow-unauthenticated"], |c| c.tcp_token = None)
            .await?;
    let channel = tcp(p.addr(), None).await?;
    let (_, mut control) = clients(&channel, None)?;
    control
        .list_isolates(ListIsolatesRequest::default())
        .await
        .context("an unauthenticated call on an allow_unauthenticated listener")?;
    ensure!(
        p.log_text()
            .contains("allow_unauthenticated: anyone who reaches"),
        "no warning about the open listener in the log"
    );
    drop(p);

    // bind = "": the socket alone.
    let p = PrivateIsolated::start(t.env, &["--bind="]).await?;
    ensure!(
        tokio::net::TcpStream::connect(p.addr()).await.is_err(),
        "with bind = \"\" something listens on {}",
        p.addr()
    );
    let out = ctl(p.socket(), &["ls"], Duration::from_secs(30)).await?;
    ensure!(out.status.success(), "ls over the socket: {}", shown(&out));
    // And health over the socket.
    let channel = crate::harness::private::channel(p.socket()).await?;
    ensure!(
        health(&channel).await? == ServingStatus::Serving,
        "health over the socket"
    );
    Ok(())
}
