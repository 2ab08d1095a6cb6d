//! The OCI runtime under the runc v2 shim (issue 15): which binary it runs
//! for each namespace (`runtime_binary`, runc, crun or a path), where that
//! binary keeps its state (`--root`), the runtime options that tell the
//! shim both (`containerd.runc.v1.Options`), and whether the host's cgroup
//! layout lets the binary run at all.
//!
//! containerd hands a container's runtime options to the shim when a task
//! is created without options of its own; the shim then runs
//! `BinaryName --root Root/<namespace> …` for that container. Without
//! options it runs `runc` from its PATH with the root
//! `/run/containerd/runc`, which is what a node without any of this
//! setting gets, unchanged. crun keeps its state in another format than
//! runc, so a binary other than runc gets a root of its own, named after
//! it (`/run/containerd/crun`), and the embedded containerd's roots are
//! under its own directory (issue 14: embedded means private).
//!
//! Decides nothing about actions and makes no containerd call: the runner
//! and the shim keepers put [`OciRuntime::options`] into the containers
//! they create, `ops` runs the binary to free an id a crash left.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::config::{Config, RuntimeBinary};

/// The runc v2 shim's runc root when the client gives none (containerd's
/// `process.RuncRoot`); the shim appends the namespace.
pub const DEFAULT_RUNC_ROOT: &str = "/run/containerd/runc";

/// The runtime of one namespace: binary and state root.
#[derive(Debug, Clone, PartialEq)]
pub struct OciRuntime {
    binary: RuntimeBinary,
    /// `--root` without the namespace.
    root: PathBuf,
    /// Whether the options name the root, or the shim's default is it.
    own_root: bool,
}

impl Default for OciRuntime {
    fn default() -> Self {
        OciRuntime::new(RuntimeBinary::Runc, None)
    }
}

impl OciRuntime {
    /// `binary`, with its root under `containerd_dir` (the embedded
    /// containerd's directory), else the shim's default for runc and
    /// `/run/containerd/<name>` for any other binary.
    pub fn new(binary: RuntimeBinary, containerd_dir: Option<&Path>) -> OciRuntime {
        let name = binary.name().to_string();
        let (root, own_root) = match containerd_dir {
            Some(dir) => (dir.join(&name), true),
            None if name == "runc" => (PathBuf::from(DEFAULT_RUNC_ROOT), false),
            None => (Path::new(DEFAULT_RUNC_ROOT).with_file_name(&name), true),
        };
        OciRuntime {
            binary,
            root,
            own_root,
        }
    }

    pub fn binary(&self) -> &RuntimeBinary {
        &self.binary
    }

    /// The binary's state root of containerd namespace `cns` (`--root`).
    pub fn root_of(&self, cns: &str) -> PathBuf {
        self.root.join(cns)
    }

    /// The root without the namespace, if isolated chose it (it then
    /// creates it at start).
    pub fn own_root(&self) -> Option<&Path> {
        self.own_root.then_some(self.root.as_path())
    }

    /// What every container of this runtime carries as
    /// `Container.runtime.options`: none at all for runc with the shim's
    /// own root (containerd's defaults, as before issue 15), else the
    /// binary (unless it is runc) and the root.
    pub fn options(&self) -> Option<prost_types::Any> {
        let binary_name = match self.binary {
            RuntimeBinary::Runc => String::new(),
            _ => self.binary.command().to_string_lossy().into_owned(),
        };
        if binary_name.is_empty() && !self.own_root {
            return None;
        }
        Some(prost_types::Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: prost::Message::encode_to_vec(&RuncOptions {
                binary_name,
                root: match self.own_root {
                    true => self.root.display().to_string(),
                    false => String::new(),
                },
            }),
        })
    }

    /// A part of the shim group's name for this runtime: empty for runc,
    /// so that the groups of a node without the setting stay what they
    /// were (running shims are joined again after an upgrade); the binary's
    /// name otherwise, so that a namespace whose binary changed across a
    /// restart starts a fresh shim instead of joining the old one.
    pub fn group_tag(&self) -> String {
        match self.binary {
            RuntimeBinary::Runc => String::new(),
            _ => format!("-{}", self.binary.name()),
        }
    }
}

