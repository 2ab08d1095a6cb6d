//! The disk limit of an action (issue 13, ISOLATE.md §8): everything it
//! writes (rootfs changes, `/tmp`, `/direktiv-data`) goes to one
//! filesystem of its own, `size_disk_mib` of its size large; past that,
//! writes fail with ENOSPC inside the action, and the node's disk never
//! holds more of it than that.
//!
//! Owns the per-action filesystems: their templates (made at start), each
//! action's image, its loop mount at the action's directory, the rootfs
//! mounts that put the overlay's upper and work dirs on it, and their
//! removal. Does not decide when: the runner creates and releases, the
//! start-up sweep (`crate::recover`) finds the images of unknown actions.
//!
//! The mechanism, and why:
//! - An ext4 image per action, `<state_dir>/disks/<cns>/<actionId>.ext4`, a
//!   sparse file of `size_disk_mib`, loop-mounted `nosuid,nodev` at the
//!   action's directory `<state_dir>/actions/<cns>/<actionId>/`. That
//!   directory then holds `data/` (bind-mounted at `/direktiv-data`) and the
//!   overlay's `upper/` and `work/`, which replace the snapshot's own in the
//!   task's rootfs mounts (the snapshot's lower dirs stay as they are), so
//!   `/tmp` and every other rootfs change land there too. The image lives
//!   on the state dir's filesystem: sparse, its real use is what the action
//!   wrote (plus 144 KiB of ext4 metadata for 1 GiB), never more than its
//!   size, and it goes with the action.
//! - Not a size-capped tmpfs: tmpfs pages are charged to the writer's
//!   memory cgroup, so an action of 256 MiB memory writing 300 MiB would be
//!   OOM-killed rather than get ENOSPC, and every limit would have to stay
//!   below its size's memory. Not project quotas: they need `prjquota` in
//!   the host's mount options and a quota-enabled ext4/xfs, which a plain
//!   ext4 node does not have.
//! - Cost, measured on the project's 2-core box (kernel 6.18, ext4 host):
//!   `mkfs.ext4` of 1 GiB takes 25-30 ms (most of it its fsync), so it runs
//!   once per size at start, into a template; an action's image is a sparse
//!   copy of the template (the 144 KiB that are not holes): under 1 ms. The
//!   mount (`mount -o loop`, one exec of util-linux: LOOP_CONFIGURE 7 ms,
//!   mount(2) 0.6 ms) and the umount (umount(2) 0.5 ms, the loop device
//!   then clears itself) are the rest; `make bench` has the figure per
//!   action.
//! - ext4 options: no journal (an action's filesystem is thrown away after
//!   a crash, never replayed; a journal would also take 32 MiB of the
//!   limit), no reserved blocks (root in the action gets the same limit),
//!   no resize inode, inode tables left uninitialised (`lazy_itable_init`,
//!   and `noinit_itable` at mount: holes of a sparse file read as zeros, so
//!   the kernel's lazy-init thread would only write zeros into the image),
//!   no discard at mkfs, and `nobarrier` (a flush on the loop device is an
//!   fsync of the image on the host: 10 ms at every umount for data nobody
//!   keeps).
//! - Loop devices come from util-linux `mount -o loop`, which sets
//!   `LO_FLAGS_AUTOCLEAR`: the device detaches itself when its mount goes
//!   (or when a `mount` killed midway closes it), so a crash at any point
//!   leaves at most a mount and an image, both found again by the next
//!   start's sweep. No `unsafe` ioctls here.

use std::collections::BTreeSet;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use crate::config::Config;
use crate::engine::Mount;

/// Why an action's filesystem could not be made or used.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum DiskError {
    /// cannot make the {mib} MiB filesystem template {path}: {reason}
    Template {
        mib: u64,
        path: PathBuf,
        reason: String,
    },
    /// loop devices do not work on this node ({reason}); size_disk_mib = [0, 0, 0] turns the disk limit off
    LoopUnavailable { reason: String },
    /// cannot create the action's disk image {path}: {source}
    Image {
        path: PathBuf,
        source: std::io::Error,
    },
    /// cannot mount the action's disk {image} at {dir}: {reason}
    Mount {
        image: PathBuf,
        dir: PathBuf,
        reason: String,
    },
    /// cannot prepare {path} on the action's disk: {source}
    Layout {
        path: PathBuf,
        source: std::io::Error,
    },
    /// the snapshot's rootfs cannot be put on the action's disk: {0}
    Rootfs(String),
}

