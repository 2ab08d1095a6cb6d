//! The bearer tokens of `auth_tokens_file` (ISOLATE.md §9): parsing and
//! checking the TOML file, looking a presented secret up in constant time,
//! and re-reading the file when it changes. Owns no listener and decides no
//! call: `auth` asks it who a secret belongs to and what it may use.
//!
//! The daemon never holds a secret: the file has the SHA-256 of each one, and
//! a presented secret is hashed and compared with every entry (all of them,
//! without stopping at a match) in constant time.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A SHA-256 of a secret.
pub type Digest = [u8; 32];

/// How often the file is read again. ISOLATE.md §9 wants a change to take
/// effect within 5 s; the file is small, so reading it is cheaper than any
/// change notification that would also have to follow renames and symlink
/// swaps (how a Kubernetes Secret volume updates).
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// A tokens file larger than this is refused: it is a short list of names
/// and hashes, and a huge one is a mistake.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Why a tokens file was refused.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum TokensError {
    /// cannot read the tokens file {path}: {reason}
    Read { path: PathBuf, reason: String },
    /// the tokens file {path} is not valid TOML at line {line}: {reason}
    Syntax {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// the tokens file {path}: token {token}: {reason}
    Entry {
        path: PathBuf,
        token: String,
        reason: String,
    },
}

/// The namespaces a token may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Only(BTreeSet<String>),
}

impl Scope {
    pub fn allows(&self, namespace: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Only(set) => set.contains(namespace),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    name: String,
    digest: Digest,
    scope: Scope,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    #[serde(default)]
    token: Vec<EntryFormat>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFormat {
    name: String,
    sha256: String,
    namespaces: Vec<String>,
}

/// The tokens in force, shared by every connection and replaced whole when
/// the file changes, so a call sees one version of the file or the next.
#[derive(Clone)]
pub struct Tokens {
    path: PathBuf,
    current: Arc<RwLock<Arc<Vec<Token>>>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("path", &self.path).finish()
    }
}

/// What a secret turned out to be.
#[derive(Debug, Clone)]
pub struct Known {
    pub name: String,
    pub digest: Digest,
    pub scope: Scope,
}

impl Tokens {
    /// Reads and checks the file; any fault is a start-up error.
    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        let text = read(path)?;
        let tokens = parse(path, &text)?;
        if tokens.is_empty() {
            warn!(file = %path.display(), "the tokens file has no token: every call on the TCP listener needs a client certificate");
        }
        info!(file = %path.display(), tokens = %names(&tokens), "bearer tokens loaded");
        Ok(Tokens {
            path: path.to_owned(),
            current: Arc::new(RwLock::new(Arc::new(tokens))),
        })
    }

    /// Tokens parsed from `text`, for tests that need no file.
    pub fn from_text(text: &str) -> Result<Tokens, TokensError> {
        let path = PathBuf::from("(text)");
        let tokens = parse(&path, text)?;
        Ok(Tokens {
            path,
            current: Arc::new(RwLock::new(Arc::new(tokens))),
        })
    }

    fn snapshot(&self) -> Arc<Vec<Token>> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The token whose secret this is, if any. Every entry is compared, in
    /// constant time, so the time taken says nothing about which matched.
    pub fn lookup(&self, secret: &[u8]) -> Option<Known> {
        let digest: Digest = Sha256::digest(secret).into();
        self.by_digest(&digest)
    }

    /// The token with this digest as the file says now: a token removed
    /// since the call started is gone, one whose namespaces changed has the
    /// new ones.
    pub fn by_digest(&self, digest: &Digest) -> Option<Known> {
        let tokens = self.snapshot();
        let mut found = None;
        for t in tokens.iter() {
            if bool::from(t.digest.ct_eq(digest)) {
                found = Some(Known {
                    name: t.name.clone(),
                    digest: t.digest,
                    scope: t.scope.clone(),
                });
            }
        }
        found
    }

