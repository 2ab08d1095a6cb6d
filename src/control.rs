//! The control service (`isolated.control.v1.IsolateControl`), served on
//! the same port as `DirektivIsolate`: get, list, watch, logs and cancel of
//! actions, retry and drop of undeliverable reports, and image import, list
//! and removal. A thin layer over [`Actions`], the image service and the
//! engine; it decides nothing itself but what a caller may see: a token
//! scoped to some namespaces sees only those (`auth::Caller`). A watch
//! ends when the daemon starts to stop ([`ControlService::stopping`]), so a
//! follower never holds a graceful stop open.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::io::AsyncWriteExt;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::actions::{Actions, ReportCommandKind};
use crate::auth::Caller;
use crate::engine::{ops, Engine, LABEL_IMAGE_SOURCE};
use crate::error::Error;
use crate::image::ImageService;
use crate::proto::control::isolate_control_server::IsolateControl;
use crate::proto::control::{
    ActionInfo, ActionRef, ActionState, CancelIsolateRequest, CapacityRequest, CapacityResponse,
    DrainRequest, ImageInfo, ImportImageRequest, ImportImageResponse, IsolateLogsResponse,
    ListImagesRequest, ListImagesResponse, ListIsolatesRequest, ListIsolatesResponse,
    ListPoolRequest, ListPoolResponse, PoolInfo, RemoveImageRequest,
};
use crate::readiness::Capacity;
use crate::runner::Runner;

pub struct ControlService {
    pub actions: Arc<Actions>,
    /// Where a cancel is made durable before it is acknowledged.
    pub store: crate::store::Store,
    pub images: Arc<ImageService>,
    /// For listing and removing images (every containerd call goes
    /// through the engine).
    pub engine: Arc<dyn Engine>,
    pub namespace_prefix: String,
    /// Where an archive being imported is spooled: it must be read out of
    /// order (index.json may come last), and a stream cannot be.
    pub import_dir: PathBuf,
    /// Beyond this an import is refused, an archive alone or all imports in
    /// progress together: the spool shares its disk with the store, and a
    /// full disk would stop every accept.
    pub import_budget: crate::image::import::SpoolBudget,
    /// Cancelled when the daemon starts to stop. Every open watch ends
    /// then with UNAVAILABLE: a graceful stop waits for the calls in
    /// flight, and a watch lasts as long as its action (issue 14: Ctrl-C
    /// with `isolatectl run` following an action took 42 s, not 10).
    pub stopping: CancellationToken,
    /// Its counts and readiness, for capacity and drain (issue 17).
    pub runner: Arc<Runner>,
}

fn capacity_response(c: &Capacity, image_cached: bool) -> CapacityResponse {
    let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    CapacityResponse {
        serving: c.not_serving.is_none(),
        not_serving_reason: c
            .not_serving
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        draining: c.not_serving == Some(crate::readiness::NotServing::Draining),
        running: n(c.running),
        max_running: n(c.max_running),
        queued: n(c.queued),
        max_queued: n(c.max_queued),
        free_running: n(c.free_running()),
        free_queue: n(c.free_queue()),
        image_cached,
        total_memory_mib: c.total_memory_mib,
        free_memory_mib: n(c.free_memory_mib),
        total_pids: c.total_pids,
        free_pids: n(c.free_pids),
    }
}

/// The caller of `req`, if it may use namespace `ns`.
fn allowed<T>(req: &Request<T>, ns: &str) -> Result<Caller, Status> {
    let caller = Caller::of(req).map_err(Error::from)?;
    caller.authorize(ns).map_err(Error::from)?;
    Ok(caller)
}

fn not_found(r: &ActionRef) -> Status {
    Error::NotFound {
        namespace: r.namespace.clone(),
        action_id: r.action_id.clone(),
    }
    .into()
}

type InfoStream = Pin<Box<dyn Stream<Item = Result<ActionInfo, Status>> + Send>>;

impl ControlService {
    /// The containerd namespace of Direktiv namespace `ns`, once it is
    /// known to be one.
    fn cns(&self, ns: &str) -> Result<String, Error> {
        crate::request::validate_namespace(ns)?;
        Ok(format!(
            "{}{}",
            self.namespace_prefix,
            crate::request::containerd_name(ns)
        ))
    }

