//! Mounts the run leaves under its temp dir (containerd's overlay rootfs mounts, bind
//! mounts of data dirs, actions' disks): finding them in /proc/self/mountinfo and
//! detaching them; and loop devices whose backing file is there (an action's disk
//! image), found in /sys/block and detached with `losetup -d`.

use std::path::{Path, PathBuf};

use nix::mount::{umount2, MntFlags};

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Lazily unmounts everything at or below `dir`; returns what was mounted.
pub fn unmount_under(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    // Stacked mounts on one path need one detach each.
    for _ in 0..8 {
        let found = mounts_under(dir);
        if found.is_empty() {
            break;
        }
        for m in &found {
            if let Err(e) = umount2(m, MntFlags::MNT_DETACH) {
                eprintln!("harness: umount -l {}: {e}", m.display());
            }
        }
        all.extend(found);
    }
    all
}

/// Loop devices whose backing file is at or below `dir` (deleted files too), as
/// `(device, backing file)`.
pub fn loops_under(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return found;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(file) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let file = file.trim_end_matches('\n');
        let file = PathBuf::from(file.strip_suffix(" (deleted)").unwrap_or(file));
        if file.starts_with(dir) {
            found.push((format!("/dev/{name}"), file));
        }
    }
    found.sort();
    found
}

/// Detaches the loop devices backed by files at or below `dir` (after their mounts are
/// gone, see `unmount_under`); returns what was attached.
pub fn detach_loops_under(dir: &Path) -> Vec<String> {
    let mut all = Vec::new();
    for (dev, file) in loops_under(dir) {
        let out = std::process::Command::new("losetup")
            .args(["-d", &dev])
            .output();
        if let Ok(o) = &out {
            if !o.status.success() {
                eprintln!(
                    "harness: losetup -d {dev}: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
        }
        all.push(format!("loop device {dev} ({})", file.display()));
    }
    all
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