    /// Reads the file again if it changed; a bad new version is logged and
    /// the previous good set stays. Returns whether the set was replaced.
    pub fn reload(&self, last: &mut Option<String>) -> bool {
        let text = match read(&self.path) {
            Ok(t) => t,
            Err(e) => {
                let msg = e.to_string();
                if last.as_deref() != Some(msg.as_str()) {
                    warn!(error = %msg, "keeping the tokens in force");
                    *last = Some(msg);
                }
                return false;
            }
        };
        if last.as_deref() == Some(text.as_str()) {
            return false;
        }
        let replaced = match parse(&self.path, &text) {
            Ok(tokens) => {
                info!(file = %self.path.display(), tokens = %names(&tokens), "bearer tokens reloaded");
                match self.current.write() {
                    Ok(mut g) => *g = Arc::new(tokens),
                    Err(poisoned) => *poisoned.into_inner() = Arc::new(tokens),
                }
                true
            }
            Err(e) => {
                warn!(error = %e, "the changed tokens file is refused; keeping the tokens in force");
                false
            }
        };
        *last = Some(text);
        replaced
    }

    /// Re-reads the file every second until `stop`.
    pub fn watch(&self, stop: CancellationToken) {
        let tokens = self.clone();
        tokio::spawn(async move {
            // The version loaded at start is the baseline.
            let mut last = read(&tokens.path).ok();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RELOAD_EVERY) => {}
                }
                let t = tokens.clone();
                let mut l = last.take();
                // File reads are blocking; a stuck filesystem must not hold a
                // runtime thread.
                last = tokio::task::spawn_blocking(move || {
                    t.reload(&mut l);
                    l
                })
                .await
                .unwrap_or_default();
            }
        });
    }
}

fn names(tokens: &[Token]) -> String {
    let v: Vec<&str> = tokens.iter().map(|t| t.name.as_str()).collect();
    if v.is_empty() {
        "(none)".into()
    } else {
        v.join(",")
    }
}

