//! Remains of earlier runs whose test binary died without its teardown (SIGKILL, a crash):
//! their child processes died with them (parent-death signal), but their temp dir, its
//! mounts, their shims, and the runc and cgroup directories of their namespaces stay.
//! Each run marks its temp dir with its owner; the next run removes what belongs to an
//! owner that is gone.

use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::cleanup::remove_namespace_cgroups;
use super::mounts;

pub const TEMP_PREFIX: &str = "isot-";
const OWNER_FILE: &str = "owner";
const NAMESPACES_FILE: &str = "namespaces";

/// `<pid> <start time>` of this process: the pair stays unique when pids are reused.
fn identity(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // A zombie is as gone as a reaped process.
    if fields.first() == Some(&"Z") {
        return None;
    }
    let start = fields.get(19)?;
    Some(format!("{pid} {start}"))
}

/// Marks `dir` as belonging to this process.
pub fn claim(dir: &Path) -> std::io::Result<()> {
    let me = identity(std::process::id()).unwrap_or_default();
    std::fs::write(dir.join(OWNER_FILE), me)
}

/// Gives up the claim on `dir`: it is then nobody's to clean up.
pub fn release(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(OWNER_FILE));
}

/// Records a containerd namespace the run uses, so a later run can clean up after it.
pub fn record_namespace(dir: &Path, containerd_namespace: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(NAMESPACES_FILE))
    {
        let _ = writeln!(f, "{containerd_namespace}");
    }
}

pub fn recorded_namespaces(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join(NAMESPACES_FILE))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn is_stale(dir: &Path) -> bool {
    let Ok(owner) = std::fs::read_to_string(dir.join(OWNER_FILE)) else {
        // Unclaimed: another run between creating and claiming it, or not ours.
        return false;
    };
    let Some(pid) = owner.split_whitespace().next().and_then(|p| p.parse().ok()) else {
        return false;
    };
    identity(pid).as_deref() != Some(owner.trim())
}

/// Shims started for the containerd whose files live in `dir`.
pub fn shims_of(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("containerd-shim") && cmdline.contains(&needle)
        })
        .collect()
}

/// Kills the shims, removes runc state and cgroup directories of the recorded namespaces,
/// unmounts and removes `dir`. Returns what it found.
pub fn remove_run(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for pid in shims_of(dir) {
        found.push(format!("shim pid {pid}"));
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    for ns in recorded_namespaces(dir) {
        let _ = std::fs::remove_dir(Path::new("/run/containerd/runc").join(&ns));
        found.extend(remove_namespace_cgroups(&ns));
    }
    found.extend(super::cni::remove_recorded(dir));
    for m in mounts::unmount_under(dir) {
        found.push(format!("mount {}", m.display()));
    }
    found.extend(mounts::detach_loops_under(dir));
    if let Err(e) = std::fs::remove_dir_all(dir) {
        found.push(format!("could not remove {}: {e}", dir.display()));
    }
    found
}

/// Cleans up after every earlier run in /tmp whose owner is gone.
pub fn remove_stale_runs() {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    let stale: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(TEMP_PREFIX))
        .map(|e| e.path())
        .filter(|p| is_stale(p))
        .collect();
    for dir in stale {
        let found = remove_run(&dir);
        eprintln!(
            "harness: removed {} left by a run that died{}",
            dir.display(),
            if found.is_empty() {
                String::new()
            } else {
                format!(": {}", found.join(", "))
            }
        );
    }
}