/// Options of `mkfs.ext4` for a template at `path`, a sparse file of the
/// limit's size (the module doc says why each).
fn mkfs_args(path: &Path) -> Vec<String> {
    [
        "-q",
        "-F",
        "-t",
        "ext4",
        // The same layout whatever the size: 4 KiB blocks, an inode per
        // 16 KiB (mke2fs's "small" type would pick 1 KiB blocks).
        "-T",
        "default",
        "-b",
        "4096",
        "-i",
        "16384",
        "-m",
        "0",
        "-O",
        "^has_journal,^resize_inode",
        "-E",
        "lazy_itable_init=1,nodiscard",
        "-L",
        "isolated-action",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([path.display().to_string()])
    .collect()
}

/// Options of the loop mount at the action's directory.
const MOUNT_OPTIONS: &str = "loop,nosuid,nodev,noinit_itable,nobarrier";

/// Directories on the action's disk: the overlay's upper and work dirs.
pub const UPPER: &str = "upper";
pub const WORK: &str = "work";

/// The per-action filesystems of one daemon.
pub struct Disks {
    /// `<state_dir>/disks`: `<cns>/<actionId>.ext4`.
    root: PathBuf,
    /// `<state_dir>/disk-templates`: `<mib>.ext4`, made at start.
    templates: PathBuf,
    /// The limit of each size in MiB; 0 is none.
    size_mib: Vec<u64>,
}

impl Disks {
    /// The disks of `cfg`; no I/O (see [`Disks::prepare`]).
    pub fn new(cfg: &Config) -> Disks {
        Disks {
            root: cfg.state_dir.join("disks"),
            templates: cfg.state_dir.join("disk-templates"),
            size_mib: cfg.size_disk_mib.clone(),
        }
    }

    /// At start: a fresh template for every limit in use, and one loop
    /// mount of one of them, so a node where loop devices or e2fsprogs are
    /// missing refuses to start with the reason instead of failing every
    /// action.
    pub async fn prepare(&self) -> Result<(), DiskError> {
        // Made afresh at every start, so a change of the options or sizes
        // applies. A probe mount left by a crash would be emptied, not
        // removed, so it goes first.
        unmount(&self.templates.join("probe"));
        let _ = std::fs::remove_dir_all(&self.templates);
        let sizes: BTreeSet<u64> = self.size_mib.iter().copied().filter(|&m| m > 0).collect();
        let Some(&first) = sizes.iter().next() else {
            return Ok(());
        };
        let io = |mib, path: &Path, e: std::io::Error| DiskError::Template {
            mib,
            path: path.to_owned(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(&self.templates).map_err(|e| io(first, &self.templates, e))?;
        std::fs::create_dir_all(&self.root).map_err(|e| io(first, &self.root, e))?;
        for &mib in &sizes {
            let path = self.template(mib);
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| io(mib, &path, e))?;
            file.set_len(mib << 20).map_err(|e| io(mib, &path, e))?;
            drop(file);
            run("mkfs.ext4", &mkfs_args(&path))
                .await
                .map_err(|reason| DiskError::Template {
                    mib,
                    path: path.clone(),
                    reason,
                })?;
        }
        // Read-only: the template stays as mkfs left it.
        let probe = self.templates.join("probe");
        std::fs::create_dir_all(&probe).map_err(|e| io(first, &probe, e))?;
        let template = self.template(first).display().to_string();
        let mounted = run(
            "mount",
            &[
                "-t".into(),
                "ext4".into(),
                "-o".into(),
                format!("{MOUNT_OPTIONS},ro"),
                template,
                probe.display().to_string(),
            ],
        )
        .await;
        unmount(&probe);
        let _ = std::fs::remove_dir(&probe);
        mounted.map_err(|reason| DiskError::LoopUnavailable { reason })
    }

    /// The limit of size index `size` in MiB; 0 for none.
    pub fn limit_mib(&self, size: usize) -> u64 {
        self.size_mib.get(size).copied().unwrap_or(0)
    }

    fn template(&self, mib: u64) -> PathBuf {
        self.templates.join(format!("{mib}.ext4"))
    }

    /// The image of action `id` of containerd namespace `cns`.
    pub fn image(&self, cns: &str, id: &str) -> PathBuf {
        self.root.join(cns).join(format!("{id}.ext4"))
    }

    /// Makes the action's filesystem of `mib` MiB and mounts it at `dir`
    /// (an empty directory), with the overlay's upper and work dirs on it.
    /// On failure nothing of it is left (no image, no mount).
    pub async fn create(&self, cns: &str, id: &str, dir: &Path, mib: u64) -> Result<(), DiskError> {
        let image = self.image(cns, id);
        let made = self.create_inner(&image, dir, mib).await;
        if made.is_err() {
            self.release(cns, id, dir);
        }
        made
    }

    async fn create_inner(&self, image: &Path, dir: &Path, mib: u64) -> Result<(), DiskError> {
        let err = |source| DiskError::Image {
            path: image.to_owned(),
            source,
        };
        // A crashed run's image of the same action is no use: start afresh.
        match std::fs::remove_file(image) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
            _ => {}
        }
        // Another action's release may remove the namespace's (then empty)
        // directory between this creating it and creating the image in it.
        let mut tries = 0;
        loop {
            if let Some(parent) = image.parent() {
                std::fs::create_dir_all(parent).map_err(err)?;
            }
            match copy_sparse(&self.template(mib), image, mib << 20) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 3 => tries += 1,
                other => break other.map_err(err)?,
            }
        }
        run(
            "mount",
            &[
                "-t".into(),
                "ext4".into(),
                "-o".into(),
                MOUNT_OPTIONS.into(),
                image.display().to_string(),
                dir.display().to_string(),
            ],
        )
        .await
        .map_err(|reason| DiskError::Mount {
            image: image.to_owned(),
            dir: dir.to_owned(),
            reason,
        })?;
        // The mount's root is mkfs's (root, 0755); lost+found is mkfs's too.
        for sub in [UPPER, WORK] {
            let path = dir.join(sub);
            std::fs::create_dir(&path).map_err(|source| DiskError::Layout { path, source })?;
        }
        Ok(())
    }

    /// Unmounts the action's filesystem from `dir` (if it is there) and
    /// removes its image; tolerates what is gone, so it runs after any
    /// failure and again after a crash.
    pub fn release(&self, cns: &str, id: &str, dir: &Path) {
        unmount(dir);
        let image = self.image(cns, id);
        if let Err(e) = std::fs::remove_file(&image) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(image = %image.display(), error = %e, "cannot remove the action's disk image");
            }
        }
        // The namespace's directory goes with its last image (it fails,
        // harmlessly, while another is in it).
        if let Some(ns_dir) = image.parent() {
            let _ = std::fs::remove_dir(ns_dir);
        }
    }

    /// `(cns, actionId)` of every image on disk, for the start-up sweep.
    pub fn images(&self) -> Vec<(String, String)> {
        let mut found = Vec::new();
        let Ok(namespaces) = std::fs::read_dir(&self.root) else {
            return found;
        };
        for ns in namespaces.flatten() {
            let cns = ns.file_name().to_string_lossy().into_owned();
            for e in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(id) = name.strip_suffix(".ext4") {
                    found.push((cns.clone(), id.to_string()));
                }
            }
        }
        found
    }
}

