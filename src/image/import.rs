//! Image import, for machines without registry access: an OCI image layout
//! as tar (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`, as `ctr images
//! export`, `skopeo copy … oci-archive:` and `docker save` from Docker 25
//! write it) into one containerd namespace's image store, the same way a
//! pull stores an image: blobs into the content store (containerd checks
//! every digest), layers through the diff service into committed snapshots,
//! the image record last, all under one lease.
//!
//! Also the other half of running imported images: reading an image back
//! from its record when its registry cannot be reached
//! ([`ImageService::local_fallback`]).
//!
//! And the one spool budget every import in progress shares
//! ([`SpoolBudget`]): the control service spools each archive to a file
//! under the state dir, and without a node-wide cap a few concurrent
//! imports of `max_import_bytes` each could fill the disk the store and the
//! input spool live on.
//!
//! Does not receive the archive (the control service spools it to a file)
//! and does not take legacy docker-archives (`manifest.json` only).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use containerd_client::services::v1::GetImageRequest;
use oci_client::Reference;
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tracing::{info, warn};

use super::registry::{self, Blob, Resolved, MEDIA_DOCKER_LIST, MEDIA_OCI_INDEX};
use super::{content, unpack, Image, ImageError, ImageService};
use crate::containerd::with_ns;

/// Largest index, manifest or config read into memory.
const MAX_DOCUMENT: usize = 16 << 20;
/// The annotation `ctr images export` and `docker save` put the full name in.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The OCI annotation; skopeo and most tools put the name (or a tag) here.
const OCI_REF_NAME: &str = "org.opencontainers.image.ref.name";
const READ_CHUNK: usize = 1 << 20;

/// Why an archive could not be imported.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ImportError {
    /// cannot read the archive {path}: {source}
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// the archive is not a readable tar: {0}
    Tar(String),
    /// the archive is a legacy docker-archive (manifest.json without index.json), which is not supported: write an OCI archive instead (`skopeo copy docker-archive:IN oci-archive:OUT:NAME`, or `docker save` of Docker 25 or later)
    DockerArchive,
    /// the archive has no index.json: it is not an OCI image layout
    NotOciLayout,
    /// {what} in the archive is invalid: {reason}
    Invalid { what: String, reason: String },
    /// blob {digest} that {by} refers to is not in the archive
    MissingBlob { digest: String, by: String },
    /// the archive names no image: no entry of index.json has an org.opencontainers.image.ref.name or io.containerd.image.name annotation
    NoName,
    /// image name {name:?} in the archive is not a valid reference: {reason}
    Name { name: String, reason: String },
    /// {name} in the archive has no image for {platform}
    Platform { name: String, platform: String },
    /// containerd failed to {what}: {reason}
    Containerd { what: String, reason: String },
    /// cannot unpack {name}: {reason}
    Unpack { name: String, reason: String },
}

/// The bytes all imports in progress may spool together (issue 13):
/// `max_import_bytes`, the same as one archive may have, so the state dir's
/// disk sees at most that much of imports at any time, however many run.
pub struct SpoolBudget {
    limit: u64,
    used: Arc<AtomicU64>,
}

/// One import's share of the [`SpoolBudget`], given back when dropped (once
/// its spool file is removed), so no path can leak it.
#[must_use = "the share is given back when dropped"]
pub struct SpoolHold {
    used: Arc<AtomicU64>,
    held: u64,
}

