//! Start-up recovery: everything the store says was accepted is finished
//! (re-attached if its task still runs, restarted if it never started, its
//! report re-delivered if it was not acknowledged), and everything isolated
//! created that belongs to no stored action is removed.
//!
//! Runs once, before the server accepts new work.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use containerd_client::services::v1::snapshots::{ListSnapshotsRequest, RemoveSnapshotRequest};
use containerd_client::services::v1::{ListContainersRequest, ListNamespacesRequest};
use tonic::Code;
use tracing::{error, info, warn};

use crate::actions::Actions;
use crate::config::Limits;
use crate::containerd::{with_ns, LABEL_ACTION_ID, LABEL_MANAGED};
use crate::network::NetTarget;
use crate::proto::control::ActionState;
use crate::request::ActionRequest;
use crate::runner::shim_keeper::{LABEL_ROLE, ROLE_SHIM_KEEPER};
use crate::runner::{delete_task, Action, Runner, Start};
use crate::store::{StoreError, Sync};

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    pub restarted: usize,
    pub resumed: usize,
    pub redelivered: usize,
    pub orphans_removed: usize,
}

pub async fn recover(
    runner: &Arc<Runner>,
    actions: &Arc<Actions>,
) -> Result<Recovered, StoreError> {
    let records = runner.store.load_all()?;
    let mut found = Recovered::default();
    let mut plans = Vec::new();
    // Requests were validated when accepted; only the input limit may have
    // shrunk since, and an accepted action is still owed its run.
    let limits = Limits {
        max_input_bytes: usize::MAX,
        ..runner.cfg.limits()
    };
    for record in records {
        let wire = record.request.clone().unwrap_or_default();
        let req = match ActionRequest::validate(wire, &limits) {
            Ok(r) => r,
            Err(e) => {
                error!(key = %record.key(), error = %e, "stored action is unusable; dropping it");
                let _ = runner.store.remove_key(&record.key(), Sync::Durable).await;
                continue;
            }
        };
        let handle = match actions.claim(&req) {
            Ok(h) => h,
            Err(e) => {
                error!(key = %record.key(), error = %e, "stored action twice");
                continue;
            }
        };
        let start = match record.state() {
            ActionState::Finished => match record.report.clone() {
                Some(report) => {
                    found.redelivered += 1;
                    Start::Deliver(report)
                }
                None => {
                    found.restarted += 1;
                    Start::Fresh
                }
            },
            ActionState::Running => {
                found.resumed += 1;
                Start::Resume {
                    deadline_ms: record.deadline_ms,
                }
            }
            _ => {
                found.restarted += 1;
                Start::Fresh
            }
        };
        // A cancel acknowledged before the crash is carried out now.
        if !record.cancel_reason.is_empty() && !matches!(start, Start::Deliver(_)) {
            info!(key = %record.key(), "carrying out a cancel stored before the restart");
            handle.cancel_now(&record.cancel_reason);
        }
        if matches!(start, Start::Fresh) {
            // Already accepted: it takes its queue place whatever the limit.
            runner
                .queued
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        plans.push((Action::new(&runner.cfg, req, handle), record, start));
    }

    let known: HashSet<(String, String)> = plans
        .iter()
        .map(|(a, _, _)| (a.cns.clone(), a.req.action_id.clone()))
        .collect();
    found.orphans_removed = sweep(runner, &known).await;

    for (action, record, start) in plans {
        tokio::spawn(runner.clone().run(action, record, start));
    }
    info!(?found, "recovery done");
    Ok(found)
}

/// Removes containers, tasks, snapshots, networks and directories that
/// carry isolated's marks but belong to no stored action. Returns how many
/// actions' leftovers were removed.
async fn sweep(runner: &Runner, known: &HashSet<(String, String)>) -> usize {
    let cd = &runner.cd;
    let prefix = &runner.cfg.namespace_prefix;
    let mut orphans: HashSet<(String, String)> = HashSet::new();
    let namespaces = match cd.namespaces().list(ListNamespacesRequest::default()).await {
        Ok(r) => r
            .into_inner()
            .namespaces
            .into_iter()
            .map(|n| n.name)
            .filter(|n| n.starts_with(prefix.as_str()))
            .collect(),
        Err(e) => {
            warn!(error = %e.message(), "cannot list containerd namespaces; skipping the orphan sweep");
            Vec::new()
        }
    };
    let managed = format!("labels.\"{LABEL_MANAGED}\"==true");
    for cns in &namespaces {
        let list = ListContainersRequest {
            filters: vec![managed.clone()],
        };
        if let Ok(r) = cd.containers().list(with_ns(list, cns, None)).await {
            for c in r.into_inner().containers {
                if c.labels.get(LABEL_ROLE).map(String::as_str) == Some(ROLE_SHIM_KEEPER) {
                    if let Some(k) = &runner.keepers {
                        k.remove_stale(cns, &c.id).await;
                    } else {
                        orphans.insert((cns.clone(), c.id));
                    }
                    continue;
                }
                if !known.contains(&(cns.clone(), c.id.clone())) {
                    orphans.insert((cns.clone(), c.id));
                }
            }
        }
        let list = ListSnapshotsRequest {
            snapshotter: runner.cfg.snapshotter.clone(),
            filters: vec![managed.clone()],
        };
        if let Ok(r) = cd.snapshots().list(with_ns(list, cns, None)).await {
            let mut stream = r.into_inner();
            while let Ok(Some(page)) = stream.message().await {
                for s in page.info {
                    let id = s
                        .labels
                        .get(LABEL_ACTION_ID)
                        .cloned()
                        .unwrap_or(s.name.clone());
                    if !known.contains(&(cns.clone(), id.clone())) {
                        orphans.insert((cns.clone(), id));
                    }
                }
            }
        }
    }
    // Directories whose containerd objects never existed or are gone.
    if let Ok(dirs) = std::fs::read_dir(runner.cfg.actions_dir()) {
        for ns_dir in dirs.flatten() {
            let cns = ns_dir.file_name().to_string_lossy().into_owned();
            if let Ok(entries) = std::fs::read_dir(ns_dir.path()) {
                for e in entries.flatten() {
                    let id = e.file_name().to_string_lossy().into_owned();
                    if !known.contains(&(cns.clone(), id.clone())) {
                        orphans.insert((cns.clone(), id));
                    }
                }
            }
        }
    }
    // Networks (namespace, lease) whose action left nothing else behind.
    for key in runner.networks.attached() {
        if !known.contains(&key) {
            orphans.insert(key);
        }
    }
    for (cns, id) in &orphans {
        warn!(namespace = %cns, action_id = %id, "removing leftovers of an unknown action");
        remove_orphan(runner, cns, id).await;
    }
    orphans.len()
}

async fn remove_orphan(runner: &Runner, cns: &str, id: &str) {
    let cd = &runner.cd;
    delete_task(cd, cns, id).await;
    let del = containerd_client::services::v1::DeleteContainerRequest { id: id.to_string() };
    if let Err(e) = cd.containers().delete(with_ns(del, cns, None)).await {
        if e.code() != Code::NotFound {
            warn!(error = %e.message(), "cannot delete orphan container");
        }
    }
    let rm = RemoveSnapshotRequest {
        snapshotter: runner.cfg.snapshotter.clone(),
        key: id.to_string(),
    };
    if let Err(e) = cd.snapshots().remove(with_ns(rm, cns, None)).await {
        if e.code() != Code::NotFound {
            warn!(error = %e.message(), "cannot remove orphan snapshot");
        }
    }
    let dir = runner.cfg.actions_dir().join(cns).join(id);
    runner
        .networks
        .detach(&NetTarget {
            cns,
            action_id: id,
            dir: &dir,
        })
        .await;
    remove_dir(&dir);
}

fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(dir = %dir.display(), error = %e, "cannot remove orphan directory");
        }
    }
}