/// `containerd.runc.v1.Options` with `binary_name` (field 6) and `root`
/// (field 7): what the shim reads, without the rest of containerd's API
/// types. Empty fields are not encoded, and the shim reads them as its
/// defaults (`runc`, `/run/containerd/runc`).
#[derive(Clone, PartialEq, prost::Message)]
struct RuncOptions {
    #[prost(string, tag = "6")]
    binary_name: String,
    #[prost(string, tag = "7")]
    root: String,
}

/// Every namespace's runtime: the node's, and those that
/// `[namespaces.NAME]` tables choose, by containerd namespace.
#[derive(Debug, Clone, Default)]
pub struct Runtimes {
    node: OciRuntime,
    namespaces: HashMap<String, OciRuntime>,
}

impl Runtimes {
    /// From the settings; `containerd_dir` is the embedded containerd's
    /// directory, if it is the one in use.
    pub fn from_config(cfg: &Config, containerd_dir: Option<&Path>) -> Runtimes {
        Runtimes {
            node: OciRuntime::new(cfg.runtime_binary.clone(), containerd_dir),
            namespaces: cfg
                .namespaces
                .iter()
                .filter_map(|(ns, o)| Some((ns, o.runtime_binary.clone()?)))
                .map(|(ns, b)| {
                    (
                        cfg.containerd_namespace(ns),
                        OciRuntime::new(b, containerd_dir),
                    )
                })
                .collect(),
        }
    }

    /// The runtime of containerd namespace `cns`.
    pub fn of(&self, cns: &str) -> &OciRuntime {
        self.namespaces.get(cns).unwrap_or(&self.node)
    }

    /// Every runtime in use, the node's first.
    pub fn all(&self) -> impl Iterator<Item = &OciRuntime> {
        std::iter::once(&self.node).chain(self.namespaces.values())
    }