/// The upper and work dirs on the action's disk at `dir`, their root made
/// like the image's root dir (owner and mode of the topmost lower dir, as
/// containerd's overlayfs snapshotter does for its own upper dir), or `/`
/// would be root's 0755 whatever the image says.
pub fn upper_like_image(dir: &Path, rootfs: &[Mount]) -> Result<(PathBuf, PathBuf), DiskError> {
    let upper = dir.join(UPPER);
    let work = dir.join(WORK);
    let top = rootfs.first().and_then(|m| {
        m.options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="))
            .and_then(|l| l.split(':').next())
            .map(PathBuf::from)
            .or_else(|| (m.r#type == "bind").then(|| PathBuf::from(&m.source)))
    });
    if let Some(top) = top {
        let layout = |source| DiskError::Layout {
            path: upper.clone(),
            source,
        };
        let meta = std::fs::symlink_metadata(&top).map_err(|source| DiskError::Layout {
            path: top.clone(),
            source,
        })?;
        nix::unistd::chown(
            &upper,
            Some(nix::unistd::Uid::from_raw(meta.uid())),
            Some(nix::unistd::Gid::from_raw(meta.gid())),
        )
        .map_err(|e| layout(e.into()))?;
        std::fs::set_permissions(
            &upper,
            std::fs::Permissions::from_mode(meta.mode() & 0o7777),
        )
        .map_err(layout)?;
    }
    Ok((upper, work))
}

/// The task's rootfs mounts: the snapshot's, with the overlay's upper and
/// work dirs replaced by `upper` and `work` on the action's disk. A
/// snapshot without a parent (a bind mount of its empty dir) becomes an
/// overlay with that dir as its only lower one. Anything else (another
/// snapshotter) is refused: its writes would not be counted.
pub fn rootfs_mounts(mounts: &[Mount], upper: &Path, work: &Path) -> Result<Vec<Mount>, DiskError> {
    let upper_opt = format!("upperdir={}", upper.display());
    let work_opt = format!("workdir={}", work.display());
    match mounts {
        [m] if m.r#type == "overlay" => {
            let has = |p: &str| m.options.iter().any(|o| o.starts_with(p));
            if !has("lowerdir=") || !has("upperdir=") || !has("workdir=") {
                return Err(DiskError::Rootfs(format!(
                    "the overlay has no lowerdir, upperdir or workdir: {:?}",
                    m.options
                )));
            }
            let options = m
                .options
                .iter()
                .map(|o| {
                    if o.starts_with("upperdir=") {
                        upper_opt.clone()
                    } else if o.starts_with("workdir=") {
                        work_opt.clone()
                    } else {
                        o.clone()
                    }
                })
                .collect();
            Ok(vec![Mount {
                options,
                ..m.clone()
            }])
        }
        [m] if m.r#type == "bind" => Ok(vec![Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: m.target.clone(),
            options: vec![
                "index=off".into(),
                work_opt,
                upper_opt,
                format!("lowerdir={}", m.source),
            ],
        }]),
        other => Err(DiskError::Rootfs(format!(
            "expected one overlay or bind mount (the overlayfs snapshotter), got {}",
            other
                .iter()
                .map(|m| m.r#type.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Unmounts whatever is mounted at `dir` (stacked mounts one by one); a
/// mount still busy (a file of it open) is detached lazily, and its loop
/// device clears itself once the last user lets go.
fn unmount(dir: &Path) {
    use nix::errno::Errno;
    use nix::mount::{umount2, MntFlags};
    for _ in 0..4 {
        match umount2(dir, MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => continue,
            // Not a mount point (any more), or no directory at all.
            Err(Errno::EINVAL | Errno::ENOENT) => return,
            Err(Errno::EBUSY) => {
                debug!(dir = %dir.display(), "the action's disk is busy; detaching it lazily");
                if let Err(e) = umount2(dir, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
                    warn!(dir = %dir.display(), error = %e, "cannot unmount the action's disk");
                    return;
                }
            }
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot unmount the action's disk");
                return;
            }
        }
    }
}

/// Copies the data of sparse file `from` into a new file `to` of `len`
/// bytes, leaving its holes holes.
fn copy_sparse(from: &Path, to: &Path, len: u64) -> std::io::Result<()> {
    use nix::errno::Errno;
    use nix::unistd::{lseek, Whence};
    let src = std::fs::File::open(from)?;
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    dst.set_len(len)?;
    let mut buf = vec![0u8; 128 << 10];
    let mut pos: i64 = 0;
    loop {
        let start = match lseek(&src, pos, Whence::SeekData) {
            Ok(o) => o,
            // No data after `pos`.
            Err(Errno::ENXIO) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let end = lseek(&src, start, Whence::SeekHole)?;
        let mut at = start as u64;
        while at < end as u64 {
            let want = buf.len().min((end as u64 - at) as usize);
            let n = src.read_at(&mut buf[..want], at)?;
            if n == 0 {
                break;
            }
            dst.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        pos = end;
    }
}

/// Runs `program args`; its stderr (or status) is the error.
async fn run(program: &str, args: &[String]) -> Result<(), String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(false)
        .output()
        .await
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(format!(
        "{program} failed ({}): {}",
        out.status,
        crate::text::one_line(stderr.trim())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(options: &[&str]) -> Mount {
        Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn the_overlay_keeps_its_lower_dirs_and_writes_to_the_action_disk() {
        let snap = overlay(&[
            "index=off",
            "workdir=/c/snapshots/9/work",
            "upperdir=/c/snapshots/9/fs",
            "lowerdir=/c/snapshots/2/fs:/c/snapshots/1/fs",
        ]);
        let m = rootfs_mounts(&[snap], Path::new("/a/upper"), Path::new("/a/work")).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].r#type, "overlay");
        assert_eq!(
            m[0].options,
            [
                "index=off",
                "workdir=/a/work",
                "upperdir=/a/upper",
                "lowerdir=/c/snapshots/2/fs:/c/snapshots/1/fs"
            ]
        );
    }

    #[test]
    fn a_snapshot_without_parent_becomes_an_overlay_on_its_empty_dir() {
        let bind = Mount {
            r#type: "bind".into(),
            source: "/c/snapshots/3/fs".into(),
            target: String::new(),
            options: vec!["rbind".into(), "rw".into()],
        };
        let m = rootfs_mounts(&[bind], Path::new("/a/upper"), Path::new("/a/work")).unwrap();
        assert_eq!(m[0].r#type, "overlay");
        assert!(m[0]
            .options
            .contains(&"lowerdir=/c/snapshots/3/fs".to_string()));
        assert!(m[0].options.contains(&"upperdir=/a/upper".to_string()));
        assert!(m[0].options.contains(&"workdir=/a/work".to_string()));
    }

    #[test]
    fn other_rootfs_shapes_are_refused() {
        let (u, w) = (Path::new("/a/upper"), Path::new("/a/work"));
        assert!(rootfs_mounts(&[], u, w).is_err());
        let ext4 = Mount {
            r#type: "ext4".into(),
            source: "/dev/dm-3".into(),
            ..Default::default()
        };
        assert!(rootfs_mounts(&[ext4], u, w).is_err());
        // A read-only view has no upper dir to replace.
        assert!(rootfs_mounts(&[overlay(&["lowerdir=/x:/y"])], u, w).is_err());
        let two = overlay(&["workdir=/w", "upperdir=/u", "lowerdir=/l"]);
        assert!(rootfs_mounts(&[two.clone(), two], u, w).is_err());
    }

    #[test]
    fn mkfs_makes_a_journal_less_fixed_layout_filesystem() {
        let args = mkfs_args(Path::new("/s/disk-templates/1024.ext4"));
        let joined = args.join(" ");
        for want in [
            "-b 4096",
            "-m 0",
            "-O ^has_journal,^resize_inode",
            "-E lazy_itable_init=1,nodiscard",
        ] {
            assert!(joined.contains(want), "{want} missing in {joined}");
        }
        assert_eq!(args.last().unwrap(), "/s/disk-templates/1024.ext4");
        for want in ["nosuid", "nodev", "loop", "noinit_itable"] {
            assert!(MOUNT_OPTIONS.split(',').any(|o| o == want), "{want}");
        }
    }

    #[test]
    fn images_are_named_by_namespace_and_action_and_found_again() {
        let t = tempfile::tempdir().unwrap();
        let o = crate::config::Options {
            state_dir: Some(t.path().to_path_buf()),
            bind: Some(String::new()),
            ..Default::default()
        };
        let cfg = Config::load(o, None).unwrap();
        let disks = Disks::new(&cfg);
        assert_eq!(disks.limit_mib(0), 1024);
        assert_eq!(disks.limit_mib(2), 4096);
        let image = disks.image("direktiv.ns", "act.1");
        assert_eq!(image, t.path().join("disks/direktiv.ns/act.1.ext4"));
        std::fs::create_dir_all(image.parent().unwrap()).unwrap();
        std::fs::write(&image, b"x").unwrap();
        assert_eq!(
            disks.images(),
            [("direktiv.ns".to_string(), "act.1".to_string())]
        );
        // Not mounted: release only removes the image and its empty dir.
        let dir = t.path().join("actions/direktiv.ns/act.1");
        std::fs::create_dir_all(&dir).unwrap();
        disks.release("direktiv.ns", "act.1", &dir);
        assert!(!image.exists() && !image.parent().unwrap().exists());
        assert!(disks.images().is_empty());
        disks.release("direktiv.ns", "act.1", &dir);
    }

    #[test]
    fn sparse_copies_keep_data_and_holes() {
        let t = tempfile::tempdir().unwrap();
        let from = t.path().join("from");
        let f = std::fs::File::create(&from).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"middle", 32 << 20).unwrap();
        drop(f);
        let to = t.path().join("to");
        copy_sparse(&from, &to, 64 << 20).unwrap();
        let meta = std::fs::metadata(&to).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        // Two 4 KiB blocks or so, not 64 MiB.
        assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
        let g = std::fs::File::open(&to).unwrap();
        let mut buf = [0u8; 6];
        g.read_exact_at(&mut buf, 32 << 20).unwrap();
        assert_eq!(&buf, b"middle");
        g.read_exact_at(&mut buf[..4], 0).unwrap();
        assert_eq!(&buf[..4], b"head");
        // An existing file is never overwritten.
        assert!(copy_sparse(&from, &to, 64 << 20).is_err());
    }
}
