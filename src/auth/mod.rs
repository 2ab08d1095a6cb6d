//! Who a caller is and what it may touch (ISOLATE.md §9). Owns the gate every
//! call of DirektivIsolate and the control service passes ([`Gate`], a tonic
//! interceptor), the identity it leaves on the call ([`Caller`]), the
//! namespace check the services make with it ([`Caller::authorize`]), and
//! the TCP listener's policy decided once at start ([`TcpPolicy`]). Does not
//! own the listeners (`listen`) nor TLS files (`tls`) nor the tokens file
//! (`tokens`). gRPC health passes no gate: probes need no credentials.
//!
//! Every call is authenticated on its own, not once per connection, so a
//! token removed from the file is refused on a connection that is already
//! open, and a watch stream checks again at every message it sends.

pub mod tls;
pub mod tokens;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tonic::service::Interceptor;
use tonic::{Request, Status};
use tracing::{debug, info, warn};

use crate::config::Config;
use tokens::{Digest, Tokens, TokensError};

/// The longest `authorization` value looked at; anything longer is refused
/// as malformed before it is hashed or logged.
const MAX_AUTHORIZATION: usize = 1024;

/// How many (peer, identity) pairs are remembered for "first call on this
/// connection" info lines before the memory is cleared.
const SEEN_PEERS: usize = 4096;

/// Why a call was refused, or why the TCP listener cannot start.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum AuthError {
    /// no credentials: this listener needs {wanted}
    Missing { wanted: &'static str },
    /// the authorization metadata is not `Bearer <token>` (at most 1 KiB of ASCII)
    Malformed,
    /// unknown bearer token
    UnknownToken,
    /// this listener takes no bearer tokens (no auth_tokens_file): use a client certificate
    TokensNotAccepted,
    /// token {name} was removed from the tokens file
    Revoked { name: String },
    /// {who} may not use namespace {namespace}
    Forbidden { who: String, namespace: String },
    /// {who} may not {what}: it is node-wide, for the local socket, a client certificate or a token of every namespace
    NodeWide { who: String, what: &'static str },
    /// the call reached a service without passing the gate (a bug: refused to be safe)
    NoCaller,
    /// {0}
    Tokens(#[from] TokensError),
    /// {0}
    Tls(#[from] tls::TlsError),
    /// the TCP listener {bind} has no authentication: set tls_client_ca (with tls_cert and tls_key) or auth_tokens_file, bind = "" for the local socket only, or allow_unauthenticated = true to serve it open
    NoAuthentication { bind: SocketAddr },
    /// bearer tokens would cross the network in plaintext on {bind}: set tls_cert and tls_key, or bind to loopback
    PlaintextTokens { bind: SocketAddr },
}

impl AuthError {
    /// The `reason` label of `isolated_auth_refusals_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing { .. } => "missing",
            AuthError::Malformed => "malformed",
            AuthError::UnknownToken | AuthError::TokensNotAccepted => "unknown_token",
            AuthError::Revoked { .. } => "revoked",
            AuthError::Forbidden { .. } => "namespace",
            AuthError::NodeWide { .. } => "node_wide",
            _ => "internal",
        }
    }

    /// Its gRPC status, through the crate's one mapping.
    pub fn to_status(self) -> Status {
        crate::error::Error::Auth(self).into()
    }
}

/// Who made a call, left on it by the [`Gate`].
#[derive(Debug, Clone)]
pub enum Caller {
    /// Through the local socket, which only root (or `socket_group`) can open.
    Local,
    /// A client certificate the listener's client CA verified.
    Certificate { subject: String },
    /// A bearer token of the tokens file, known by its name and digest; its
    /// namespaces are read from the file as it is at each check.
    Token {
        name: String,
        digest: Digest,
        tokens: Tokens,
    },
    /// The TCP listener with `allow_unauthenticated`.
    Anonymous,
}

impl Caller {
    /// The caller of a request, as the gate left it; fails closed.
    pub fn of<T>(req: &Request<T>) -> Result<Caller, AuthError> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or(AuthError::NoCaller)
    }

    /// How the log names it: never a secret.
    pub fn who(&self) -> String {
        match self {
            Caller::Local => "the local socket".into(),
            Caller::Certificate { subject } => format!("certificate {subject}"),
            Caller::Token { name, .. } => format!("token {name}"),
            Caller::Anonymous => "an unauthenticated caller".into(),
        }
    }

    /// Whether it may use Direktiv namespace `namespace` now. A refusal is
    /// logged and counted here, once per call.
    pub fn authorize(&self, namespace: &str) -> Result<(), AuthError> {
        let Caller::Token {
            name,
            digest,
            tokens,
        } = self
        else {
            return Ok(());
        };
        let outcome = match tokens.by_digest(digest) {
            None => Err(AuthError::Revoked { name: name.clone() }),
            Some(k) if k.scope.allows(namespace) => Ok(()),
            Some(_) => Err(AuthError::Forbidden {
                who: self.who(),
                namespace: crate::text::one_line(namespace).into_owned(),
            }),
        };
        if let Err(e) = &outcome {
            refused(e, None);
        }
        outcome
    }

    /// Whether it may `what` the whole node (drain it): a token only if it
    /// is for every namespace, since a drain stops them all (issue 17).
    pub fn authorize_node(&self, what: &'static str) -> Result<(), AuthError> {
        let Caller::Token { digest, tokens, .. } = self else {
            return Ok(());
        };
        let outcome = match tokens.by_digest(digest) {
            Some(k) if k.scope == tokens::Scope::All => Ok(()),
            _ => Err(AuthError::NodeWide {
                who: self.who(),
                what,
            }),
        };
        if let Err(e) = &outcome {
            refused(e, None);
        }
        outcome
    }

    /// Whether it may see namespace `namespace`, without logging: for
    /// filtering a list.
    pub fn sees(&self, namespace: &str) -> bool {
        match self {
            Caller::Token { digest, tokens, .. } => tokens
                .by_digest(digest)
                .is_some_and(|k| k.scope.allows(namespace)),
            _ => true,
        }
    }
}

