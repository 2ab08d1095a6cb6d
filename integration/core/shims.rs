//! One runc shim per namespace (`shim_group = "namespace"`, the default): the actions of
//! a namespace join a shim that its keeper (a container whose task is created and never
//! started) holds open, and the keeper goes once the namespace is idle, when isolated
//! stops, and at the next start after a crash.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::ListContainersRequest;
use direktiv_isolate::runner::shim_keeper::KEEPER_ID_PREFIX;

use direktiv_isolate::proto::control::ActionState;

use super::{echo_spec, expect_success};
use crate::harness::cleanup::{action_cgroups, drop_pool, is_keeper};
use crate::harness::containerd::with_ns;
use crate::harness::private::{
    ensure_processes_gone, task_init_pid, task_processes, PrivateIsolated,
};
use crate::harness::{Ctx, ImageSpec, ACTION, FIRST_PULL, NOTHING_LEFT};

/// [`shims_of`] once it has settled: a second daemon of one group can live for a moment
/// while containerd >= 1.7 starts the shim for a create beside another's (two daemons of
/// `keeper.0` were seen right after an action, with the pool's refill creating beside it).
/// Polls for up to 5 s until at most one is left or the list stops changing.
async fn settled_shims(cns: &str) -> Vec<(i32, String)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut last = shims_of(cns);
    loop {
        if last.len() <= 1 || tokio::time::Instant::now() >= deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = shims_of(cns);
        if now == last {
            return now;
        }
        last = now;
    }
}

/// Shim daemons serving containerd namespace `cns`: (pid, the `-id` they started for).
fn shims_of(cns: &str) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let after = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        // The shim daemon, not containerd's short-lived `… start` and `… delete` calls of
        // the same binary for each task.
        let daemon = !matches!(
            args.iter()
                .rev()
                .find(|a| !a.is_empty())
                .map(String::as_str),
            Some("start" | "delete")
        );
        if args.first().is_some_and(|a| a.contains("containerd-shim"))
            && after("-namespace").as_deref() == Some(cns)
            && daemon
        {
            out.push((pid, after("-id").unwrap_or_default()));
        }
    }
    out
}

fn parent_of(pid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))?
        .trim()
        .parse()
        .ok()
}

async fn keepers_in(t: &Ctx, cns: &str) -> Result<Vec<String>> {
    let channel = t.env.containerd.channel().await?;
    Ok(ContainersClient::new(channel)
        .list(with_ns(ListContainersRequest::default(), cns))
        .await?
        .into_inner()
        .containers
        .into_iter()
        .map(|c| c.id)
        .filter(|id| is_keeper(id))
        .collect())
}

