//! `--embedded-containerd` from nothing: a second isolated with its own state dir and ports
//! starts its own containerd, runs actions, restarts that containerd when it dies, replaces
//! the one a killed isolated left behind, and leaves no process behind when stopped. And
//! what embedded must mean (issue 14): a second isolated on its state dir leaves it alone,
//! and its runc state is its own, so another containerd running the same namespace and
//! container id at the same time does not collide with it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{ctl, ctl_command, shown};
use crate::core::echo_spec;
use crate::harness::private::{task_status, TASK_RUNNING};
use crate::harness::process::{wait_ready, ChildProcess};
use crate::harness::{Ctx, ImageSpec, FIRST_PULL};

/// Processes whose command line mentions `needle` (containerd and its shims name their
/// config or socket, both under the state dir).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(needle) {
            found.push(format!("pid {pid}: {}", text.trim()));
        }
    }
    found
}

/// Whether `pid` is a live process (a zombie has an empty command line).
fn alive(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

/// The pid in the embedded containerd's pid file, if it names a live process.
fn containerd_pid(state: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(state.join("containerd/containerd.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    alive(pid).then_some(pid)
}

/// Polls `f` every 50 ms until it holds; fails naming `what` after `timeout`.
async fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no {what} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Served on its local socket only (`--bind ""`), as `make run` does; its log beside the
/// state dir.
fn start_isolated(state: &Path, socket: &Path) -> Result<ChildProcess> {
    start_isolated_logged(state, socket, &state.with_extension("log"))
}

fn start_isolated_logged(state: &Path, socket: &Path, log: &Path) -> Result<ChildProcess> {
    let state_arg = state.display().to_string();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_isolated"));
    cmd.args(["--embedded-containerd", "--state-dir", &state_arg])
        .args(["--bind", "", "--flow-endpoint", "none"])
        .arg("--socket")
        .arg(socket)
        .args([
            "--metrics-bind",
            "",
            "--network",
            "none",
            "--log-format",
            "text",
        ])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info");
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("ISOLATED_") || k.starts_with("DIREKTIV_") {
            cmd.env_remove(&key);
        }
    }
    std::fs::create_dir_all(state)?;
    ChildProcess::spawn("embedded isolated", cmd, log)
}

async fn ready(isolated: &mut ChildProcess, socket: &Path) -> Result<()> {
    let probe = || async move {
        tokio::net::UnixStream::connect(socket).await?;
        Ok(())
    };
    wait_ready(
        "embedded isolated",
        isolated,
        Duration::from_secs(60),
        probe,
    )
    .await
}

/// Runs the echo image through `addr` and checks its output.
async fn echo_through(t: &Ctx, addr: &Path, image: &str, label: &str) -> Result<String> {
    let id = t.action_id(label);
    let input = format!("from the embedded one: {label}");
    let args = [
        "run",
        "-n",
        &t.ns,
        "-i",
        image,
        "-d",
        &input,
        "--action-id",
        &id,
    ];
    let out = ctl(addr, &args, FIRST_PULL).await?;
    ensure!(
        out.status.code() == Some(0) && out.stdout == input.as_bytes(),
        "run {label} on the embedded containerd: {}",
        shown(&out)
    );
    Ok(id)
}

pub async fn from_nothing(t: Ctx) -> Result<()> {
    let image = t.push(&echo_spec()).await?;
    let state = t
        .env
        .dir()
        .join(format!("emb-{:06x}", rand::random::<u32>() >> 8));
    let socket = state.with_extension("sock");
    let addr = socket.as_path();
    let mut isolated = start_isolated(&state, addr)?;
    ready(&mut isolated, addr).await?;
    let config = state.join("containerd/config.toml");
    ensure!(
        !processes_mentioning(&config.display().to_string()).is_empty(),
        "no containerd runs with {}",
        config.display()
    );

    let id = echo_through(&t, addr, &image.reference, "first")
        .await
        .with_context(|| format!("log:\n{}", isolated.log_tail(30)))?;
    // No flow engine: the result is kept, and the action counts as reported at once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = ctl(addr, &["get", "-n", &t.ns, &id, "--json"], FIRST_PULL).await?;
        let info: serde_json::Value =
            serde_json::from_slice(&out.stdout).with_context(|| shown(&out))?;
        if info["state"] == "reported" {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "never reported: {info}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // containerd dies: isolated starts a new one and goes on serving.
    let first = containerd_pid(&state).context("the embedded containerd has a pid file")?;
    kill(Pid::from_raw(first), Signal::SIGKILL)?;
    until("new containerd", Duration::from_secs(20), || {
        containerd_pid(&state).is_some_and(|p| p != first)
    })
    .await?;
    echo_through(&t, addr, &image.reference, "after-containerd-died").await?;

    // isolated dies: its containerd is left running, and the next start replaces it.
    let orphan = containerd_pid(&state).context("the restarted containerd has a pid file")?;
    isolated.kill();
    ensure!(
        alive(orphan),
        "containerd went down with a SIGKILLed isolated: the leftover case is not tested"
    );
    let mut isolated = start_isolated(&state, addr)?;
    ready(&mut isolated, addr).await?;
    ensure!(
        !alive(orphan),
        "the containerd a killed isolated left (pid {orphan}) still runs after the next start"
    );
    echo_through(&t, addr, &image.reference, "after-isolated-died").await?;

    let status = isolated.stop(Duration::from_secs(30));
    ensure!(
        status.success(),
        "embedded isolated exited with {status}; log:\n{}",
        isolated.log_tail(30)
    );
    let needle = state.display().to_string();
    until("clean process table", Duration::from_secs(15), || {
        processes_mentioning(&needle).is_empty()
    })
    .await
    .with_context(|| {
        format!(
            "still running:\n  {}",
            processes_mentioning(&needle).join("\n  ")
        )
    })?;
    ensure!(
        !state.join("containerd/containerd.pid").exists(),
        "the pid file of a stopped containerd is left"
    );
    Ok(())
}

/// Stops `isolated` and checks that nothing under `state` still runs.
async fn stop_cleanly(mut isolated: ChildProcess, state: &Path) -> Result<()> {
    let status = isolated.stop(Duration::from_secs(30));
    ensure!(
        status.success(),
        "embedded isolated exited with {status}; log:\n{}",
        isolated.log_tail(30)
    );
    let needle = state.display().to_string();
    until("clean process table", Duration::from_secs(15), || {
        processes_mentioning(&needle).is_empty()
    })
    .await
    .with_context(|| {
        format!(
            "still running:\n  {}",
            processes_mentioning(&needle).join("\n  ")
        )
    })
}

/// A second `isolated --embedded-containerd` on the state dir of a running one (a second
/// `make run` in the same checkout) exits 1 with one line naming the first one's pid, and
/// the first one's containerd is the same process afterwards and still runs actions.
pub async fn second_isolated_leaves_it_alone(t: Ctx) -> Result<()> {
    let image = t.push(&echo_spec()).await?;
    let state = t
        .env
        .dir()
        .join(format!("emb2-{:06x}", rand::random::<u32>() >> 8));
    let socket = state.with_extension("sock");
    let mut first = start_isolated(&state, &socket)?;
    ready(&mut first, &socket).await?;
    let containerd = containerd_pid(&state).context("the embedded containerd has a pid file")?;

    let second_log = state.with_extension("second.log");
    let mut second =
        start_isolated_logged(&state, &state.with_extension("second.sock"), &second_log)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = second.exited() {
            break s;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the second isolated still runs after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let text = std::fs::read_to_string(&second_log).unwrap_or_default();
    let want = format!(
        "isolated is already running on this state dir, pid {}",
        first.pid()
    );
    ensure!(
        status.code() == Some(1) && text.lines().any(|l| l.ends_with(&want)),
        "the second isolated exited with {status}, saying:\n{text}"
    );
    ensure!(
        !text.contains("stopping the embedded containerd"),
        "the second isolated went for the first one's containerd:\n{text}"
    );
    ensure!(
        containerd_pid(&state) == Some(containerd),
        "the embedded containerd (pid {containerd}) was replaced or stopped: now {:?}",
        containerd_pid(&state)
    );
    first.ensure_running()?;
    echo_through(&t, &socket, &image.reference, "after-a-second-start")
        .await
        .with_context(|| format!("log:\n{}", first.log_tail(30)))?;
    ensure!(
        containerd_pid(&state) == Some(containerd),
        "the embedded containerd was restarted while serving"
    );
    stop_cleanly(first, &state).await
}

/// The same containerd namespace and container id at the same time in the harness's
/// containerd (through `ctr run`, runc's default root) and in an embedded one (through
/// isolated): neither collides, and the embedded one's runc state is under its state dir.
pub async fn runc_state_is_private(t: Ctx) -> Result<()> {
    let image = t.push(&ImageSpec::with_script("sleep 600")).await?;
    // The embedded isolated keeps the default prefix.
    let cns = format!("direktiv.{}", t.ns);
    let id = t.action_id("same");
    let ctr = |args: &[&str]| {
        let mut cmd = t.env.containerd.ctr(&cns);
        cmd.args(args);
        let shown_args = args.join(" ");
        async move {
            let out = tokio::process::Command::from(cmd)
                .output()
                .await
                .context("run ctr")?;
            ensure!(
                out.status.success(),
                "ctr {shown_args}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    };
    ctr(&["images", "pull", "--plain-http", &image.reference]).await?;
    // A cgroup of its own: the point is runc's state, not the cgroup names.
    let cgroup = format!("/isolated/{cns}@{id}.ctr");
    ctr(&[
        "run",
        "-d",
        "--null-io",
        "--cgroup",
        &cgroup,
        &image.reference,
        &id,
    ])
    .await?;
    let shared_state = Path::new(direktiv_isolate::engine::runtime::DEFAULT_RUNC_ROOT)
        .join(&cns)
        .join(&id)
        .join("state.json");
    let res = async {
        ensure!(
            shared_state.exists(),
            "ctr's container has no runc state at {}",
            shared_state.display()
        );
        let state = t
            .env
            .dir()
            .join(format!("emb3-{:06x}", rand::random::<u32>() >> 8));
        let socket = state.with_extension("sock");
        let mut isolated = start_isolated(&state, &socket)?;
        ready(&mut isolated, &socket).await?;
        let private_state = state
            .join("containerd/runc")
            .join(&cns)
            .join(&id)
            .join("state.json");
        let mut run = ctl_command(
            &socket,
            &[
                "run",
                "-n",
                &t.ns,
                "-i",
                &image.reference,
                "-c",
                "sleep 4",
                "--action-id",
                &id,
            ],
        )
        .spawn()?;
        until("runc state under the state dir", FIRST_PULL, || {
            private_state.exists() || matches!(run.try_wait(), Ok(Some(_)))
        })
        .await?;
        ensure!(
            private_state.exists(),
            "the action ended before it ran: {}",
            shown(&run.wait_with_output().await?)
        );
        ensure!(
            shared_state.exists() && ctr(&["tasks", "ls"]).await?.contains(&id),
            "ctr's container of the same id is gone while the embedded one runs"
        );
        let out = tokio::time::timeout(crate::harness::ACTION, run.wait_with_output())
            .await
            .context("the embedded action did not end")??;
        ensure!(
            out.status.success(),
            "the embedded action with ctr's id: {}; log:\n{}",
            shown(&out),
            isolated.log_tail(30)
        );
        // Without a runc root of its own, the embedded one's task create met ctr's
        // container, and the runner's retry force-deleted it (`runc delete --force` under
        // the shared root): the other daemon's container must still run.
        ensure!(
            task_status(&t.env.containerd, &cns, &id).await? == Some(TASK_RUNNING)
                && shared_state.exists(),
            "ctr's container of the same id no longer runs after the embedded action"
        );
        // The result is shown before the task is deleted.
        until(
            "runc state removed with the action",
            crate::harness::NOTHING_LEFT,
            || !private_state.exists(),
        )
        .await?;
        stop_cleanly(isolated, &state).await
    }
    .await;
    let _ = ctr(&["tasks", "kill", "-s", "SIGKILL", &id]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while ctr(&["tasks", "rm", &id]).await.is_err() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let removed = ctr(&["containers", "rm", &id]).await;
    res?;
    removed.map(|_| ())
}
