//! The operator's side (issue 6): `isolatectl` against the harness's daemon, image import
//! and offline runs, the embedded containerd, `make install`, metrics and health.

mod cli;
mod embedded;
mod images;
mod install;
mod make_run;
pub mod metrics;
mod runtimes;
mod stop;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use libtest_mimic::Trial;

use crate::harness::{harness_trial, trial};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "operator::cli_run_output_error_and_exit_codes",
            cli::run_output_error_and_exit_codes,
        ),
        trial("operator::cli_ls_get_logs_cancel", cli::ls_get_logs_cancel),
        trial(
            "operator::image_import_then_run_offline",
            cli::image_import_then_run_offline,
        ),
        trial(
            "operator::image_ls_rm_and_history_after_a_restart",
            images::image_ls_rm_and_history_after_a_restart,
        ),
        trial(
            "operator::quick_start_demo_image",
            cli::quick_start_demo_image,
        ),
        trial(
            "operator::embedded_containerd_from_nothing",
            embedded::from_nothing,
        ),
        trial(
            "operator::embedded_containerd_is_left_alone_by_a_second_isolated",
            embedded::second_isolated_leaves_it_alone,
        ),
        trial(
            "operator::embedded_runc_state_is_private",
            embedded::runc_state_is_private,
        ),
        trial(
            "operator::runtime_binary_per_namespace",
            runtimes::runtime_binary_per_namespace,
        ),
        trial(
            "operator::crun_refused_on_hybrid_cgroups",
            runtimes::crun_refused_on_hybrid_cgroups,
        ),
        trial(
            "operator::stop_with_a_follower_then_a_second_signal",
            stop::with_a_follower_then_a_second_signal,
        ),
        trial(
            "operator::second_isolated_on_a_state_dir_is_refused",
            stop::second_isolated_on_a_state_dir_is_refused,
        ),
        trial(
            "operator::make_run_honours_the_environment_and_clean_unmounts",
            make_run::honours_the_environment_and_cleans_up,
        ),
        harness_trial("operator::install_into_destdir", install::into_destdir),
        trial(
            "operator::metrics_move_and_health_serves",
            metrics::move_and_health_serves,
        ),
    ]
}

/// `isolatectl ARGS` against the local `socket`, stdin closed, output piped, killed when
/// dropped: started, not waited for.
pub fn ctl_command(socket: &Path, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_isolatectl"));
    // Over the local socket, as an operator on the node would; nothing from the
    // developer's shell points it elsewhere.
    cmd.args(args)
        .env("ISOLATECTL_SOCKET", socket)
        .env_remove("ISOLATECTL_ADDR")
        .env_remove("ISOLATECTL_TOKEN")
        .env_remove("ISOLATECTL_TOKEN_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// `isolatectl ARGS` against `addr`, stdin closed, at most `timeout`.
pub async fn ctl(socket: &Path, args: &[&str], timeout: Duration) -> Result<Output> {
    let mut cmd = ctl_command(socket, args);
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| anyhow!("isolatectl {args:?} did not end within {timeout:?}"))?
        .with_context(|| format!("run isolatectl {args:?}"))?;
    Ok(out)
}

/// One line about an isolatectl run, for failure messages.
pub fn shown(out: &Output) -> String {
    format!(
        "exit {:?}, stdout {:?}, stderr {:?}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
