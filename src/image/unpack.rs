//! Turning layers into committed snapshots, the way containerd's own
//! unpacker does: one snapshot per chain id, each prepared on its parent,
//! filled by the diff service and committed under the chain id.
//!
//! A chain already committed is skipped without fetching its layer at all,
//! which makes a warm unpack a handful of `Stat` calls.

use sha2::{Digest, Sha256};

use crate::engine::store::{Blob, ImageStore};
use crate::engine::EngineError;

/// The OCI chain ids of a list of diff ids: the first is the first diff id,
/// each next one is `sha256(parent + " " + diff_id)`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(parent) => {
                let h = Sha256::digest(format!("{parent} {diff}").as_bytes());
                format!("sha256:{}", hex(&h))
            }
        };
        out.push(next);
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Why one layer could not be applied.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum UnpackError {
    /// layer {layer}: {source}
    Containerd { layer: String, source: EngineError },
    /// layer {layer} unpacked to {got}, but the image config says {want}
    DiffId {
        layer: String,
        got: String,
        want: String,
    },
}

/// Where layers are unpacked: one namespace's snapshotter, under a lease.
pub struct Target<'a> {
    pub store: &'a ImageStore,
    pub ns: &'a str,
    pub lease: &'a str,
    pub snapshotter: &'a str,
}

/// Applies one layer blob (already in the content store) on `parent` and
/// commits it as `chain_id`. Another pull committing the same chain first
/// is success, not an error.
pub async fn apply_layer(
    t: &Target<'_>,
    layer: &Blob,
    diff_id: &str,
    chain_id: &str,
    parent: Option<&str>,
) -> Result<(), UnpackError> {
    let Target {
        store,
        ns,
        lease,
        snapshotter,
    } = *t;
    let fail = |source: EngineError| UnpackError::Containerd {
        layer: layer.digest.clone(),
        source,
    };
    let key = format!("extract-{:016x} {chain_id}", rand::random::<u64>());
    let mounts = match store
        .prepare_extract(
            ns,
            lease,
            snapshotter,
            &key,
            parent.unwrap_or_default(),
            chain_id,
        )
        .await
    {
        Ok(mounts) => mounts,
        Err(e) if e.is_already_exists() => return Ok(()),
        Err(e) => return Err(fail(e)),
    };
    let result = async {
        let applied = store.apply(ns, lease, layer, mounts).await.map_err(fail)?;
        if applied != diff_id {
            return Err(UnpackError::DiffId {
                layer: layer.digest.clone(),
                got: applied,
                want: diff_id.to_string(),
            });
        }
        match store.commit(ns, lease, snapshotter, &key, chain_id).await {
            // Another pull committed the same chain first: same content.
            Err(e) if !e.is_already_exists() => Err(fail(e)),
            _ => Ok(()),
        }
    }
    .await;
    if result.is_err()
        || store
            .has_snapshot(ns, snapshotter, &key)
            .await
            .unwrap_or(false)
    {
        // Failed, or lost the race to another commit: the extract snapshot
        // is ours alone to remove.
        let _ = store.remove_extract(ns, lease, snapshotter, &key).await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        let want = format!(
            "sha256:{}",
            hex(&Sha256::digest(format!("{a} {b}").as_bytes()))
        );
        assert_eq!(ids[1], want);
        assert!(chain_ids(&[]).is_empty());
    }
}

/// Why a layer of a chain could not be unpacked: its source failed (the
/// registry, the archive), or containerd did.
#[derive(Debug)]
pub enum LayerError<E> {
    Source(E),
    Store(String),
}

/// The one unpack loop of pulls and imports alike (issue 12): for each
/// layer whose chain is not committed yet, its blob is written into the
/// content store from `open` unless it is there already, then applied on
/// the chain below and committed. A chain already unpacked costs one stat
/// and no fetch. Returns the bytes that were fetched.
pub async fn unpack_chain<E, F, Fut, S>(
    t: &Target<'_>,
    layers: &[Blob],
    diff_ids: &[String],
    chains: &[String],
    mut open: F,
) -> Result<u64, LayerError<E>>
where
    F: FnMut(Blob) -> Fut,
    Fut: std::future::Future<Output = Result<S, E>>,
    S: futures::Stream<Item = std::io::Result<bytes::Bytes>> + Unpin,
{
    let mut fetched = 0u64;
    for (i, layer) in layers.iter().enumerate() {
        let store = |e: EngineError| LayerError::Store(e.to_string());
        if t.store
            .has_snapshot(t.ns, t.snapshotter, &chains[i])
            .await
            .map_err(store)?
        {
            continue;
        }
        if !t.store.has_blob(t.ns, &layer.digest).await.map_err(store)? {
            let stream = open(layer.clone()).await.map_err(LayerError::Source)?;
            t.store
                .write_blob(t.ns, t.lease, layer, stream)
                .await
                .map_err(|e| LayerError::Store(format!("storing layer {}: {e}", layer.digest)))?;
            fetched += layer.size.max(0) as u64;
        }
        let parent = i.checked_sub(1).map(|p| chains[p].as_str());
        apply_layer(t, layer, &diff_ids[i], &chains[i], parent)
            .await
            .map_err(|e| LayerError::Store(e.to_string()))?;
    }
    Ok(fetched)
}
