//! Images: from a reference and a tenant's credentials to a committed
//! snapshot chain in the tenant's containerd namespace.
//!
//! Owns the per-namespace cache (every reference, tag or digest, is checked
//! against its registry with the caller's credentials at least once per
//! `tag_ttl`, and the registry's answer stands: issue 13), the single
//! flight (concurrent requests for
//! one image in one namespace share one pull) and the pull itself, done the
//! way containerd's own client does it on 1.6 (CONTAINERD-NOTES.md): under
//! a lease, blobs through the content service, layers through the diff
//! service into snapshots, the image record last. Does not run anything.

pub mod auth;
pub mod import;
pub mod registry;
pub mod resolve;
pub mod unpack;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use oci_client::Reference;
use oci_spec::image::ImageConfiguration;
use tracing::{debug, info, info_span, warn, Instrument};

use self::auth::{Credentials, MalformedCredentials};
use self::registry::{Blob, Registry};
use crate::engine::store::ImageStore;
use crate::engine::EngineError;

/// Why an image could not be made ready. All but `Internal` are the
/// image's (or its registry's) fault and are reported with the image code.
#[derive(Debug, Clone, thiserror::Error, displaydoc::Display)]
pub enum ImageError {
    /// {0}
    Credentials(#[from] MalformedCredentials),
    /// cannot pull {reference}: {reason}
    Registry { reference: String, reason: String },
    /// cannot reach the registry of {reference}: {reason}
    Unreachable { reference: String, reason: String },
    /// no image {reference} in namespace {namespace}, and its registry did not answer: {reason}
    NotHere {
        reference: String,
        namespace: String,
        reason: String,
    },
    /// {reference} has no image for {platform}
    Platform { reference: String, platform: String },
    /// cannot unpack {reference}: {reason}
    Unpack { reference: String, reason: String },
    /// containerd failed while storing {reference}: {reason}
    Internal { reference: String, reason: String },
}

/// An image ready to run in one namespace.
#[derive(Debug, Clone)]
pub struct Image {
    /// The image record's name (the fully qualified reference).
    pub name: String,
    pub manifest_digest: String,
    pub config: ImageConfiguration,
    /// What the reference resolves to at the registry: the index's digest
    /// when it names one, else the manifest's. A re-check compares it.
    pub resolved_digest: String,
    /// Chain id of the top layer: the parent of every action's snapshot.
    /// `None` for an image without layers.
    pub top_chain: Option<String>,
}

struct Cached {
    image: Arc<Image>,
    /// When the registry last said yes to this image for each credential
    /// (by fingerprint; `None` is no credentials). A credential not here,
    /// or here for longer than the TTL, asks the registry again before the
    /// image runs: within one namespace a request without credentials (or
    /// with revoked ones) must not ride on another request's pull.
    checked: HashMap<Option<u64>, Instant>,
}

type Key = (String, String);
/// A pull in flight is shared only by requests with the same credentials:
/// one without them must not get what another's credentials fetched.
type FlightKey = (String, String, Option<u64>);
type Pull = Shared<BoxFuture<'static, Result<Arc<Image>, ImageError>>>;

/// Pulls and caches images for every namespace of one containerd.
pub struct ImageService {
    /// Every containerd call of pulls and imports.
    store: ImageStore,
    snapshotter: String,
    insecure: Vec<String>,
    tag_ttl: Duration,
    cache: Mutex<HashMap<Key, Cached>>,
    /// Keys credentials' fingerprints ([`Credentials::fingerprint`]).
    hasher: std::hash::RandomState,
    inflight: Mutex<HashMap<FlightKey, Pull>>,
}

impl ImageError {
    /// The error with the namespace named as its tenant knows it: this
    /// service works in containerd namespaces (issue 14: a typo'd image or
    /// a wrong namespace said "cannot reach the registry").
    pub fn in_namespace(self, namespace: &str) -> ImageError {
        match self {
            ImageError::NotHere {
                reference, reason, ..
            } => ImageError::NotHere {
                reference,
                namespace: namespace.to_string(),
                reason,
            },
            other => other,
        }
    }
}

/// What isolated records of where an image came from
/// ([`crate::engine::LABEL_IMAGE_SOURCE`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Pulled,
    Imported,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Pulled => "pulled",
            Source::Imported => "imported",
        }
    }
}

impl ImageService {
    pub fn new(
        store: ImageStore,
        snapshotter: String,
        insecure: Vec<String>,
        tag_ttl: Duration,
    ) -> Arc<Self> {
        Arc::new(ImageService {
            store,
            snapshotter,
            insecure,
            tag_ttl,
            cache: Mutex::new(HashMap::new()),
            hasher: std::hash::RandomState::new(),
            inflight: Mutex::new(HashMap::new()),
        })
    }

