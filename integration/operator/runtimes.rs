//! The OCI runtime under the runc v2 shim (issue 15): `runtime_binary` chosen for one
//! namespace by its `[namespaces.NAME]` table reaches the shim as its BinaryName, and a
//! crun that this host's hybrid cgroup layout would make fail every action is refused at
//! start in one line. crun itself runs in the node tier (`make test-node`, Debian 13's
//! cgroup v2 guest); this host has no crun and could not run it.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use direktiv_isolate::engine::runtime::{cgroup_layout, CgroupLayout};
use direktiv_isolate::proto::control::ActionState;

use super::shown;
use crate::durability::{expect_output, sleep_input, sleep_then_echo};
use crate::harness::private::PrivateIsolated;
use crate::harness::{Ctx, ACTION, FIRST_PULL, NOTHING_LEFT};

/// The host's runc, by absolute path (what an operator pointing at another runc build
/// writes): found on the PATH the harness gives containerd and isolated.
fn runc_path() -> Result<std::path::PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("runc"))
        .find(|p| p.is_file())
        .context("no runc on PATH")
}

/// A namespace whose table names runc by path: its action's task bundle has the shim's
/// options with that BinaryName (the shim writes them to `options.json` from the
/// container's runtime options), the action runs and answers, and another namespace of
/// the same daemon passes no options at all, as before the setting existed.
pub async fn runtime_binary_per_namespace(t: Ctx) -> Result<()> {
    let runc = runc_path()?;
    let other_ns = format!("{}-other", t.ns);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("config.toml");
    std::fs::write(
        &file,
        format!(
            "[namespaces.{:?}]\nruntime_binary = {:?}\n",
            t.ns,
            runc.display().to_string()
        ),
    )?;
    let p = PrivateIsolated::start(t.env, &["--config", &file.display().to_string()]).await?;
    let cns = p.adopt(&t.ns);
    let other_cns = p.adopt(&other_ns);
    let res = async {
        let image = t.push(&sleep_then_echo()).await?;
        let bundles = t
            .env
            .containerd
            .state_dir()
            .join("io.containerd.runtime.v2.task");
        let mut inputs = Vec::new();
        for (ns, cns) in [(&t.ns, &cns), (&other_ns, &other_cns)] {
            let id = t.action_id("binary");
            let mut req = t.request(&image.reference, &id);
            req.namespace = Some(ns.clone());
            req.data = Some(sleep_input(3, &id));
            inputs.push((id.clone(), req.data.clone().unwrap_or_default()));
            p.accept(req).await?;
            p.wait_state(ns, &id, ActionState::Running, FIRST_PULL)
                .await?;
            let options = bundles.join(cns).join(&id).join("options.json");
            let text = std::fs::read_to_string(&options).unwrap_or_default();
            if ns == &t.ns {
                ensure!(
                    text.contains(&format!("{:?}", runc.display().to_string())),
                    "the shim's options of {id} ({}) do not name {}: {text:?}",
                    options.display(),
                    runc.display()
                );
            } else {
                ensure!(
                    !text.contains("binary_name"),
                    "a namespace without a table got a BinaryName: {text:?}"
                );
            }
        }
        for (id, input) in &inputs {
            let report = t.env.flow.wait_report(id, ACTION).await?;
            expect_output(&report, input)?;
        }
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await?;
        p.assert_nothing_left(&t.env.containerd, &other_ns, NOTHING_LEFT)
            .await
    }
    .await;
    res.map_err(|e| p.explain(e))
}

/// On a hybrid cgroup host (this machine: v1 controllers, v2 at /sys/fs/cgroup/unified)
/// isolated with crun as a namespace's runtime_binary exits at start with one line naming
/// the cause, before it serves or starts anything. On a cgroup v2 host the trial checks
/// the other side: the same config starts.
pub async fn crun_refused_on_hybrid_cgroups(t: Ctx) -> Result<()> {
    let layout = cgroup_layout(&std::fs::read_to_string("/proc/self/mountinfo")?);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("config.toml");
    std::fs::write(&file, "[namespaces.fast]\nruntime_binary = \"crun\"\n")?;
    let socket = dir.path().join("isolated.sock");
    let state = dir.path().join("state");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_isolated"));
    cmd.arg("--config")
        .arg(&file)
        .args([
            "--bind",
            "",
            "--flow-endpoint",
            "none",
            "--metrics-bind",
            "",
        ])
        .args(["--network", "none"])
        .arg("--socket")
        .arg(&socket)
        .arg("--containerd-address")
        .arg(t.env.containerd.socket())
        .arg("--state-dir")
        .arg(&state)
        .env("NO_COLOR", "1")
        .env_remove("ISOLATED_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if layout != CgroupLayout::Hybrid {
        eprintln!("operator: the host's cgroups are {layout:?}, not hybrid: crun must be accepted");
        let mut child = cmd.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            ensure!(
                child.try_wait()?.is_none(),
                "isolated with crun exited on a {layout:?} host"
            );
            ensure!(
                Instant::now() < deadline,
                "isolated with crun did not serve"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        return Ok(());
    }
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .context("isolated with crun on a hybrid host did not exit")??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("crun cannot run on this host's hybrid cgroup layout"));
    ensure!(
        out.status.code() == Some(1) && line.is_some_and(|l| l.contains("runtime_binary crun")),
        "isolated with crun on a hybrid host: {}",
        shown(&out)
    );
    ensure!(!socket.exists(), "the refused isolated made its socket");
    ensure!(
        !state.exists(),
        "the refused isolated left state behind: {:?}",
        std::fs::read_dir(&state)
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            .unwrap_or_default()
    );
    Ok(())
}
