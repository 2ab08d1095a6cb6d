//! The core contract of isolated: what an action sees and what its report says
//! (ISOLATE.md §4), request validation and its size bounds (§2, §8), images, registry
//! credentials and the registry's answers (§6, §8), memory limits (§5), disk limits (§8).
//! Every trial ends with the harness checking that nothing of its namespaces is left (§6).

mod action;
mod disk;
mod images;
mod limits;
mod registry_answers;
mod seccomp;
mod shims;
mod validation;

use anyhow::{ensure, Result};
use direktiv_isolate::proto::flow::ReportActionResultsRequest;
use direktiv_isolate::proto::isolate::RunIsolateRequest;
use libtest_mimic::Trial;

use crate::harness::{trial, Ctx, ImageSpec, PushedImage};

pub const CODE_IMAGE: &str = "au.com.direktiv.error.image";
pub const CODE_EXIT: &str = "au.com.direktiv.error.exit";
pub const CODE_IO: &str = "au.com.direktiv.error.io";
pub const CODE_OOM: &str = "au.com.direktiv.error.oom";

pub fn trials() -> Vec<Trial> {
    vec![
        trial("core::echo_round_trip", action::echo_round_trip),
        trial("core::error_json_with_exit_0", |t| action::error_json(t, 0)),
        trial("core::error_json_with_nonzero_exit", |t| {
            action::error_json(t, 5)
        }),
        trial(
            "core::success_without_data_out",
            action::success_without_data_out,
        ),
        trial("core::invalid_error_json", action::invalid_error_json),
        trial(
            "core::nonzero_exit_without_error_json",
            action::nonzero_exit_without_error_json,
        ),
        trial(
            "core::doubled_separators_are_their_own_namespace",
            action::doubled_separators_are_their_own_namespace,
        ),
        trial(
            "core::missing_or_unexecutable_command",
            action::missing_or_unexecutable_command,
        ),
        trial(
            "core::command_override_splits_like_a_shell",
            action::command_override_splits_like_a_shell,
        ),
        trial(
            "core::command_is_not_run_by_a_shell",
            action::command_is_not_run_by_a_shell,
        ),
        trial(
            "core::environment_and_working_dir",
            action::environment_and_working_dir,
        ),
        trial(
            "core::image_user_is_honoured",
            action::image_user_is_honoured,
        ),
        trial("core::missing_image", images::missing_image),
        trial(
            "core::image_cache_and_single_flight",
            images::image_cache_and_single_flight,
        ),
        trial("core::unreachable_registry", images::unreachable_registry),
        trial(
            "core::unparseable_image_reference",
            images::unparseable_image_reference,
        ),
        trial(
            "core::private_registry_credentials",
            images::private_registry_credentials,
        ),
        trial(
            "core::validation_rejects_bad_requests",
            validation::rejects_bad_requests,
        ),
        trial(
            "core::size_bounds_are_invalid_argument",
            validation::size_bounds_are_invalid_argument,
        ),
        trial(
            "core::registry_401_after_ttl_is_honoured",
            registry_answers::unauthorized_after_ttl,
        ),
        trial(
            "core::registry_404_after_tag_deleted_is_honoured",
            registry_answers::not_found_after_tag_deleted,
        ),
        trial(
            "core::imported_copy_does_not_shadow_the_registry",
            registry_answers::imported_copy_does_not_shadow_the_registry,
        ),
        trial(
            "core::duplicate_action_id_while_running",
            validation::duplicate_action_id_while_running,
        ),
        trial("core::memory_limit_by_size", limits::memory_limit_by_size),
        trial(
            "core::disk_limits_small_writes_work",
            disk::disk_limits_small_writes_work,
        ),
        trial(
            "core::disk_limits_enospc_and_free_space_held",
            disk::disk_limits_enospc_and_free_space_held,
        ),
        trial(
            "core::disk_limits_crash_leaves_nothing",
            disk::disk_limits_crash_leaves_nothing,
        ),
        // The probe is x86 code (`int 0x80`): elsewhere the trial says it did not run.
        trial(
            "core::thirty_two_bit_syscalls_are_refused",
            seccomp::thirty_two_bit_syscalls_are_refused,
        )
        .with_ignored_flag(std::env::consts::ARCH != "x86_64"),
        trial(
            "core::namespace_shares_one_shim_until_idle",
            shims::namespace_shares_one_shim_until_idle,
        ),
        trial(
            "core::keeper_comes_back_after_its_shim_dies",
            shims::keeper_comes_back_after_its_shim_dies,
        ),
        trial(
            "core::running_actions_reported_when_their_shim_dies",
            shims::running_actions_reported_when_their_shim_dies,
        ),
        trial(
            "core::keepers_removed_after_crash_and_at_stop",
            shims::keepers_removed_after_crash_and_at_stop,
        ),
    ]
}