    /// Hands an operator's retry or drop to the runner holding the parked
    /// report, and answers once it is done (durably).
    async fn report_command(
        &self,
        req: Request<ActionRef>,
        kind: ReportCommandKind,
    ) -> Result<Response<ActionInfo>, Status> {
        let caller = allowed(&req, &req.get_ref().namespace)?;
        let r = req.into_inner();
        let answer = self
            .actions
            .report_command(&r.namespace, &r.action_id, kind)?;
        tracing::info!(namespace = %r.namespace, action_id = %r.action_id, command = ?kind,
                       caller = %caller.who(), "undeliverable report: operator's command");
        let info = answer.await.map_err(|_| Error::CommandLost {
            namespace: r.namespace.clone(),
            action_id: r.action_id.clone(),
        })?;
        Ok(Response::new(info))
    }
}

#[tonic::async_trait]
impl IsolateControl for ControlService {
    async fn node_capacity(
        &self,
        req: Request<CapacityRequest>,
    ) -> Result<Response<CapacityResponse>, Status> {
        let image_cached = match (&req.get_ref().namespace, &req.get_ref().image) {
            (_, image) if image.is_empty() => false,
            (ns, image) => {
                allowed(&req, ns)?;
                let reference = crate::request::parse_reference(image).map_err(Error::from)?;
                let cns = format!(
                    "{}{}",
                    self.namespace_prefix,
                    crate::request::containerd_name(ns)
                );
                self.images.is_cached(&cns, &reference)
            }
        };
        let c = self.runner.readiness.capacity(&self.runner);
        Ok(Response::new(capacity_response(&c, image_cached)))
    }

    async fn drain(
        &self,
        req: Request<DrainRequest>,
    ) -> Result<Response<CapacityResponse>, Status> {
        let caller = Caller::of(&req).map_err(Error::from)?;
        caller.authorize_node("drain").map_err(Error::from)?;
        self.runner
            .readiness
            .drain(&format!("asked by {}", caller.who()));
        if req.get_ref().wait {
            // Every running slot back: none runs, and none will start.
            let all = u32::try_from(self.runner.cfg.max_running).unwrap_or(u32::MAX);
            tokio::select! {
                permits = self.runner.slots.acquire_many(all) => drop(permits),
                _ = self.stopping.cancelled() => return Err(Status::from(Error::Stopping)),
            }
        }
        let c = self.runner.readiness.capacity(&self.runner);
        Ok(Response::new(capacity_response(&c, false)))
    }

    async fn list_pool(
        &self,
        req: Request<ListPoolRequest>,
    ) -> Result<Response<ListPoolResponse>, Status> {
        let caller = Caller::of(&req).map_err(Error::from)?;
        caller
            .authorize_node("list the pre-created tasks")
            .map_err(Error::from)?;
        let ns = req.get_ref().namespace.clone();
        let cns = (!ns.is_empty()).then(|| self.runner.cfg.containerd_namespace(&ns));
        let dropped = match req.get_ref().drop {
            true => self.runner.drop_pool(cns.as_deref()).await,
            false => 0,
        };
        let keys = self
            .runner
            .pool
            .list()
            .into_iter()
            .filter(|l| ns.is_empty() || l.namespace == ns)
            .map(|l| PoolInfo {
                namespace: l.namespace,
                image: l.key.image,
                digest: l.key.digest,
                size: l.key.size as i32,
                entries: l.entries as u32,
                target: l.target as u32,
            })
            .collect();
        Ok(Response::new(ListPoolResponse {
            keys,
            dropped: dropped as u32,
        }))
    }

    async fn cancel_isolate(
        &self,
        req: Request<CancelIsolateRequest>,
    ) -> Result<Response<ActionInfo>, Status> {
        let caller = allowed(&req, &req.get_ref().namespace)?;
        let r = req.into_inner();
        let (info, cancel) = self.actions.cancel(&r.namespace, &r.action_id, &r.reason)?;
        // Durable before it is acknowledged: a crash right after this answer
        // still ends the action as cancelled (issue 12).
        self.store
            .cancel(&r.namespace, &r.action_id, &cancel.reason)
            .await
            .map_err(Error::from)?;
        cancel.fire();
        tracing::info!(namespace = %r.namespace, action_id = %r.action_id, reason = %r.reason,
                       caller = %caller.who(), "cancel requested");
        Ok(Response::new(info))
    }

    async fn get_isolate(&self, req: Request<ActionRef>) -> Result<Response<ActionInfo>, Status> {
        allowed(&req, &req.get_ref().namespace)?;
        let r = req.into_inner();
        self.actions
            .get(&r.namespace, &r.action_id)
            .map(Response::new)
            .ok_or_else(|| not_found(&r))
    }

