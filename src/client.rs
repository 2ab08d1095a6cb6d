//! How a client reaches `isolated` (ISOLATE.md §9): over the local socket,
//! or over TCP, with TLS when asked for and a bearer token on every call.
//! Used by `isolatectl` and the tests, so both connect the way an operator
//! would. Owns connecting only; what is called is the caller's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

/// Where the daemon is.
#[derive(Debug, Clone)]
pub enum Target {
    /// The local socket at this path.
    Socket(PathBuf),
    /// `host:port` (or a URI), over TLS when `tls` is set.
    Tcp {
        addr: String,
        tls: Option<ClientTlsConfig>,
    },
}

/// Why no connection was made.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ClientError {
    /// {addr:?} is not an address: {reason}
    Address { addr: String, reason: String },
    /// cannot reach isolated at {target}: {reason}
    Unreachable { target: String, reason: String },
    /// the token is not usable as gRPC metadata (printable ASCII only)
    Token,
}

/// A connected channel to the daemon.
pub async fn connect(target: &Target) -> Result<Channel, ClientError> {
    match target {
        Target::Socket(path) => {
            let path = path.clone();
            let unreachable = |e: &dyn std::error::Error| ClientError::Unreachable {
                target: format!("socket {}", path.display()),
                reason: crate::text::error_chain(e),
            };
            // The URI is only a placeholder: the connector dials the socket.
            let p = path.clone();
            Endpoint::from_static("http://localhost")
                .connect_timeout(Duration::from_secs(5))
                .connect_with_connector(tower::service_fn(move |_| {
                    let p = p.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(p).await?,
                        ))
                    }
                }))
                .await
                .map_err(|e| unreachable(&e))
        }
        Target::Tcp { addr, tls } => {
            let uri = match (addr.contains("://"), tls.is_some()) {
                (true, _) => addr.clone(),
                (false, true) => format!("https://{addr}"),
                (false, false) => format!("http://{addr}"),
            };
            let bad = |reason: String| ClientError::Address {
                addr: addr.clone(),
                reason,
            };
            let mut ep = Endpoint::from_shared(uri).map_err(|e| bad(e.to_string()))?;
            let https = ep.uri().scheme_str() == Some("https");
            if let Some(tls) = tls {
                if !https {
                    return Err(bad("TLS was asked for, but the address is http://".into()));
                }
                ep = ep
                    .tls_config(tls.clone())
                    .map_err(|e| bad(crate::text::error_chain(&e)))?;
            } else if https {
                ep = ep
                    .tls_config(ClientTlsConfig::new().with_native_roots())
                    .map_err(|e| bad(crate::text::error_chain(&e)))?;
            }
            ep.connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .map_err(|e| ClientError::Unreachable {
                    target: addr.clone(),
                    reason: crate::text::error_chain(&e),
                })
        }
    }
}

/// Adds `authorization: Bearer <token>` to every call, when there is a token.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Bearer, ClientError> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(Bearer(None)),
            Some(t) => format!("Bearer {t}")
                .parse()
                .map(|v| Bearer(Some(v)))
                .map_err(|_| ClientError::Token),
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel whose every call carries the token.
pub type Authed = InterceptedService<Channel, Bearer>;

/// A token from a file: its first line, trimmed.
pub fn read_token_file(path: &Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}
