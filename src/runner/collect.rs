//! After the task exited: whether the kernel's OOM killer ended it, the
//! files the action left in its data directory, and its output streams.
//!
//! Every file here was written by untrusted code, so nothing is followed:
//! a symlink, a FIFO, a device, a socket or a directory where a result file
//! should be is reported as an I/O error naming it, and never opened for
//! reading ([`crate::hostdir::open_regular`]).

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use tracing::{debug, warn};

/// How long the output streams get to end after the task exited. They end
/// at once unless something outside the container holds them open.
const STREAM_END_WAIT: Duration = Duration::from_secs(2);

use super::{stdio::Stdio, Action, Runner};
use crate::report::{Collected, Stopped, ERROR_JSON_MAX};

/// Collects everything the report needs. The task is not deleted here:
/// the shim closes the output FIFOs as soon as the container's last writer
/// is gone, so the streams end on their own, and deleting the task (runc
/// delete, shim exit) is left to the cleanup after the report, off the
/// path the flow engine waits on.
pub async fn collect(
    runner: &Runner,
    a: &Action,
    stdio: Stdio,
    exit_code: u32,
    stopped: Option<Stopped>,
    memory_limit: i64,
) -> Collected {
    // Read while the task's cgroup still exists (it goes with the task).
    let oom = oom_killed(&a.cgroups_path());
    let (_stdout, stderr_tail) = stdio.finish(STREAM_END_WAIT).await;
    debug!(exit_code, oom, "task ended");

    let data = a.data_dir();
    let error_json = match read_result_file(&data, "error.json", ERROR_JSON_MAX) {
        Ok(v) => v,
        // Not a readable small regular file: hand the reason to the
        // error.json rule, which reports it as an I/O error.
        Err(why) => Some(why.into_bytes()),
    };
    let data_out = read_result_file(&data, "data.out", runner.cfg.max_output_bytes);
    Collected {
        exit_code,
        oom,
        memory_limit,
        stopped,
        error_json,
        data_out,
        stderr_tail,
    }
}

/// Reads `dir/name` if it is a regular file of at most `max` bytes.
/// `Ok(None)` when absent; `Err` says why it cannot be used.
pub fn read_result_file(dir: &Path, name: &str, max: usize) -> Result<Option<Vec<u8>>, String> {
    let Some(file) = crate::hostdir::open_regular(dir, name)? else {
        return Ok(None);
    };
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat {name}: {e}"))?;
    if meta.len() > max as u64 {
        return Err(format!(
            "{name} is {} bytes, above the limit of {max} bytes",
            meta.len()
        ));
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    // Read one byte more than allowed in case the file grew.
    file.take(max as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read {name}: {e}"))?;
    if buf.len() > max {
        return Err(format!("{name} is above the limit of {max} bytes"));
    }
    Ok(Some(buf))
}

/// Whether the kernel's OOM killer killed a process of the task's cgroup
/// (cgroup v1 `memory.oom_control`, v2 `memory.events`). A plain SIGKILL
/// from inside the action leaves the counter at zero.
pub fn oom_killed(cgroups_path: &str) -> bool {
    let rel = cgroups_path.trim_start_matches('/');
    let candidates = [
        (
            format!("/sys/fs/cgroup/memory/{rel}/memory.oom_control"),
            "oom_kill ",
        ),
        (format!("/sys/fs/cgroup/{rel}/memory.events"), "oom_kill "),
    ];
    for (file, key) in candidates {
        if let Ok(text) = std::fs::read_to_string(&file) {
            return text
                .lines()
                .filter_map(|l| l.strip_prefix(key))
                .any(|n| n.trim().parse::<u64>().unwrap_or(0) > 0);
        }
    }
    warn!(
        cgroups_path,
        "cannot read the task's memory cgroup; OOM is not known"
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_files_are_read_safely() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(read_result_file(d, "data.out", 10).unwrap(), None);
        std::fs::write(d.join("data.out"), b"12345").unwrap();
        assert_eq!(
            read_result_file(d, "data.out", 10).unwrap(),
            Some(b"12345".to_vec())
        );
        assert!(read_result_file(d, "data.out", 4)
            .unwrap_err()
            .contains("above the limit"));
        std::os::unix::fs::symlink("/etc/hostname", d.join("link")).unwrap();
        assert!(read_result_file(d, "link", 1000).is_err());
        nix::unistd::mkfifo(
            &d.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        assert!(read_result_file(d, "fifo", 1000)
            .unwrap_err()
            .contains("not a regular file"));
        std::fs::create_dir(d.join("dir")).unwrap();
        assert!(read_result_file(d, "dir", 1000).is_err());
    }
}