    async fn list_isolates(
        &self,
        req: Request<ListIsolatesRequest>,
    ) -> Result<Response<ListIsolatesResponse>, Status> {
        let caller = match req.get_ref().namespace.as_str() {
            "" => Caller::of(&req).map_err(Error::from)?,
            ns => allowed(&req, ns)?,
        };
        let r = req.into_inner();
        let ns = (!r.namespace.is_empty()).then_some(r.namespace.as_str());
        let state = match r.state() {
            ActionState::Unspecified => None,
            s => Some(s),
        };
        let mut actions = self.actions.list(ns, state);
        actions.retain(|a| caller.sees(&a.namespace));
        Ok(Response::new(ListIsolatesResponse { actions }))
    }

    type WatchIsolateStream = InfoStream;

    async fn watch_isolate(&self, req: Request<ActionRef>) -> Result<Response<InfoStream>, Status> {
        let caller = allowed(&req, &req.get_ref().namespace)?;
        if self.stopping.is_cancelled() {
            return Err(Status::from(Error::Stopping));
        }
        let r = req.into_inner();
        let rx = self
            .actions
            .watch(&r.namespace, &r.action_id)
            .ok_or_else(|| not_found(&r))?;
        // Every state change, the current one first; the stream ends after
        // the report was acknowledged.
        // A token removed from the tokens file (or no longer listing the
        // namespace) ends the stream at its next message.
        let mut done = false;
        let stream = WatchStream::new(rx)
            .take_while(move |info| {
                let go = !done;
                done = info.state() == ActionState::Reported;
                go
            })
            .map(move |info| match caller.authorize(&info.namespace) {
                Ok(()) => Ok(info),
                Err(e) => Err(Status::from(Error::from(e))),
            });
        Ok(Response::new(Box::pin(until_stopping(
            Box::pin(stream),
            self.stopping.clone(),
        ))))
    }

    async fn isolate_logs(
        &self,
        req: Request<ActionRef>,
    ) -> Result<Response<IsolateLogsResponse>, Status> {
        allowed(&req, &req.get_ref().namespace)?;
        let r = req.into_inner();
        let (stdout, stderr) = self
            .actions
            .logs(&r.namespace, &r.action_id)
            .ok_or_else(|| not_found(&r))?;
        Ok(Response::new(IsolateLogsResponse { stdout, stderr }))
    }

    async fn retry_report(&self, req: Request<ActionRef>) -> Result<Response<ActionInfo>, Status> {
        self.report_command(req, ReportCommandKind::Retry).await
    }

    async fn drop_report(&self, req: Request<ActionRef>) -> Result<Response<ActionInfo>, Status> {
        self.report_command(req, ReportCommandKind::Drop).await
    }

