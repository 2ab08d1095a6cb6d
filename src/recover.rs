//! Start-up recovery: everything the store says was accepted is finished
//! (re-attached if its task still runs, restarted if it never started, its
//! report re-delivered if it was not acknowledged), and everything isolated
//! created that belongs to no stored action is removed. The history of
//! reported actions is put back first, so the control API shows them.
//!
//! Runs once, before the server accepts new work.

use std::collections::HashSet;
use std::sync::Arc;

use tracing::{error, info, warn};

use crate::actions::Actions;
use crate::config::Limits;
use crate::engine::{ops, LABEL_ACTION_ID};
use crate::report::Outcome;
use crate::request::ActionRequest;
use crate::runner::shim_keeper::{LABEL_ROLE, ROLE_SHIM_KEEPER};
use crate::runner::{Action, Runner, Start};
use crate::store::{StoreError, Sync};

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    pub restarted: usize,
    pub resumed: usize,
    pub redelivered: usize,
    /// Undeliverable reports, waiting again for an operator.
    pub parked: usize,
    pub orphans_removed: usize,
}

pub async fn recover(
    runner: &Arc<Runner>,
    actions: &Arc<Actions>,
) -> Result<Recovered, StoreError> {
    actions.restore(runner.store.load_history()?);
    let records = runner.store.load_all()?;
    let mut found = Recovered::default();
    let mut plans = Vec::new();
    // Requests were validated when accepted; only the input limit may have
    // shrunk since (and the size bounds come after some were accepted), and
    // an accepted action is still owed its run.
    let limits = Limits {
        max_input_bytes: usize::MAX,
        size_bounds: false,
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
        // Its original acceptance, not this restart's: a re-attached
        // action must not show accepted after started (issue 14).
        handle.set_accepted_at(record.accepted_at_ms);
        let start = Start::of(&record);
        match &start {
            Start::Deliver(_) if record.undeliverable => found.parked += 1,
            Start::Deliver(_) => found.redelivered += 1,
            Start::Resume { .. } => found.resumed += 1,
            Start::Fresh => found.restarted += 1,
        }
        // Shown as it is before the server answers a call: a re-attached
        // action as running since its start, a stored report as finished,
        // a parked one as undeliverable with the engine's last answer.
        match &start {
            Start::Resume { deadline_ms } => {
                let container = match record.container_id.as_str() {
                    "" => req.action_id.as_str(),
                    taken => taken,
                };
                handle.set_running(deadline_ms - req.timeout.as_millis() as i64, container)
            }
            Start::Deliver(report) => {
                handle.finished(&Outcome::from_wire(report));
                if record.undeliverable {
                    handle.parked(&record.last_refusal_code, &record.last_refusal_message);
                }
            }
            Start::Fresh => {}
        }
        // A cancel acknowledged before the crash is carried out now.
        if !record.cancel_reason.is_empty() && !matches!(start, Start::Deliver(_)) {
            info!(key = %record.key(), "carrying out a cancel stored before the restart");
            handle.cancel_now(&record.cancel_reason);
        }
        // Accepted since inputs are spooled: the record has none inline.
        let spooled = record.request.as_ref().is_some_and(|r| r.data.is_none());
        let mut action =
            Action::new(&runner.cfg, req, handle).in_container(&runner.cfg, &record.container_id);
        if spooled {
            action = action.spooled();
        }
        if matches!(start, Start::Fresh) {
            // Already accepted: it takes its queue place whatever the limit.
            action = action.queued(runner.queued.force());
        }
        plans.push((action, record, start));
    }

    // By action id (its spooled input) and by the id it runs under (a
    // pre-created task's, issue 16): what the sweep must keep.
    let known: HashSet<(String, String)> = plans
        .iter()
        .flat_map(|(a, _, _)| {
            [
                (a.cns.clone(), a.req.action_id.clone()),
                (a.cns.clone(), a.id().to_string()),
            ]
        })
        .collect();
    found.orphans_removed = sweep(runner, &known).await;

    for (action, record, start) in plans {
        runner.spawn(action, record, start);
    }
    info!(?found, "recovery done");
    Ok(found)
}

/// Removes containers, tasks, snapshots, networks, disks (their mounts and
/// images) and directories that carry isolated's marks but belong to no
/// stored action. Returns how many
/// actions' leftovers were removed.
async fn sweep(runner: &Runner, known: &HashSet<(String, String)>) -> usize {
    let engine = &*runner.engine;
    let prefix = &runner.cfg.namespace_prefix;
    let mut orphans: HashSet<(String, String)> = HashSet::new();
    let namespaces: Vec<String> = match engine.namespaces().await {
        Ok(all) => all
            .into_iter()
            .filter(|n| n.starts_with(prefix.as_str()))
            .collect(),
        Err(e) => {
            warn!(error = %e, "skipping the orphan sweep");
            Vec::new()
        }
    };
    for cns in &namespaces {
        match engine.managed_containers(cns).await {
            Ok(containers) => {
                for c in containers {
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
            Err(e) => warn!(namespace = %cns, error = %e, "cannot sweep its containers"),
        }
        match engine.managed_snapshots(cns, &runner.cfg.snapshotter).await {
            Ok(snapshots) => {
                for s in snapshots {
                    let id = s.labels.get(LABEL_ACTION_ID).cloned().unwrap_or(s.id);
                    if !known.contains(&(cns.clone(), id.clone())) {
                        orphans.insert((cns.clone(), id));
                    }
                }
            }
            Err(e) => warn!(namespace = %cns, error = %e, "cannot sweep its snapshots"),
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
    // Inputs spooled for actions the store no longer has.
    let spooled = crate::inputs::sweep(&runner.cfg.inputs_dir(), known);
    if spooled > 0 {
        warn!(count = spooled, "removed spooled inputs of unknown actions");
    }
    // Disk images (a crash between the image and its directory, or after
    // the directory went).
    for key in runner.disks.images() {
        if !known.contains(&key) {
            orphans.insert(key);
        }
    }
    // Networks (namespace, lease) whose action left nothing else behind.
    for key in runner.networks.attached() {
        if !known.contains(&key) {
            orphans.insert(key);
        }
    }
    // Cgroups with nothing else left (a create cut short whose removal
    // met a failing cgroup file system): only empty ones are removed, and
    // not counted, since no process of an unknown action is killed on a
    // cgroup's word alone (another daemon's, configured with an
    // overlapping namespace prefix, may share the host).
    for (cns, id) in ops::cgroup_orphans(&runner.cgroup_mount, prefix) {
        if known.contains(&(cns.clone(), id.clone()))
            || orphans.contains(&(cns.clone(), id.clone()))
            || id.starts_with(crate::runner::shim_keeper::KEEPER_ID_PREFIX)
        {
            continue;
        }
        let cgroup = ops::action_cgroup(&cns, &id);
        for failed in ops::remove_cgroup(&runner.cgroup_mount, &cgroup, false).await {
            warn!(error = %failed, "cannot remove the cgroup of an unknown action");
        }
    }
    for (cns, id) in &orphans {
        warn!(namespace = %cns, action_id = %id, "removing leftovers of an unknown action");
        remove_orphan(runner, cns, id).await;
    }
    orphans.len()
}

async fn remove_orphan(runner: &Runner, cns: &str, id: &str) {
    let dir = runner.cfg.actions_dir().join(cns).join(id);
    runner.remove_leftovers(cns, id, &dir).await;
}