impl SpoolBudget {
    pub fn new(limit: u64) -> Self {
        SpoolBudget {
            limit,
            used: Arc::default(),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// An empty share, grown as the archive arrives.
    pub fn hold(&self) -> SpoolHold {
        SpoolHold {
            used: self.used.clone(),
            held: 0,
        }
    }

    /// Grows `hold` by `bytes`, or says how much all imports hold when that
    /// would pass the limit. Check and take are one atomic step.
    pub fn grow(&self, hold: &mut SpoolHold, bytes: u64) -> Result<(), u64> {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| {
                u.checked_add(bytes).filter(|&n| n <= self.limit)
            })
            .map(|_| hold.held += bytes)
    }

    /// Bytes spooled by all imports in progress.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }
}

impl Drop for SpoolHold {
    fn drop(&mut self) {
        self.used.fetch_sub(self.held, Ordering::SeqCst);
    }
}

/// Where each file of the archive is: data offset and size.
#[derive(Default)]
struct Listing {
    files: HashMap<String, (u64, u64)>,
}

impl Listing {
    /// Reads only the tar headers, seeking over the data.
    fn scan(path: &Path) -> Result<Listing, ImportError> {
        let file = std::fs::File::open(path).map_err(|source| ImportError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut archive = tar::Archive::new(file);
        let mut listing = Listing::default();
        let tar_err = |e: std::io::Error| ImportError::Tar(e.to_string());
        for entry in archive.entries_with_seek().map_err(tar_err)? {
            let entry = entry.map_err(tar_err)?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = entry.path().map_err(tar_err)?.display().to_string();
            let name = name.trim_start_matches("./").to_string();
            listing
                .files
                .insert(name, (entry.raw_file_position(), entry.size()));
        }
        Ok(listing)
    }

    fn blob_path(digest: &str) -> String {
        let (alg, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
        format!("blobs/{alg}/{hex}")
    }

    fn find_blob(&self, digest: &str, by: &str) -> Result<(u64, u64), ImportError> {
        self.files
            .get(&Self::blob_path(digest))
            .copied()
            .ok_or_else(|| ImportError::MissingBlob {
                digest: digest.to_string(),
                by: by.to_string(),
            })
    }
}

/// Reads a small file of the archive into memory.
fn read_region(
    path: &Path,
    (offset, size): (u64, u64),
    what: &str,
) -> Result<Vec<u8>, ImportError> {
    if size > MAX_DOCUMENT as u64 {
        return Err(ImportError::Invalid {
            what: what.to_string(),
            reason: format!("{size} bytes is more than a document may have"),
        });
    }
    let io = |source| ImportError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    f.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut buf = vec![0; size as usize];
    f.read_exact(&mut buf).map_err(io)?;
    Ok(buf)
}

fn blob_of(d: &Descriptor) -> Blob {
    Blob {
        media_type: d.media_type().to_string(),
        digest: d.digest().to_string(),
        size: d.size() as i64,
    }
}

fn invalid(what: impl Into<String>) -> impl FnOnce(oci_spec::OciSpecError) -> ImportError {
    let what = what.into();
    move |e| ImportError::Invalid {
        what,
        reason: e.to_string(),
    }
}

/// The fully qualified name of one index.json entry, if it has one.
fn entry_name(d: &Descriptor) -> Option<Result<String, ImportError>> {
    let ann = d.annotations().as_ref()?;
    // containerd's full name first: next to it, ref.name is only the tag.
    let name = ann.get(CONTAINERD_NAME).or_else(|| ann.get(OCI_REF_NAME))?;
    Some(
        Reference::try_from(name.as_str())
            .map(|r| r.whole())
            .map_err(|e| ImportError::Name {
                name: name.clone(),
                reason: e.to_string(),
            }),
    )
}

fn is_index(media_type: &str) -> bool {
    media_type == MEDIA_OCI_INDEX || media_type == MEDIA_DOCKER_LIST
}

/// One image of the archive, resolved to this platform's manifest.
struct Entry {
    name: String,
    resolved: Resolved,
}

/// Resolves one index.json entry through a nested index if there is one.
fn resolve_entry(
    archive: &Path,
    listing: &Listing,
    name: String,
    d: &Descriptor,
) -> Result<Entry, ImportError> {
    let top = blob_of(d);
    let read = |blob: &Blob, what: &str| {
        read_region(archive, listing.find_blob(&blob.digest, what)?, what)
    };
    let mut index = None;
    let manifest = if is_index(&top.media_type) {
        let bytes = read(&top, &name)?;
        let parsed =
            ImageIndex::from_reader(&bytes[..]).map_err(invalid(format!("index of {name}")))?;
        let (pos, entry) =
            registry::select_platform(&parsed).ok_or_else(|| ImportError::Platform {
                name: name.clone(),
                platform: registry::platform_name(),
            })?;
        let m = blob_of(entry);
        index = Some((top, bytes, pos));
        m
    } else {
        top
    };
    let manifest_bytes = read(&manifest, &name)?;
    let parsed = ImageManifest::from_reader(&manifest_bytes[..])
        .map_err(invalid(format!("manifest of {name}")))?;
    let config = blob_of(parsed.config());
    let config_bytes = read(&config, &format!("the manifest of {name}"))?;
    let image_config = ImageConfiguration::from_reader(&config_bytes[..])
        .map_err(invalid(format!("config of {name}")))?;
    let layers: Vec<Blob> = parsed.layers().iter().map(blob_of).collect();
    if layers.len() != image_config.rootfs().diff_ids().len() {
        return Err(ImportError::Invalid {
            what: format!("image {name}"),
            reason: format!(
                "{} layers but {} diff ids",
                layers.len(),
                image_config.rootfs().diff_ids().len()
            ),
        });
    }
    for l in &layers {
        listing.find_blob(&l.digest, &format!("the manifest of {name}"))?;
    }
    Ok(Entry {
        name,
        resolved: Resolved {
            index,
            manifest,
            manifest_bytes,
            config,
            config_bytes,
            image_config,
            layers,
        },
    })
}

/// Reads index.json and resolves every named image in it.
fn plan(archive: &Path) -> Result<(Listing, Vec<Entry>), ImportError> {
    let listing = Listing::scan(archive)?;
    let Some(&region) = listing.files.get("index.json") else {
        return Err(if listing.files.contains_key("manifest.json") {
            ImportError::DockerArchive
        } else {
            ImportError::NotOciLayout
        });
    };
    let bytes = read_region(archive, region, "index.json")?;
    let index = ImageIndex::from_reader(&bytes[..]).map_err(invalid("index.json"))?;
    let mut entries = Vec::new();
    for d in index.manifests() {
        if let Some(name) = entry_name(d) {
            entries.push(resolve_entry(archive, &listing, name?, d)?);
        }
    }
    if entries.is_empty() {
        return Err(ImportError::NoName);
    }
    Ok((listing, entries))
}

impl ImageService {
    /// Imports every named image of the OCI archive at `archive` into
    /// containerd namespace `ns`; returns their names.
    pub async fn import(&self, ns: &str, archive: &Path) -> Result<Vec<String>, ImportError> {
        let path = archive.to_owned();
        let (listing, entries) = tokio::task::spawn_blocking(move || plan(&path))
            .await
            .map_err(|e| ImportError::Tar(format!("archive reader failed: {e}")))??;
        let cd_err = |what: &str| {
            let what = what.to_string();
            move |e: tonic::Status| ImportError::Containerd {
                what,
                reason: e.message().to_string(),
            }
        };
        let lease = self.cd.lease(ns).await.map_err(cd_err("create a lease"))?;
        let result = async {
            let mut names = Vec::new();
            for entry in &entries {
                self.import_one(ns, &lease, archive, &listing, entry).await?;
                self.forget(ns, &entry.name);
                info!(namespace = ns, image = %entry.name, digest = %entry.resolved.manifest.digest, "image imported");
                names.push(entry.name.clone());
            }
            Ok(names)
        }
        .await;
        self.cd.drop_lease(ns, &lease).await;
        result
    }

    async fn import_one(
        &self,
        ns: &str,
        lease: &str,
        archive: &Path,
        listing: &Listing,
        entry: &Entry,
    ) -> Result<(), ImportError> {
        let r = &entry.resolved;
        let cd_err = |what: String| {
            move |e: tonic::Status| ImportError::Containerd {
                what,
                reason: e.message().to_string(),
            }
        };
        content::write_bytes(&self.cd, ns, lease, &r.config, &r.config_bytes)
            .await
            .map_err(cd_err(format!("store the config of {}", entry.name)))?;
        let diff_ids: Vec<String> = r.image_config.rootfs().diff_ids().to_vec();
        let chains = unpack::chain_ids(&diff_ids);
        let target = unpack::Target {
            cd: &self.cd,
            ns,
            lease,
            snapshotter: &self.snapshotter,
        };
        unpack::unpack_chain(&target, &r.layers, &diff_ids, &chains, |layer| {
            let region = listing.find_blob(&layer.digest, &entry.name);
            async move {
                let region = region?;
                region_stream(archive, region)
                    .await
                    .map_err(|source| ImportError::Io {
                        path: archive.to_owned(),
                        source,
                    })
            }
        })
        .await
        .map_err(|e| match e {
            unpack::LayerError::Source(e) => e,
            unpack::LayerError::Store(reason) => ImportError::Unpack {
                name: entry.name.clone(),
                reason,
            },
        })?;
        self.record(
            ns,
            lease,
            &entry.name,
            r,
            chains.last(),
            super::Source::Imported,
        )
        .await
        .map_err(cd_err(format!("record image {}", entry.name)))
    }

    /// An image of namespace `ns` read back from its record, for when its
    /// registry does not answer: the record, the manifest and config it
    /// points to, and the committed snapshot chain must all be there.
    /// Otherwise `unreachable` (the registry's error) is what the action
    /// gets, since that is what kept it from running.
    pub(crate) async fn local_fallback(
        &self,
        ns: &str,
        reference: &Reference,
        unreachable: ImageError,
    ) -> Result<Image, ImageError> {
        let name = reference.whole();
        match self.load_local(ns, &name).await {
            Ok(Some(image)) => {
                warn!(image = %name, error = %unreachable, "registry unreachable, running the image already in the namespace");
                Ok(image)
            }
            // Nothing here either: most often a typo'd name or the wrong
            // namespace, which "cannot reach the registry" hides.
            Ok(None) => Err(match unreachable {
                ImageError::Unreachable { reference, reason } => ImageError::NotHere {
                    reference,
                    namespace: ns.to_string(),
                    reason,
                },
                other => other,
            }),
            Err(e) => {
                warn!(image = %name, error = %e, "registry unreachable and the local image is not usable");
                Err(unreachable)
            }
        }
    }

    async fn load_local(&self, ns: &str, name: &str) -> Result<Option<Image>, String> {
        let get = GetImageRequest {
            name: name.to_string(),
        };
        let record = match self.cd.images().get(with_ns(get, ns, None)).await {
            Ok(r) => r.into_inner().image,
            Err(e) if e.code() == tonic::Code::NotFound => return Ok(None),
            Err(e) => return Err(format!("get image record: {}", e.message())),
        };
        let Some(target) = record.and_then(|r| r.target) else {
            return Ok(None);
        };
        let read = |digest: String| async move {
            content::read_all(&self.cd, ns, &digest, MAX_DOCUMENT)
                .await
                .map_err(|e| format!("read {digest}: {}", e.message()))
        };
        let resolved_digest = target.digest.clone();
        let mut manifest_digest = target.digest.clone();
        let mut bytes = read(target.digest.clone()).await?;
        if is_index(&target.media_type) {
            let index = ImageIndex::from_reader(&bytes[..]).map_err(|e| e.to_string())?;
            let (_, d) = registry::select_platform(&index)
                .ok_or_else(|| format!("no image for {}", registry::platform_name()))?;
            manifest_digest = d.digest().to_string();
            bytes = read(manifest_digest.clone()).await?;
        }
        let manifest = ImageManifest::from_reader(&bytes[..]).map_err(|e| e.to_string())?;
        let config_bytes = read(manifest.config().digest().to_string()).await?;
        let config =
            ImageConfiguration::from_reader(&config_bytes[..]).map_err(|e| e.to_string())?;
        let chains = unpack::chain_ids(config.rootfs().diff_ids());
        if let Some(top) = chains.last() {
            let there = unpack::snapshot_exists(&self.cd, ns, &self.snapshotter, top)
                .await
                .map_err(|e| e.message().to_string())?;
            if !there {
                return Err(format!("snapshot {top} is not unpacked"));
            }
        }
        Ok(Some(Image {
            name: name.to_string(),
            resolved_digest,
            manifest_digest,
            config,
            top_chain: chains.last().cloned(),
        }))
    }
}

/// A file region as a stream of chunks, for the content writer.
async fn region_stream(
    path: &Path,
    (offset, size): (u64, u64),
) -> std::io::Result<impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Unpin> {
    let mut f = tokio::fs::File::open(path).await?;
    f.seek(SeekFrom::Start(offset)).await?;
    let reader = f.take(size);
    Ok(Box::pin(futures::stream::unfold(
        reader,
        |mut r| async move {
            let mut buf = vec![0u8; READ_CHUNK];
            match r.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(bytes::Bytes::from(buf)), r))
                }
                Err(e) => Some((Err(e), r)),
            }
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, &[u8])]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(f.reopen().unwrap());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.finish().unwrap();
        f
    }

