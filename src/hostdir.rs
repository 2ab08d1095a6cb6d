//! The host side of what actions write (ISOLATE.md §8, issue 13): the state
//! dir reachable by root only, the action data dirs on a `nosuid,nodev`
//! mount, and the one way the daemon opens a file an action may have made.
//!
//! Owns the state dir's mode, the self bind mount of `<state_dir>/actions`
//! and [`open_regular`]. Does not own the per-action directories (the
//! runner makes and removes them) nor any per-action filesystem mounted
//! below `actions/` (those carry their own flags).
//!
//! Why: an action wrote a setuid-root busybox into `/direktiv-data`, and any
//! local user ran it from `<state_dir>/actions/…/data/` (0755 when isolated
//! made the state dir, as `make run` does) and was root. With the state dir
//! 0700 nobody but root reaches the file; on a `nosuid,nodev` mount even
//! root's exec of it does not honour setuid/setgid or file capabilities, and
//! a device node an action made there cannot be opened at all.
//!
//! The bind mount is of the directory onto itself, so its content is the
//! same mounted or not: a start after `kill -9` (or after a reboot, which
//! dropped it) simply finds it mounted (or mounts it again); a graceful stop
//! unmounts it, so a stopped daemon leaves no mount behind (`make clean`,
//! the tests' leak checks).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::statvfs::{statvfs, FsFlags};

/// Why the host side of the data dirs could not be secured.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum HostDirError {
    /// cannot make the state dir {path} reachable by root only (mode 0700): {reason}
    StateDir { path: PathBuf, reason: String },
    /// cannot mount the actions dir {path} nosuid,nodev: {reason}
    Mount { path: PathBuf, reason: String },
}

/// Makes `state_dir` mode 0700 and root's, whoever created it and however
/// (`make run`'s mkdir, an operator's 0755). A state dir that is a symlink
/// is secured where it points.
pub fn secure_state_dir(state_dir: &Path) -> Result<(), HostDirError> {
    let fail = |reason: String| HostDirError::StateDir {
        path: state_dir.to_owned(),
        reason,
    };
    let real = std::fs::canonicalize(state_dir).map_err(|e| fail(e.to_string()))?;
    let state_dir = real.as_path();
    let meta = std::fs::symlink_metadata(state_dir).map_err(|e| fail(e.to_string()))?;
    if !meta.is_dir() {
        return Err(fail("it is not a directory".into()));
    }
    if meta.uid() != 0 || meta.gid() != 0 {
        nix::unistd::chown(
            state_dir,
            Some(nix::unistd::Uid::from_raw(0)),
            Some(nix::unistd::Gid::from_raw(0)),
        )
        .map_err(|e| fail(format!("chown root: {e}")))?;
    }
    if meta.permissions().mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| fail(e.to_string()))?;
    }
    Ok(())
}

/// Whether `dir` is a mount point, and whether that mount is the self bind
/// of [`mount_actions_dir`] (same device as its parent directory).
fn mount_state(dir: &Path) -> Result<(bool, bool), String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let target = dir.to_string_lossy();
    let mounted = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| unescape_mountinfo(p) == target);
    if !mounted {
        return Ok((false, false));
    }
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev());
    let own = match (dev(dir), dir.parent().map(dev)) {
        (Ok(a), Some(Ok(b))) => a == b,
        _ => false,
    };
    Ok((true, own))
}

