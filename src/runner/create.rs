//! Making an action's task, up to "created, not started": its directory
//! (on a filesystem of its own when its size has a disk limit,
//! `crate::disk`) with `data/data.in`, its snapshot, its user (from the
//! image's own passwd and group, read without following links), its
//! network, its spec, container and task (its rootfs writing to the
//! action's disk), and its place in the namespace's shim. Owns nothing
//! after the task exists.

use std::path::PathBuf;

use containerd_client::services::v1::container::Runtime;
use tracing::{info_span, Instrument};

use super::shim_keeper::ShimHold;
use super::stdio::Stdio;
use super::{collect, Action, RunError, Runner};
use crate::disk;
use crate::engine::{self, ops, Container, NewTask, Prepare};
use crate::image::Image;
use crate::spec::{self, SpecInput};

impl Runner {
    /// Snapshot, spec, container and task, in that order.
    ///
    /// No lease: the one thing a lease would protect is the active snapshot
    /// between its Prepare and the container that then references it, and
    /// the snapshot's own `gc.root` label does that for two fewer metadata
    /// transactions (each an fsync in containerd) per action. Cleanup and
    /// the start-up sweep remove the snapshot explicitly either way.
    ///
    /// With `launcher`, a pre-created task's (issue 16): the launcher is its
    /// process (`crate::spec`), and the action's argv and environment come
    /// when it is taken (`super::pool`).
    pub(super) async fn create(
        &self,
        a: &Action,
        image: &Image,
        launcher: Option<&std::path::Path>,
    ) -> Result<(Stdio, i64), RunError> {
        // An action's time to its task; a pre-created one is on no action's path.
        let _timer = launcher
            .is_none()
            .then(|| crate::metrics::timer(crate::metrics::Phase::Start));
        let mut labels = action_labels(a);
        if launcher.is_some() {
            labels.insert(
                super::pool::LABEL_POOL.to_string(),
                format!(
                    "{}/{}/{}",
                    a.req.namespace,
                    image.manifest_digest,
                    a.req.size.index()
                ),
            );
        }
        let mut snapshot_labels = labels.clone();
        snapshot_labels.insert(
            "containerd.io/gc.root".to_string(),
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        );
        let prepare = Prepare {
            snapshotter: self.cfg.snapshotter.clone(),
            key: a.id().to_string(),
            parent: image.top_chain.clone().unwrap_or_default(),
            labels: snapshot_labels,
        };
        let mounts = match self.engine.prepare_snapshot(&a.cns, prepare.clone()).await {
            Err(e) if e.is_already_exists() => {
                // Left by a run of this action that died before its report:
                // start from a clean slate.
                self.cleanup_containerd(a).await;
                self.engine.prepare_snapshot(&a.cns, prepare).await?
            }
            other => other?,
        };

        let image_user = image
            .config
            .config()
            .as_ref()
            .and_then(|c| c.user().clone())
            .unwrap_or_default();
        let user = if image_user.is_empty() {
            spec::resolve_user("", None, None)?
        } else {
            let passwd = read_from_rootfs(&mounts, "etc/passwd");
            let group = read_from_rootfs(&mounts, "etc/group");
            spec::resolve_user(&image_user, passwd.as_deref(), group.as_deref())?
        };
        // The action's user must be able to write its results.
        let data_dir = a.data_dir();
        nix::unistd::chown(
            &data_dir,
            Some(nix::unistd::Uid::from_raw(user.uid)),
            Some(nix::unistd::Gid::from_raw(user.gid)),
        )
        .map_err(|e| RunError::DataDir {
            path: data_dir.clone(),
            source: e.into(),
        })?;

        let net = self
            .networks
            .attach(&a.net())
            .instrument(info_span!("network"))
            .await?;
        let shim_group = self.join_shim(a).await;
        let size = a.req.size.index();
        let memory = (self.cfg.size_memory_mib[size] as i64) << 20;
        let input = SpecInput {
            image: &image.config,
            argv: a.req.argv.as_deref(),
            env: match launcher {
                None => super::pool::direktiv_env(&a.req),
                Some(_) => Vec::new(),
            },
            user,
            data_dir: &data_dir,
            memory_bytes: memory,
            cpus: self.cfg.size_cpus[size],
            cgroups_path: a.cgroups_path(),
            shim_group,
            netns: net.netns,
            files: net.files,
            sysctl: net.sysctl,
            launcher,
        };
        let spec = self.template.build(&input)?;
        let container = Container {
            id: a.id().to_string(),
            labels,
            image: image.name.clone(),
            runtime: Some(Runtime {
                name: self.cfg.runtime.clone(),
                options: self.runtimes.of(&a.cns).options(),
            }),
            spec: Some(spec::to_any(&spec)?),
            snapshotter: self.cfg.snapshotter.clone(),
            snapshot_key: a.id().to_string(),
            ..Default::default()
        };
        self.engine.create_container(&a.cns, container).await?;

        let stdio =
            Stdio::open(a.dir(), a.handle.logs.clone()).map_err(|source| RunError::DataDir {
                path: a.dir().to_owned(),
                source,
            })?;
        // Last, after the user lookup read the image's files through the
        // snapshot's own mounts: the rootfs's writes go to the action's disk.
        let rootfs = match self.disks.limit_mib(size) {
            0 => mounts,
            _ => {
                let (upper, work) = disk::upper_like_image(a.dir(), &mounts)?;
                disk::rootfs_mounts(&mounts, &upper, &work)?
            }
        };
        let task = NewTask {
            container_id: a.id().to_string(),
            rootfs,
            stdout: stdio.stdout.display().to_string(),
            stderr: stdio.stderr.display().to_string(),
        };
        ops::create_task(&*self.engine, &a.cns, &task, self.runtimes.of(&a.cns)).await?;
        Ok((stdio, memory))
    }