    #[test]
    fn docker_archives_and_strangers_are_refused_clearly() {
        let docker = tar_of(&[("manifest.json", b"[]")]);
        assert!(matches!(
            plan(docker.path()),
            Err(ImportError::DockerArchive)
        ));
        let other = tar_of(&[("hello.txt", b"hi")]);
        assert!(matches!(plan(other.path()), Err(ImportError::NotOciLayout)));
        let junk = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(junk.path(), vec![7u8; 1500]).unwrap();
        assert!(plan(junk.path()).is_err());
    }

    #[test]
    fn imports_share_one_spool_budget() {
        let budget = SpoolBudget::new(100);
        let mut a = budget.hold();
        let mut b = budget.hold();
        budget.grow(&mut a, 60).unwrap();
        assert_eq!(budget.grow(&mut b, 41), Err(60));
        budget.grow(&mut b, 40).unwrap();
        assert_eq!(budget.grow(&mut a, 1), Err(100));
        drop(a);
        assert_eq!(budget.used(), 40);
        budget.grow(&mut b, 60).unwrap();
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn unnamed_and_missing_blobs() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let unnamed = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":2}}]}}"#
        );
        let t = tar_of(&[("oci-layout", b"{}"), ("index.json", unnamed.as_bytes())]);
        assert!(matches!(plan(t.path()), Err(ImportError::NoName)));
        let named = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":2,"annotations":{{"org.opencontainers.image.ref.name":"demo/echo:1"}}}}]}}"#
        );
        let t = tar_of(&[("./index.json", named.as_bytes())]);
        match plan(t.path()) {
            Err(ImportError::MissingBlob { digest: d, by }) => {
                assert_eq!(d, digest);
                assert_eq!(by, "docker.io/demo/echo:1");
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("planned an archive without blobs"),
        }
    }
}
