//! Deaths by the kernel and by the action's own hand (ISOLATE.md §4, §5, §8): the OOM
//! killer is reported as oom, a plain SIGKILL is not; a fork bomb meets the pids limit and
//! stays inside its action.

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use direktiv_isolate::proto::control::ActionState;

use super::{CODE_TIMEOUT, DEFAULT_GRACE_S, SLACK_S};
use crate::core::{
    echo_spec, ensure_echo_works, expect_error, mentions_number, CODE_EXIT, CODE_OOM,
};
use crate::harness::private::{cgroup_of, now_ms, task_init_pid, wait_state};
use crate::harness::{Ctx, Env, ImageSpec, ACTION, FIRST_PULL, NOTHING_LEFT};

/// Size 0 (256 MiB): a process that fills a 400 MiB buffer as the action's init process
/// is OOM-killed, and the report says oom naming the limit, not "exit 137". A process of
/// the action that SIGKILLs itself makes the action exit 137 the same way, and that is an
/// exit error, not oom. (It is a child shell that kills itself: the kernel does not let a
/// PID namespace's init process be SIGKILLed from inside, so `kill -9 $$` in the init shell
/// would do nothing.) Both run at once.
pub async fn oom_versus_plain_sigkill(t: Ctx) -> Result<()> {
    let image = t
        .push(&ImageSpec::with_script(
            r#"case "$(cat /direktiv-data/data.in)" in
oom) exec dd if=/dev/zero of=/dev/null bs=400M count=1 ;;
kill) sh -c 'kill -9 $$'; exit $? ;;
esac
echo "unexpected input" >&2
exit 3"#,
        ))
        .await?;
    let run = |what: &'static str| {
        let mut req = t.request(&image.reference, &t.action_id(what));
        req.size = Some(0);
        req.data = Some(what.as_bytes().to_vec());
        t.run_and_wait(req, FIRST_PULL)
    };
    let (oom, kill) = tokio::try_join!(run("oom"), run("kill"))?;

    let message = expect_error(&oom, CODE_OOM)?;
    ensure!(
        message.contains("256") || message.contains("268435456"),
        "oom errorMessage {message:?} does not name the 256 MiB limit"
    );
    let message = expect_error(&kill, CODE_EXIT)
        .map_err(|e| e.context("a SIGKILL from inside the action is no OOM"))?;
    ensure!(
        mentions_number(&message, 137) && message.contains("SIGKILL"),
        "errorMessage {message:?} does not name exit code 137 and SIGKILL"
    );
    Ok(())
}

fn read_number(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A fork bomb fills its pids cgroup up to the limit and no further; while it does, an
/// echo action in the same namespace runs and answers correctly; the bomb is reported
/// (as timeout: it never ends on its own) and none of its processes is left.
pub async fn fork_bomb_stays_inside(t: Ctx) -> Result<()> {
    // Long enough for the echo action to run beside the bomb on a loaded machine: with
    // 8 s, a make test on 2 cores saw the bomb reported first (1 December 2026).
    const TIMEOUT_S: i64 = 20;
    let echo = t.push(&echo_spec()).await?;
    // The init shell keeps no fork for itself after starting the bomb: `wait` is a
    // builtin, so it neither dies of a failed fork nor ends the bomb early.
    let bomb = t
        .push(&ImageSpec::with_script(
            "sleep 600 &\nb() { b | b & }\nb\nwait",
        ))
        .await?;
    // The echo image is pulled before the bomb takes a CPU.
    ensure_echo_works(&t, &t.ns, &echo, FIRST_PULL).await?;

    let id = t.action_id("bomb");
    let mut req = t.request(&bomb.reference, &id);
    req.timeout = Some(TIMEOUT_S);
    t.run(req)
        .await
        .map_err(|s| anyhow::anyhow!("RunIsolate(bomb): {s}"))?;
    let mut control = t.env.control_client().await?;
    let running = wait_state(&mut control, &t.ns, &id, ActionState::Running, FIRST_PULL).await?;

    // Where isolated puts the task's cgroup is its business: ask the kernel.
    let cns = Env::containerd_namespace(&t.ns);
    // The init, not the first of ListPids: the bomb's other processes come and go, and a
    // pid read after its process died may be another's (seen once: the root cgroup).
    let init = task_init_pid(&t.env.containerd, &cns, &id).await? as i32;
    let cgroup = cgroup_of(init, "pids").context("the bomb's init has no pids cgroup")?;
    let max = read_number(&cgroup.join("pids.max"));
    let Some(max) = max else {
        bail!(
            "no numeric pids.max in {}: the action has no pids limit",
            cgroup.display()
        );
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(TIMEOUT_S as u64 - 2);
    let mut peak = 0;
    loop {
        let current = read_number(&cgroup.join("pids.current")).unwrap_or(0);
        peak = peak.max(current);
        ensure!(
            current <= max,
            "{current} processes in the action's pids cgroup, above its limit {max}"
        );
        if current >= max {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the fork bomb reached only {peak} of {max} processes before its timeout");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // At the limit, with the bomb still raging: another action is not starved of pids.
    ensure_echo_works(&t, &t.ns, &echo, ACTION).await?;
    ensure!(
        t.env.flow.count(&id) == 0,
        "the bomb was reported before the echo action ran next to it"
    );
    let failed_forks = std::fs::read_to_string(cgroup.join("pids.events")).unwrap_or_default();

    let bound_s = TIMEOUT_S + DEFAULT_GRACE_S + SLACK_S;
    let report = t
        .env
        .flow
        .wait_report(&id, Duration::from_secs(bound_s as u64 + 10))
        .await?;
    let took_ms = now_ms() - running.started_at_ms;
    expect_error(&report, CODE_TIMEOUT)?;
    ensure!(
        took_ms <= bound_s * 1000,
        "the bomb was reported {took_ms} ms after it started, later than timeout + grace + {SLACK_S} s (pids.events: {failed_forks:?})"
    );
    // Reported once its init process is gone, and with it the PID namespace: not one
    // process of the bomb may be left by then. The cgroup itself goes with the task.
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
    ensure!(
        procs.trim().is_empty(),
        "processes of the bomb outlived its report: {}",
        procs.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    let deadline = tokio::time::Instant::now() + NOTHING_LEFT;
    while cgroup.exists() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the bomb's pids cgroup {} outlived its report by {NOTHING_LEFT:?}",
            cgroup.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
