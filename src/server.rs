//! The gRPC face: `isolate.DirektivIsolate/RunIsolate`. Checks the caller
//! may use the namespace (`auth`), validates at the edge, claims the action id, writes the action durably, hands it to the
//! runner and returns. Owns nothing of the action after that.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{error, info};

use crate::actions::Actions;
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
        // The store keeps the request as it came, for recovery, but for its
        // input (up to 32 MiB), which is moved, never copied: into the
        // validated request, then into the spool.
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
        // A draining node takes nothing new (issue 17); checked after the
        // caller and the request, so a refusal says what is wrong first.
        if self.runner.readiness.is_draining() {
            return Err(Error::Draining.into());
        }
        let handle = self.actions.claim(&req)?;
        let place = match self.runner.queued.reserve(self.max_queued) {
            Ok(place) => place,
            Err(queued) => {
                handle.abandon();
                return Err(Error::Busy(queued).into());
            }
        };
        // The input waits on disk, not in memory nor in the record (issue
        // 13: twenty queued 32 MiB inputs once held 1.5 GB of the daemon's
        // memory and 1.6 GB of the store): spooled durably before the
        // record that makes it accepted.
        let cns = self.runner.cfg.containerd_namespace(&req.namespace);
        let spool = crate::inputs::path(&self.runner.cfg.inputs_dir(), &cns, &req.action_id);
        if let Err(e) = crate::inputs::write(spool.clone(), std::mem::take(&mut req.data)).await {
            error!(error = %e, "cannot spool an accepted action's input");
            drop(place);
            handle.abandon();
            return Err(Error::Input(e).into());
        }
        let record = StoredAction {
            request: Some(wire),
            state: ActionState::Accepted as i32,
            // The time the control API shows, so a restart shows the same.
            accepted_at_ms: handle.info().accepted_at_ms,
            ..Default::default()
        };
        if let Err(e) = self.runner.store.put(&record, Sync::Durable).await {
            // Not durable, so not accepted: the caller may try again.
            error!(error = %e, "cannot store an accepted action");
            crate::inputs::remove(&spool);
            drop(place);
            handle.abandon();
            return Err(Error::Store(e).into());
        }
        info!(namespace = %req.namespace, action_id = %req.action_id, image = %req.image,
              timeout_s = req.timeout.as_secs(), "accepted");
        let action = Action::new(&self.runner.cfg, req, handle)
            .spooled()
            .queued(place);
        self.runner.spawn(action, record, Start::Fresh);
        Ok(Response::new(()))
    }
}
