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
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};

use super::auth::Credentials;
use super::ImageError;

pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const ACCEPT: &[&str] = &[
    MEDIA_OCI_INDEX,
    MEDIA_DOCKER_LIST,
    MEDIA_OCI_MANIFEST,
    MEDIA_DOCKER_MANIFEST,
];

/// A blob as containerd's content store wants it described.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub size: i64,
}

impl Blob {
    pub fn descriptor(&self) -> containerd_client::types::Descriptor {
        containerd_client::types::Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            annotations: Default::default(),
        }
    }
}

/// What resolution found: the raw documents (stored byte for byte, so
/// their digests hold) and the parsed pieces the unpacker needs.
pub struct Resolved {
    /// The index the tag pointed at, if it was one, and which of its
    /// entries was chosen.
    pub index: Option<(Blob, Vec<u8>, usize)>,
    pub manifest: Blob,
    pub manifest_bytes: Vec<u8>,
    pub config: Blob,
    pub config_bytes: Vec<u8>,
    pub image_config: ImageConfiguration,
    pub layers: Vec<Blob>,
}

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
                crate::containerd::error_chain(&e)
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
    /// index) and the config.
    pub async fn resolve(&self, reference: &Reference) -> Result<Resolved, ImageError> {
        let (bytes, digest) = self
            .client
            .pull_manifest_raw(reference, &self.auth, ACCEPT)
            .await
            .map_err(|e| self.fail(reference, "cannot fetch manifest", e))?;
        let bytes = bytes.to_vec();
        let media_type =
            media_type_of(&bytes).map_err(|e| self.fail(reference, "manifest is not JSON", e))?;

        let mut index = None;
        let (manifest_bytes, manifest) = if media_type == MEDIA_OCI_INDEX
            || media_type == MEDIA_DOCKER_LIST
        {
            let parsed = ImageIndex::from_reader(&bytes[..])
                .map_err(|e| self.fail(reference, "index is invalid", e))?;
            let (pos, entry) = select_platform(&parsed).ok_or_else(|| ImageError::Platform {
                reference: reference.whole(),
                platform: platform_name(),
            })?;
            let by_digest = Reference::with_digest(
                reference.registry().to_string(),
                reference.repository().to_string(),
                entry.digest().to_string(),
            );
            let (mbytes, mdigest) = self
                .client
                .pull_manifest_raw(&by_digest, &self.auth, ACCEPT)
                .await
                .map_err(|e| self.fail(reference, "cannot fetch platform manifest", e))?;
            let mbytes = mbytes.to_vec();
            let mtype = media_type_of(&mbytes)
                .map_err(|e| self.fail(reference, "manifest is not JSON", e))?;
            index = Some((
                Blob {
                    media_type: media_type.clone(),
                    size: bytes.len() as i64,
                    digest,
                },
                bytes,
                pos,
            ));
            let blob = Blob {
                media_type: mtype,
                size: mbytes.len() as i64,
                digest: mdigest,
            };
            (mbytes, blob)
        } else if media_type == MEDIA_OCI_MANIFEST || media_type == MEDIA_DOCKER_MANIFEST {
            let blob = Blob {
                media_type,
                size: bytes.len() as i64,
                digest,
            };
            (bytes, blob)
        } else {
            return Err(self.fail(reference, "unsupported manifest type", media_type));
        };

        let parsed = ImageManifest::from_reader(&manifest_bytes[..])
            .map_err(|e| self.fail(reference, "manifest is invalid", e))?;
        let config = Blob {
            media_type: parsed.config().media_type().to_string(),
            digest: parsed.config().digest().to_string(),
            size: parsed.config().size() as i64,
        };
        let mut config_bytes = Vec::with_capacity(config.size.max(0) as usize);
        self.client
            .pull_blob(reference, config.digest.as_str(), &mut config_bytes)
            .await
            .map_err(|e| self.fail(reference, "cannot fetch config", e))?;
        let image_config = ImageConfiguration::from_reader(&config_bytes[..])
            .map_err(|e| self.fail(reference, "config is invalid", e))?;
        let layers = parsed
            .layers()
            .iter()
            .map(|l| Blob {
                media_type: l.media_type().to_string(),
                digest: l.digest().to_string(),
                size: l.size() as i64,
            })
            .collect::<Vec<_>>();
        if layers.len() != image_config.rootfs().diff_ids().len() {
            return Err(self.fail(
                reference,
                "manifest and config disagree",
                format!(
                    "{} layers but {} diff ids",
                    layers.len(),
                    image_config.rootfs().diff_ids().len()
                ),
            ));
        }
        Ok(Resolved {
            index,
            manifest,
            manifest_bytes,
            config,
            config_bytes,
            image_config,
            layers,
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

/// Media type from the document itself; OCI lets it be absent, in which
/// case the shape tells.
fn media_type_of(bytes: &[u8]) -> Result<String, serde_json::Error> {
    let v: serde_json::Value = serde_json::from_slice(bytes)?;
    if let Some(t) = v.get("mediaType").and_then(|t| t.as_str()) {
        return Ok(t.to_string());
    }
    Ok(if v.get("manifests").is_some() {
        MEDIA_OCI_INDEX
    } else {
        MEDIA_OCI_MANIFEST
    }
    .to_string())
}

/// GOARCH naming, as image indexes use it.
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

pub(crate) fn platform_name() -> String {
    format!("linux/{}", go_arch())
}

pub(crate) fn select_platform(index: &ImageIndex) -> Option<(usize, &oci_spec::image::Descriptor)> {
    index.manifests().iter().enumerate().find(|(_, d)| {
        d.platform().as_ref().is_some_and(|p| {
            p.os().to_string() == "linux" && p.architecture().to_string() == go_arch()
        })
    })
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

    #[test]
    fn media_type_detection() {
        assert_eq!(media_type_of(br#"{"mediaType":"x"}"#).unwrap(), "x");
        assert_eq!(
            media_type_of(br#"{"manifests":[]}"#).unwrap(),
            MEDIA_OCI_INDEX
        );
        assert_eq!(
            media_type_of(br#"{"layers":[]}"#).unwrap(),
            MEDIA_OCI_MANIFEST
        );
        assert!(media_type_of(b"nope").is_err());
    }

    #[test]
    fn picks_this_platform() {
        let json = format!(
            r#"{{"schemaVersion":2,"manifests":[
            {{"mediaType":"{MEDIA_OCI_MANIFEST}","digest":"sha256:{a}","size":1,"platform":{{"os":"windows","architecture":"{arch}"}}}},
            {{"mediaType":"{MEDIA_OCI_MANIFEST}","digest":"sha256:{b}","size":1,"platform":{{"os":"linux","architecture":"{arch}"}}}}]}}"#,
            a = "a".repeat(64),
            b = "b".repeat(64),
            arch = go_arch()
        );
        let index = ImageIndex::from_reader(json.as_bytes()).unwrap();
        let (pos, d) = select_platform(&index).unwrap();
        assert_eq!(pos, 1);
        assert!(d.digest().to_string().ends_with(&"b".repeat(64)));
    }
}