/// Polls until namespace `cns` has no keeper container, no keeper cgroup and no shim.
async fn wait_no_keeper(t: &Ctx, cns: &str, within: Duration, why: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let keepers = keepers_in(t, cns).await?;
        let shims = shims_of(cns);
        let cgroups: Vec<_> = action_cgroups(cns)
            .into_iter()
            .filter(|c| c.to_string_lossy().contains(KEEPER_ID_PREFIX))
            .collect();
        if keepers.is_empty() && shims.is_empty() && cgroups.is_empty() {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "{why}: after {within:?} still keepers {keepers:?}, shims {shims:?}, cgroups {cgroups:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs one echo action on `p` and expects its input back.
async fn run_ok(
    t: &Ctx,
    p: &PrivateIsolated,
    image: &str,
    label: &str,
    within: Duration,
) -> Result<()> {
    let id = t.action_id(label);
    let mut req = t.request(image, &id);
    req.data = Some(id.clone().into_bytes());
    p.accept(req).await?;
    let report = t.env.flow.wait_report(&id, within).await?;
    ensure!(
        expect_success(&report)? == id.as_bytes(),
        "wrong output of {id}"
    );
    Ok(())
}

/// Three actions one after another in one namespace run in one shim, started for the
/// namespace's keeper (each task's process is that shim's child while it runs); 3 s
/// after the last, keeper, cgroup and shim are gone.
pub async fn namespace_shares_one_shim_until_idle(t: Ctx) -> Result<()> {
    let p = PrivateIsolated::start(
        t.env,
        // Pre-created tasks (issue 16) live in the namespace's shim too: it is idle once
        // they have gone as well.
        &[
            "--shim-keep-secs",
            "3",
            "--shims-per-namespace",
            "1",
            "--precreate-idle-secs",
            "3",
        ],
    )
    .await?;
    let cns = p.adopt(&t.ns);
    let res = async {
        // Long enough to be seen running, and then done.
        let image = t
            .push(&ImageSpec::with_script(
                "sleep 1; cat /direktiv-data/data.in > /direktiv-data/data.out",
            ))
            .await?;
        let mut seen = Vec::new();
        for i in 0..3 {
            let id = t.action_id(&format!("seq{i}"));
            let mut req = t.request(&image.reference, &id);
            req.data = Some(id.clone().into_bytes());
            p.accept(req).await?;
            let within = if i == 0 { FIRST_PULL } else { ACTION };
            p.wait_state(&t.ns, &id, ActionState::Running, within)
                .await?;
            // Sampled while the task runs: a task in a shim of its own would
            // show that shim here, whatever is left once it is deleted.
            // The init, not ListPids' first entry: that list is in pid order, and once
            // pids wrap the script's `sleep` comes before the shell (seen: "process 351
            // has parent 32763, no shim").
            let init = task_init_pid(&t.env.containerd, &cns, &id).await?;
            let parent = parent_of(init as i32).context("the task's init has no parent")?;
            let shim = shims_of(&cns).into_iter().find(|(pid, _)| *pid == parent);
            seen.push(
                shim.with_context(|| format!("{id}'s init {init} has parent {parent}, no shim"))?,
            );
            let report = t.env.flow.wait_report(&id, ACTION).await?;
            ensure!(
                expect_success(&report)? == id.as_bytes(),
                "wrong output of {id}"
            );
        }
        seen.sort();
        seen.dedup();
        ensure!(
            seen.len() == 1 && seen[0].1 == format!("{KEEPER_ID_PREFIX}.0"),
            "expected one shim, started for the keeper, across the three actions; saw {seen:?}"
        );
        ensure!(
            keepers_in(&t, &cns).await?.len() == 1,
            "the keeper is gone before the namespace went idle"
        );
        wait_no_keeper(&t, &cns, Duration::from_secs(20), "idle namespace").await?;
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await
    }
    .await;
    res.map_err(|e| p.explain(e))
}

/// A keeper left by a crash (kill -9) is removed at the next start, a new one comes with
/// the next action, and a graceful stop removes it with its shim.
pub async fn keepers_removed_after_crash_and_at_stop(t: Ctx) -> Result<()> {
    let p = PrivateIsolated::start(t.env, &["--shim-keep-secs", "600"]).await?;
    let cns = p.adopt(&t.ns);
    let res = async {
        let image = t.push(&echo_spec()).await?;
        run_ok(&t, &p, &image.reference, "before-crash", FIRST_PULL).await?;
        ensure!(
            !keepers_in(&t, &cns).await?.is_empty(),
            "no keeper while the namespace is in use (shim_keep_secs 600)"
        );
        p.kill();
        p.start_again().await?;
        wait_no_keeper(&t, &cns, Duration::from_secs(20), "restart after kill -9").await?;
        run_ok(&t, &p, &image.reference, "after-crash", ACTION).await?;
        ensure!(
            !keepers_in(&t, &cns).await?.is_empty(),
            "no keeper for the action after the restart"
        );
        p.stop();
        wait_no_keeper(&t, &cns, Duration::from_secs(20), "graceful stop").await?;
        p.start_again()
            .await
            .context("start it again for the final check")?;
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await
    }
    .await;
    res.map_err(|e| p.explain(e))
}

/// The namespace's shim is killed (SIGKILL) while idle: containerd cleans up its keeper,
/// and the next action brings a new keeper, and with it a new shim that the actions after
/// it share.
pub async fn keeper_comes_back_after_its_shim_dies(t: Ctx) -> Result<()> {
    let p = PrivateIsolated::start(
        t.env,
        &["--shim-keep-secs", "600", "--shims-per-namespace", "1"],
    )
    .await?;
    let cns = p.adopt(&t.ns);
    let res = async {
        let image = t.push(&echo_spec()).await?;
        run_ok(&t, &p, &image.reference, "first", FIRST_PULL).await?;
        let shims = settled_shims(&cns).await;
        ensure!(shims.len() == 1, "expected one shim, saw {shims:?}");
        let old = shims[0].0;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(old),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        // containerd notices the lost shim and force-deletes the keeper's task.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while keeper_task_exists(&t, &cns).await? {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "containerd did not clean up the keeper of the killed shim"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A pre-created task (issue 16) being made as the shim died may have started a
        // shim of its own (containerd 1.7 and 2.1 start one for a create that finds its
        // group's shim gone; seen in the matrix): its shim ends with it. So the pool goes,
        // and with it every shim it started (the pool's refill may have brought the keeper
        // back already: that shim stays), before the three show which shim the namespace
        // gets now.
        drop_pool(p.socket(), &t.ns).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while shims_of(&cns).iter().any(|(_, id)| !is_keeper(id)) {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "shims started by pre-created tasks left once the pool was gone: {:?}",
                shims_of(&cns)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut seen = Vec::new();
        for i in 0..3 {
            run_ok(&t, &p, &image.reference, &format!("after{i}"), ACTION).await?;
            seen.extend(settled_shims(&cns).await);
        }
        seen.sort();
        seen.dedup();
        // Every shim the three ran in was started for a keeper, none is the dead one.
        // One, as a rule; two seen once on containerd 1.7 in a full matrix run: a keeper
        // made again by the refill while containerd still cleaned up the dead shim's task
        // of the same id (node/KNOWN-GAPS.md), so the next action made it a third time.
        ensure!(
            (1..=2).contains(&seen.len())
                && seen
                    .iter()
                    .all(|(pid, id)| *pid != old && id == &format!("{KEEPER_ID_PREFIX}.0")),
            "expected the new keeper's shim, after the old one died; saw {seen:?}",
        );
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await
    }
    .await;
    res.map_err(|e| p.explain(e))
}

async fn keeper_task_exists(t: &Ctx, cns: &str) -> Result<bool> {
    use containerd_client::services::v1::tasks_client::TasksClient;
    use containerd_client::services::v1::ListTasksRequest;
    let channel = t.env.containerd.channel().await?;
    Ok(TasksClient::new(channel)
        .list(with_ns(ListTasksRequest::default(), cns))
        .await?
        .into_inner()
        .tasks
        .iter()
        .any(|task| is_keeper(&task.id)))
}

/// What a namespace's shim takes with it when it dies: its running actions end, are
/// reported as failed (not as successes, and not never), and leave no process behind; the
/// next action gets a new shim.
pub async fn running_actions_reported_when_their_shim_dies(t: Ctx) -> Result<()> {
    let p = PrivateIsolated::start(
        t.env,
        &["--shim-keep-secs", "600", "--shims-per-namespace", "1"],
    )
    .await?;
    let cns = p.adopt(&t.ns);
    let res = async {
        // A marker no other process has, to find the actions' processes by.
        let marker = format!("sleep {}", 5000 + rand::random_range(0..4000));
        let image = t.push(&ImageSpec::with_script(&marker)).await?;
        let ids = [t.action_id("lost-a"), t.action_id("lost-b")];
        let mut processes = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            p.accept(t.request(&image.reference, id)).await?;
            let within = if i == 0 { FIRST_PULL } else { ACTION };
            p.wait_state(&t.ns, id, ActionState::Running, within)
                .await?;
            processes.extend(task_processes(&t.env.containerd, &cns, id).await?);
        }
        let shims = shims_of(&cns);
        ensure!(
            shims.len() == 1,
            "expected one shim for both, saw {shims:?}"
        );
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(shims[0].0),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        for id in &ids {
            let report = t.env.flow.wait_report(id, ACTION).await?;
            let message = report.error_message.clone().unwrap_or_default();
            ensure!(
                report.error_code.is_some() && !message.is_empty() && !message.contains('\n'),
                "{id}: expected a failure with a one-line message, got {report:?}"
            );
        }
        ensure_processes_gone(&processes, &marker)?;
        let echo = t.push(&echo_spec()).await?;
        run_ok(&t, &p, &echo.reference, "after", ACTION).await?;
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await
    }
    .await;
    res.map_err(|e| p.explain(e))
}
