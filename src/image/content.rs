//! Writing blobs into containerd's content store (the `Content.Write`
//! stream) and labelling them so containerd's garbage collector follows
//! index → manifest → config/layers → snapshots.
//!
//! containerd checks the digest on commit, so what the registry sent is
//! verified here without hashing it ourselves.

use std::collections::HashMap;

use containerd_client::services::v1::{
    Info, InfoRequest, ReadContentRequest, UpdateRequest, WriteAction, WriteContentRequest,
};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use super::registry::Blob;
use crate::containerd::{with_ns, Containerd};

/// Chunk size of `Content.Write` messages: big enough to keep the call
/// count low, far below gRPC's message limit.
const CHUNK: usize = 1 << 20;

/// Whether the namespace already holds the blob.
pub async fn exists(cd: &Containerd, ns: &str, digest: &str) -> Result<bool, tonic::Status> {
    let req = InfoRequest {
        digest: digest.to_string(),
    };
    match cd.content().info(with_ns(req, ns, None)).await {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Code::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes `data` as blob `blob`, or does nothing if it is there already.
pub async fn write<S>(
    cd: &Containerd,
    ns: &str,
    lease: &str,
    blob: &Blob,
    data: S,
) -> Result<(), tonic::Status>
where
    S: Stream<Item = std::io::Result<bytes::Bytes>> + Unpin,
{
    let (tx, rx) = mpsc::channel::<WriteContentRequest>(2);
    // A fresh ref per write: two pulls of images sharing a layer must not
    // collide on containerd's per-ref lock.
    let write_ref = format!("isolated-{}-{:08x}", blob.digest, rand::random::<u32>());
    let mut client = cd.content();
    let call = client.write(with_ns(ReceiverStream::new(rx), ns, Some(lease)));

    let first = WriteContentRequest {
        action: WriteAction::Stat as i32,
        r#ref: write_ref.clone(),
        total: blob.size,
        expected: blob.digest.clone(),
        ..Default::default()
    };
    tx.send(first)
        .await
        .map_err(|_| tonic::Status::internal("content writer closed"))?;
    let mut responses = match call.await {
        Ok(r) => r.into_inner(),
        Err(e) if e.code() == Code::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    };
    // Answer to the status request; its offset would allow resuming, but
    // a fresh ref always starts at zero.
    next(&mut responses).await?;

    let mut offset: i64 = 0;
    let mut pending = bytes::BytesMut::new();
    let mut data = data;
    let send_chunk = |tx: &mpsc::Sender<WriteContentRequest>, chunk: Vec<u8>, offset: i64| {
        let tx = tx.clone();
        let write_ref = write_ref.clone();
        async move {
            tx.send(WriteContentRequest {
                action: WriteAction::Write as i32,
                r#ref: write_ref,
                offset,
                data: chunk,
                ..Default::default()
            })
            .await
            .map_err(|_| tonic::Status::internal("content writer closed"))
        }
    };
    while let Some(piece) = data.next().await {
        let piece = piece.map_err(|e| {
            tonic::Status::unavailable(format!("reading blob {}: {e}", blob.digest))
        })?;
        pending.extend_from_slice(&piece);
        while pending.len() >= CHUNK {
            let chunk = pending.split_to(CHUNK).to_vec();
            let len = chunk.len() as i64;
            send_chunk(&tx, chunk, offset).await?;
            next(&mut responses).await?;
            offset += len;
        }
    }
    let rest = pending.to_vec();
    let len = rest.len() as i64;
    tx.send(WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref: write_ref,
        total: blob.size,
        expected: blob.digest.clone(),
        offset,
        data: rest,
        ..Default::default()
    })
    .await
    .map_err(|_| tonic::Status::internal("content writer closed"))?;
    match next(&mut responses).await {
        Ok(_) => {}
        Err(e) if e.code() == Code::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let _ = offset + len;
    drop(tx);
    Ok(())
}

async fn next(
    responses: &mut tonic::Streaming<containerd_client::services::v1::WriteContentResponse>,
) -> Result<(), tonic::Status> {
    match responses.message().await? {
        Some(_) => Ok(()),
        None => Err(tonic::Status::internal("content writer ended early")),
    }
}

/// Writes a small in-memory blob.
pub async fn write_bytes(
    cd: &Containerd,
    ns: &str,
    lease: &str,
    blob: &Blob,
    bytes: &[u8],
) -> Result<(), tonic::Status> {
    let once = futures::stream::iter([Ok(bytes::Bytes::copy_from_slice(bytes))]);
    write(cd, ns, lease, blob, once).await
}

/// Reads a whole small blob (a manifest, an index, a config) back from the
/// store; refuses one larger than `max` so a bad descriptor cannot make us
/// buffer a layer.
pub async fn read_all(
    cd: &Containerd,
    ns: &str,
    digest: &str,
    max: usize,
) -> Result<Vec<u8>, tonic::Status> {
    let req = ReadContentRequest {
        digest: digest.to_string(),
        offset: 0,
        size: 0,
    };
    let mut stream = cd
        .content()
        .read(with_ns(req, ns, None))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await? {
        out.extend_from_slice(&msg.data);
        if out.len() > max {
            return Err(tonic::Status::out_of_range(format!(
                "blob {digest} is larger than {max} bytes"
            )));
        }
    }
    Ok(out)
}

/// Sets labels on a blob that exists (ours or one written earlier).
pub async fn label(
    cd: &Containerd,
    ns: &str,
    digest: &str,
    labels: HashMap<String, String>,
) -> Result<(), tonic::Status> {
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
    cd.content()
        .update(with_ns(req, ns, None))
        .await
        .map(|_| ())
}
