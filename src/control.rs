//! The control service (`isolated.control.v1.IsolateControl`), served on
//! the same port as `DirektivIsolate`: get, list, watch, logs and cancel of
//! actions, and image import. A thin layer over [`Actions`] and the image
//! service; it decides nothing itself.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::actions::Actions;
use crate::error::Error;
use crate::image::ImageService;
use crate::proto::control::isolate_control_server::IsolateControl;
use crate::proto::control::{
    ActionInfo, ActionRef, ActionState, CancelIsolateRequest, ImportImageRequest,
    ImportImageResponse, IsolateLogsResponse, ListIsolatesRequest, ListIsolatesResponse,
};

pub struct ControlService {
    pub actions: Arc<Actions>,
    pub images: Arc<ImageService>,
    pub namespace_prefix: String,
}

fn not_found(r: &ActionRef) -> Status {
    Error::NotFound {
        namespace: r.namespace.clone(),
        action_id: r.action_id.clone(),
    }
    .into()
}

type InfoStream = Pin<Box<dyn Stream<Item = Result<ActionInfo, Status>> + Send>>;

#[tonic::async_trait]
impl IsolateControl for ControlService {
    async fn cancel_isolate(
        &self,
        req: Request<CancelIsolateRequest>,
    ) -> Result<Response<ActionInfo>, Status> {
        let r = req.into_inner();
        let info = self.actions.cancel(&r.namespace, &r.action_id, &r.reason)?;
        tracing::info!(namespace = %r.namespace, action_id = %r.action_id, reason = %r.reason, "cancel requested");
        Ok(Response::new(info))
    }

    async fn get_isolate(&self, req: Request<ActionRef>) -> Result<Response<ActionInfo>, Status> {
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
        let r = req.into_inner();
        let ns = (!r.namespace.is_empty()).then_some(r.namespace.as_str());
        let state = match r.state() {
            ActionState::Unspecified => None,
            s => Some(s),
        };
        Ok(Response::new(ListIsolatesResponse {
            actions: self.actions.list(ns, state),
        }))
    }

    type WatchIsolateStream = InfoStream;

    async fn watch_isolate(&self, req: Request<ActionRef>) -> Result<Response<InfoStream>, Status> {
        let r = req.into_inner();
        let rx = self
            .actions
            .watch(&r.namespace, &r.action_id)
            .ok_or_else(|| not_found(&r))?;
        // Every state change, the current one first; the stream ends after
        // the report was acknowledged.
        let mut done = false;
        let stream = WatchStream::new(rx)
            .take_while(move |info| {
                let go = !done;
                done = info.state() == ActionState::Reported;
                go
            })
            .map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn isolate_logs(
        &self,
        req: Request<ActionRef>,
    ) -> Result<Response<IsolateLogsResponse>, Status> {
        let r = req.into_inner();
        let (stdout, stderr) = self
            .actions
            .logs(&r.namespace, &r.action_id)
            .ok_or_else(|| not_found(&r))?;
        Ok(Response::new(IsolateLogsResponse { stdout, stderr }))
    }

    async fn import_image(
        &self,
        _req: Request<Streaming<ImportImageRequest>>,
    ) -> Result<Response<ImportImageResponse>, Status> {
        let _ = (&self.images, &self.namespace_prefix);
        Err(Status::unimplemented("image import is not implemented yet"))
    }
}