    /// Refuses a crun that the host's cgroup layout (as `mountinfo`, the
    /// text of /proc/self/mountinfo, shows it) would make fail every
    /// action, in one line naming the cause.
    pub fn check_host(&self, mountinfo: &str) -> Result<(), RuntimeError> {
        let layout = cgroup_layout(mountinfo);
        if layout != CgroupLayout::Hybrid {
            return Ok(());
        }
        match self.all().find(|r| r.binary.is_crun()) {
            Some(r) => Err(RuntimeError::CrunOnHybrid {
                binary: r.binary.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Creates the state roots isolated chose (the binaries create the
    /// namespace's directory under it themselves).
    pub fn prepare(&self) -> Result<(), RuntimeError> {
        for root in self.all().filter_map(OciRuntime::own_root) {
            std::fs::create_dir_all(root).map_err(|source| RuntimeError::Root {
                path: root.to_owned(),
                source,
            })?;
        }
        Ok(())
    }
}

/// Why the configured runtimes cannot run on this host.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum RuntimeError {
    /// crun cannot run on this host's hybrid cgroup layout (cgroup v1 controllers under /sys/fs/cgroup with v2 at /sys/fs/cgroup/unified; crun refuses it with "cgroups in hybrid mode not supported", so every action would fail): runtime_binary {binary} needs a cgroup v2 host (boot with systemd.unified_cgroup_hierarchy=1) or choose runc
    CrunOnHybrid { binary: String },
    /// cannot create the runtime's state root {path}: {source}
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How the host mounts its cgroups, told as crun tells it (statfs of
/// /sys/fs/cgroup, then of /sys/fs/cgroup/unified).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupLayout {
    /// cgroup v2 at /sys/fs/cgroup.
    Unified,
    /// v1 controllers, and v2 (without controllers) at /sys/fs/cgroup/unified:
    /// systemd's hybrid mode, Debian 12's default without
    /// `systemd.unified_cgroup_hierarchy=1`.
    Hybrid,
    /// v1 only (or no cgroups mounted).
    Legacy,
}

/// The layout, from the text of /proc/self/mountinfo: field 5 is the mount
/// point, the field after the ` - ` separator the file system type. A
/// later mount on the same point hides an earlier one.
pub fn cgroup_layout(mountinfo: &str) -> CgroupLayout {
    let mut root = None;
    let mut unified = None;
    for line in mountinfo.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let (Some(point), Some(fstype)) = (
            before.split_whitespace().nth(4),
            after.split_whitespace().next(),
        ) else {
            continue;
        };
        match point {
            "/sys/fs/cgroup" => root = Some(fstype.to_string()),
            "/sys/fs/cgroup/unified" => unified = Some(fstype.to_string()),
            _ => {}
        }
    }
    match (root.as_deref(), unified.as_deref()) {
        (Some("cgroup2"), _) => CgroupLayout::Unified,
        (_, Some("cgroup2")) => CgroupLayout::Hybrid,
        _ => CgroupLayout::Legacy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(any: &prost_types::Any) -> RuncOptions {
        assert_eq!(any.type_url, "containerd.runc.v1.Options");
        prost::Message::decode(any.value.as_slice()).unwrap()
    }

    #[test]
    fn runc_on_a_system_containerd_passes_no_options() {
        assert_eq!(OciRuntime::default().options(), None);
        assert_eq!(
            OciRuntime::default().root_of("direktiv.a"),
            Path::new("/run/containerd/runc/direktiv.a")
        );
        assert_eq!(OciRuntime::default().group_tag(), "");
    }

    #[test]
    fn options_carry_the_binary_as_field_six_and_the_root_as_field_seven() {
        let crun = OciRuntime::new(RuntimeBinary::Crun, None);
        assert_eq!(
            decode(&crun.options().unwrap()),
            RuncOptions {
                binary_name: "crun".into(),
                root: "/run/containerd/crun".into()
            }
        );
        // Tag 6, wire type 2 (length-delimited): 0x32; tag 7: 0x3a.
        let embedded = OciRuntime::new(RuntimeBinary::Runc, Some(Path::new("/s/containerd")));
        let root = b"/s/containerd/runc";
        let mut want = vec![0x3a, root.len() as u8];
        want.extend_from_slice(root);
        assert_eq!(embedded.options().unwrap().value, want);
        let path = OciRuntime::new(
            RuntimeBinary::Path("/opt/crun-1.21/crun".into()),
            Some(Path::new("/s/containerd")),
        );
        let any = path.options().unwrap();
        assert_eq!(&any.value[..2], &[0x32, 19]);
        assert_eq!(
            decode(&any),
            RuncOptions {
                binary_name: "/opt/crun-1.21/crun".into(),
                root: "/s/containerd/crun".into()
            }
        );
        assert_eq!(path.group_tag(), "-crun");
    }

    #[test]
    fn namespaces_get_their_own_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[namespaces.fast]\nruntime_binary = \"crun\"\n").unwrap();
        let cfg = Config::load(Default::default(), Some(&file)).unwrap();
        let r = Runtimes::from_config(&cfg, None);
        assert_eq!(r.of("direktiv.fast").binary(), &RuntimeBinary::Crun);
        assert_eq!(r.of("direktiv.other").binary(), &RuntimeBinary::Runc);
        assert_eq!(r.all().count(), 2);
    }

    const HYBRID: &str = "\
25 31 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
27 26 0:25 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
28 26 0:26 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,xattr,name=systemd
31 26 0:29 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,memory
";
    const UNIFIED: &str = "\
25 31 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:8 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
    const LEGACY: &str = "\
26 25 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
31 26 0:29 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:13 - cgroup cgroup rw,memory
";

    #[test]
    fn cgroup_layouts_are_told_as_crun_tells_them() {
        assert_eq!(cgroup_layout(HYBRID), CgroupLayout::Hybrid);
        assert_eq!(cgroup_layout(UNIFIED), CgroupLayout::Unified);
        assert_eq!(cgroup_layout(LEGACY), CgroupLayout::Legacy);
        assert_eq!(cgroup_layout(""), CgroupLayout::Legacy);
        // A cgroup2 mounted over the tmpfs later wins.
        let over = format!("{HYBRID}40 25 0:40 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        assert_eq!(cgroup_layout(&over), CgroupLayout::Unified);
    }

    #[test]
    fn crun_is_refused_on_a_hybrid_host_only() {
        let crun = Runtimes {
            namespaces: HashMap::from([(
                "direktiv.fast".to_string(),
                OciRuntime::new(RuntimeBinary::Path("/usr/local/bin/crun".into()), None),
            )]),
            ..Default::default()
        };
        let e = crun.check_host(HYBRID).unwrap_err();
        let line = e.to_string();
        assert!(
            line.starts_with("crun cannot run on this host's hybrid cgroup layout")
                && line.contains("/usr/local/bin/crun")
                && !line.contains('\n'),
            "{line}"
        );
        crun.check_host(UNIFIED).unwrap();
        crun.check_host(LEGACY).unwrap();
        Runtimes::default().check_host(HYBRID).unwrap();
    }
}