    /// The shim group the action's task joins: its namespace's, held open
    /// by the keeper, or none (a shim of its own).
    async fn join_shim(&self, a: &Action) -> Option<String> {
        let keepers = self.keepers.as_ref()?;
        let held = a
            .shim
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(ShimHold::group);
        if held.is_some() {
            return held;
        }
        let hold = keepers.hold(&a.cns).instrument(info_span!("shim")).await?;
        let group = hold.group();
        *a.shim.lock().unwrap_or_else(|p| p.into_inner()) = Some(hold);
        Some(group)
    }
}

fn action_labels(a: &Action) -> std::collections::HashMap<String, String> {
    let mut l = std::collections::HashMap::from([
        (engine::LABEL_MANAGED.to_string(), "true".to_string()),
        (engine::LABEL_NAMESPACE.to_string(), a.req.namespace.clone()),
        (engine::LABEL_ACTION_ID.to_string(), a.req.action_id.clone()),
    ]);
    if let Some(i) = &a.req.instance_id {
        l.insert(engine::LABEL_INSTANCE_ID.to_string(), i.clone());
    }
    if let Some(s) = a.req.step {
        l.insert(engine::LABEL_STEP.to_string(), s.to_string());
    }
    l
}

impl Runner {
    /// A fresh action directory, on a filesystem of the size's disk limit
    /// when it has one, with a data directory holding exactly the
    /// request's bytes as data.in.
    pub(super) async fn prepare_dir(&self, a: &Action) -> Result<(), RunError> {
        let data = a.data_dir();
        let io = |source| RunError::DataDir {
            path: data.clone(),
            source,
        };
        // Left by an earlier action of the same id that crashed: its
        // content must not leak into this one.
        self.disks.release(&a.cns, a.id(), a.dir());
        if a.dir().exists() {
            std::fs::remove_dir_all(a.dir()).map_err(io)?;
        }
        // Another action's cleanup may remove the namespace's (then empty)
        // directory between this creating it and creating the action's in it.
        if let Err(e) = std::fs::create_dir_all(a.dir()) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(io(e));
            }
            std::fs::create_dir_all(a.dir()).map_err(io)?;
        }
        match self.disks.limit_mib(a.req.size.index()) {
            0 => {}
            mib => {
                self.disks
                    .create(&a.cns, a.id(), a.dir(), mib)
                    .instrument(info_span!("disk"))
                    .await?
            }
        }
        std::fs::create_dir(&data).map_err(io)?;
        a.write_input(&data.join("data.in"))
    }
}

/// Reads a file of the image from the snapshot's mounts without mounting
/// them: the upper directory first, then the lower ones, top to bottom.
/// The image is untrusted, so no symlink is followed on the way: a link in
/// place of `etc` or `passwd` could point anywhere on the host.
fn read_from_rootfs(mounts: &[containerd_client::types::Mount], rel: &str) -> Option<String> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for m in mounts {
        if m.r#type == "bind" {
            dirs.push(PathBuf::from(&m.source));
        }
        for o in &m.options {
            if let Some(u) = o.strip_prefix("upperdir=") {
                dirs.push(PathBuf::from(u));
            }
        }
        for o in &m.options {
            if let Some(l) = o.strip_prefix("lowerdir=") {
                dirs.extend(l.split(':').map(PathBuf::from));
            }
        }
    }
    let (parent_rel, name) = rel.rsplit_once('/').unwrap_or(("", rel));
    for base in dirs {
        let mut parent = base.clone();
        let mut ok = true;
        for c in parent_rel.split('/').filter(|c| !c.is_empty()) {
            parent.push(c);
            if !std::fs::symlink_metadata(&parent).is_ok_and(|m| m.is_dir()) {
                ok = false;
                break;
            }
        }
        if !ok || std::fs::symlink_metadata(parent.join(name)).is_err() {
            continue;
        }
        // The topmost layer that has the name decides, even if what it has
        // is a whiteout or a link: then the image has no usable file.
        return collect::read_result_file(&parent, name, 1 << 20)
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn overlay(lower: &[&Path], upper: &Path) -> Vec<containerd_client::types::Mount> {
        let lower: Vec<String> = lower.iter().map(|p| p.display().to_string()).collect();
        vec![containerd_client::types::Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![
                format!("upperdir={}", upper.display()),
                format!("lowerdir={}", lower.join(":")),
            ],
        }]
    }

    #[test]
    fn rootfs_files_come_from_the_topmost_layer_and_never_through_links() {
        let t = tempfile::tempdir().unwrap();
        let (l1, l2, up) = (
            t.path().join("l1"),
            t.path().join("l2"),
            t.path().join("up"),
        );
        for d in [&l1, &l2, &up] {
            std::fs::create_dir_all(d.join("etc")).unwrap();
        }
        std::fs::write(l2.join("etc/passwd"), "bottom").unwrap();
        std::fs::write(l1.join("etc/passwd"), "top").unwrap();
        assert_eq!(
            read_from_rootfs(&overlay(&[&l1, &l2], &up), "etc/passwd").as_deref(),
            Some("top")
        );
        std::os::unix::fs::symlink("/etc/hostname", up.join("etc/passwd")).unwrap();
        assert_eq!(
            read_from_rootfs(&overlay(&[&l1, &l2], &up), "etc/passwd"),
            None
        );
        let evil = t.path().join("evil");
        std::fs::create_dir_all(&evil).unwrap();
        std::os::unix::fs::symlink("/etc", evil.join("etc")).unwrap();
        assert_eq!(
            read_from_rootfs(&overlay(&[&evil], &up.join("none")), "etc/hostname"),
            None
        );
    }
}
