//! The daemon's two listeners (ISOLATE.md §9): the local Unix socket, made
//! 0600 root's (0660 with `socket_group`) before anyone can connect, and the
//! TCP listener with TCP_NODELAY. Owns creating, checking and removing the
//! socket file; does not decide who may call (that is `auth`), nor what is
//! served (the binary adds the services).

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::Mode;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

/// Why a listener could not be opened.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ListenError {
    /// cannot listen on {bind}: {source}
    Tcp {
        bind: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// cannot create the local socket {path}: {reason}
    Socket { path: PathBuf, reason: String },
    /// {path} is in use by another process (another isolated? two daemons on one host need two sockets)
    SocketInUse { path: PathBuf },
    /// socket_group {group:?} is not a group of this host
    NoGroup { group: String },
}

/// The local socket, removed again when dropped (if it is still the one
/// this process made).
pub struct LocalSocket {
    path: PathBuf,
    listener: Option<UnixListener>,
    /// (device, inode) of the socket file made, so a socket another daemon
    /// put there since is not removed.
    made: (u64, u64),
}

impl LocalSocket {
    /// Binds `path`: a stale socket left by a crash is replaced, a live one
    /// is refused. The socket is created with umask 0177, so it is never
    /// open to others, not even for an instant, then given its mode and group.
    pub fn bind(path: &Path, group: &str) -> Result<LocalSocket, ListenError> {
        let fail = |reason: String| ListenError::Socket {
            path: path.to_owned(),
            reason,
        };
        let gid = match group.trim() {
            "" => None,
            g => Some(
                nix::unistd::Group::from_name(g)
                    .map_err(|e| fail(format!("cannot look up group {g:?}: {e}")))?
                    .ok_or_else(|| ListenError::NoGroup { group: g.into() })?
                    .gid,
            ),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
                // Others may traverse it to reach a 0660 socket; the
                // socket's own mode is what protects it.
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| fail(format!("cannot set the mode of {}: {e}", dir.display())))?;
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ListenError::SocketInUse {
                        path: path.to_owned(),
                    });
                }
                // Left by a daemon that did not stop cleanly.
                std::fs::remove_file(path)
                    .map_err(|e| fail(format!("cannot remove the stale socket: {e}")))?;
            }
            Ok(_) => return Err(fail("it exists and is not a socket".into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e.to_string())),
        }
        // The umask is the process's; nothing else creates files while the
        // daemon starts, and it is put back at once.
        let old = nix::sys::stat::umask(Mode::from_bits_truncate(0o177));
        let bound = UnixListener::bind(path);
        nix::sys::stat::umask(old);
        let listener = bound.map_err(|e| fail(e.to_string()))?;
        let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
        let sock = LocalSocket {
            path: path.to_owned(),
            listener: Some(listener),
            made: (meta.dev(), meta.ino()),
        };
        if let Some(gid) = gid {
            nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(0)), Some(gid))
                .map_err(|e| fail(format!("cannot give it to group {group}: {e}")))?;
        }
        let mode = if gid.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| fail(format!("cannot set its mode: {e}")))?;
        Ok(sock)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connections, for the server; the listener is handed over once.
    pub fn incoming(&mut self) -> Option<UnixListenerStream> {
        self.listener.take().map(UnixListenerStream::new)
    }
}

impl Drop for LocalSocket {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.made)
            .unwrap_or(false);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The TCP listener, with TCP_NODELAY on every connection: without it the
/// small answers to concurrent calls on one connection wait for the
/// client's delayed ACK (RunIsolate's p99 under load was 40-60 ms; tonic
/// does not set it on a listener handed to `serve_with_incoming`).
pub async fn tcp(
    bind: std::net::SocketAddr,
) -> Result<tonic::transport::server::TcpIncoming, ListenError> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|source| ListenError::Tcp { bind, source })?;
    Ok(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn socket_is_private_replaces_stale_and_refuses_live() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/isolated.sock");
        let sock = LocalSocket::bind(&path, "").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(matches!(
            LocalSocket::bind(&path, ""),
            Err(ListenError::SocketInUse { .. })
        ));
        drop(sock);
        assert!(!path.exists(), "removed when dropped");
        // A stale socket file (its listener gone without removing it).
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        let _sock = LocalSocket::bind(&path, "").unwrap();
        let e = LocalSocket::bind(&dir.path().join("run"), "")
            .err()
            .unwrap();
        assert!(e.to_string().contains("not a socket"), "{e}");
        let e = LocalSocket::bind(&dir.path().join("g.sock"), "no-such-group-here")
            .err()
            .unwrap();
        assert!(matches!(e, ListenError::NoGroup { .. }), "{e}");
    }
}
