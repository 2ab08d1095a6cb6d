//! The registry side of a pull: resolving a reference to one platform's
//! manifest and config, and streaming blobs, through `oci-client` (which
//! speaks the distribution protocol, token and basic auth included).
//!
//! Owns the transport choice (HTTPS with the system roots; plain HTTP for
//! loopback and configured insecure registries) and the platform choice.
//! Does not write anything: containerd's content store is `content`'s.

use std::net::IpAddr;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::auth::Credentials;
use super::resolve::{self, Doc, ResolveError, Resolved};
use super::ImageError;
pub use crate::engine::store::Blob;
use resolve::{MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST};

const ACCEPT: &[&str] = &[
    MEDIA_OCI_INDEX,
    MEDIA_DOCKER_LIST,
    MEDIA_OCI_MANIFEST,
    MEDIA_DOCKER_MANIFEST,
];

/// One registry conversation: a fresh client per pull, because
/// `oci-client` caches authorization per registry and two tenants' pulls
/// from one registry must never share it.
pub struct Registry {
    client: Client,
    auth: RegistryAuth,
    creds: Option<Credentials>,
}

impl Registry {
    /// A client for `reference`'s registry. Fails (as unreachable, so an
    /// image already in the namespace still runs) where the node cannot
    /// make one at all, e.g. it has no CA certificates: oci-client's
    /// `Client::new` would fall back to reqwest's, which panics then.
    pub fn new(
        reference: &Reference,
        creds: Option<Credentials>,
        insecure: &[String],
    ) -> Result<Self, ImageError> {
        let registry = reference.resolve_registry().to_string();
        let plain_http = is_loopback(&registry)
            || insecure
                .iter()
                .any(|h| h == &registry || h == reference.registry());
        let config = ClientConfig {
            protocol: if plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            connect_timeout: Some(std::time::Duration::from_secs(15)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        };
        let auth = creds
            .as_ref()
            .map(Credentials::to_auth)
            .unwrap_or(RegistryAuth::Anonymous);
        let client = Client::try_from(config).map_err(|e| ImageError::Unreachable {
            reference: reference.whole(),
            reason: format!(
                "cannot set up a registry client on this node: {}",
                crate::text::error_chain(&e)
            ),
        })?;
        Ok(Registry {
            client,
            auth,
            creds,
        })
    }

    /// One line for a registry error, with the password scrubbed.
    fn fail<E: std::fmt::Display + 'static>(
        &self,
        reference: &Reference,
        what: &str,
        e: E,
    ) -> ImageError {
        let reason = format!("{what}: {e}");
        let reason = match &self.creds {
            Some(c) => c.redact(&reason),
            None => reason,
        };
        if is_unreachable(&e) {
            return ImageError::Unreachable {
                reference: reference.whole(),
                reason,
            };
        }
        ImageError::Registry {
            reference: reference.whole(),
            reason,
        }
    }

    /// Resolves `reference` to a manifest digest only (a HEAD request), to
    /// check whether a cached tag still points where it did.
    pub async fn head(&self, reference: &Reference) -> Result<String, ImageError> {
        self.client
            .fetch_manifest_digest(reference, &self.auth)
            .await
            .map_err(|e| self.fail(reference, "cannot resolve", e))
    }

    /// Fetches the manifest (choosing this machine's platform from an
    /// index) and the config, resolved as every image is (`resolve`).
    pub async fn resolve(&self, reference: &Reference) -> Result<Resolved, ImageError> {
        let (bytes, digest) = self
            .client
            .pull_manifest_raw(reference, &self.auth, ACCEPT)
            .await
            .map_err(|e| self.fail(reference, "cannot fetch manifest", e))?;
        let top = Blob {
            // Told by the document: the registry's Content-Type is not kept.
            media_type: String::new(),
            size: bytes.len() as i64,
            digest,
        };
        let read = |doc: Doc, blob: Blob| async move {
            match doc {
                Doc::Manifest => {
                    let by_digest = Reference::with_digest(
                        reference.registry().to_string(),
                        reference.repository().to_string(),
                        blob.digest.clone(),
                    );
                    self.client
                        .pull_manifest_raw(&by_digest, &self.auth, ACCEPT)
                        .await
                        .map(|(b, _)| b.to_vec())
                        .map_err(|e| self.fail(reference, "cannot fetch platform manifest", e))
                }
                Doc::Config => {
                    let mut out = Vec::with_capacity(blob.size.max(0) as usize);
                    self.client
                        .pull_blob(reference, blob.digest.as_str(), &mut out)
                        .await
                        .map(|()| out)
                        .map_err(|e| self.fail(reference, "cannot fetch config", e))
                }
            }
        };
        resolve::resolve(top, bytes.to_vec(), read)
            .await
            .map_err(|e| match e {
                ResolveError::Source(e) => e,
                ResolveError::Platform { platform } => ImageError::Platform {
                    reference: reference.whole(),
                    platform,
                },
                other => ImageError::Registry {
                    reference: reference.whole(),
                    reason: other.to_string(),
                },
            })
    }

    /// Streams one blob from the registry.
    pub async fn blob_stream(
        &self,
        reference: &Reference,
        blob: &Blob,
    ) -> Result<futures::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>, ImageError>
    {
        self.client
            .pull_blob_stream(reference, blob.digest.as_str())
            .await
            .map(|s| s.stream)
            .map_err(|e| self.fail(reference, &format!("cannot fetch layer {}", blob.digest), e))
    }
}

/// Whether the registry could not be reached at all (no answer: DNS,
/// refused or timed-out connection), as opposed to an answer such as
/// "unauthorized" or "not found". Only the former may fall back to an image
/// already in the namespace (`ImageService::ensure`).
fn is_unreachable(e: &dyn std::any::Any) -> bool {
    match e.downcast_ref::<oci_client::errors::OciDistributionError>() {
        Some(oci_client::errors::OciDistributionError::RequestError(r)) => {
            r.is_connect() || r.is_timeout()
        }
        _ => false,
    }
}

/// Loopback registries are reached over plain HTTP, as Docker does.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        registry
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(registry)
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.3.2.1",
            "[::1]:5000",
            "[::1]",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in [
            "docker.io",
            "10.0.0.1:5000",
            "example.com:443",
            "[fe80::1]:80",
        ] {
            assert!(!is_loopback(h), "{h}");
        }
    }
}
