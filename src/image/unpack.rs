//! Turning layers into committed snapshots, the way containerd's own
//! unpacker does: one snapshot per chain id, each prepared on its parent,
//! filled by the diff service and committed under the chain id.
//!
//! A chain already committed is skipped without fetching its layer at all,
//! which makes a warm unpack a handful of `Stat` calls.

use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::ApplyRequest;
use sha2::{Digest, Sha256};
use tonic::Code;

use super::content;
use super::registry::Blob;
use crate::containerd::{with_ns, Containerd};

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

/// Whether a committed snapshot named `key` exists.
pub async fn snapshot_exists(
    cd: &Containerd,
    ns: &str,
    snapshotter: &str,
    key: &str,
) -> Result<bool, tonic::Status> {
    let req = StatSnapshotRequest {
        snapshotter: snapshotter.to_string(),
        key: key.to_string(),
    };
    match cd.snapshots().stat(with_ns(req, ns, None)).await {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Code::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Why one layer could not be applied.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum UnpackError {
    /// containerd refused to {what} layer {layer}: {status}
    Containerd {
        what: &'static str,
        layer: String,
        status: String,
    },
    /// layer {layer} unpacked to {got}, but the image config says {want}
    DiffId {
        layer: String,
        got: String,
        want: String,
    },
}

/// Where layers are unpacked: one namespace's snapshotter, under a lease.
pub struct Target<'a> {
    pub cd: &'a Containerd,
    pub ns: &'a str,
    pub lease: &'a str,
    pub snapshotter: &'a str,
}

/// Applies one layer blob (already in the content store) on `parent` and
/// commits it as `chain_id`. Another pull committing the same chain first
/// is success, not an error.
pub async fn apply_layer(
    t: &Target<'_>,
    layer: &super::registry::Blob,
    diff_id: &str,
    chain_id: &str,
    parent: Option<&str>,
) -> Result<(), UnpackError> {
    let Target {
        cd,
        ns,
        lease,
        snapshotter,
    } = *t;
    let fail = |what: &'static str, s: tonic::Status| UnpackError::Containerd {
        what,
        layer: layer.digest.clone(),
        status: s.message().to_string(),
    };
    let key = format!("extract-{:016x} {chain_id}", rand::random::<u64>());
    let prepare = PrepareSnapshotRequest {
        snapshotter: snapshotter.to_string(),
        key: key.clone(),
        parent: parent.unwrap_or_default().to_string(),
        labels: [(
            "containerd.io/snapshot.ref".to_string(),
            chain_id.to_string(),
        )]
        .into(),
    };
    let mounts = match cd
        .snapshots()
        .prepare(with_ns(prepare, ns, Some(lease)))
        .await
    {
        Ok(r) => r.into_inner().mounts,
        Err(e) if e.code() == Code::AlreadyExists => return Ok(()),
        Err(e) => return Err(fail("prepare a snapshot for", e)),
    };
    let result = async {
        let apply = ApplyRequest {
            diff: Some(layer.descriptor()),
            mounts,
            ..Default::default()
        };
        let applied = cd
            .diff()
            .apply(with_ns(apply, ns, Some(lease)))
            .await
            .map_err(|e| fail("apply", e))?
            .into_inner()
            .applied
            .map(|d| d.digest)
            .unwrap_or_default();
        if applied != diff_id {
            return Err(UnpackError::DiffId {
                layer: layer.digest.clone(),
                got: applied,
                want: diff_id.to_string(),
            });
        }
        let commit = CommitSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            name: chain_id.to_string(),
            key: key.clone(),
            labels: Default::default(),
        };
        match cd
            .snapshots()
            .commit(with_ns(commit, ns, Some(lease)))
            .await
        {
            Ok(_) => Ok(()),
            // Another pull committed the same chain first: same content.
            Err(e) if e.code() == Code::AlreadyExists => Ok(()),
            Err(e) => Err(fail("commit", e)),
        }
    }
    .await;
    if result.is_err()
        || snapshot_exists(cd, ns, snapshotter, &key)
            .await
            .unwrap_or(false)
    {
        // Failed, or lost the race to another commit: the extract snapshot
        // is ours alone to remove.
        let remove = RemoveSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            key,
        };
        let _ = cd
            .snapshots()
            .remove(with_ns(remove, ns, Some(lease)))
            .await;
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
        let store = |e: tonic::Status| LayerError::Store(e.message().to_string());
        if snapshot_exists(t.cd, t.ns, t.snapshotter, &chains[i])
            .await
            .map_err(store)?
        {
            continue;
        }
        if !content::exists(t.cd, t.ns, &layer.digest)
            .await
            .map_err(store)?
        {
            let stream = open(layer.clone()).await.map_err(LayerError::Source)?;
            content::write(t.cd, t.ns, t.lease, layer, stream)
                .await
                .map_err(|e| {
                    LayerError::Store(format!("storing layer {}: {}", layer.digest, e.message()))
                })?;
            fetched += layer.size.max(0) as u64;
        }
        let parent = i.checked_sub(1).map(|p| chains[p].as_str());
        apply_layer(t, layer, &diff_ids[i], &chains[i], parent)
            .await
            .map_err(|e| LayerError::Store(e.to_string()))?;
    }
    Ok(fetched)
}
