//! The state dir's lock: one `isolated` per state dir (issue 14). Owns the
//! file `<state_dir>/isolated.lock`, an exclusive `flock` on it held for
//! the life of the process, and the pid written in it for whoever is
//! refused. Does not decide what else a second daemon must not touch: the
//! binary takes this lock before it touches anything else (the embedded
//! containerd, the store, the sockets).
//!
//! Why a lock and not the store or the socket: a second `make run` in the
//! same checkout got as far as stopping the first one's embedded containerd
//! (which it took for a leftover) before the store said "Database already
//! open". `flock` is released by the kernel when the process ends however
//! it ends, so a crash never leaves a stale lock, and the file is opened
//! close-on-exec, so containerd and the shims never inherit it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The lock file's name in the state dir.
pub const LOCK_FILE: &str = "isolated.lock";

/// How long a refused start waits for the holder to write its pid: the
/// holder writes it right after taking the lock, so only a start racing
/// another start can see the file empty.
const PID_WAIT: Duration = Duration::from_millis(500);

/// Why the state dir could not be locked.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum LockError {
    /// isolated is already running on this state dir, pid {pid}
    Held { pid: String },
    /// cannot lock the state dir {path}: {source}
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The held lock; released when dropped (or when the process ends).
pub struct StateLock {
    _file: Flock<File>,
    path: PathBuf,
}

impl StateLock {
    /// Creates the state dir if needed (0700: ISOLATE.md §8), then takes
    /// the lock without waiting and writes this process's pid into it.
    pub fn acquire(state_dir: &Path) -> Result<StateLock, LockError> {
        let path = state_dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(io)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((file, Errno::EWOULDBLOCK)) => {
                return Err(LockError::Held {
                    pid: holder_pid(file),
                })
            }
            Err((_, e)) => return Err(io(e.into())),
        };
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes())
            .map_err(io)?;
        file.sync_data().map_err(io)?;
        Ok(StateLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid the holder wrote, or "unknown" if it wrote none in time.
fn holder_pid(mut file: File) -> String {
    let deadline = Instant::now() + PID_WAIT;
    loop {
        let mut text = String::new();
        let read = file
            .seek(SeekFrom::Start(0))
            .and_then(|_| file.read_to_string(&mut text));
        let pid = text.trim();
        if read.is_ok() && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) {
            return pid.to_string();
        }
        if Instant::now() >= deadline {
            return "unknown".into();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = StateLock::acquire(&state).unwrap();
        let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "a state dir it creates is root's only");
        let pid = std::fs::read_to_string(first.path()).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        // flock locks belong to the open file description: a second open in
        // this same process is refused just as another process would be.
        let e = StateLock::acquire(&state).err().unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "isolated is already running on this state dir, pid {}",
                std::process::id()
            )
        );
        drop(first);
        let again = StateLock::acquire(&state).unwrap();
        assert_eq!(
            std::fs::read_to_string(again.path()).unwrap().trim(),
            std::process::id().to_string(),
            "the pid is rewritten, not appended"
        );
    }
}
