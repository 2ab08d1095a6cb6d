//! Persistent network namespaces: created empty, kept alive by a bind
//! mount of their nsfs file (as `ip netns add` does), so that CNI plugins
//! can enter them by path before any process lives there, and so that they
//! outlive a crash of isolated until DEL has run; and removed again.
//!
//! The directory holding them is made a shared mount point first: the
//! mount namespaces runc creates for containers are slaves of the host's,
//! so an unmount here propagates into their copies instead of keeping a
//! released namespace alive there.

use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

use super::NetworkError;

fn io_error(what: &'static str, path: &Path, e: impl std::fmt::Display) -> NetworkError {
    NetworkError::Io {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Makes `dir` a mount point with shared propagation, binding it onto
/// itself unless it already is one (a restart must not stack a second
/// bind over the namespaces of actions still running).
pub fn prepare_dir(dir: &Path) -> Result<(), NetworkError> {
    std::fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| io_error("resolve", dir, e))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| io_error("read", Path::new("/proc/self/mountinfo"), e))?;
    if !is_mount_point(&mountinfo, &dir) {
        mount(
            Some(&dir),
            &dir,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| io_error("bind-mount", &dir, e))?;
    }
    mount(
        None::<&str>,
        &dir,
        None::<&str>,
        MsFlags::MS_SHARED | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| io_error("make shared", &dir, e))
}

/// Undoes [`prepare_dir`] once no namespace is pinned under `dir` (issue
/// 14: the bind mount outlived a graceful stop, and `rm -rf` of the state
/// dir then failed on it). Returns whether it unmounted anything; with a
/// namespace still pinned (an action left running for the next start) the
/// mount stays, since a lazy unmount would detach that namespace too.
pub fn release_dir(dir: &Path) -> Result<bool, NetworkError> {
    let Ok(dir) = dir.canonicalize() else {
        return Ok(false);
    };
    if let Some(pinned) = first_pinned(&dir) {
        return Err(io_error(
            "keep the mount of",
            &dir,
            format!("{} is still pinned", pinned.display()),
        ));
    }
    let mut unmounted = false;
    // prepare_dir binds once; a crash between two starts of an older
    // version may have stacked more.
    for _ in 0..8 {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| io_error("read", Path::new("/proc/self/mountinfo"), e))?;
        if !is_mount_point(&mountinfo, &dir) {
            break;
        }
        umount2(&dir, MntFlags::empty()).map_err(|e| io_error("unmount", &dir, e))?;
        unmounted = true;
    }
    Ok(unmounted)
}

/// A file under `dir/<tenant>/` (a pinned namespace, or the file of one
/// being created), if there is any.
fn first_pinned(dir: &Path) -> Option<PathBuf> {
    for tenant in std::fs::read_dir(dir).ok()?.flatten() {
        let Ok(entries) = std::fs::read_dir(tenant.path()) else {
            continue;
        };
        if let Some(e) = entries.flatten().next() {
            return Some(e.path());
        }
    }
    None
}

/// Whether `path` is a mount point according to a mountinfo text (field 5,
/// with the kernel's octal escapes).
pub fn is_mount_point(mountinfo: &str, path: &Path) -> bool {
    let want = path.to_string_lossy();
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| unescape_mountinfo(m) == want)
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
            match u8::try_from(v) {
                Ok(v) => {
                    out.push(v);
                    i += 4;
                }
                Err(_) => {
                    out.push(b[i]);
                    i += 1;
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Creates a new, empty network namespace pinned at `path`.
///
/// The unshare happens on a thread of its own that ends right after the
/// bind mount: a thread's network namespace cannot be switched back
/// reliably, and no tokio worker may ever end up in an action's namespace.
pub async fn create(path: &Path) -> Result<(), NetworkError> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    // A concurrent remove of the last namespace of the same tenant may
    // take the directory away between these two steps; once more is enough.
    let mut attempt = 0;
    loop {
        std::fs::create_dir_all(parent).map_err(|e| io_error("create", parent, e))?;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempt == 0 => attempt += 1,
            Err(e) => return Err(io_error("create the namespace file", path, e)),
        }
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let target: PathBuf = path.to_owned();
    let spawned = std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            let r = unshare(CloneFlags::CLONE_NEWNET).and_then(|()| {
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
            });
            let _ = tx.send(r);
        });
    let result = match spawned {
        Ok(_) => rx.await.unwrap_or(Err(Errno::EINTR)),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            return Err(io_error("start a thread for", path, e));
        }
    };
    result.map_err(|e| {
        let _ = std::fs::remove_file(path);
        io_error("create a network namespace at", path, e)
    })
}

/// Whether `path` is a pinned namespace (and not a bare file left by an
/// interrupted create or remove).
pub fn is_namespace(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

/// Unpins and deletes the namespace at `path`, then its directory if that
/// is now empty. Whatever is already gone is fine.
pub fn remove(path: &Path) -> Result<(), NetworkError> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(io_error("unmount the namespace", path, e)),
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("remove the namespace file", path, e)),
    }
    if let Some(parent) = path.parent() {
        // Fails while the tenant has other actions: that is the point.
        let _ = std::fs::remove_dir(parent);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_found_with_escapes() {
        let info = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
90 27 254:0 /x /var/lib/my\\040state/netns rw,relatime shared:5 - ext4 /dev/vda rw
";
        assert!(is_mount_point(info, Path::new("/proc")));
        assert!(is_mount_point(info, Path::new("/var/lib/my state/netns")));
        assert!(!is_mount_point(info, Path::new("/var/lib/my state")));
        assert!(!is_mount_point(
            info,
            Path::new("/var/lib/my\\040state/netns")
        ));
        assert_eq!(unescape_mountinfo("a\\011b\\134"), "a\tb\\");
        assert_eq!(unescape_mountinfo("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn the_directory_stays_mounted_while_a_namespace_is_pinned_in_it() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("netns");
        // Not a mount point and nothing in it: nothing to do.
        std::fs::create_dir_all(dir.join("direktiv.ns")).unwrap();
        assert!(!release_dir(&dir).unwrap());
        assert!(!release_dir(&d.path().join("absent")).unwrap());
        std::fs::write(dir.join("direktiv.ns/a1"), "").unwrap();
        let e = release_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("a1 is still pinned"), "{e}");
    }

    #[test]
    fn removing_what_is_not_there_is_fine() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ns").join("a");
        remove(&p).unwrap();
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "").unwrap();
        assert!(!is_namespace(&p));
        remove(&p).unwrap();
        assert!(!p.exists() && !p.parent().unwrap().exists());
    }
}