/// Mounts `actions_dir` onto itself `nosuid,nodev` (recursively, so that
/// per-action mounts below it stay visible), unless it already is a mount
/// with both flags; a mount found without them (an operator's filesystem
/// there) gets them added. Idempotent. Returns whether it mounted.
pub fn mount_actions_dir(actions_dir: &Path) -> Result<bool, HostDirError> {
    let fail = |reason: String| HostDirError::Mount {
        path: actions_dir.to_owned(),
        reason,
    };
    let flags = |p: &Path| {
        statvfs(p)
            .map(|s| s.flags())
            .map_err(|e| fail(e.to_string()))
    };
    let real = std::fs::canonicalize(actions_dir).map_err(|e| fail(e.to_string()))?;
    let actions_dir = real.as_path();
    let (mounted, _) = mount_state(actions_dir).map_err(fail)?;
    let mut made = false;
    if !mounted {
        mount(
            Some(actions_dir),
            actions_dir,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| fail(format!("bind mount: {e}")))?;
        made = true;
    }
    let have = flags(actions_dir)?;
    if !have.contains(FsFlags::ST_NOSUID | FsFlags::ST_NODEV) {
        // A bind remount sets the mount's flags as given: keep the ones it
        // has (read-only, noexec, atime) and add ours.
        let mut ms =
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        for (st, m) in [
            (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        ] {
            if have.contains(st) {
                ms |= m;
            }
        }
        if let Err(e) = mount(None::<&str>, actions_dir, None::<&str>, ms, None::<&str>) {
            if made {
                let _ = umount2(actions_dir, MntFlags::MNT_DETACH);
            }
            return Err(fail(format!("remount nosuid,nodev: {e}")));
        }
    }
    let have = flags(actions_dir)?;
    if !have.contains(FsFlags::ST_NOSUID | FsFlags::ST_NODEV) {
        return Err(fail("the mount does not keep nosuid,nodev".into()));
    }
    Ok(made)
}

/// Unmounts the self bind at a graceful stop, once no action uses the dir.
/// Leaves a mount of another filesystem (an operator's) alone; a busy one
/// (a per-action mount still below) stays, and the next start reuses it.
/// Returns whether it unmounted; errors are for the log, the stop goes on.
pub fn unmount_actions_dir(actions_dir: &Path) -> Result<bool, String> {
    let real = std::fs::canonicalize(actions_dir)
        .map_err(|e| format!("cannot resolve {}: {e}", actions_dir.display()))?;
    let actions_dir = real.as_path();
    match mount_state(actions_dir)? {
        (true, true) => umount2(actions_dir, MntFlags::empty())
            .map(|_| true)
            .map_err(|e| format!("cannot unmount {}: {e}", actions_dir.display())),
        _ => Ok(false),
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or(""), 8)
            {
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

/// What a non-regular file is, for the error naming it.
fn kind(ft: std::fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "a symlink"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_char_device() {
        "a character device"
    } else {
        "not a regular file"
    }
}

/// Opens `dir/name` for reading only if it is a regular file; `Ok(None)`
/// when absent, `Err` (naming the file and why) otherwise. The file is
/// first opened `O_PATH|O_NOFOLLOW`, which performs no I/O on it: a FIFO
/// is not waited on, a device's driver is never called, a symlink is
/// looked at itself and not followed. Only once `fstat` of that handle
/// says "regular file" is the very same inode opened for reading (through
/// `/proc/self/fd`, so a rename in between cannot swap it).
pub fn open_regular(dir: &Path, name: &str) -> Result<Option<File>, String> {
    let path = dir.join(name);
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_NOFOLLOW).bits())
        .open(&path);
    let handle = match handle {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open {name}: {e}")),
    };
    let meta = handle
        .metadata()
        .map_err(|e| format!("cannot stat {name}: {e}"))?;
    if !meta.is_file() {
        return Err(format!(
            "{name} is {}, not a regular file",
            kind(meta.file_type())
        ));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
        .map(Some)
        .map_err(|e| format!("cannot open {name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn only_regular_files_are_opened() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(open_regular(d, "absent").unwrap().is_none());
        std::fs::write(d.join("data.out"), b"ok").unwrap();
        let mut s = String::new();
        open_regular(d, "data.out")
            .unwrap()
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "ok");
        std::os::unix::fs::symlink(d.join("data.out"), d.join("link")).unwrap();
        nix::unistd::mkfifo(
            &d.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        std::fs::create_dir(d.join("dir")).unwrap();
        // A FIFO with no writer: an open for reading would not block with
        // O_NONBLOCK, but it is never opened for reading at all.
        for (name, what) in [
            ("link", "a symlink"),
            ("fifo", "a FIFO"),
            ("dir", "a directory"),
        ] {
            let e = open_regular(d, name).unwrap_err();
            assert_eq!(e, format!("{name} is {what}, not a regular file"));
        }
        let sock = std::os::unix::net::UnixListener::bind(d.join("sock")).unwrap();
        assert!(open_regular(d, "sock").unwrap_err().contains("a socket"));
        drop(sock);
        // A device node (root can make one here; the tests run as root).
        if nix::sys::stat::mknod(
            &d.join("null"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .is_ok()
        {
            assert!(open_regular(d, "null")
                .unwrap_err()
                .contains("a character device"));
        }
    }

    #[test]
    fn removal_does_not_follow_links() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"x").unwrap();
        let action = tempfile::tempdir().unwrap();
        let data = action.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::os::unix::fs::symlink(outside.path(), data.join("escape")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("keep"), data.join("file")).unwrap();
        std::fs::remove_dir_all(action.path()).unwrap();
        assert!(outside.path().join("keep").exists());
    }

    #[test]
    fn the_state_dir_becomes_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("state");
        std::fs::create_dir(&s).unwrap();
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o755)).unwrap();
        secure_state_dir(&s).unwrap();
        let meta = std::fs::metadata(&s).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::symlink(&s, dir.path().join("link")).unwrap();
        secure_state_dir(&dir.path().join("link")).unwrap();
        let meta = std::fs::metadata(&s).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let e = secure_state_dir(&dir.path().join("file"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("file") && e.contains("not a directory"), "{e}");
        let e = secure_state_dir(&dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("cannot make the state dir"), "{e}");
    }

    /// An immutable directory (chattr +i) cannot be chmod-ed even by root:
    /// the error names the path and the cause. Skipped where chattr is
    /// missing or the filesystem has no such flag.
    #[test]
    fn a_state_dir_that_cannot_be_fixed_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path().join("state");
        std::fs::create_dir(&s).unwrap();
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o755)).unwrap();
        let chattr = |flag: &str| {
            std::process::Command::new("chattr")
                .arg(flag)
                .arg(&s)
                .status()
                .is_ok_and(|st| st.success())
        };
        if !chattr("+i") {
            eprintln!("chattr +i not available here; skipped");
            return;
        }
        let e = secure_state_dir(&s).map_err(|e| e.to_string());
        chattr("-i");
        let e = e.unwrap_err();
        assert!(
            e.contains(&s.display().to_string()) && e.contains("not permitted"),
            "{e}"
        );
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), "/a b\\c");
    }
}
