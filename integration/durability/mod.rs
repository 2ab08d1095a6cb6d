//! Accepted means reported (issue 4; ISOLATE.md §2, §3, §6): isolated killed with SIGKILL
//! and restarted on its state dir, the flow endpoint down, containerd restarted, orphans
//! from an earlier life, many clients at once and a full queue; and the bounds on what
//! callers can make the daemon hold (issue 13: queued inputs, the store's size, the
//! node's memory budget).
//!
//! Every trial that kills, restarts or starves a daemon gets its own (see
//! `harness::private`), so the trials on the shared ones are not disturbed; reports go to
//! the shared flow receiver, where they are counted per action id.

mod bounds;
mod containerd_restart;
mod crash;
mod delivery;
mod drain;
mod load;
mod many_nodes;
mod orphans;
mod release;
mod soak;

use anyhow::{ensure, Result};
use direktiv_isolate::proto::flow::ReportActionResultsRequest;
use libtest_mimic::Trial;

use crate::core::expect_success;
use crate::harness::{trial, ImageSpec};

/// A 1 s grace period for the private daemons: their trials are not about it.
pub const FAST_GRACE: [&str; 2] = ["--kill-grace-secs", "1"];

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "durability::sigkill_while_running",
            crash::sigkill_while_running,
        ),
        trial(
            "durability::sigkill_with_three_unfinished",
            crash::sigkill_with_three_unfinished,
        ),
        trial(
            "durability::flow_unavailable_for_10s",
            delivery::flow_unavailable_for_10s,
        ),
        trial(
            "durability::reports_fit_a_4_mib_flow_engine",
            delivery::reports_fit_a_4_mib_flow_engine,
        ),
        trial(
            "durability::stored_report_survives_sigkill",
            delivery::stored_report_survives_sigkill,
        ),
        trial(
            "durability::refused_report_is_parked_then_retried_or_dropped",
            delivery::refused_report_is_parked_then_retried_or_dropped,
        ),
        trial(
            "durability::transient_refusal_is_retried_past_the_give_up_time",
            delivery::transient_refusal_is_retried_past_the_give_up_time,
        ),
        trial(
            "durability::flow_down_releases_everything",
            release::flow_down_releases_everything,
        ),
        trial(
            "durability::cancel_survives_sigkill",
            release::cancel_survives_sigkill,
        ),
        trial("durability::soak_mixed", soak::soak_mixed),
        trial(
            "durability::three_nodes_round_robin",
            many_nodes::three_nodes_round_robin,
        ),
        trial(
            "durability::health_follows_capacity",
            drain::health_follows_capacity,
        ),
        trial(
            "durability::drain_keeps_queued_work_for_the_restart",
            drain::drain_keeps_queued_work_for_the_restart,
        ),
        trial(
            "durability::containerd_restart_while_running",
            containerd_restart::containerd_restart_while_running,
        ),
        trial(
            "durability::orphans_removed_at_start",
            orphans::orphans_removed_at_start,
        ),
        trial(
            "durability::five_hundred_from_32_clients",
            load::five_hundred_from_32_clients,
        ),
        trial(
            "durability::queue_full_is_resource_exhausted",
            load::queue_full_is_resource_exhausted,
        ),
        trial(
            "durability::queued_inputs_wait_on_disk",
            bounds::queued_inputs_wait_on_disk,
        ),
        trial(
            "durability::store_gives_space_back_after_a_burst",
            bounds::store_gives_space_back_after_a_burst,
        ),
        trial(
            "durability::memory_budget_queues_instead_of_overcommitting",
            bounds::memory_budget_queues_instead_of_overcommitting,
        ),
    ]
}

/// An image whose action sleeps for the number of seconds that starts its input, then
/// answers with the whole input: the output tells which request it ran.
pub fn sleep_then_echo() -> ImageSpec {
    ImageSpec::with_script(
        "read secs rest < /direktiv-data/data.in\nsleep \"$secs\"\ncat /direktiv-data/data.in > /direktiv-data/data.out",
    )
}

/// Input for `sleep_then_echo`: sleep `secs`, answer with a text unique to `id`.
pub fn sleep_input(secs: u32, id: &str) -> Vec<u8> {
    format!("{secs} output of {id}").into_bytes()
}

/// A success report whose output is exactly `input`.
/// Each action id reached the flow receiver exactly once.
pub fn ensure_reported_once<S: AsRef<str>>(
    flow: &crate::harness::flow::FlowReceiver,
    ids: impl IntoIterator<Item = S>,
) -> Result<()> {
    for id in ids {
        let id = id.as_ref();
        let n = flow.count(id);
        ensure!(n == 1, "{id} reported {n} times");
    }
    Ok(())
}

pub fn expect_output(report: &ReportActionResultsRequest, input: &[u8]) -> Result<()> {
    let output = expect_success(report)?;
    ensure!(
        output == input,
        "action {:?}: output {:?}, expected {:?}",
        report.action_id,
        String::from_utf8_lossy(&output),
        String::from_utf8_lossy(input)
    );
    Ok(())
}
