//! The one resolution of an image's documents (issue 12): from the document
//! a name points at (an index or a manifest), through this platform's
//! manifest, to the config and the layers, with the same checks for a pull
//! (documents from the registry), an import (from the archive) and the
//! offline fallback (from the namespace's content store): the platform is
//! chosen one way, media types are told one way, and a manifest whose
//! layers and config disagree is refused everywhere.
//!
//! Owns the parsing and those checks. Where the bytes come from, and what a
//! failure is called for its caller, is the caller's.

use std::future::Future;

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};

use crate::engine::store::Blob;

pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// What resolution found: the raw documents (stored byte for byte, so
/// their digests hold) and the parsed pieces the unpacker needs.
#[derive(Debug)]
pub struct Resolved {
    /// The index the name pointed at, if it was one, and which of its
    /// entries was chosen.
    pub index: Option<(Blob, Vec<u8>, usize)>,
    pub manifest: Blob,
    pub manifest_bytes: Vec<u8>,
    pub config: Blob,
    pub config_bytes: Vec<u8>,
    pub image_config: ImageConfiguration,
    pub layers: Vec<Blob>,
}

/// Which document a source is asked for: a registry fetches manifests and
/// blobs from different endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Doc {
    Manifest,
    Config,
}

/// Why the documents do not make an image for this machine.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ResolveError<E: std::fmt::Display> {
    /// {0}
    Source(E),
    /// the {what} is invalid: {reason}
    Invalid { what: &'static str, reason: String },
    /// no image for {platform}
    Platform { platform: String },
    /// unsupported manifest type {0:?}
    Unsupported(String),
    /// manifest and config disagree: {layers} layers but {diff_ids} diff ids
    Mismatch { layers: usize, diff_ids: usize },
}