/// Logs and counts a refusal.
fn refused(e: &AuthError, peer: Option<SocketAddr>) {
    crate::metrics::auth_refused(e.reason());
    match peer {
        Some(peer) => warn!(%peer, reason = e.reason(), "call refused: {e}"),
        None => warn!(reason = e.reason(), "call refused: {e}"),
    }
}

/// How the TCP listener authenticates, decided once at start from the
/// settings (ISOLATE.md §9).
#[derive(Debug, Clone)]
pub struct TcpPolicy {
    pub bind: SocketAddr,
    /// Verified client certificates are accepted (a client CA is set).
    pub client_certs: bool,
    pub tokens: Option<Tokens>,
    /// Neither of the above, and `allow_unauthenticated`.
    pub anonymous: bool,
    /// TLS files, when the listener is TLS-only.
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

fn set(p: &Path) -> Option<PathBuf> {
    (!p.as_os_str().is_empty()).then(|| p.to_owned())
}

impl TcpPolicy {
    /// The TCP listener's policy, `None` when `bind` is empty. Reads the
    /// tokens file and checks the TLS files, so every fault is a start-up
    /// error of one line.
    pub fn from_config(cfg: &Config) -> Result<Option<TcpPolicy>, AuthError> {
        let Some(bind) = cfg.tcp_bind().ok().flatten() else {
            return Ok(None);
        };
        let tls = match (set(&cfg.tls_cert), set(&cfg.tls_key)) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                client_ca: set(&cfg.tls_client_ca),
            }),
            _ => None,
        };
        if let Some(t) = &tls {
            // Read now, so a bad file stops the start with its name.
            tls::server_config(&t.cert, &t.key, t.client_ca.as_deref())?;
        }
        let client_certs = tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        let tokens = match set(&cfg.auth_tokens_file) {
            Some(path) => Some(Tokens::load(&path)?),
            None => None,
        };
        if tokens.is_some() && tls.is_none() && !bind.ip().is_loopback() {
            return Err(AuthError::PlaintextTokens { bind });
        }
        let anonymous = !client_certs && tokens.is_none();
        if anonymous && !cfg.allow_unauthenticated {
            return Err(AuthError::NoAuthentication { bind });
        }
        if anonymous {
            warn!(%bind, "allow_unauthenticated: anyone who reaches the TCP listener can run, read and cancel any action in any namespace");
        } else if cfg.allow_unauthenticated {
            warn!(%bind, "allow_unauthenticated is ignored: client certificates or tokens are configured, and every call must present one");
        }
        Ok(Some(TcpPolicy {
            bind,
            client_certs,
            tokens,
            anonymous,
            tls,
        }))
    }

    /// What a caller without credentials is told to bring.
    fn wanted(&self) -> &'static str {
        match (self.client_certs, self.tokens.is_some()) {
            (true, true) => "a client certificate or `authorization: Bearer <token>`",
            (true, false) => "a client certificate",
            _ => "`authorization: Bearer <token>`",
        }
    }

    fn authenticate<T>(&self, req: &Request<T>) -> Result<Caller, AuthError> {
        if self.client_certs {
            // rustls verified it against the client CA in the handshake; a
            // certificate that does not verify never gets this far.
            if let Some(certs) = req.peer_certs() {
                if let Some(leaf) = certs.first() {
                    return Ok(Caller::Certificate {
                        subject: tls::subject(leaf),
                    });
                }
            }
        }
        let Some(value) = req.metadata().get("authorization") else {
            if self.anonymous {
                return Ok(Caller::Anonymous);
            }
            return Err(AuthError::Missing {
                wanted: self.wanted(),
            });
        };
        let Some(tokens) = &self.tokens else {
            if self.anonymous {
                return Ok(Caller::Anonymous);
            }
            return Err(AuthError::TokensNotAccepted);
        };
        let secret = bearer(value.as_bytes()).ok_or(AuthError::Malformed)?;
        let known = tokens.lookup(secret).ok_or(AuthError::UnknownToken)?;
        Ok(Caller::Token {
            name: known.name,
            digest: known.digest,
            tokens: tokens.clone(),
        })
    }
}

