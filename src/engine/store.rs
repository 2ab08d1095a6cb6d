//! The image side of the boundary to containerd (issue 12): the content
//! store (blobs written through the `Content.Write` stream, read back,
//! labelled for the garbage collector), the snapshots a layer is unpacked
//! into, the diff service that unpacks it, the image records and the leases
//! a pull or an import holds while it writes. Every call in its containerd
//! namespace, every failure classified into an [`EngineError`].
//!
//! Owns the requests' shape and nothing else: which blob, layer or record
//! comes when is `crate::image`'s. Unlike the lifecycle's calls this is a
//! concrete type, not part of the [`super::Engine`] trait: the image code
//! has no branch a fake containerd would reach that its unit tests (pure:
//! chain ids, resolution, archives) and the image trials (a real registry
//! and containerd) do not, and a fake content store would be a second
//! content store to keep true.

use std::collections::HashMap;
use std::time::Duration;

use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, CreateRequest, DeleteRequest, GetImageRequest, Image, Info,
    InfoRequest, ReadContentRequest, UpdateImageRequest, UpdateRequest, WriteAction,
    WriteContentRequest, WriteContentResponse,
};
use containerd_client::types::Descriptor;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use super::channel::{with_ns, Containerd};
use super::error::classify;
use super::{EngineError, Mount};

/// Chunk size of `Content.Write` messages: big enough to keep the call
/// count low, far below gRPC's message limit.
const CHUNK: usize = 1 << 20;

/// How long a lease lives if its holder dies before deleting it: a crash
/// between create and delete leaks nothing for longer than a day.
const LEASE_EXPIRY: Duration = Duration::from_secs(86400);

/// A blob as the content store knows it: what it is, its digest, its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub size: i64,
}

impl Blob {
    pub fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            annotations: Default::default(),
        }
    }
}

/// The writer's half of a `Content.Write` stream closed under us.
fn writer_closed(what: &'static str) -> EngineError {
    EngineError::Failed {
        what,
        code: Code::Internal,
        message: "the content writer closed".into(),
    }
}

/// containerd's content, snapshot, diff, image and lease services, through
/// the daemon's channel.
#[derive(Clone)]
pub struct ImageStore {
    cd: Containerd,
}

impl ImageStore {
    pub fn new(cd: Containerd) -> ImageStore {
        ImageStore { cd }
    }

    /// A lease that expires on its own after a day.
    pub async fn lease(&self, ns: &str) -> Result<String, EngineError> {
        let id = format!("isolated-{:016x}", rand::random::<u64>());
        let expire = humantime::format_rfc3339_seconds(std::time::SystemTime::now() + LEASE_EXPIRY)
            .to_string();
        let req = CreateRequest {
            id: id.clone(),
            labels: [("containerd.io/gc.expire".to_string(), expire)].into(),
        };
        self.cd
            .leases()
            .create(with_ns(req, ns, None))
            .await
            .map_err(classify("create a lease"))?;
        Ok(id)
    }

    /// Deletes a lease; failure only delays garbage collection (the lease
    /// expires on its own), so it is logged, not returned.
    pub async fn drop_lease(&self, ns: &str, lease: &str) {
        let req = DeleteRequest {
            id: lease.to_string(),
            sync: false,
        };
        if let Err(e) = self.cd.leases().delete(with_ns(req, ns, None)).await {
            if e.code() != Code::NotFound {
                tracing::warn!(lease, error = %e.message(), "cannot delete lease");
            }
        }
    }

    /// Whether the namespace holds the blob.
    pub async fn has_blob(&self, ns: &str, digest: &str) -> Result<bool, EngineError> {
        let req = InfoRequest {
            digest: digest.to_string(),
        };
        match self.cd.content().info(with_ns(req, ns, None)).await {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Code::NotFound => Ok(false),
            Err(e) => Err(EngineError::classify("read a blob's info", &e)),
        }
    }