    async fn list_images(
        &self,
        req: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        allowed(&req, &req.get_ref().namespace)?;
        let cns = self.cns(&req.get_ref().namespace)?;
        let records = self.engine.images(&cns).await.map_err(Error::from)?;
        let mut images = Vec::with_capacity(records.len());
        for r in records {
            let size = ops::image_size(&*self.engine, &cns, &r.digest)
                .await
                .map_err(Error::from)?;
            images.push(ImageInfo {
                source: r
                    .labels
                    .get(LABEL_IMAGE_SOURCE)
                    .cloned()
                    .unwrap_or_default(),
                name: r.name,
                digest: r.digest,
                // At least the target itself, should the store lack it.
                size: size.max(r.size),
                updated_at_ms: r.updated_at_ms,
            });
        }
        images.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(ListImagesResponse {
            containerd_namespace: cns,
            images,
        }))
    }

    async fn remove_image(
        &self,
        req: Request<RemoveImageRequest>,
    ) -> Result<Response<ImageInfo>, Status> {
        let caller = allowed(&req, &req.get_ref().namespace)?;
        let r = req.into_inner();
        let cns = self.cns(&r.namespace)?;
        // As listed, or as an action names it (busybox is
        // docker.io/library/busybox:latest).
        let records = self.engine.images(&cns).await.map_err(Error::from)?;
        let record = match records.iter().find(|i| i.name == r.name) {
            Some(found) => Some(found),
            None => {
                let whole = crate::request::parse_reference(&r.name)
                    .map_err(|e| Error::ImageName {
                        name: r.name.clone(),
                        reason: e.to_string(),
                    })?
                    .whole();
                records.iter().find(|i| i.name == whole)
            }
        };
        let no_image = || Error::NoImage {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
        };
        let record = record.ok_or_else(no_image)?.clone();
        match self.engine.delete_image(&cns, &record.name).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => return Err(no_image().into()),
            Err(e) => return Err(Error::from(e).into()),
        }
        // The next action resolves it afresh rather than run what was removed.
        self.images.forget(&cns, &record.name);
        tracing::info!(namespace = %r.namespace, image = %record.name, digest = %record.digest,
                       caller = %caller.who(), "image removed");
        Ok(Response::new(ImageInfo {
            source: record
                .labels
                .get(LABEL_IMAGE_SOURCE)
                .cloned()
                .unwrap_or_default(),
            name: record.name,
            digest: record.digest,
            size: record.size,
            updated_at_ms: record.updated_at_ms,
        }))
    }

    async fn import_image(
        &self,
        req: Request<Streaming<ImportImageRequest>>,
    ) -> Result<Response<ImportImageResponse>, Status> {
        let caller = Caller::of(&req).map_err(Error::from)?;
        let mut stream = req.into_inner();
        let first = stream.message().await?.ok_or(Error::EmptyImport)?;
        // Before a byte is spooled.
        caller.authorize(&first.namespace).map_err(Error::from)?;
        crate::request::validate_namespace(&first.namespace).map_err(Error::from)?;
        let namespace = first.namespace.clone();
        let spool = Spool::create(&self.import_dir).await?;
        let spool_err = |e: std::io::Error| Error::Spool {
            dir: self.import_dir.clone(),
            reason: e.to_string(),
        };
        let mut file = tokio::fs::File::from_std(spool.file.try_clone().map_err(spool_err)?);
        let budget = &self.import_budget;
        let mut hold = budget.hold();
        let mut received = 0u64;
        let mut next = Some(first);
        while let Some(msg) = next {
            received += msg.chunk.len() as u64;
            if received > budget.limit() {
                return Err(Error::ImportTooLarge(budget.limit()).into());
            }
            if let Err(held) = budget.grow(&mut hold, msg.chunk.len() as u64) {
                return Err(Error::ImportSpoolFull {
                    held,
                    limit: budget.limit(),
                }
                .into());
            }
            file.write_all(&msg.chunk).await.map_err(spool_err)?;
            next = stream.message().await?;
        }
        file.flush().await.map_err(spool_err)?;
        drop(file);
        let cns = self.cns(&namespace)?;
        tracing::info!(namespace = %namespace, bytes = received, caller = %caller.who(), "importing an image archive");
        // Detached: a caller that goes away (Ctrl-C in isolatectl) drops this
        // handler, and the import would stop between its lease and the
        // lease's removal, pinning what it wrote for the lease's day.
        let service = self.images.clone();
        let images = tokio::spawn(async move {
            let imported = service.import(&cns, &spool.path).await;
            drop(spool);
            drop(hold);
            imported
        })
        .await
        .map_err(|e| Error::Spool {
            dir: self.import_dir.clone(),
            reason: format!("the import stopped: {e}"),
        })?
        .map_err(Error::from)?;
        Ok(Response::new(ImportImageResponse { images }))
    }
}

/// `inner`, ended by one UNAVAILABLE item once `stopping` is cancelled.
fn until_stopping(inner: InfoStream, stopping: CancellationToken) -> InfoStream {
    Box::pin(futures::stream::unfold(
        Some((inner, stopping)),
        |state| async move {
            let (mut inner, stopping) = state?;
            tokio::select! {
                // A state change and the stop at once: the stop wins, so a
                // stopping daemon answers nothing more.
                biased;
                _ = stopping.cancelled() => Some((Err(Status::from(Error::Stopping)), None)),
                item = inner.next() => item.map(|i| (i, Some((inner, stopping)))),
            }
        },
    ))
}

/// A spooled archive, removed when dropped, whatever the import's outcome.
struct Spool {
    path: PathBuf,
    file: std::fs::File,
}

impl Spool {
    async fn create(dir: &std::path::Path) -> Result<Spool, Status> {
        let fail = |e: std::io::Error| -> Status {
            Error::Spool {
                dir: dir.to_owned(),
                reason: e.to_string(),
            }
            .into()
        };
        tokio::fs::create_dir_all(dir).await.map_err(fail)?;
        let path = dir.join(format!("import-{:016x}.tar", rand::random::<u64>()));
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(fail)?;
        Ok(Spool { path, file })
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_watch_ends_with_unavailable_when_the_daemon_stops() {
        // A watch whose action never changes again: without the token it
        // would never end.
        let (tx, rx) = tokio::sync::watch::channel(ActionInfo {
            state: ActionState::Running as i32,
            ..Default::default()
        });
        let inner: InfoStream = Box::pin(WatchStream::new(rx).map(Ok));
        let stopping = CancellationToken::new();
        let mut s = until_stopping(inner, stopping.clone());
        let first = s.next().await.unwrap().unwrap();
        assert_eq!(first.state(), ActionState::Running);
        stopping.cancel();
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), s.next())
            .await
            .expect("the watch ends once the daemon stops");
        let status = end.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("stopping"), "{status}");
        assert!(s.next().await.is_none(), "nothing after the stop");
        drop(tx);
    }
}
