//! The input spool (issue 13): the input (`data`, up to `max_input_bytes`)
//! of an accepted action waits on disk, in `<state_dir>/inputs/<containerd
//! namespace>@<actionId>` (0600, in a 0700 directory), not in memory and
//! not in the store's record. Written and fsync'd before `RunIsolate`
//! answers (acceptance is durable), copied into the action's `data.in`
//! when its task is made, removed with everything else the action used
//! (`runner::release`), and swept at start-up for actions the store no
//! longer has (`recover`).
//!
//! Why not the action's data dir: that is made (and may be a filesystem of
//! its own) only when the task is created. Owns the files only; when an
//! action's input is spooled is the server's and the runner's business.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why an input could not be spooled or read back.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum InputError {
    /// cannot spool the input to {path}: {source}
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// cannot read the spooled input {path}: {source}
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The end of a half-written input's name.
const PART: &str = "~part";

/// The spooled input of action `id` in containerd namespace `cns`. `@` is
/// in neither, so the name is unambiguous.
pub fn path(dir: &Path, cns: &str, id: &str) -> PathBuf {
    dir.join(format!("{cns}@{id}"))
}

/// Writes `data` durably to `dest` (file and directory entry fsync'd), by
/// way of a temporary name, so a crash leaves either nothing or all of it.
pub async fn write(dest: PathBuf, data: Vec<u8>) -> Result<(), InputError> {
    let blocking = dest.clone();
    let result = tokio::task::spawn_blocking(move || write_sync(&blocking, &data)).await;
    match result {
        Ok(r) => r,
        Err(e) => Err(std::io::Error::other(e.to_string())),
    }
    .map_err(|source| InputError::Write { path: dest, source })
}

fn write_sync(dest: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = dest
        .parent()
        .ok_or_else(|| std::io::Error::other("the spool path has no directory"))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // Beside it, under a name no spooled input has (`~` is in neither a
    // namespace nor an action id); appended, as both may contain dots.
    let mut tmp = dest.as_os_str().to_owned();
    tmp.push(PART);
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Copies the spooled input at `spool` to `dest` (a new file, with the
/// mode a plain write gives it, so the action's user can read it).
pub fn copy_to(spool: &Path, dest: &Path) -> Result<(), InputError> {
    let read = |source| InputError::Read {
        path: spool.to_owned(),
        source,
    };
    let mut from = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(spool)
        .map_err(read)?;
    let mut to = std::fs::File::create(dest).map_err(|source| InputError::Write {
        path: dest.to_owned(),
        source,
    })?;
    // Readable by the action whatever the process's umask is now (the local
    // socket's bind narrows it for a moment).
    use std::os::unix::fs::PermissionsExt;
    to.set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(|source| InputError::Write {
            path: dest.to_owned(),
            source,
        })?;
    std::io::copy(&mut from, &mut to).map_err(read)?;
    Ok(())
}

/// Removes a spooled input; one that is not there is fine.
pub fn remove(spool: &Path) {
    if let Err(e) = std::fs::remove_file(spool) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %spool.display(), error = %e, "cannot remove a spooled input");
        }
    }
}

/// Removes every spooled input (and half-written one) of `dir` whose action
/// is not in `known` (containerd namespace, actionId); returns how many.
pub fn sweep(dir: &Path, known: &HashSet<(String, String)>) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let keep = !name.ends_with(PART)
            && name
                .split_once('@')
                .is_some_and(|(cns, id)| known.contains(&(cns.to_string(), id.to_string())));
        if !keep {
            remove(&e.path());
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn spooled_durably_private_and_swept() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("inputs");
        let a = path(&spool, "direktiv.n", "a");
        write(a.clone(), vec![7; 3 << 20]).await.unwrap();
        write(path(&spool, "direktiv.n", "b"), b"b".to_vec())
            .await
            .unwrap();
        std::fs::write(spool.join("direktiv.n@c~part"), b"half").unwrap();
        // Dots in both names, written at once: each to its own file.
        let dotted: Vec<_> = (0..8)
            .map(|i| {
                write(
                    path(&spool, "direktiv.n", &format!("a.{i}")),
                    vec![i; 1 << 16],
                )
            })
            .collect();
        for w in futures::future::join_all(dotted).await {
            w.unwrap();
        }
        for i in 0..8u8 {
            let p = path(&spool, "direktiv.n", &format!("a.{i}"));
            assert_eq!(std::fs::read(&p).unwrap(), vec![i; 1 << 16]);
            remove(&p);
        }
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&a), 0o600);
        assert_eq!(mode(&spool), 0o700);
        let dest = dir.path().join("data.in");
        copy_to(&a, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), vec![7; 3 << 20]);
        assert_ne!(mode(&dest), 0o600, "data.in must be readable by the action");
        let known = HashSet::from([("direktiv.n".to_string(), "a".to_string())]);
        assert_eq!(sweep(&spool, &known), 2);
        assert!(a.exists());
        remove(&a);
        remove(&a);
        assert!(std::fs::read_dir(&spool).unwrap().next().is_none());
        assert!(matches!(copy_to(&a, &dest), Err(InputError::Read { .. })));
    }
}
