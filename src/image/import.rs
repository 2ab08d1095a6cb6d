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

use oci_client::Reference;
use oci_spec::image::{Descriptor, ImageIndex};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tracing::{info, warn};

use super::registry::Blob;
use super::resolve::{self, blob_of, ResolveError, Resolved};
use super::{unpack, Image, ImageError, ImageService};
use crate::engine::EngineError;

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

/// One image of the archive, resolved to this platform's manifest.
struct Entry {
    name: String,
    resolved: Resolved,
}

/// Resolves one index.json entry (`resolve`, the same as a pull), its
/// documents read from the archive; every layer must be in the archive too.
fn resolve_entry(
    archive: &Path,
    listing: &Listing,
    name: String,
    d: &Descriptor,
) -> Result<Entry, ImportError> {
    let top = blob_of(d);
    let read = |blob: &Blob| read_region(archive, listing.find_blob(&blob.digest, &name)?, &name);
    let top_bytes = read(&top)?;
    let resolved = futures::executor::block_on(resolve::resolve(top, top_bytes, |_, blob| {
        std::future::ready(read(&blob))
    }))
    .map_err(|e| match e {
        ResolveError::Source(e) => e,
        ResolveError::Platform { platform } => ImportError::Platform {
            name: name.clone(),
            platform,
        },
        other => ImportError::Invalid {
            what: format!("image {name}"),
            reason: other.to_string(),
        },
    })?;
    for l in &resolved.layers {
        listing.find_blob(&l.digest, &format!("the manifest of {name}"))?;
    }
    Ok(Entry { name, resolved })
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
        let lease = self
            .store
            .lease(ns)
            .await
            .map_err(|e| ImportError::Containerd {
                what: "create a lease".into(),
                reason: e.to_string(),
            })?;
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
        self.store.drop_lease(ns, &lease).await;
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
            move |e: EngineError| ImportError::Containerd {
                what,
                reason: e.to_string(),
            }
        };
        self.store
            .write_bytes(ns, lease, &r.config, &r.config_bytes)
            .await
            .map_err(cd_err(format!("store the config of {}", entry.name)))?;
        let diff_ids: Vec<String> = r.image_config.rootfs().diff_ids().to_vec();
        let chains = unpack::chain_ids(&diff_ids);
        let target = unpack::Target {
            store: &self.store,
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

    /// The image of record `name`, resolved from the namespace's content
    /// store as a pull resolves it from a registry; `None` when there is no
    /// record.
    async fn load_local(&self, ns: &str, name: &str) -> Result<Option<Image>, String> {
        let Some(target) = self
            .store
            .image_target(ns, name)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        let read = |blob: Blob| async move {
            self.store
                .read_blob(ns, &blob.digest, MAX_DOCUMENT)
                .await
                .map_err(|e| e.to_string())
        };
        let top_bytes = read(target.clone()).await?;
        let resolved_digest = target.digest.clone();
        let r = resolve::resolve(target, top_bytes, |_, blob| read(blob))
            .await
            .map_err(|e| e.to_string())?;
        let chains = unpack::chain_ids(r.image_config.rootfs().diff_ids());
        if let Some(top) = chains.last() {
            let there = self
                .store
                .has_snapshot(ns, &self.snapshotter, top)
                .await
                .map_err(|e| e.to_string())?;
            if !there {
                return Err(format!("snapshot {top} is not unpacked"));
            }
        }
        Ok(Some(Image {
            name: name.to_string(),
            resolved_digest,
            manifest_digest: r.manifest.digest,
            config: r.image_config,
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
