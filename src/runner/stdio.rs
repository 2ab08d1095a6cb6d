//! The action's stdout and stderr: FIFOs the shim writes into and isolated
//! reads, keeping the last [`TAIL_BYTES`] of each and logging every line
//! under the action's span.
//!
//! FIFOs rather than the shim's `file://` logging because that scheme
//! merges both streams into one file, and the contract keeps them apart.

use std::path::{Path, PathBuf};

use nix::sys::stat::Mode;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;
use tracing::{debug, Instrument};

use crate::actions::Logs;

/// How much of each stream is kept.
pub const TAIL_BYTES: usize = 1 << 20;

/// Longest line logged as is; longer ones are cut in the log (not in the tail).
const LOG_LINE_MAX: usize = 4096;

/// The two FIFOs of one task and the readers draining them.
pub struct Stdio {
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    // Our own write ends keep the readers from seeing end-of-file before the
    // shim has opened the FIFOs; dropped once the task exists.
    keepalive: Vec<pipe::Sender>,
    readers: Vec<JoinHandle<()>>,
    logs: Target,
}

/// Where the readers keep the tails: the action's logs, chosen again when a
/// pre-created task is taken (issue 16) before it runs, so before anything
/// is written.
type Target = std::sync::Arc<std::sync::Mutex<std::sync::Arc<Logs>>>;

impl Stdio {
    /// Creates `stdout` and `stderr` FIFOs in `dir` and starts reading them.
    pub fn open(dir: &Path, logs: std::sync::Arc<Logs>) -> std::io::Result<Stdio> {
        let logs: Target = std::sync::Arc::new(std::sync::Mutex::new(logs));
        let stdout = dir.join("stdout");
        let stderr = dir.join("stderr");
        let mut keepalive = Vec::new();
        let mut readers = Vec::new();
        for (path, name, stream) in [
            (&stdout, "stdout", Stream::Stdout),
            (&stderr, "stderr", Stream::Stderr),
        ] {
            match nix::unistd::mkfifo(path, Mode::from_bits_truncate(0o600)) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
            let rx = pipe::OpenOptions::new().open_receiver(path)?;
            keepalive.push(pipe::OpenOptions::new().open_sender(path)?);
            readers.push(spawn_reader(rx, &logs, stream, name));
        }
        Ok(Stdio {
            stdout,
            stderr,
            keepalive,
            readers,
            logs,
        })
    }

    /// Reads the FIFOs of a task started by an earlier run of isolated. The
    /// shim still holds their write ends; if they are gone, so is the output
    /// (it was in the earlier run's memory), and the streams are empty.
    pub fn reopen(dir: &Path, logs: std::sync::Arc<Logs>) -> Stdio {
        let logs: Target = std::sync::Arc::new(std::sync::Mutex::new(logs));
        let stdout = dir.join("stdout");
        let stderr = dir.join("stderr");
        let mut readers = Vec::new();
        for (path, name, stream) in [
            (&stdout, "stdout", Stream::Stdout),
            (&stderr, "stderr", Stream::Stderr),
        ] {
            if let Ok(rx) = pipe::OpenOptions::new().open_receiver(path) {
                readers.push(spawn_reader(rx, &logs, stream, name));
            }
        }
        Stdio {
            stdout,
            stderr,
            keepalive: Vec::new(),
            readers,
            logs,
        }
    }

    /// What the task writes goes to `logs` from now on: a pre-created
    /// task's streams become those of the action that takes it.
    pub fn redirect(&self, logs: std::sync::Arc<Logs>) {
        *self.logs.lock().unwrap_or_else(|p| p.into_inner()) = logs;
    }

    /// The shim holds the write ends now; ours would hide its end-of-file.
    pub fn release(&mut self) {
        self.keepalive.clear();
    }

    /// Waits for both streams to end (the shim closes them when the task is
    /// deleted) and returns their tails: `(stdout, stderr)`.
    pub async fn finish(mut self, limit: std::time::Duration) -> (Vec<u8>, Vec<u8>) {
        self.release();
        for r in self.readers.drain(..) {
            let abort = r.abort_handle();
            if tokio::time::timeout(limit, r).await.is_err() {
                abort.abort();
            }
        }
        let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        logs.snapshot()
    }
}

impl Drop for Stdio {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

fn spawn_reader(
    rx: pipe::Receiver,
    logs: &Target,
    stream: Stream,
    name: &'static str,
) -> JoinHandle<()> {
    let tail = Tail {
        logs: logs.clone(),
        stream,
        name,
        line: Vec::new(),
    };
    tokio::spawn(drain(rx, tail).in_current_span())
}

async fn drain(mut rx: pipe::Receiver, mut tail: Tail) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => tail.push(&buf[..n]),
        }
    }
    tail.flush_line();
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Appends to the shared tail of one stream, and logs complete lines.
struct Tail {
    logs: Target,
    stream: Stream,
    name: &'static str,
    line: Vec<u8>,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        {
            let logs = self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let buf = match self.stream {
                Stream::Stdout => &logs.stdout,
                Stream::Stderr => &logs.stderr,
            };
            let mut bytes = buf.lock().unwrap_or_else(|p| p.into_inner());
            bytes.extend_from_slice(data);
            if bytes.len() > TAIL_BYTES {
                let cut = bytes.len() - TAIL_BYTES;
                bytes.drain(..cut);
            }
        }
        for chunk in data.split_inclusive(|b| *b == b'\n') {
            if self.line.len() < LOG_LINE_MAX {
                let room = LOG_LINE_MAX - self.line.len();
                self.line.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            if chunk.ends_with(b"\n") {
                self.flush_line();
            }
        }
    }

    fn flush_line(&mut self) {
        if !self.line.is_empty() {
            let line = String::from_utf8_lossy(&self.line);
            // Escaped: a carriage return or an escape sequence in what the
            // action prints must not forge or rewrite log lines (issue 13).
            debug!(stream = self.name, line = %crate::text::one_line(line.trim_end()), "action output");
            self.line.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_tail() {
        let logs = std::sync::Arc::new(Logs::default());
        let mut t = Tail {
            logs: std::sync::Arc::new(std::sync::Mutex::new(logs.clone())),
            stream: Stream::Stdout,
            name: "stdout",
            line: Vec::new(),
        };
        for i in 0..5u8 {
            t.push(&vec![i; TAIL_BYTES / 2]);
        }
        let (out, err) = logs.snapshot();
        assert_eq!(out.len(), TAIL_BYTES);
        assert!(out[..TAIL_BYTES / 2].iter().all(|b| *b == 3));
        assert!(out[TAIL_BYTES / 2..].iter().all(|b| *b == 4));
        assert!(err.is_empty());
    }

    #[tokio::test]
    async fn reads_until_the_writer_closes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Stdio::open(dir.path(), Default::default()).unwrap();
        let mut w = pipe::OpenOptions::new().open_sender(&s.stderr).unwrap();
        s.release();
        use tokio::io::AsyncWriteExt;
        w.write_all(b"hello\nworld").await.unwrap();
        drop(w);
        let w2 = pipe::OpenOptions::new().open_sender(&s.stdout).unwrap();
        drop(w2);
        let (out, err) = s.finish(std::time::Duration::from_secs(5)).await;
        assert_eq!(err, b"hello\nworld");
        assert!(out.is_empty());
    }
}