    /// Makes `reference` runnable in containerd namespace `ns`.
    pub async fn ensure(
        self: &Arc<Self>,
        ns: &str,
        reference: &Reference,
        registries: &HashMap<String, String>,
    ) -> Result<Arc<Image>, ImageError> {
        let creds = auth::lookup(registries, reference.registry())?;
        let key = (ns.to_string(), reference.whole());

        let fp = creds.as_ref().map(|c| c.fingerprint(&self.hasher));

        let cached = {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache
                .get(&key)
                .map(|c| (c.image.clone(), c.checked.get(&fp).map(Instant::elapsed)))
        };
        if let Some((image, age)) = cached {
            if age.is_some_and(|age| age < self.tag_ttl) {
                return Ok(image);
            }
            // Tag or digest, the registry has the last word once per TTL and
            // per credential: a tag may have moved or gone, a credential may
            // have been revoked or never been good (one HEAD request).
            let head = match Registry::new(reference, creds.clone(), &self.insecure) {
                Ok(registry) => registry.head(reference).await,
                Err(e) => Err(e),
            };
            match head {
                Ok(digest)
                    if digest == image.resolved_digest || digest == image.manifest_digest =>
                {
                    self.remember(&key, image.clone(), fp);
                    return Ok(image);
                }
                Ok(digest) => debug!(image = %key.1, %digest, "tag moved, pulling again"),
                Err(e @ ImageError::Unreachable { .. }) => {
                    // No answer at all: an edge box's registry comes and
                    // goes, and the image we have is this tenant's, so keep
                    // running it. Asked again one TTL later, not by every
                    // action meanwhile: an unreachable registry can take a
                    // connect timeout to say so.
                    warn!(image = %key.1, error = %e, "cannot re-resolve, the registry does not answer; using the cached image");
                    self.remember(&key, image.clone(), fp);
                    return Ok(image);
                }
                Err(e) => {
                    // An answer ("unauthorized", "denied", "not found")
                    // stands, whatever this namespace holds: the credential
                    // loses its mark, so it is asked again next time too.
                    warn!(image = %key.1, error = %e, "the registry refused the cached image");
                    self.unmark(&key, fp);
                    return Err(e);
                }
            }
        }

        let pull = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            inflight
                .entry((key.0.clone(), key.1.clone(), fp))
                .or_insert_with(|| {
                    let this = self.clone();
                    let (ns, reference) = (ns.to_string(), reference.clone());
                    let span = info_span!("pull", image = %key.1);
                    async move {
                        let result = match this.pull(&ns, &reference, creds).await {
                            // Offline: an image already in this namespace
                            // (imported, or pulled before a restart) still
                            // runs. Only when the registry did not answer at
                            // all: "unauthorized" or "not found" is the
                            // registry's word and stands, so a tenant without
                            // credentials never gets past it.
                            Err(e @ ImageError::Unreachable { .. }) => {
                                this.local_fallback(&ns, &reference, e).await
                            }
                            other => other,
                        }
                        .map(Arc::new);
                        let key = (ns, reference.whole());
                        if let Ok(image) = &result {
                            this.remember(&key, image.clone(), fp);
                        }
                        this.inflight
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&(key.0, key.1, fp));
                        result
                    }
                    .instrument(span)
                    .boxed()
                    .shared()
                })
                .clone()
        };
        pull.await
    }

    /// Puts `image` in `ns`'s cache under `reference`, as a pull would: for
    /// unit tests of the lifecycle, which has no registry.
    #[cfg(test)]
    pub fn cache_for_test(&self, ns: &str, reference: &Reference, image: Image) {
        self.remember(&(ns.to_string(), reference.whole()), Arc::new(image), None);
    }

    /// Whether `reference` was resolved in containerd namespace `ns` and is
    /// held here: what a balancer asks to prefer a node that has the image
    /// (issue 17). Memory only; the registry's answer at run time still
    /// decides whether it runs.
    pub fn is_cached(&self, ns: &str, reference: &Reference) -> bool {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&(ns.to_string(), reference.whole()))
    }

    /// Drops a cached image, so that the next `ensure` resolves it afresh
    /// (after an import replaced its record).
    pub fn forget(&self, ns: &str, name: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(ns.to_string(), name.to_string()));
    }

    /// Caches `image` under `key`, checked now for credential `fp`. A new
    /// image (the tag moved) drops every other credential's mark.
    fn remember(&self, key: &Key, image: Arc<Image>, fp: Option<u64>) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let entry = cache.entry(key.clone()).or_insert_with(|| Cached {
            image: image.clone(),
            checked: HashMap::new(),
        });
        if !Arc::ptr_eq(&entry.image, &image)
            && entry.image.manifest_digest != image.manifest_digest
        {
            entry.checked.clear();
        }
        entry.image = image;
        entry.checked.insert(fp, Instant::now());
    }

    /// The registry refused credential `fp`: it is asked again next time.
    fn unmark(&self, key: &Key, fp: Option<u64>) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = cache.get_mut(key) {
            entry.checked.remove(&fp);
            if entry.checked.is_empty() {
                cache.remove(key);
            }
        }
    }

    async fn pull(
        &self,
        ns: &str,
        reference: &Reference,
        creds: Option<Credentials>,
    ) -> Result<Image, ImageError> {
        let _timer = crate::metrics::timer(crate::metrics::Phase::Pull);
        let started = Instant::now();
        let registry = Registry::new(reference, creds, &self.insecure)?;
        let resolved = registry.resolve(reference).await?;
        let whole = reference.whole();
        // containerd away is the node's trouble (internal, retried); any
        // other refusal is the image's.
        let internal = |what: &str, e: EngineError| {
            let reason = format!("{what}: {e}");
            if e.is_unavailable() {
                ImageError::Internal {
                    reference: whole.clone(),
                    reason,
                }
            } else {
                ImageError::Unpack {
                    reference: whole.clone(),
                    reason,
                }
            }
        };

        let diff_ids: Vec<String> = resolved.image_config.rootfs().diff_ids().to_vec();
        let chains = unpack::chain_ids(&diff_ids);
        let lease = self
            .store
            .lease(ns)
            .await
            .map_err(|e| internal("create lease", e))?;
        let result = async {
            self.store
                .write_bytes(ns, &lease, &resolved.config, &resolved.config_bytes)
                .await
                .map_err(|e| internal("write config", e))?;

            let top_done = match chains.last() {
                Some(top) => self
                    .store
                    .has_snapshot(ns, &self.snapshotter, top)
                    .await
                    .map_err(|e| internal("stat snapshot", e))?,
                None => true,
            };
            if !top_done {
                self.unpack(
                    ns,
                    &lease,
                    reference,
                    &registry,
                    &resolved.layers,
                    &diff_ids,
                    &chains,
                )
                .await?;
            }
            self.record(ns, &lease, &whole, &resolved, chains.last(), Source::Pulled)
                .await
                .map_err(|e| internal("record image", e))
        }
        .await;
        self.store.drop_lease(ns, &lease).await;
        result?;

        info!(image = %whole, digest = %resolved.manifest.digest, layers = chains.len(),
              ms = started.elapsed().as_millis() as u64, "image ready");
        Ok(Image {
            name: whole,
            resolved_digest: resolved
                .index
                .as_ref()
                .map_or(&resolved.manifest.digest, |(blob, _, _)| &blob.digest)
                .clone(),
            manifest_digest: resolved.manifest.digest.clone(),
            config: resolved.image_config,
            top_chain: chains.last().cloned(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn unpack(
        &self,
        ns: &str,
        lease: &str,
        reference: &Reference,
        registry: &Registry,
        layers: &[Blob],
        diff_ids: &[String],
        chains: &[String],
    ) -> Result<(), ImageError> {
        let whole = reference.whole();
        let unpack_err = |reason: String| ImageError::Unpack {
            reference: whole.clone(),
            reason,
        };
        let target = unpack::Target {
            store: &self.store,
            ns,
            lease,
            snapshotter: &self.snapshotter,
        };
        let fetched = unpack::unpack_chain(&target, layers, diff_ids, chains, |layer| async move {
            registry.blob_stream(reference, &layer).await
        })
        .await
        .map_err(|e| match e {
            unpack::LayerError::Source(e) => e,
            unpack::LayerError::Store(reason) => unpack_err(reason),
        })?;
        crate::metrics::bytes_pulled(fetched as i64);
        Ok(())
    }

    /// Writes the manifest (and index), labels everything for the garbage
    /// collector, then creates or updates the image record, which from then
    /// on roots it all.
    async fn record(
        &self,
        ns: &str,
        lease: &str,
        name: &str,
        resolved: &resolve::Resolved,
        top_chain: Option<&String>,
        source: Source,
    ) -> Result<(), EngineError> {
        let store = &self.store;
        if let Some(top) = top_chain {
            let label = format!("containerd.io/gc.ref.snapshot.{}", self.snapshotter);
            store
                .label_blob(ns, &resolved.config.digest, [(label, top.clone())].into())
                .await?;
        }
        store
            .write_bytes(ns, lease, &resolved.manifest, &resolved.manifest_bytes)
            .await?;
        let mut labels: HashMap<String, String> = [(
            "containerd.io/gc.ref.content.config".to_string(),
            resolved.config.digest.clone(),
        )]
        .into();
        for (i, l) in resolved.layers.iter().enumerate() {
            labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.clone(),
            );
        }
        store
            .label_blob(ns, &resolved.manifest.digest, labels)
            .await?;

        let target = match &resolved.index {
            Some((blob, bytes, pos)) => {
                store.write_bytes(ns, lease, blob, bytes).await?;
                let label = format!("containerd.io/gc.ref.content.m.{pos}");
                store
                    .label_blob(
                        ns,
                        &blob.digest,
                        [(label, resolved.manifest.digest.clone())].into(),
                    )
                    .await?;
                blob
            }
            None => &resolved.manifest,
        };
        let labels = [(
            crate::engine::LABEL_IMAGE_SOURCE.to_string(),
            source.as_str().to_string(),
        )]
        .into();
        store.put_image(ns, lease, name, target, labels).await
    }
}
