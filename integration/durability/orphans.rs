//! Start-up sweep (ISOLATE.md §6): what carries isolated's labels but belongs to no action
//! it knows is killed and removed; what does not carry them is not touched.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use super::FAST_GRACE;
use crate::harness::private::{task_processes, task_status, PrivateIsolated, TASK_RUNNING};
use crate::harness::{Ctx, ImageSpec, NOTHING_LEFT};

async fn ctr(t: &Ctx, cns: &str, args: &[&str]) -> Result<String> {
    let mut cmd = t.env.containerd.ctr(cns);
    cmd.args(args);
    let out = tokio::process::Command::from(cmd)
        .output()
        .await
        .context("run ctr")?;
    if !out.status.success() {
        bail!(
            "ctr {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn containers(t: &Ctx, cns: &str) -> Result<Vec<String>> {
    Ok(ctr(t, cns, &["containers", "ls", "-q"])
        .await?
        .lines()
        .map(str::to_string)
        .collect())
}

/// Before isolated's first start, its namespace holds a running container with isolated's
/// labels and no record (a crash after the state dir was lost, say), a data directory of
/// no action, and a container of someone else. At start isolated kills and removes the
/// first (task, processes, container, snapshot, cgroup) and the directory, and leaves the
/// stranger alone.
pub async fn orphans_removed_at_start(t: Ctx) -> Result<()> {
    let p = PrivateIsolated::new(t.env, t.env.containerd.socket(), &FAST_GRACE)?;
    let cns = p.adopt(&t.ns);
    let res = async {
        let image = t.push(&ImageSpec::with_script("sleep 600")).await?;
        ctr(
            &t,
            &cns,
            &["images", "pull", "--plain-http", &image.reference],
        )
        .await?;
        let orphan = t.action_id("orphan");
        // Where isolated would put it: a leftover check that finds it finds it there.
        let cgroup = format!("/isolated/{cns}@{orphan}");
        let labels = [
            "io.direktiv.isolate.managed=true".to_string(),
            format!("io.direktiv.isolate.namespace={}", t.ns),
            format!("io.direktiv.isolate.action-id={orphan}"),
        ];
        let mut args = vec!["run", "-d", "--null-io", "--cgroup", &cgroup];
        for l in &labels {
            args.extend(["--label", l.as_str()]);
        }
        args.extend([image.reference.as_str(), orphan.as_str()]);
        ctr(&t, &cns, &args).await?;
        ensure!(
            task_status(&t.env.containerd, &cns, &orphan).await? == Some(TASK_RUNNING),
            "the planted orphan does not run"
        );
        let processes = task_processes(&t.env.containerd, &cns, &orphan).await?;

        let stranger = t.action_id("stranger");
        ctr(
            &t,
            &cns,
            &["containers", "create", &image.reference, &stranger],
        )
        .await?;
        let stray = p
            .state_dir()
            .join("actions")
            .join(&cns)
            .join(t.action_id("stray"));
        std::fs::create_dir_all(stray.join("data"))?;
        std::fs::write(stray.join("data").join("data.in"), b"left over")?;

        p.start_again().await?;
        // The sweep runs before isolated serves, but the port is bound before it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let listed = containers(&t, &cns).await?;
            if !listed.contains(&orphan) && !stray.exists() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "30 s after start: containers {listed:?}, stray dir exists: {}",
                    stray.exists()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            task_status(&t.env.containerd, &cns, &orphan)
                .await?
                .is_none(),
            "the orphan's task is still there"
        );
        let alive: Vec<_> = processes.iter().filter(|p| p.alive()).collect();
        ensure!(
            alive.is_empty(),
            "the orphan's processes live on: {alive:?}"
        );
        ensure!(
            containers(&t, &cns).await?.contains(&stranger),
            "the container without isolated's labels was removed"
        );

        ctr(&t, &cns, &["containers", "rm", &stranger]).await?;
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await
    }
    .await;
    res.map_err(|e| p.explain(e))
}
