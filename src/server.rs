//! The gRPC face: `isolate.DirektivIsolate/RunIsolate`. Validates at the
//! edge, claims the action id, hands the action to the runner and returns
//! at once. Owns nothing of the action after that.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{info, Instrument};

use crate::actions::Actions;
use crate::config::Limits;
use crate::error::Error;
use crate::proto::isolate::direktiv_isolate_server::DirektivIsolate;
use crate::proto::isolate::RunIsolateRequest;
use crate::request::ActionRequest;
use crate::runner::{Action, Runner};

pub struct IsolateService {
    pub runner: Arc<Runner>,
    pub actions: Arc<Actions>,
    pub limits: Limits,
}

#[tonic::async_trait]
impl DirektivIsolate for IsolateService {
    async fn run_isolate(
        &self,
        request: Request<RunIsolateRequest>,
    ) -> Result<Response<()>, Status> {
        let req =
            ActionRequest::validate(request.into_inner(), &self.limits).map_err(Error::from)?;
        let handle = self.actions.claim(&req)?;
        info!(namespace = %req.namespace, action_id = %req.action_id, image = %req.image,
              timeout_s = req.timeout.as_secs(), "accepted");
        let action = Action::new(&self.runner.cfg, req, handle);
        tokio::spawn(self.runner.clone().run(action).in_current_span());
        Ok(Response::new(()))
    }
}