    /// Writes `data` as `blob` under `lease`, or does nothing if it is
    /// there already. containerd checks the digest on commit, so what a
    /// registry or an archive sent is verified without hashing it here.
    pub async fn write_blob<S>(
        &self,
        ns: &str,
        lease: &str,
        blob: &Blob,
        mut data: S,
    ) -> Result<(), EngineError>
    where
        S: Stream<Item = std::io::Result<bytes::Bytes>> + Unpin,
    {
        const WHAT: &str = "write a blob";
        let (tx, rx) = mpsc::channel::<WriteContentRequest>(2);
        // A fresh ref per write: two pulls of images sharing a layer must
        // not collide on containerd's per-ref lock; a fresh ref also always
        // starts at offset zero, so the status answer's offset is not used.
        let write_ref = format!("isolated-{}-{:08x}", blob.digest, rand::random::<u32>());
        let mut client = self.cd.content();
        let call = client.write(with_ns(ReceiverStream::new(rx), ns, Some(lease)));
        let send = |req: WriteContentRequest| {
            let tx = tx.clone();
            async move { tx.send(req).await.map_err(|_| writer_closed(WHAT)) }
        };
        send(WriteContentRequest {
            action: WriteAction::Stat as i32,
            r#ref: write_ref.clone(),
            total: blob.size,
            expected: blob.digest.clone(),
            ..Default::default()
        })
        .await?;
        let mut responses = match call.await {
            Ok(r) => r.into_inner(),
            Err(e) if e.code() == Code::AlreadyExists => return Ok(()),
            Err(e) => return Err(EngineError::classify(WHAT, &e)),
        };
        next(&mut responses).await?;

        let mut offset: i64 = 0;
        let mut pending = bytes::BytesMut::new();
        while let Some(piece) = data.next().await {
            let piece = piece.map_err(|e| EngineError::Failed {
                what: WHAT,
                code: Code::Unavailable,
                message: format!("reading blob {}: {e}", blob.digest),
            })?;
            pending.extend_from_slice(&piece);
            while pending.len() >= CHUNK {
                let chunk = pending.split_to(CHUNK).to_vec();
                let len = chunk.len() as i64;
                send(WriteContentRequest {
                    action: WriteAction::Write as i32,
                    r#ref: write_ref.clone(),
                    offset,
                    data: chunk,
                    ..Default::default()
                })
                .await?;
                next(&mut responses).await?;
                offset += len;
            }
        }
        send(WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: write_ref,
            total: blob.size,
            expected: blob.digest.clone(),
            offset,
            data: pending.to_vec(),
            ..Default::default()
        })
        .await?;
        drop(tx);
        match next(&mut responses).await {
            Err(e) if e.is_already_exists() => Ok(()),
            other => other,
        }
    }

    /// Writes a small in-memory blob (a manifest, an index, a config).
    pub async fn write_bytes(
        &self,
        ns: &str,
        lease: &str,
        blob: &Blob,
        bytes: &[u8],
    ) -> Result<(), EngineError> {
        let once = futures::stream::iter([Ok(bytes::Bytes::copy_from_slice(bytes))]);
        self.write_blob(ns, lease, blob, once).await
    }

    /// Reads a whole small blob back; refuses one larger than `max`, so a
    /// bad descriptor cannot make the daemon buffer a layer.
    pub async fn read_blob(
        &self,
        ns: &str,
        digest: &str,
        max: usize,
    ) -> Result<Vec<u8>, EngineError> {
        const WHAT: &str = "read a blob";
        let req = ReadContentRequest {
            digest: digest.to_string(),
            offset: 0,
            size: 0,
        };
        let mut stream = self
            .cd
            .content()
            .read(with_ns(req, ns, None))
            .await
            .map_err(classify(WHAT))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(msg) = stream.message().await.map_err(classify(WHAT))? {
            out.extend_from_slice(&msg.data);
            if out.len() > max {
                return Err(EngineError::Failed {
                    what: WHAT,
                    code: Code::OutOfRange,
                    message: format!("blob {digest} is larger than {max} bytes"),
                });
            }
        }
        Ok(out)
    }

    /// Sets labels on a blob that exists.
    pub async fn label_blob(
        &self,
        ns: &str,
        digest: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), EngineError> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let req = UpdateRequest {
            info: Some(Info {
                digest: digest.to_string(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        };
        self.cd
            .content()
            .update(with_ns(req, ns, None))
            .await
            .map(|_| ())
            .map_err(classify("label a blob"))
    }

    /// Whether a snapshot named `key` exists.
    pub async fn has_snapshot(
        &self,
        ns: &str,
        snapshotter: &str,
        key: &str,
    ) -> Result<bool, EngineError> {
        let req = StatSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            key: key.to_string(),
        };
        match self.cd.snapshots().stat(with_ns(req, ns, None)).await {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Code::NotFound => Ok(false),
            Err(e) => Err(EngineError::classify("stat a snapshot", &e)),
        }
    }

    /// An active snapshot to unpack a layer into, under `lease`, labelled
    /// with the chain it will be committed as.
    pub async fn prepare_extract(
        &self,
        ns: &str,
        lease: &str,
        snapshotter: &str,
        key: &str,
        parent: &str,
        chain_id: &str,
    ) -> Result<Vec<Mount>, EngineError> {
        let req = PrepareSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            key: key.to_string(),
            parent: parent.to_string(),
            labels: [(
                "containerd.io/snapshot.ref".to_string(),
                chain_id.to_string(),
            )]
            .into(),
        };
        Ok(self
            .cd
            .snapshots()
            .prepare(with_ns(req, ns, Some(lease)))
            .await
            .map_err(classify("prepare a snapshot for a layer"))?
            .into_inner()
            .mounts)
    }

    /// Unpacks `layer` (in the content store) onto `mounts`; returns the
    /// digest of what was unpacked (the layer's diff id).
    pub async fn apply(
        &self,
        ns: &str,
        lease: &str,
        layer: &Blob,
        mounts: Vec<Mount>,
    ) -> Result<String, EngineError> {
        let req = ApplyRequest {
            diff: Some(layer.descriptor()),
            mounts,
            ..Default::default()
        };
        Ok(self
            .cd
            .diff()
            .apply(with_ns(req, ns, Some(lease)))
            .await
            .map_err(classify("apply a layer"))?
            .into_inner()
            .applied
            .map(|d| d.digest)
            .unwrap_or_default())
    }

    /// Commits the active snapshot `key` as `name`.
    pub async fn commit(
        &self,
        ns: &str,
        lease: &str,
        snapshotter: &str,
        key: &str,
        name: &str,
    ) -> Result<(), EngineError> {
        let req = CommitSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            name: name.to_string(),
            key: key.to_string(),
            labels: Default::default(),
        };
        self.cd
            .snapshots()
            .commit(with_ns(req, ns, Some(lease)))
            .await
            .map(|_| ())
            .map_err(classify("commit a layer's snapshot"))
    }

    /// Removes an extract snapshot a failed or lost unpack left.
    pub async fn remove_extract(
        &self,
        ns: &str,
        lease: &str,
        snapshotter: &str,
        key: &str,
    ) -> Result<(), EngineError> {
        self.cd
            .remove_snapshot(
                ns,
                Some(lease),
                snapshotter,
                key,
                "remove an extract snapshot",
            )
            .await
    }

    /// The target of image record `name`; `None` when there is none.
    pub async fn image_target(&self, ns: &str, name: &str) -> Result<Option<Blob>, EngineError> {
        let req = GetImageRequest {
            name: name.to_string(),
        };
        match self.cd.images().get(with_ns(req, ns, None)).await {
            Ok(r) => Ok(r.into_inner().image.and_then(|i| i.target).map(|t| Blob {
                media_type: t.media_type,
                digest: t.digest,
                size: t.size,
            })),
            Err(e) if e.code() == Code::NotFound => Ok(None),
            Err(e) => Err(EngineError::classify("read an image record", &e)),
        }
    }

    /// Creates image record `name` pointing at `target`, or points the
    /// existing one there.
    pub async fn put_image(
        &self,
        ns: &str,
        lease: &str,
        name: &str,
        target: &Blob,
        labels: HashMap<String, String>,
    ) -> Result<(), EngineError> {
        let record = Image {
            name: name.to_string(),
            labels,
            target: Some(target.descriptor()),
            created_at: None,
            updated_at: None,
        };
        let create = CreateImageRequest {
            image: Some(record.clone()),
            ..Default::default()
        };
        match self
            .cd
            .images()
            .create(with_ns(create, ns, Some(lease)))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Code::AlreadyExists => {
                let update = UpdateImageRequest {
                    image: Some(record),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".into(), "labels".into()],
                    }),
                    ..Default::default()
                };
                self.cd
                    .images()
                    .update(with_ns(update, ns, Some(lease)))
                    .await
                    .map(|_| ())
                    .map_err(classify("update an image record"))
            }
            Err(e) => Err(EngineError::classify("create an image record", &e)),
        }
    }
}

/// The next answer of a `Content.Write` stream.
async fn next(responses: &mut tonic::Streaming<WriteContentResponse>) -> Result<(), EngineError> {
    const WHAT: &str = "write a blob";
    match responses.message().await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(EngineError::Failed {
            what: WHAT,
            code: Code::Internal,
            message: "the content writer ended early".into(),
        }),
        Err(e) => Err(EngineError::classify(WHAT, &e)),
    }
}
