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
    readers: Vec<JoinHandle<Vec<u8>>>,
}

impl Stdio {
    /// Creates `stdout` and `stderr` FIFOs in `dir` and starts reading them.
    pub fn open(dir: &Path) -> std::io::Result<Stdio> {
        let stdout = dir.join("stdout");
        let stderr = dir.join("stderr");
        let mut keepalive = Vec::new();
        let mut readers = Vec::new();
        for (path, name) in [(&stdout, "stdout"), (&stderr, "stderr")] {
            match nix::unistd::mkfifo(path, Mode::from_bits_truncate(0o600)) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
            let rx = pipe::OpenOptions::new().open_receiver(path)?;
            keepalive.push(pipe::OpenOptions::new().open_sender(path)?);
            readers.push(tokio::spawn(drain(rx, name).in_current_span()));
        }
        Ok(Stdio {
            stdout,
            stderr,
            keepalive,
            readers,
        })
    }

    /// The shim holds the write ends now; ours would hide its end-of-file.
    pub fn release(&mut self) {
        self.keepalive.clear();
    }

    /// Waits for both streams to end (the shim closes them when the task is
    /// deleted) and returns their tails: `(stdout, stderr)`.
    pub async fn finish(mut self, limit: std::time::Duration) -> (Vec<u8>, Vec<u8>) {
        self.release();
        let mut tails = Vec::new();
        for r in self.readers.drain(..) {
            let abort = r.abort_handle();
            match tokio::time::timeout(limit, r).await {
                Ok(Ok(tail)) => tails.push(tail),
                _ => {
                    abort.abort();
                    tails.push(Vec::new());
                }
            }
        }
        let stderr = tails.pop().unwrap_or_default();
        let stdout = tails.pop().unwrap_or_default();
        (stdout, stderr)
    }
}

impl Drop for Stdio {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

async fn drain(mut rx: pipe::Receiver, stream: &'static str) -> Vec<u8> {
    let mut tail = Tail::default();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match rx.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => tail.push(&buf[..n], stream),
        }
    }
    tail.flush(stream);
    tail.bytes
}

/// The last `TAIL_BYTES` of a stream, plus the unfinished line for the log.
#[derive(Default)]
struct Tail {
    bytes: Vec<u8>,
    line: Vec<u8>,
}

impl Tail {
    fn push(&mut self, data: &[u8], stream: &'static str) {
        self.bytes.extend_from_slice(data);
        if self.bytes.len() > 2 * TAIL_BYTES {
            // Trim in big steps so the copy is amortised.
            let cut = self.bytes.len() - TAIL_BYTES;
            self.bytes.drain(..cut);
        }
        for chunk in data.split_inclusive(|b| *b == b'\n') {
            if self.line.len() < LOG_LINE_MAX {
                let room = LOG_LINE_MAX - self.line.len();
                self.line.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            if chunk.ends_with(b"\n") {
                self.flush(stream);
            }
        }
    }

    fn flush(&mut self, stream: &'static str) {
        if !self.line.is_empty() {
            let line = String::from_utf8_lossy(&self.line);
            debug!(stream, line = %line.trim_end(), "action output");
            self.line.clear();
        }
        if self.bytes.len() > TAIL_BYTES {
            let cut = self.bytes.len() - TAIL_BYTES;
            self.bytes.drain(..cut);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_tail() {
        let mut t = Tail::default();
        for i in 0..5u8 {
            t.push(&vec![i; TAIL_BYTES / 2], "stdout");
        }
        t.flush("stdout");
        assert_eq!(t.bytes.len(), TAIL_BYTES);
        assert!(t.bytes[..TAIL_BYTES / 2].iter().all(|b| *b == 3));
        assert!(t.bytes[TAIL_BYTES / 2..].iter().all(|b| *b == 4));
    }

    #[tokio::test]
    async fn reads_until_the_writer_closes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Stdio::open(dir.path()).unwrap();
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
