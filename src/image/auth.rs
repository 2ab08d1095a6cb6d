//! Registry credentials from a request's `registries` map: which entry
//! applies to a registry host, and how its `user!password` value splits.
//!
//! Owns the redaction rule too: a password never leaves this module in a
//! `Debug` or `Display`, and [`Credentials::redact`] scrubs it from any text
//! a registry sent back before that text reaches a report or a log.

use std::collections::HashMap;
use std::fmt;

use oci_client::secrets::RegistryAuth;

/// Docker Hub answers under three names; a credential for one is for all.
const DOCKER_HUB: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

/// A user and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}:***)", self.user)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, displaydoc::Display)]
/// credentials for registry {host} are malformed: expected user!password
pub struct MalformedCredentials {
    pub host: String,
}

impl Credentials {
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials {
            user: user.into(),
            password: password.into(),
        }
    }

    /// Splits at the first `!`: passwords may contain `!`, user names not.
    pub fn parse(host: &str, value: &str) -> Result<Self, MalformedCredentials> {
        match value.split_once('!') {
            Some((user, password)) if !user.is_empty() => Ok(Credentials::new(user, password)),
            _ => Err(MalformedCredentials {
                host: host.to_string(),
            }),
        }
    }

    pub fn to_auth(&self) -> RegistryAuth {
        RegistryAuth::Basic(self.user.clone(), self.password.clone())
    }

    /// Replaces every occurrence of the password in `text`.
    /// Which credential this is, for the image cache's "checked with these
    /// credentials" marks: keyed by the cache's own random hasher, so it
    /// cannot be turned back into the password, and never shown.
    pub fn fingerprint(&self, hasher: &std::hash::RandomState) -> u64 {
        use std::hash::BuildHasher;
        hasher.hash_one((&self.user, &self.password))
    }

    pub fn redact(&self, text: &str) -> String {
        if self.password.is_empty() {
            text.to_string()
        } else {
            text.replace(&self.password, "***")
        }
    }
}

/// Picks the credentials for `registry` (as written in the image
/// reference, e.g. `docker.io` or `127.0.0.1:5000`) from a request's map.
/// Keys may carry a scheme or a trailing path, as Docker config files do.
pub fn lookup(
    registries: &HashMap<String, String>,
    registry: &str,
) -> Result<Option<Credentials>, MalformedCredentials> {
    let want = canonical_host(registry);
    for (key, value) in registries {
        if canonical_host(key) == want {
            return Credentials::parse(key, value).map(Some);
        }
    }
    Ok(None)
}

fn canonical_host(key: &str) -> String {
    let key = key.trim();
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key).to_ascii_lowercase();
    if DOCKER_HUB.contains(&host.as_str()) {
        DOCKER_HUB[0].to_string()
    } else {
        host
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn splits_at_the_first_bang() {
        let c = Credentials::parse("h", "user!pa!ss").unwrap();
        assert_eq!(c, Credentials::new("user", "pa!ss"));
        assert!(Credentials::parse("h", "nobang").is_err());
        assert!(Credentials::parse("h", "!pw").is_err());
        assert_eq!(
            Credentials::parse("h", "u!").unwrap(),
            Credentials::new("u", "")
        );
    }

    #[test]
    fn docker_hub_names_are_one_host() {
        let m = map(&[("https://index.docker.io/v1/", "u!p")]);
        assert_eq!(
            lookup(&m, "docker.io").unwrap(),
            Some(Credentials::new("u", "p"))
        );
        let m = map(&[("registry-1.docker.io", "u!p")]);
        assert!(lookup(&m, "docker.io").unwrap().is_some());
        assert!(lookup(&m, "quay.io").unwrap().is_none());
    }

    #[test]
    fn ports_matter_and_malformed_is_an_error() {
        let m = map(&[("127.0.0.1:5000", "u!p"), ("127.0.0.1:6000", "broken")]);
        assert!(lookup(&m, "127.0.0.1:5000").unwrap().is_some());
        assert_eq!(
            lookup(&m, "127.0.0.1:6000").unwrap_err().to_string(),
            "credentials for registry 127.0.0.1:6000 are malformed: expected user!password"
        );
        assert!(lookup(&m, "127.0.0.1").unwrap().is_none());
    }

    #[test]
    fn secrets_do_not_leak() {
        let c = Credentials::new("alice", "s3cret");
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(c.redact("denied for s3cret"), "denied for ***");
        let e = Credentials::parse("h", "s3cret").unwrap_err();
        assert!(!e.to_string().contains("s3cret"));
    }
}