/// The secret of `Bearer <secret>` (the scheme in any case), if the value is
/// one: printable ASCII, at most [`MAX_AUTHORIZATION`] bytes.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    if value.len() > MAX_AUTHORIZATION || !value.iter().all(|b| b.is_ascii_graphic() || *b == b' ')
    {
        return None;
    }
    let (scheme, rest) = value.split_at(value.iter().position(|b| *b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let secret = rest.trim_ascii();
    (!secret.is_empty() && !secret.contains(&b' ')).then_some(secret)
}

/// The interceptor in front of every service but health: it decides who
/// the caller is, or refuses the call before any handler sees it.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<GateInner>,
}

struct GateInner {
    /// `None`: the local socket.
    tcp: Option<TcpPolicy>,
    /// Peers already logged at info with their identity.
    seen: Mutex<HashSet<(SocketAddr, String)>>,
}

impl Gate {
    /// The local socket's gate: every caller is [`Caller::Local`].
    pub fn local() -> Gate {
        Gate {
            inner: Arc::new(GateInner {
                tcp: None,
                seen: Default::default(),
            }),
        }
    }

    pub fn tcp(policy: TcpPolicy) -> Gate {
        Gate {
            inner: Arc::new(GateInner {
                tcp: Some(policy),
                seen: Default::default(),
            }),
        }
    }

    /// Logs an accepted caller at info the first time its connection is
    /// seen with that identity, at debug afterwards.
    fn note(&self, peer: Option<SocketAddr>, caller: &Caller) {
        let who = caller.who();
        let Some(peer) = peer else {
            debug!(caller = %who, "call authenticated");
            return;
        };
        let first = match self.inner.seen.lock() {
            Ok(mut seen) => {
                if seen.len() >= SEEN_PEERS {
                    seen.clear();
                }
                seen.insert((peer, who.clone()))
            }
            Err(_) => true,
        };
        if first {
            info!(%peer, caller = %who, "authenticated");
        } else {
            debug!(%peer, caller = %who, "call authenticated");
        }
    }
}

impl Interceptor for Gate {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let peer = req.remote_addr();
        let caller = match &self.inner.tcp {
            None => Caller::Local,
            Some(policy) => match policy.authenticate(&req) {
                Ok(c) => c,
                Err(e) => {
                    refused(&e, peer);
                    return Err(e.to_status());
                }
            },
        };
        self.note(peer, &caller);
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    fn policy(text: &str, anonymous: bool) -> TcpPolicy {
        TcpPolicy {
            bind: "127.0.0.1:1".parse().unwrap(),
            client_certs: false,
            tokens: (!text.is_empty()).then(|| Tokens::from_text(text).unwrap()),
            anonymous,
            tls: None,
        }
    }

    fn entry(name: &str, secret: &str, ns: &str) -> String {
        let hex: String = sha2::Sha256::digest(secret.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("[[token]]\nname = \"{name}\"\nsha256 = \"{hex}\"\nnamespaces = {ns}\n")
    }

    fn call(gate: &mut Gate, auth: Option<&str>) -> Result<Caller, Status> {
        let mut req = Request::new(());
        if let Some(a) = auth {
            req.metadata_mut()
                .insert("authorization", a.parse().unwrap());
        }
        let req = gate.call(req)?;
        Ok(Caller::of(&req).unwrap())
    }

    #[test]
    fn bearer_values() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer   abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearer a b"), None);
        assert_eq!(bearer("Bearer \u{e9}".as_bytes()), None);
        assert_eq!(bearer(&[b'x'; 5000]), None);
    }

