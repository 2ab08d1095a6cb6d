//! The gRPC face: `isolate.DirektivIsolate/RunIsolate`. Checks the caller
//! may use the namespace (`auth`), validates at the edge, claims the action id, writes the action durably, hands it to the
//! runner and returns. Owns nothing of the action after that.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{error, info};

use crate::actions::{now_ms, Actions};
use crate::auth::Caller;
use crate::config::Limits;
use crate::error::Error;
use crate::proto::control::ActionState;
use crate::proto::isolate::direktiv_isolate_server::DirektivIsolate;
use crate::proto::isolate::RunIsolateRequest;
use crate::request::ActionRequest;
use crate::runner::{Action, Runner, Start};
use crate::store::{StoredAction, Sync};

pub struct IsolateService {
    pub runner: Arc<Runner>,
    pub actions: Arc<Actions>,
    pub limits: Limits,
    pub max_queued: usize,
}

#[tonic::async_trait]
impl DirektivIsolate for IsolateService {
    async fn run_isolate(
        &self,
        request: Request<RunIsolateRequest>,
    ) -> Result<Response<()>, Status> {
        let _timer = crate::metrics::timer(crate::metrics::Phase::Accept);
        // Authenticated by the gate; the namespace is checked before the
        // request is even validated, so a token learns nothing about
        // namespaces it may not use.
        let caller = Caller::of(&request).map_err(Error::from)?;
        caller
            .authorize(request.get_ref().namespace())
            .map_err(Error::from)?;
        // The store keeps the request as it came, for recovery. The input (up
        // to 32 MiB) is moved, never copied: into the validated request, into
        // the record for the durable write, and back.
        let mut wire = request.into_inner();
        let data = wire.data.take();
        let mut req = ActionRequest::validate(
            RunIsolateRequest {
                data,
                ..wire.clone()
            },
            &self.limits,
        )
        .map_err(Error::from)?;
        let handle = self.actions.claim(&req)?;
        let place = match self.runner.queued.reserve(self.max_queued) {
            Ok(place) => place,
            Err(queued) => {
                handle.abandon();
                return Err(Error::Busy(queued).into());
            }
        };
        wire.data = Some(std::mem::take(&mut req.data));
        let mut record = StoredAction {
            request: Some(wire),
            state: ActionState::Accepted as i32,
            accepted_at_ms: now_ms(),
            ..Default::default()
        };
        let stored = self.runner.store.put(&record, Sync::Durable).await;
        // The runner's copy of the record need not hold the input too.
        if let Some(r) = record.request.as_mut() {
            req.data = r.data.take().unwrap_or_default();
        }
        if let Err(e) = stored {
            // Not durable, so not accepted: the caller may try again.
            error!(error = %e, "cannot store an accepted action");
            drop(place);
            handle.abandon();
            return Err(Error::Store(e).into());
        }
        info!(namespace = %req.namespace, action_id = %req.action_id, image = %req.image,
              timeout_s = req.timeout.as_secs(), "accepted");
        let action = Action::new(&self.runner.cfg, req, handle).queued(place);
        self.runner.spawn(action, record, Start::Fresh);
        Ok(Response::new(()))
    }
}
