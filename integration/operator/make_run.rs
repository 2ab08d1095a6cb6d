//! `make run`'s script and `make clean`'s (issue 14): make run honours isolated's
//! environment and `BIND=`/`METRICS_BIND=`, probes for a system containerd in under a
//! second, and really starts on what it was given; make clean refuses while isolated
//! runs, then unmounts what is left under the directory and removes it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use nix::sys::signal::Signal;

use crate::harness::process::{free_port, wait_ready, ChildProcess};
use crate::harness::Ctx;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("dist")
        .join(name)
}

/// `dist/run.sh` with `vars` and nothing of the developer's isolated environment.
fn run_sh(run_dir: &Path, vars: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(script("run.sh")).env("RUN_DIR", run_dir);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("ISOLATED_") || k.starts_with("DIREKTIV_") || k.starts_with("RUN_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("RUN_DIR", run_dir);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd
}

/// The command line run.sh would run, and how long it took to decide.
fn printed(run_dir: &Path, vars: &[(&str, &str)]) -> Result<(String, Duration)> {
    let started = Instant::now();
    let out = run_sh(run_dir, vars)
        .env("RUN_PRINT", "1")
        .output()
        .context("run dist/run.sh")?;
    let took = started.elapsed();
    ensure!(
        out.status.success(),
        "run.sh {vars:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default().to_string();
    Ok((line, took))
}

fn clean(dir: &Path) -> Result<std::process::Output> {
    Command::new("bash")
        .arg(script("clean-run.sh"))
        .arg(dir)
        .output()
        .context("run dist/clean-run.sh")
}

pub async fn honours_the_environment_and_cleans_up(t: Ctx) -> Result<()> {
    let run_dir = t
        .env
        .dir()
        .join(format!("mr-{:06x}", rand::random::<u32>() >> 8));
    let dead = run_dir.with_extension("dead.sock");
    // A socket that accepts and never answers: ctr alone would wait 10 s on it.
    let _silent = std::os::unix::net::UnixListener::bind(&dead)?;
    let dead_s = dead.display().to_string();
    let (line, took) = printed(&run_dir, &[("SYSTEM_SOCK", &dead_s)])?;
    eprintln!("operator: make run decided on a silent containerd socket in {took:?}");
    ensure!(took < Duration::from_secs(1), "the probe took {took:?}");
    let rd = run_dir.display();
    ensure!(
        line.contains("--embedded-containerd")
            && line.contains("--bind ''")
            && line.contains(&format!("--state-dir {rd}/state"))
            && line.contains("--flow-endpoint none"),
        "defaults: {line}"
    );
    // The environment decides where it is set; make's variables win over it.
    let (line, _) = printed(
        &run_dir,
        &[
            ("SYSTEM_SOCK", &dead_s),
            ("DIREKTIV_ISOLATE_BIND", "127.0.0.1:5"),
            ("ISOLATED_STATE_DIR", "/elsewhere"),
            ("ISOLATED_CONTAINERD_ADDRESS", "/some/containerd.sock"),
        ],
    )?;
    ensure!(
        !line.contains("--bind")
            && !line.contains("--state-dir")
            && !line.contains("containerd")
            && line.contains("--socket"),
        "with the environment set: {line}"
    );
    let (line, _) = printed(
        &run_dir,
        &[
            ("SYSTEM_SOCK", &dead_s),
            ("DIREKTIV_ISOLATE_BIND", "127.0.0.1:5"),
            ("RUN_BIND", "127.0.0.1:6"),
            ("RUN_METRICS_BIND", "127.0.0.1:7"),
        ],
    )?;
    ensure!(
        line.contains("--bind 127.0.0.1:6") && line.contains("--metrics-bind 127.0.0.1:7"),
        "make's variables: {line}"
    );
    let (line, _) = printed(&run_dir, &[("ISOLATED_CONFIG", "/etc/isolated/x.toml")])?;
    ensure!(
        line.trim().ends_with("isolated"),
        "with a config file make run adds nothing: {line}"
    );

    // For real: the shared containerd from the environment, metrics where make says.
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let containerd = t.env.containerd.socket().display().to_string();
    let prefix = format!("mr{:08x}.", rand::random::<u32>());
    let mut cmd = run_sh(
        &run_dir,
        &[
            ("ISOLATED_BIN", env!("CARGO_BIN_EXE_isolated")),
            ("ISOLATED_CONTAINERD_ADDRESS", &containerd),
            ("ISOLATED_NETWORK", "none"),
            ("ISOLATED_NAMESPACE_PREFIX", &prefix),
            ("RUN_METRICS_BIND", &metrics),
            ("NO_COLOR", "1"),
        ],
    );
    cmd.env("RUN_DIR", &run_dir);
    std::fs::create_dir_all(&run_dir)?;
    let mut isolated =
        ChildProcess::spawn("make run's isolated", cmd, &run_dir.with_extension("log"))?;
    let socket = run_dir.join("isolated.sock");
    let addr = metrics.clone();
    wait_ready(
        "make run's isolated",
        &mut isolated,
        Duration::from_secs(60),
        || {
            let (socket, addr) = (socket.clone(), addr.clone());
            async move {
                tokio::net::UnixStream::connect(&socket).await?;
                tokio::net::TcpStream::connect(&addr).await?;
                Ok(())
            }
        },
    )
    .await?;
    let refused = clean(&run_dir)?;
    ensure!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("isolated still runs"),
        "make clean while isolated runs: {:?}",
        refused
    );
    ensure!(
        run_dir.join("state").exists(),
        "make clean removed a running state dir"
    );
    isolated.signal(Signal::SIGTERM)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = isolated.exited() {
            break s;
        }
        ensure!(
            Instant::now() < deadline,
            "make run's isolated did not stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    ensure!(status.success(), "make run's isolated exited with {status}");

    // Something left mounted under it (as a killed isolated leaves its netns mount).
    let leftover = run_dir.join("state/netns");
    std::fs::create_dir_all(&leftover)?;
    nix::mount::mount(
        Some(&leftover),
        &leftover,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )?;
    let out = clean(&run_dir)?;
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success()
            && said.contains(&format!(
                "unmounting {}",
                leftover
                    .canonicalize()
                    .unwrap_or(leftover.clone())
                    .display()
            ))
            && said.contains("make clean: removing"),
        "make clean: {out:?}"
    );
    ensure!(!run_dir.exists(), "make clean left {}", run_dir.display());
    ensure!(
        crate::harness::mounts::mounts_under(&run_dir).is_empty(),
        "mounts left under {}",
        run_dir.display()
    );
    Ok(())
}