    #[test]
    fn the_gate_decides_before_any_handler() {
        let mut gate = Gate::tcp(policy(&entry("flow", "s1", r#"["a"]"#), false));
        let e = call(&mut gate, None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("Bearer"), "{}", e.message());
        for bad in ["Bearer nope", "Basic czE=", "Bearer"] {
            let e = call(&mut gate, Some(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad}");
        }
        let huge = format!("Bearer {}", "x".repeat(100_000));
        assert_eq!(
            call(&mut gate, Some(&huge)).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let c = call(&mut gate, Some("Bearer s1")).unwrap();
        assert_eq!(c.who(), "token flow");
        assert!(c.authorize("a").is_ok());
        let e = c.authorize("b").unwrap_err();
        assert!(!e.to_string().contains("s1"), "no secret in {e}");
        assert_eq!(e.to_status().code(), tonic::Code::PermissionDenied);
        assert!(c.sees("a") && !c.sees("b"));
    }

    #[test]
    fn only_a_token_of_every_namespace_may_act_on_the_node() {
        let text = format!(
            "{}{}",
            entry("flow", "s1", r#"["a", "b"]"#),
            entry("ops", "s2", r#"["*"]"#)
        );
        let mut gate = Gate::tcp(policy(&text, false));
        let scoped = call(&mut gate, Some("Bearer s1")).unwrap();
        let e = scoped.authorize_node("drain").unwrap_err();
        assert!(e.to_string().contains("token flow may not drain"), "{e}");
        assert_eq!(e.to_status().code(), tonic::Code::PermissionDenied);
        let all = call(&mut gate, Some("Bearer s2")).unwrap();
        assert!(all.authorize_node("drain").is_ok());
        assert!(call(&mut Gate::local(), None)
            .unwrap()
            .authorize_node("drain")
            .is_ok());
    }

    #[test]
    fn local_and_anonymous_callers_use_every_namespace() {
        let c = call(&mut Gate::local(), None).unwrap();
        assert!(matches!(c, Caller::Local));
        assert!(c.authorize("any").is_ok());
        let c = call(&mut Gate::tcp(policy("", true)), Some("Bearer x")).unwrap();
        assert!(matches!(c, Caller::Anonymous));
        // Without the gate, nothing: the services fail closed.
        let req = Request::new(());
        assert!(matches!(Caller::of(&req), Err(AuthError::NoCaller)));
    }

    #[test]
    fn a_removed_token_is_refused_on_its_next_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(&path, entry("gone", "s", r#"["*"]"#)).unwrap();
        let p = TcpPolicy {
            tokens: Some(Tokens::load(&path).unwrap()),
            ..policy("", false)
        };
        let c = call(&mut Gate::tcp(p.clone()), Some("Bearer s")).unwrap();
        assert!(c.authorize("x").is_ok());
        std::fs::write(&path, entry("other", "t", r#"["*"]"#)).unwrap();
        let mut last = None;
        assert!(p.tokens.as_ref().unwrap().reload(&mut last));
        let e = c.authorize("x").unwrap_err();
        assert!(matches!(e, AuthError::Revoked { .. }), "{e}");
        assert_eq!(e.to_status().code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn start_up_policy() {
        let base = |extra: &[(&str, &str)]| {
            let mut o = crate::config::Options::default();
            for (k, v) in extra {
                match *k {
                    "bind" => o.bind = Some(v.to_string()),
                    "tokens" => o.auth_tokens_file = Some(v.into()),
                    "anon" => o.allow_unauthenticated = Some(true),
                    _ => unreachable!(),
                }
            }
            Config::load(o, None).unwrap()
        };
        let e = TcpPolicy::from_config(&base(&[])).unwrap_err();
        assert!(matches!(e, AuthError::NoAuthentication { .. }), "{e}");
        assert!(!e.to_string().contains('\n'));
        assert!(TcpPolicy::from_config(&base(&[("bind", "")]))
            .unwrap()
            .is_none());
        let p = TcpPolicy::from_config(&base(&[("anon", "")]))
            .unwrap()
            .unwrap();
        assert!(p.anonymous);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(&path, entry("a", "s", r#"["*"]"#)).unwrap();
        let t = path.to_str().unwrap();
        let p = TcpPolicy::from_config(&base(&[("tokens", t)]))
            .unwrap()
            .unwrap();
        assert!(p.tokens.is_some() && !p.anonymous);
        let e = TcpPolicy::from_config(&base(&[("tokens", t), ("bind", "0.0.0.0:1")])).unwrap_err();
        assert!(matches!(e, AuthError::PlaintextTokens { .. }), "{e}");
        std::fs::write(&path, "[[token]]\nname = 1\n").unwrap();
        let e = TcpPolicy::from_config(&base(&[("tokens", t)])).unwrap_err();
        assert!(e.to_string().contains("t.toml"), "{e}");
    }
}