/// The image most tests use: data.in copied to data.out.
pub fn echo_spec() -> ImageSpec {
    ImageSpec::with_script("cat /direktiv-data/data.in > /direktiv-data/data.out")
}

/// instanceId, step and actionId come back as sent.
pub fn ensure_ids_echoed(
    req: &RunIsolateRequest,
    report: &ReportActionResultsRequest,
) -> Result<()> {
    ensure!(
        report.instance_id == req.instance_id
            && report.step == req.step
            && report.action_id == req.action_id,
        "ids not echoed: sent instanceId {:?} step {:?} actionId {:?}, report has {:?} {:?} {:?}",
        req.instance_id,
        req.step,
        req.action_id,
        report.instance_id,
        report.step,
        report.action_id
    );
    Ok(())
}

/// A success report: no error fields; returns the output (unset means empty).
pub fn expect_success(report: &ReportActionResultsRequest) -> Result<Vec<u8>> {
    ensure!(
        report.error_code.is_none() && report.error_message.is_none(),
        "action {:?} failed: errorCode {:?}, errorMessage {:?}",
        report.action_id,
        report.error_code,
        report.error_message
    );
    Ok(report.output.clone().unwrap_or_default())
}

/// An error report with `code` and no output; returns the message.
pub fn expect_error(report: &ReportActionResultsRequest, code: &str) -> Result<String> {
    ensure!(
        report.error_code.as_deref() == Some(code),
        "action {:?}: expected errorCode {code}, got {:?} (errorMessage {:?}, output {:?})",
        report.action_id,
        report.error_code,
        report.error_message,
        report
            .output
            .as_ref()
            .map(|o| String::from_utf8_lossy(o).into_owned())
    );
    ensure!(
        report.output.is_none(),
        "action {:?}: an error report carries output {:?}",
        report.action_id,
        report
            .output
            .as_ref()
            .map(|o| String::from_utf8_lossy(o).into_owned())
    );
    Ok(report.error_message.clone().unwrap_or_default())
}

/// Runs `image` as an echo action in `ns` and checks the output: proof that the daemon
/// still serves after whatever the test did before.
pub async fn ensure_echo_works(
    t: &Ctx,
    ns: &str,
    image: &PushedImage,
    timeout: std::time::Duration,
) -> Result<()> {
    let id = t.action_id("echo");
    let mut req = t.request_in(ns, &image.reference, &id);
    let input = format!("still serving {id}").into_bytes();
    req.data = Some(input.clone());
    let report = t.run_and_wait(req.clone(), timeout).await?;
    ensure_ids_echoed(&req, &report)?;
    let output = expect_success(&report)?;
    ensure!(
        output == input,
        "echo action {id}: output {:?}, expected {:?}",
        String::from_utf8_lossy(&output),
        String::from_utf8_lossy(&input)
    );
    Ok(())
}

/// Whether `text` contains `n` as a whole number (not as part of a longer one).
pub fn mentions_number(text: &str, n: u64) -> bool {
    text.split(|c: char| !c.is_ascii_digit())
        .any(|w| w == n.to_string())
}
