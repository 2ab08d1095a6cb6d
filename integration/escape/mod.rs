//! The escape suite (issue 13, ISOLATE.md §8): an action tries what an attacker with an
//! image of their own would, and each trial asserts from inside the action (what the
//! probe saw) and from the host (mount flags, modes, neighbour table, what the daemon
//! reported). Probes busybox has no applet for are a static C program, `probe.c`.
//!
//! Traffic goes only to addresses the tests own: the test bridges, their actions, and a
//! link-local address on a dummy interface of the trial's own.

mod files;
mod network;
mod process;

use anyhow::Result;
use libtest_mimic::Trial;

use crate::harness::{gcc, trial, Env, ImageSpec};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "escape::capabilities_sockets_and_proc",
            process::capabilities_sockets_and_proc,
        ),
        trial(
            "escape::setuid_in_the_data_dir_is_powerless_on_the_host",
            files::setuid_in_the_data_dir_is_powerless_on_the_host,
        ),
        trial(
            "escape::odd_result_files_are_io_errors",
            files::odd_result_files_are_io_errors,
        ),
        trial(
            "escape::arp_spoof_is_refused",
            network::arp_spoof_is_refused,
        ),
        trial(
            "escape::link_local_and_ipv6_are_unreachable",
            network::link_local_and_ipv6_are_unreachable,
        ),
        trial(
            "escape::error_codes_forge_no_lines",
            process::error_codes_forge_no_lines,
        ),
    ]
}

/// `CapEff` (and the bounding and permitted sets) of an action under the default
/// capabilities of runtime-spec/base.json: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL,
/// SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, SYS_CHROOT.
pub const DEFAULT_CAPS: &str = "00000000000405fb";

/// The default set plus these, as a `--capabilities` value.
pub fn default_caps_and(extra: &[&str]) -> String {
    let mut caps = vec![
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
    ];
    caps.extend(extra);
    caps.join(",")
}

/// An image running `script` with the probe at /bin/probe.
pub fn probe_image(env: &Env, script: &str) -> Result<ImageSpec> {
    let probe = gcc::static_binary(env.dir(), "probe", include_str!("probe.c"))?;
    Ok(ImageSpec::with_script(script).file("bin/probe", probe, 0o755))
}

/// Polls for `path` to exist (the action's "I am ready" file), up to `limit`.
pub async fn wait_for_file(path: &std::path::Path, limit: std::time::Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    while !path.exists() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{} did not appear within {limit:?}",
            path.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(())
}
