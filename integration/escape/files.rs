//! What an action writes into `/direktiv-data`, seen from the host: a setuid-root copy of
//! busybox is neither reachable by a host user (state dir 0700) nor setuid-effective (the
//! actions' mount is nosuid,nodev); FIFOs, symlinks and device nodes in place of result
//! files are io errors naming the file, and a FIFO does not hold up collection.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nix::sys::statvfs::{statvfs, FsFlags};

use super::{default_caps_and, wait_for_file};
use crate::core::{expect_error, expect_success};
use crate::harness::{Ctx, ImageSpec, FIRST_PULL};
use crate::network::Daemon;

const CODE_IO: &str = "au.com.direktiv.error.io";

/// Inside: busybox copied to the data dir and made setuid root (the mode takes: the action
/// is root with CAP_FOWNER), then "ready", then it waits for the host's "go". From the
/// host meanwhile: the file is there with its setuid bit, the mount holding it is nosuid
/// and nodev (statvfs and mountinfo), the state dir is 0700, and a host user (nobody)
/// cannot run it.
pub async fn setuid_in_the_data_dir_is_powerless_on_the_host(t: Ctx) -> Result<()> {
    let script = "cp /bin/busybox /direktiv-data/sh && chmod 4755 /direktiv-data/sh\n\
                  ls -ln /direktiv-data/sh > /direktiv-data/data.out\n\
                  touch /direktiv-data/ready\n\
                  i=0; while [ ! -e /direktiv-data/go ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n";
    let image = t.push(&ImageSpec::with_script(script)).await?;
    let id = t.action_id("setuid");
    t.run(t.request(&image.reference, &id)).await?;
    let data = t.env.actions_dir(&t.ns).join(&id).join("data");
    let checked = host_checks(&t, &data).await;
    let _ = std::fs::write(data.join("go"), b"");
    let report = t.env.flow.wait_report(&id, FIRST_PULL).await?;
    let output = String::from_utf8(expect_success(&report)?)?;
    ensure!(
        output.starts_with("-rwsr-xr-x"),
        "the action could not make its setuid file: {output:?}"
    );
    checked
}

async fn host_checks(t: &Ctx, data: &std::path::Path) -> Result<()> {
    wait_for_file(&data.join("ready"), FIRST_PULL).await?;
    let sh = data.join("sh");
    let meta = std::fs::metadata(&sh).with_context(|| format!("stat {}", sh.display()))?;
    ensure!(
        meta.mode() & 0o4000 != 0 && meta.uid() == 0,
        "the host sees {:o} uid {} on {}",
        meta.mode(),
        meta.uid(),
        sh.display()
    );
    let flags = statvfs(data)?.flags();
    ensure!(
        flags.contains(FsFlags::ST_NOSUID | FsFlags::ST_NODEV),
        "the mount of {} is not nosuid,nodev: {flags:?}",
        data.display()
    );
    let actions = t.env.state_dir().join("actions");
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(actions.to_str().unwrap_or("")))
        .with_context(|| format!("{} is no mount point", actions.display()))?;
    let opts = line.split(' ').nth(5).unwrap_or("");
    ensure!(
        opts.split(',').any(|o| o == "nosuid") && opts.split(',').any(|o| o == "nodev"),
        "mountinfo of {}: {line}",
        actions.display()
    );
    let mode = std::fs::metadata(t.env.state_dir())?.permissions().mode() & 0o7777;
    ensure!(mode == 0o700, "the state dir is {mode:o}, not 700");
    // Through a shell: setpriv keeps its capabilities until its own exec, so the exec of
    // the file itself must come from a process that has none.
    let as_nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["/bin/sh", "-c", "exec \"$0\" id -u"])
        .arg(&sh)
        .output()
        .context("run setpriv (util-linux)")?;
    ensure!(
        !as_nobody.status.success()
            && String::from_utf8_lossy(&as_nobody.stderr).contains("Permission denied"),
        "nobody ran the action's setuid file: status {}, stdout {:?}, stderr {:?}",
        as_nobody.status,
        String::from_utf8_lossy(&as_nobody.stdout),
        String::from_utf8_lossy(&as_nobody.stderr)
    );
    Ok(())
}

/// On a daemon whose actions may mknod (a `capabilities` override; network none): data.out
/// as a FIFO no one writes, as a symlink to a host file, as a character device, and
/// error.json as a symlink. Each is reported as the io error naming what it is, within
/// the usual time (the FIFO is never opened, so nothing waits on it).
pub async fn odd_result_files_are_io_errors(t: Ctx) -> Result<()> {
    let daemon = Daemon::start(
        t.env,
        "oddfiles",
        vec![
            "--network".into(),
            "none".into(),
            "--capabilities".into(),
            default_caps_and(&["CAP_MKNOD"]),
        ],
    )
    .await?;
    let cases = [
        (
            "fifo",
            "mkfifo /direktiv-data/data.out",
            "data.out is a FIFO",
        ),
        (
            "symlink",
            "ln -s /etc/hostname /direktiv-data/data.out",
            "data.out is a symlink",
        ),
        (
            "device",
            "mknod /direktiv-data/data.out c 1 3",
            "data.out is a character device",
        ),
        (
            "errorlink",
            "ln -s /etc/hostname /direktiv-data/error.json",
            "error.json is a symlink",
        ),
    ];
    let mut script = String::from("case $(cat /direktiv-data/data.in) in\n");
    for (name, make, _) in &cases {
        script.push_str(&format!("{name}) {make} || exit 9 ;;\n"));
    }
    script.push_str("esac\n");
    let image = t.push(&ImageSpec::with_script(&script)).await?;
    let mut ids = Vec::new();
    for (name, _, _) in &cases {
        let id = t.action_id(name);
        let mut req = t.request(&image.reference, &id);
        req.data = Some(name.as_bytes().to_vec());
        daemon.run(req).await?;
        ids.push(id);
    }
    let mut failures = Vec::new();
    for ((name, _, want), id) in cases.iter().zip(&ids) {
        // A FIFO that blocked collection would hold its report past this.
        let report = t
            .env
            .flow
            .wait_report(id, FIRST_PULL + Duration::from_secs(30))
            .await
            .with_context(|| daemon.log_tail())?;
        match expect_error(&report, CODE_IO) {
            Ok(message) if message.contains(want) => {}
            Ok(message) => failures.push(format!("{name}: message {message:?} lacks {want:?}")),
            Err(e) => failures.push(format!("{name}: {e:#}")),
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    daemon.assert_nothing_left(t.env, &t.ns).await
}