/// Resolves `top` (its bytes already read) to this platform's image,
/// reading the platform manifest (behind an index) and the config with
/// `read`.
pub async fn resolve<E, F, Fut>(
    top: Blob,
    top_bytes: Vec<u8>,
    mut read: F,
) -> Result<Resolved, ResolveError<E>>
where
    E: std::fmt::Display,
    F: FnMut(Doc, Blob) -> Fut,
    Fut: Future<Output = Result<Vec<u8>, E>>,
{
    let top = typed(top, &top_bytes)?;
    let mut index = None;
    let (manifest, manifest_bytes) = if is_index(&top.media_type) {
        let parsed = ImageIndex::from_reader(&top_bytes[..]).map_err(|e| invalid("index", e))?;
        let (pos, entry) = select_platform(&parsed).ok_or_else(|| ResolveError::Platform {
            platform: platform_name(),
        })?;
        let entry = blob_of(entry);
        let bytes = read(Doc::Manifest, entry.clone())
            .await
            .map_err(ResolveError::Source)?;
        let entry = typed(entry, &bytes)?;
        index = Some((top, top_bytes, pos));
        (entry, bytes)
    } else {
        (top, top_bytes)
    };
    if !is_manifest(&manifest.media_type) {
        return Err(ResolveError::Unsupported(manifest.media_type));
    }
    let parsed =
        ImageManifest::from_reader(&manifest_bytes[..]).map_err(|e| invalid("manifest", e))?;
    let config = blob_of(parsed.config());
    let config_bytes = read(Doc::Config, config.clone())
        .await
        .map_err(ResolveError::Source)?;
    let image_config =
        ImageConfiguration::from_reader(&config_bytes[..]).map_err(|e| invalid("config", e))?;
    let layers: Vec<Blob> = parsed.layers().iter().map(blob_of).collect();
    let diff_ids = image_config.rootfs().diff_ids().len();
    if layers.len() != diff_ids {
        return Err(ResolveError::Mismatch {
            layers: layers.len(),
            diff_ids,
        });
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

fn invalid<E: std::fmt::Display>(what: &'static str, e: impl std::fmt::Display) -> ResolveError<E> {
    ResolveError::Invalid {
        what,
        reason: e.to_string(),
    }
}

/// The blob with its media type, from the document itself where the
/// descriptor did not say (a registry's answer to a tag).
fn typed<E: std::fmt::Display>(mut blob: Blob, bytes: &[u8]) -> Result<Blob, ResolveError<E>> {
    if blob.media_type.is_empty() {
        blob.media_type = media_type_of(bytes).map_err(|e| invalid("manifest", e))?;
    }
    Ok(blob)
}

pub fn blob_of(d: &oci_spec::image::Descriptor) -> Blob {
    Blob {
        media_type: d.media_type().to_string(),
        digest: d.digest().to_string(),
        size: d.size() as i64,
    }
}

pub fn is_index(media_type: &str) -> bool {
    media_type == MEDIA_OCI_INDEX || media_type == MEDIA_DOCKER_LIST
}

fn is_manifest(media_type: &str) -> bool {
    media_type == MEDIA_OCI_MANIFEST || media_type == MEDIA_DOCKER_MANIFEST
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

pub fn platform_name() -> String {
    format!("linux/{}", go_arch())
}

pub fn select_platform(index: &ImageIndex) -> Option<(usize, &oci_spec::image::Descriptor)> {
    index.manifests().iter().enumerate().find(|(_, d)| {
        d.platform().as_ref().is_some_and(|p| {
            p.os().to_string() == "linux" && p.architecture().to_string() == go_arch()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

    fn digest(tag: char) -> String {
        format!("sha256:{}", tag.to_string().repeat(64))
    }

    fn config(diff_ids: usize) -> Vec<u8> {
        let ids: Vec<String> = (0..diff_ids).map(|_| digest('d')).collect();
        serde_json::to_vec(&serde_json::json!({
            "architecture": go_arch(), "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": ids},
        }))
        .unwrap()
    }

    fn manifest(layers: usize, media: Option<&str>) -> Vec<u8> {
        let layers: Vec<_> = (0..layers)
            .map(|_| serde_json::json!({"mediaType": LAYER, "digest": digest('1'), "size": 3}))
            .collect();
        let mut m = serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": CONFIG, "digest": digest('c'), "size": 10},
            "layers": layers,
        });
        if let Some(media) = media {
            m["mediaType"] = serde_json::json!(media);
        }
        serde_json::to_vec(&m).unwrap()
    }

    fn index(arch: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX,
            "manifests": [
                {"mediaType": MEDIA_OCI_MANIFEST, "digest": digest('e'), "size": 5,
                 "platform": {"os": "linux", "architecture": "s390x-not-this"}},
                {"mediaType": MEDIA_OCI_MANIFEST, "digest": digest('a'), "size": 5,
                 "platform": {"os": "linux", "architecture": arch}},
            ],
        }))
        .unwrap()
    }

    /// A source of documents by digest; records what it was asked for.
    fn source(
        docs: HashMap<String, Vec<u8>>,
    ) -> impl FnMut(Doc, Blob) -> std::future::Ready<Result<Vec<u8>, String>> {
        move |_, blob| {
            std::future::ready(
                docs.get(&blob.digest)
                    .cloned()
                    .ok_or_else(|| format!("no {}", blob.digest)),
            )
        }
    }

    fn untyped(tag: char) -> Blob {
        Blob {
            media_type: String::new(),
            digest: digest(tag),
            size: 1,
        }
    }

    #[tokio::test]
    async fn an_index_resolves_to_this_platforms_manifest() {
        let docs = HashMap::from([(digest('a'), manifest(2, None)), (digest('c'), config(2))]);
        let r = resolve(untyped('9'), index(go_arch()), source(docs))
            .await
            .unwrap();
        let (blob, _, pos) = r.index.unwrap();
        assert_eq!(
            blob.media_type, MEDIA_OCI_INDEX,
            "sniffed from the document"
        );
        assert_eq!(pos, 1);
        assert_eq!(r.manifest.digest, digest('a'));
        assert_eq!(r.config.digest, digest('c'));
        assert_eq!(r.layers.len(), 2);
    }

    #[tokio::test]
    async fn a_manifest_without_a_media_type_is_told_by_its_shape() {
        let docs = HashMap::from([(digest('c'), config(1))]);
        let r = resolve(untyped('a'), manifest(1, None), source(docs))
            .await
            .unwrap();
        assert!(r.index.is_none());
        assert_eq!(r.manifest.media_type, MEDIA_OCI_MANIFEST);
    }

    #[tokio::test]
    async fn wrong_platform_unsupported_type_and_disagreement_are_refused() {
        let e = resolve(untyped('9'), index("not-this-arch"), source(HashMap::new()))
            .await
            .unwrap_err();
        assert!(matches!(e, ResolveError::Platform { .. }), "{e}");

        let e = resolve(
            untyped('a'),
            manifest(1, Some("application/vnd.example.other+json")),
            source(HashMap::new()),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ResolveError::Unsupported(_)), "{e}");

        let docs = HashMap::from([(digest('c'), config(1))]);
        let e = resolve(untyped('a'), manifest(2, None), source(docs))
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "manifest and config disagree: 2 layers but 1 diff ids"
        );

        let e = resolve(untyped('a'), manifest(1, None), source(HashMap::new()))
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), format!("no {}", digest('c')));

        let e = resolve(untyped('a'), b"{not json".to_vec(), source(HashMap::new()))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                ResolveError::Invalid {
                    what: "manifest",
                    ..
                }
            ),
            "{e}"
        );
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
