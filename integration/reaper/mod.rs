//! The reaper (issue 3; ISOLATE.md §4 and §5): timeouts end in SIGTERM and, after the
//! grace period, SIGKILL; an OOM kill is told apart from a plain SIGKILL; the pids limit
//! holds a fork bomb inside its action; CancelIsolate stops an action. Each trial checks
//! afterwards, in containerd and in /proc, that no process of its actions is left.
//!
//! The shared isolated runs with the contract's default grace period (5 s), so the trials
//! on it prove that default; the trial that needs fifty actions at once gets an isolated of
//! its own with a 1 s grace period and room for all of them.

mod cancel;
mod kills;
mod timeouts;

use anyhow::{bail, Result};
use libtest_mimic::Trial;

use crate::harness::containerd::Containerd;
use crate::harness::private::{task_processes, SeenProcess};
use crate::harness::{trial, trial_alone};

pub const CODE_TIMEOUT: &str = "au.com.direktiv.error.timeout";
pub const CODE_CANCELLED: &str = "au.com.direktiv.error.cancelled";

/// The shared isolated's grace period: it runs with the default of ISOLATE.md §5.
pub const DEFAULT_GRACE_S: i64 = 5;
/// "No task outlives its timeout plus the grace period plus a few seconds" (§5): the few.
pub const SLACK_S: i64 = 2;

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "reaper::sleeping_action_times_out",
            timeouts::sleeping_action_times_out,
        ),
        trial(
            "reaper::sigterm_ignored_until_grace_ends",
            timeouts::sigterm_ignored_until_grace_ends,
        ),
        trial(
            "reaper::sigterm_reaches_every_process",
            timeouts::sigterm_reaches_every_process,
        ),
        trial_alone(
            "reaper::fifty_staggered_timeouts",
            timeouts::fifty_staggered_timeouts,
        ),
        trial(
            "reaper::oom_versus_plain_sigkill",
            kills::oom_versus_plain_sigkill,
        ),
        // It takes a CPU on purpose: nothing else's timing should be measured beside it.
        trial_alone(
            "reaper::fork_bomb_stays_inside",
            kills::fork_bomb_stays_inside,
        ),
        trial(
            "reaper::cancel_running_action",
            cancel::cancel_running_action,
        ),
    ]
}

/// A marker unique to one trial, put on an action's command line so its processes can be
/// found in /proc.
pub fn marker(label: &str) -> String {
    format!("isot-marker-{label}-{:016x}", rand::random::<u64>())
}

/// The task's processes once it has at least `n` (its shell and what the shell started),
/// polled because the shell forks after the task is reported running.
pub async fn processes_of(
    containerd: &Containerd,
    cns: &str,
    id: &str,
    n: usize,
    timeout: std::time::Duration,
) -> Result<Vec<SeenProcess>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let seen = task_processes(containerd, cns, id).await?;
        if seen.len() >= n {
            return Ok(seen);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "task {cns}/{id} has {} processes after {timeout:?}, expected {n}: {seen:?}",
                seen.len()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
