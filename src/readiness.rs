//! Whether this node takes work (issue 17): the answer of gRPC health for
//! `isolate.DirektivIsolate`, the control API's capacity, and draining.
//!
//! A node does not take work while it drains (`isolatectl drain`, SIGTERM),
//! while its queue is full (RunIsolate would be RESOURCE_EXHAUSTED), or while
//! containerd does not answer. Health says NOT_SERVING then, so that a
//! client balancing over many nodes (grpc-go's round_robin with health
//! checking, a Kubernetes readiness probe, a Consul check) sends new work to
//! the others, and SERVING again as soon as it can.
//!
//! Owns the draining switch, the last containerd answer and the health
//! status it sets. Does not own the counts it reads (the runner's running
//! slots and queue places), nor what draining means for a queued action
//! (the runner leaves it accepted for the next start).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::engine::Engine;
use crate::runner::Runner;

/// How often the status is worked out again. The counts it reads are two
/// atomics, so this costs nothing; a queue that fills or empties shows in
/// health within this, which is well under a balancer's own check interval
/// (grpc-go's health watch, kubelet's probe at 5 s).
const TICK: Duration = Duration::from_millis(200);
/// How often containerd is asked whether it answers (a Version call):
/// containerd down is seen within this.
const PING_EVERY: Duration = Duration::from_secs(1);
/// A ping that takes longer than this counts as no answer.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the node takes no work now.
#[derive(Debug, Clone, PartialEq, Eq, displaydoc::Display)]
pub enum NotServing {
    /// draining: running actions finish, queued ones wait for the next start
    Draining,
    /// the queue is full ({queued} of max_queued {max})
    QueueFull { queued: usize, max: usize },
    /// containerd does not answer
    ContainerdUnreachable,
}

/// The node's counts at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity {
    pub running: usize,
    pub max_running: usize,
    pub queued: usize,
    pub max_queued: usize,
    /// The node budget (`Budget`): totals and what is free now.
    pub total_memory_mib: u32,
    pub free_memory_mib: usize,
    pub total_pids: u32,
    pub free_pids: usize,
    pub not_serving: Option<NotServing>,
}

impl Capacity {
    pub fn free_running(&self) -> usize {
        self.max_running.saturating_sub(self.running)
    }

    pub fn free_queue(&self) -> usize {
        self.max_queued.saturating_sub(self.queued)
    }
}

pub struct Readiness {
    draining: CancellationToken,
    containerd_up: AtomicBool,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            draining: CancellationToken::new(),
            // Start-up has just connected to it.
            containerd_up: AtomicBool::new(true),
        }
    }
}

impl Readiness {
    /// Cancelled once the node drains; the runner's queued actions watch it.
    pub fn draining(&self) -> &CancellationToken {
        &self.draining
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Starts draining (idempotent): accepts nothing more, starts no queued
    /// action. There is no way back but a restart: a queued action left for
    /// the next start is no longer the runner's.
    pub fn drain(&self, why: &str) {
        if !self.draining.is_cancelled() {
            info!(why, "draining: accepting nothing more; running actions finish, queued ones stay for the next start");
            self.draining.cancel();
        }
    }

    /// The counts of `runner` now, and why it takes no work if it does not.
    pub fn capacity(&self, runner: &Runner) -> Capacity {
        let max_running = runner.cfg.max_running;
        let running = max_running.saturating_sub(runner.slots.available_permits());
        let queued = runner.queued.waiting();
        let max_queued = runner.cfg.max_queued;
        let (total_memory_mib, total_pids) = runner.budget.totals();
        let (free_memory_mib, free_pids) = runner.budget.available();
        Capacity {
            running,
            max_running,
            queued,
            max_queued,
            total_memory_mib,
            free_memory_mib,
            total_pids,
            free_pids,
            not_serving: self.why_not(queued, max_queued),
        }
    }

    fn why_not(&self, queued: usize, max_queued: usize) -> Option<NotServing> {
        if self.is_draining() {
            Some(NotServing::Draining)
        } else if !self.containerd_up.load(Ordering::SeqCst) {
            Some(NotServing::ContainerdUnreachable)
        } else if queued >= max_queued {
            Some(NotServing::QueueFull {
                queued,
                max: max_queued,
            })
        } else {
            None
        }
    }

    /// Keeps gRPC health of `isolate.DirektivIsolate` in step with the
    /// node, until `stop`. Only changes are set (and logged).
    pub async fn keep_health(
        self: Arc<Self>,
        runner: Arc<Runner>,
        health: tonic_health::server::HealthReporter,
        stop: CancellationToken,
    ) {
        let service = "isolate.DirektivIsolate";
        let mut last: Option<Option<NotServing>> = None;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_ping = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.draining.cancelled(), if !self.is_draining() => {}
                _ = tick.tick() => {}
            }
            if tokio::time::Instant::now() >= next_ping {
                next_ping = tokio::time::Instant::now() + PING_EVERY;
                let up = ping(runner.engine.as_ref()).await;
                self.containerd_up.store(up, Ordering::SeqCst);
            }
            let now = self.capacity(&runner).not_serving;
            if last.as_ref() == Some(&now) {
                continue;
            }
            match &now {
                None => {
                    if last.is_some() {
                        info!(service, "health: SERVING");
                    }
                    health
                        .set_service_status(service, tonic_health::ServingStatus::Serving)
                        .await;
                }
                Some(why) => {
                    warn!(service, reason = %why, "health: NOT_SERVING");
                    health
                        .set_service_status(service, tonic_health::ServingStatus::NotServing)
                        .await;
                }
            }
            last = Some(now);
        }
    }
}

async fn ping(engine: &dyn Engine) -> bool {
    matches!(
        tokio::time::timeout(PING_TIMEOUT, engine.ping()).await,
        Ok(Ok(()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn why_a_node_takes_no_work() {
        let r = Readiness::default();
        assert_eq!(r.why_not(0, 2), None);
        assert_eq!(
            r.why_not(2, 2),
            Some(NotServing::QueueFull { queued: 2, max: 2 })
        );
        r.containerd_up.store(false, Ordering::SeqCst);
        assert_eq!(r.why_not(0, 2), Some(NotServing::ContainerdUnreachable));
        r.containerd_up.store(true, Ordering::SeqCst);
        r.drain("test");
        r.drain("again");
        assert_eq!(r.why_not(0, 2), Some(NotServing::Draining));
        assert_eq!(
            NotServing::QueueFull { queued: 2, max: 2 }.to_string(),
            "the queue is full (2 of max_queued 2)"
        );
    }
}