fn read(path: &Path) -> Result<String, TokensError> {
    let fail = |reason: String| TokensError::Read {
        path: path.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(fail(format!(
            "{} bytes, more than the {MAX_FILE_BYTES} a tokens file may have",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    String::from_utf8(bytes).map_err(|_| fail("not UTF-8 text".into()))
}

fn parse(path: &Path, text: &str) -> Result<Vec<Token>, TokensError> {
    let file: FileFormat = toml::from_str(text).map_err(|e| TokensError::Syntax {
        path: path.to_owned(),
        line: e.span().map_or(0, |s| {
            text[..s.start.min(text.len())].lines().count().max(1)
        }),
        reason: e.message().replace('\n', " "),
    })?;
    let mut tokens: Vec<Token> = Vec::with_capacity(file.token.len());
    for (i, entry) in file.token.into_iter().enumerate() {
        let label = if entry.name.is_empty() {
            format!("#{}", i + 1)
        } else {
            format!("{:?}", entry.name)
        };
        let bad = |reason: String| TokensError::Entry {
            path: path.to_owned(),
            token: label.clone(),
            reason,
        };
        if entry.name.trim().is_empty() {
            return Err(bad("has no name".into()));
        }
        if entry.name.len() > 128 || entry.name.chars().any(|c| c.is_control()) {
            return Err(bad("name must be at most 128 printable characters".into()));
        }
        let digest = parse_digest(&entry.sha256).ok_or_else(|| {
            bad("sha256 must be 64 hex digits (the SHA-256 of the secret, as `isolatectl token new` prints it)".into())
        })?;
        if entry.namespaces.is_empty() {
            return Err(bad(
                "namespaces is empty: list the Direktiv namespaces it may use, or \"*\"".into(),
            ));
        }
        let scope = if entry.namespaces.iter().any(|n| n == "*") {
            Scope::All
        } else {
            for ns in &entry.namespaces {
                crate::request::validate_namespace(ns)
                    .map_err(|e| bad(format!("namespaces: {e}")))?;
            }
            Scope::Only(entry.namespaces.into_iter().collect())
        };
        if let Some(other) = tokens.iter().find(|t| t.name == entry.name) {
            return Err(bad(format!("the name {:?} is used twice", other.name)));
        }
        if let Some(other) = tokens.iter().find(|t| t.digest == digest) {
            return Err(bad(format!(
                "has the same sha256 as token {:?}: one secret, two tokens",
                other.name
            )));
        }
        tokens.push(Token {
            name: entry.name,
            digest,
            scope,
        });
    }
    Ok(tokens)
}

fn parse_digest(hex: &str) -> Option<Digest> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A fresh secret and the file entry that accepts it, as `isolatectl token
/// new` prints them: 32 random bytes as 64 hex digits.
pub fn new_token(name: &str, namespaces: &[String]) -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let digest: String = Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let list: Vec<String> = namespaces.iter().map(|n| format!("{n:?}")).collect();
    let entry = format!(
        "[[token]]\nname = {name:?}\nsha256 = \"{digest}\"\nnamespaces = [{}]\n",
        list.join(", ")
    );
    (secret, entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_of(secret: &str) -> String {
        Sha256::digest(secret.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn file(entries: &[(&str, &str, &str)]) -> String {
        entries
            .iter()
            .map(|(n, secret, ns)| {
                format!(
                    "[[token]]\nname = \"{n}\"\nsha256 = \"{}\"\nnamespaces = {ns}\n",
                    hex_of(secret)
                )
            })
            .collect()
    }

    #[test]
    fn secrets_are_looked_up_by_their_hash() {
        let t = Tokens::from_text(&file(&[
            ("flow", "s3cret", r#"["*"]"#),
            ("a", "other", r#"["ns-a", "ns-c"]"#),
        ]))
        .unwrap();
        let k = t.lookup(b"s3cret").unwrap();
        assert_eq!(k.name, "flow");
        assert!(k.scope.allows("anything"));
        let k = t.lookup(b"other").unwrap();
        assert_eq!(k.name, "a");
        assert!(k.scope.allows("ns-a"));
        assert!(!k.scope.allows("ns-b"));
        assert!(t.lookup(b"s3cre").is_none());
        assert!(t.lookup(b"").is_none());
    }

    #[test]
    fn bad_files_name_what_is_wrong() {
        for (text, needle) in [
            ("[[token]]\nname = \"x\"\n", "missing field"),
            ("[[token]\n", "line 1"),
            (
                "[[token]]\nname = \"x\"\nsha256 = \"abc\"\nnamespaces = [\"*\"]\n",
                "64 hex digits",
            ),
            (
                &format!(
                    "[[token]]\nname = \"x\"\nsha256 = \"{}\"\nnamespaces = []\n",
                    hex_of("a")
                ),
                "namespaces is empty",
            ),
            (
                &format!(
                    "[[token]]\nname = \"x\"\nsha256 = \"{}\"\nnamespaces = [\"Bad NS\"]\n",
                    hex_of("a")
                ),
                "namespaces",
            ),
            (
                &file(&[("x", "a", r#"["*"]"#), ("x", "b", r#"["*"]"#)]),
                "used twice",
            ),
            (
                &file(&[("x", "a", r#"["*"]"#), ("y", "a", r#"["*"]"#)]),
                "same sha256",
            ),
            ("[[token]]\nname = \"x\"\nsecret = \"y\"\n", "unknown field"),
        ] {
            let e = Tokens::from_text(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{e:?} lacks {needle:?}");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
        // No tokens at all is a valid (if useless) file.
        assert!(Tokens::from_text("").is_ok());
    }

    #[test]
    fn reload_replaces_good_and_keeps_on_bad() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.toml");
        std::fs::write(&path, file(&[("one", "s1", r#"["*"]"#)])).unwrap();
        let t = Tokens::load(&path).unwrap();
        let mut last = read(&path).ok();
        assert!(!t.reload(&mut last), "unchanged");
        std::fs::write(&path, file(&[("two", "s2", r#"["a"]"#)])).unwrap();
        assert!(t.reload(&mut last));
        assert!(t.lookup(b"s1").is_none());
        assert_eq!(t.lookup(b"s2").unwrap().name, "two");
        std::fs::write(&path, "garbage [[[").unwrap();
        assert!(!t.reload(&mut last));
        assert_eq!(t.lookup(b"s2").unwrap().name, "two", "previous set kept");
        std::fs::remove_file(&path).unwrap();
        assert!(!t.reload(&mut last));
        assert_eq!(t.lookup(b"s2").unwrap().name, "two");
    }

    #[test]
    fn new_tokens_are_accepted_by_their_entry() {
        let (secret, entry) = new_token("ci", &["a".into(), "b".into()]);
        assert_eq!(secret.len(), 64);
        let t = Tokens::from_text(&entry).unwrap();
        let k = t.lookup(secret.as_bytes()).unwrap();
        assert_eq!(k.name, "ci");
        assert_eq!(
            k.scope,
            Scope::Only(["a".to_string(), "b".to_string()].into())
        );
        assert!(!entry.contains(&secret), "the entry holds only the hash");
    }
}
