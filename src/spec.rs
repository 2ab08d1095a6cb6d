//! The OCI runtime spec of one action: the base spec and seccomp profile
//! kept as data in `runtime-spec/`, plus the image config, the request and
//! the size. Pure: no I/O but reading the optional override files once at
//! start-up, so every rule here is unit-tested.
//!
//! Does not decide *which* user or limits apply (the runner resolves the
//! user from the rootfs, the config maps sizes); it only writes them in.

use std::path::{Path, PathBuf};

use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespaceType, LinuxResources, LinuxSeccomp,
    MountBuilder, Spec, UserBuilder,
};

/// The base spec and seccomp profile compiled into the binary.
const BASE_SPEC: &str = include_str!("../runtime-spec/base.json");
const SECCOMP: &str = include_str!("../runtime-spec/seccomp.json");

/// Where the action's data directory appears inside the container.
pub const DATA_MOUNT: &str = "/direktiv-data";

/// Where a pre-created task's launcher (issue 16, `launch/isolate-launch.rs`)
/// appears inside its container: read-only, the one mount a pooled action
/// has that an unpooled one has not (runtime-spec/README.md).
pub const LAUNCHER_MOUNT: &str = "/.isolate/launch";

/// The launch file a pooled action's launcher reads, removes and execs
/// from: in the data directory, written at take time (`runner::pool`).
pub const LAUNCH_FILE: &str = ".isolate-launch";

/// The annotation the runc v2 shim groups containers by.
pub const SHIM_GROUP_ANNOTATION: &str = "io.containerd.runc.v2.group";

/// CFS period: 100 ms, the kernel's and runc's default.
const CPU_PERIOD: u64 = 100_000;

/// Why a spec could not be built.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum SpecError {
    /// cannot read {path}: {reason}
    Read { path: PathBuf, reason: String },
    /// {what} is not valid: {reason}
    Parse { what: String, reason: String },
    /// the image has no entrypoint or cmd and the request no command
    NoCommand,
    /// user {user:?} of the image: {reason}
    User { user: String, reason: String },
    /// the spec cannot be encoded: {0}
    Encode(String),
}

/// A user as the kernel sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// Everything that varies from one action to the next.
pub struct SpecInput<'a> {
    pub image: &'a ImageConfiguration,
    /// The request's `command`, split; replaces entrypoint and cmd.
    pub argv: Option<&'a [String]>,
    /// Variables added to (and overriding) the image's environment.
    pub env: Vec<(String, String)>,
    pub user: ProcessUser,
    pub data_dir: &'a Path,
    pub memory_bytes: i64,
    pub cpus: f64,
    pub cgroups_path: String,
    /// The network namespace to join; `None` keeps the base spec's fresh one.
    pub netns: Option<PathBuf>,
    /// Host files bind-mounted read-only at container paths (resolv.conf, hosts).
    pub files: Vec<(PathBuf, String)>,
    /// Network namespace settings (`linux.sysctl`), added to the base spec's.
    pub sysctl: Vec<(String, String)>,
    /// The runc v2 shim group: containers with the same group share one
    /// shim process instead of starting one each.
    pub shim_group: Option<String>,
    /// A pre-created task's (issue 16): the host path of the launcher, which
    /// is then the created process, mounted read-only at
    /// [`LAUNCHER_MOUNT`]; the action's own argv and environment come at
    /// take time ([`SpecTemplate::process`]).
    pub launcher: Option<&'a Path>,
}

/// The base spec with the seccomp profile merged in, parsed once.
#[derive(Clone)]
pub struct SpecTemplate {
    base: Spec,
}

impl SpecTemplate {
    /// The pids limit every action gets (the base spec's), for the node's
    /// pids budget; 0 when the base spec sets none.
    pub fn pids_limit(&self) -> u64 {
        self.base
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.pids().as_ref())
            .map_or(0, |p| p.limit().max(0) as u64)
    }

    /// Loads the built-in data, or the override files when given. A
    /// seccomp path of `unconfined` leaves seccomp off.
    pub fn load(base: Option<&Path>, seccomp: Option<&Path>) -> Result<Self, SpecError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| SpecError::Read {
                path: p.to_owned(),
                reason: e.to_string(),
            })
        };
        let base_text = match base {
            Some(p) => read(p)?,
            None => BASE_SPEC.to_string(),
        };
        let mut spec: Spec = serde_json::from_str(&base_text).map_err(|e| SpecError::Parse {
            what: "base spec".into(),
            reason: e.to_string(),
        })?;
        let seccomp: Option<LinuxSeccomp> = match seccomp {
            Some(p) if p.as_os_str() == "unconfined" => None,
            Some(p) => Some(parse_seccomp(&read(p)?)?),
            None => Some(parse_seccomp(SECCOMP)?),
        }
        .map(|mut profile| {
            host_architectures_only(&mut profile, std::env::consts::ARCH);
            profile
        });
        if let Some(linux) = spec.linux_mut() {
            linux.set_seccomp(seccomp);
        }
        Ok(SpecTemplate { base: spec })
    }

    /// Replaces the base spec's capability set (bounding, effective,
    /// permitted; inheritable and ambient stay empty) with `names`, e.g.
    /// `CAP_NET_RAW` (the `CAP_` prefix and case are optional). Empty
    /// keeps the base spec's.
    pub fn with_capabilities(mut self, names: &[String]) -> Result<Self, SpecError> {
        let names: Vec<&str> = names
            .iter()
            .map(|n| n.trim())
            .filter(|n| !n.is_empty())
            .collect();
        if names.is_empty() {
            return Ok(self);
        }
        let mut set = oci_spec::runtime::Capabilities::new();
        for name in names {
            let upper = name.to_ascii_uppercase();
            let full = match upper.starts_with("CAP_") {
                true => upper,
                false => format!("CAP_{upper}"),
            };
            let cap: oci_spec::runtime::Capability =
                serde_json::from_value(serde_json::Value::String(full)).map_err(|_| {
                    SpecError::Parse {
                        what: "setting capabilities".into(),
                        reason: format!("{name:?} is not a Linux capability"),
                    }
                })?;
            set.insert(cap);
        }
        let process = self.base.process_mut().get_or_insert_with(Default::default);
        let mut caps = process.capabilities().clone().unwrap_or_default();
        caps.set_bounding(Some(set.clone()));
        caps.set_effective(Some(set.clone()));
        caps.set_permitted(Some(set));
        caps.set_inheritable(None);
        caps.set_ambient(None);
        process.set_capabilities(Some(caps));
        Ok(self)
    }

    /// The action's argv and environment: the request's command or the
    /// image's entrypoint and cmd; the base spec's, the image's and `extra`
    /// variables, later ones winning. What `build` writes into the spec,
    /// and what a pre-created task's launcher is handed at take time.
    pub fn process(
        &self,
        image: &ImageConfiguration,
        argv: Option<&[String]>,
        extra: &[(String, String)],
    ) -> Result<(Vec<String>, Vec<String>), SpecError> {
        let cfg = image.config().as_ref();
        let argv: Vec<String> = match argv {
            Some(argv) => argv.to_vec(),
            None => {
                let mut v = cfg.and_then(|c| c.entrypoint().clone()).unwrap_or_default();
                v.extend(cfg.and_then(|c| c.cmd().clone()).unwrap_or_default());
                v
            }
        };
        if argv.is_empty() {
            return Err(SpecError::NoCommand);
        }
        let base_env = self
            .base
            .process()
            .as_ref()
            .and_then(|p| p.env().clone())
            .unwrap_or_default();
        let image_env = cfg.and_then(|c| c.env().clone()).unwrap_or_default();
        Ok((argv, merge_env(&base_env, &image_env, extra)))
    }

    pub fn build(&self, input: &SpecInput) -> Result<Spec, SpecError> {
        let mut spec = self.base.clone();
        let cfg = input.image.config().as_ref();

        let (argv, env) = match input.launcher {
            None => self.process(input.image, input.argv, &input.env)?,
            Some(_) => {
                let (_, env) = self.process(input.image, Some(&[String::new()]), &input.env)?;
                let file = format!("{DATA_MOUNT}/{LAUNCH_FILE}");
                (vec![LAUNCHER_MOUNT.to_string(), file], env)
            }
        };
        let cwd = cfg
            .and_then(|c| c.working_dir().clone())
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into());

        let user = UserBuilder::default()
            .uid(input.user.uid)
            .gid(input.user.gid)
            .additional_gids(input.user.additional_gids.clone())
            .build()
            .map_err(|e| SpecError::Encode(e.to_string()))?;
        let process = spec.process_mut().get_or_insert_with(Default::default);
        process.set_args(Some(argv));
        process.set_env(Some(env));
        process.set_cwd(PathBuf::from(cwd));
        process.set_user(user);

        let data_mount = MountBuilder::default()
            .destination(DATA_MOUNT)
            .typ("bind")
            .source(input.data_dir)
            .options(vec![
                "rbind".into(),
                "rw".into(),
                "nosuid".into(),
                "nodev".into(),
            ])
            .build()
            .map_err(|e| SpecError::Encode(e.to_string()))?;
        spec.mounts_mut()
            .get_or_insert_with(Vec::new)
            .push(data_mount);
        if let Some(launcher) = input.launcher {
            // Not noexec: it is what runs. Read-only, so no action can change
            // what the next pooled one runs.
            let mount = MountBuilder::default()
                .destination(LAUNCHER_MOUNT)
                .typ("bind")
                .source(launcher)
                .options(vec![
                    "rbind".into(),
                    "ro".into(),
                    "nosuid".into(),
                    "nodev".into(),
                ])
                .build()
                .map_err(|e| SpecError::Encode(e.to_string()))?;
            spec.mounts_mut().get_or_insert_with(Vec::new).push(mount);
        }
        for (source, destination) in &input.files {
            // Read-only: the files are per action, but a writable one would
            // let the action fill the state dir's disk.
            let file_mount = MountBuilder::default()
                .destination(destination)
                .typ("bind")
                .source(source)
                .options(vec![
                    "rbind".into(),
                    "ro".into(),
                    "nosuid".into(),
                    "nodev".into(),
                    "noexec".into(),
                ])
                .build()
                .map_err(|e| SpecError::Encode(e.to_string()))?;
            spec.mounts_mut()
                .get_or_insert_with(Vec::new)
                .push(file_mount);
        }

        let linux = spec.linux_mut().get_or_insert_with(Default::default);
        linux.set_cgroups_path(Some(PathBuf::from(&input.cgroups_path)));

        if let Some(path) = &input.netns {
            for ns in linux.namespaces_mut().iter_mut().flatten() {
                if ns.typ() == LinuxNamespaceType::Network {
                    ns.set_path(Some(path.clone()));
                }
            }
        }
        if !input.sysctl.is_empty() {
            let sysctl = linux.sysctl_mut().get_or_insert_with(Default::default);
            for (k, v) in &input.sysctl {
                sysctl.insert(k.clone(), v.clone());
            }
        }
        let resources = linux
            .resources_mut()
            .get_or_insert_with(LinuxResources::default);
        // Swap equal to memory: the limit covers memory and swap together,
        // so an action cannot escape its size into swap.
        let memory = LinuxMemoryBuilder::default()
            .limit(input.memory_bytes)
            .swap(input.memory_bytes)
            .build()
            .map_err(|e| SpecError::Encode(e.to_string()))?;
        resources.set_memory(Some(memory));
        let cpu = LinuxCpuBuilder::default()
            .quota((input.cpus * CPU_PERIOD as f64).round() as i64)
            .period(CPU_PERIOD)
            .build()
            .map_err(|e| SpecError::Encode(e.to_string()))?;
        resources.set_cpu(Some(cpu));
        if let Some(group) = &input.shim_group {
            // An OCI annotation, not a container label: the shim reads only
            // the spec (CONTAINERD-NOTES.md).
            spec.annotations_mut()
                .get_or_insert_with(Default::default)
                .insert(SHIM_GROUP_ANNOTATION.to_string(), group.clone());
        }
        Ok(spec)
    }
}

/// Keeps only the architectures this host's kernel can present to the filter.
///
/// runc compiles the filter with libseccomp inside every container's init, and
/// the cost grows with each architecture listed: one instead of five saves
/// about 20 ms of CPU per action here (runtime-spec/README.md). Dropping the others
/// changes nothing a process can do, because a syscall from an architecture the
/// kernel cannot run never reaches the filter. Unknown hosts keep the list.
fn host_architectures_only(profile: &mut LinuxSeccomp, host: &str) {
    use oci_spec::runtime::Arch;
    let family: &[Arch] = match host {
        "x86_64" => &[Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32],
        "aarch64" => &[Arch::ScmpArchAarch64, Arch::ScmpArchArm],
        _ => return,
    };
    if let Some(archs) = profile.architectures().clone() {
        let kept: Vec<Arch> = archs.into_iter().filter(|a| family.contains(a)).collect();
        profile.set_architectures(Some(kept));
    }
}

fn parse_seccomp(text: &str) -> Result<LinuxSeccomp, SpecError> {
    serde_json::from_str(text).map_err(|e| SpecError::Parse {
        what: "seccomp profile".into(),
        reason: e.to_string(),
    })
}

/// Later layers override earlier ones key by key, keeping first-seen order.
fn merge_env(base: &[String], image: &[String], extra: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| match out.iter_mut().find(|(ek, _)| ek == k) {
        Some(e) => e.1 = v.to_string(),
        None => out.push((k.to_string(), v.to_string())),
    };
    for kv in base.iter().chain(image) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        set(k, v);
    }
    for (k, v) in extra {
        set(k, v);
    }
    out.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// Resolves an image's `User` (`""`, `uid`, `uid:gid`, `name`,
/// `name:group`) against the image's own `/etc/passwd` and `/etc/group`
/// (given as their contents; `None` when the image has none).
pub fn resolve_user(
    user: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<ProcessUser, SpecError> {
    let err = |reason: &str| SpecError::User {
        user: user.to_string(),
        reason: reason.to_string(),
    };
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd_entry = |pred: &dyn Fn(&[&str]) -> bool| {
        passwd.and_then(|p| {
            p.lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 4 && pred(f))
                .and_then(|f| {
                    Some((
                        f[0].to_string(),
                        f[2].parse::<u32>().ok()?,
                        f[3].parse::<u32>().ok()?,
                    ))
                })
        })
    };
    let (uid, name, primary_gid) = if u.is_empty() {
        (0, Some("root".to_string()), 0)
    } else if let Ok(uid) = u.parse::<u32>() {
        match passwd_entry(&|f| f[2] == u) {
            Some((name, _, gid)) => (uid, Some(name), gid),
            None => (uid, None, 0),
        }
    } else {
        match passwd_entry(&|f| f[0] == u) {
            Some((name, uid, gid)) => (uid, Some(name), gid),
            None => return Err(err("no such user in the image's /etc/passwd")),
        }
    };
    let groups: Vec<(String, u32, Vec<String>)> = group
        .map(|g| {
            g.lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() >= 3).then_some(())?;
                    let members = f.get(3).map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(String::from)
                            .collect()
                    });
                    Some((
                        f[0].to_string(),
                        f[2].parse().ok()?,
                        members.unwrap_or_default(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let gid = match g {
        None | Some("") => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|(n, _, _)| n == g)
                .map(|(_, gid, _)| *gid)
                .ok_or_else(|| err("no such group in the image's /etc/group"))?,
        },
    };
    let mut additional_gids: Vec<u32> = match &name {
        Some(name) if g.is_none() => groups
            .iter()
            .filter(|(_, _, members)| members.contains(name))
            .map(|(_, gid, _)| *gid)
            .collect(),
        _ => Vec::new(),
    };
    additional_gids.retain(|x| *x != gid);
    additional_gids.dedup();
    Ok(ProcessUser {
        uid,
        gid,
        additional_gids,
    })
}

/// The spec as containerd stores it: JSON in a protobuf `Any`.
pub fn to_any(spec: &Spec) -> Result<prost_types::Any, SpecError> {
    Ok(prost_types::Any {
        type_url: "types.containerd.io/opencontainers/runtime-spec/1/Spec".into(),
        value: serde_json::to_vec(spec).map_err(|e| SpecError::Encode(e.to_string()))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::{ConfigBuilder, ImageConfigurationBuilder};

    fn image(
        entrypoint: Option<Vec<&str>>,
        cmd: Option<Vec<&str>>,
        env: Vec<&str>,
        wd: Option<&str>,
    ) -> ImageConfiguration {
        let mut c = ConfigBuilder::default();
        if let Some(e) = entrypoint {
            c = c.entrypoint(e.into_iter().map(String::from).collect::<Vec<_>>());
        }
        if let Some(e) = cmd {
            c = c.cmd(e.into_iter().map(String::from).collect::<Vec<_>>());
        }
        c = c.env(env.into_iter().map(String::from).collect::<Vec<_>>());
        if let Some(w) = wd {
            c = c.working_dir(w.to_string());
        }
        ImageConfigurationBuilder::default()
            .config(c.build().unwrap())
            .build()
            .unwrap()
    }

    fn input<'a>(img: &'a ImageConfiguration, argv: Option<&'a [String]>) -> SpecInput<'a> {
        SpecInput {
            image: img,
            argv,
            env: vec![
                ("DIREKTIV_DIR".into(), DATA_MOUNT.into()),
                ("FOO".into(), "override".into()),
            ],
            user: ProcessUser {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![],
            },
            data_dir: Path::new("/var/lib/isolated/actions/x/data"),
            memory_bytes: 256 << 20,
            cpus: 1.5,
            cgroups_path: "/isolated/ns/a".into(),
            netns: None,
            files: vec![],
            sysctl: vec![],
            shim_group: None,
            launcher: None,
        }
    }

    fn template() -> SpecTemplate {
        SpecTemplate::load(None, None).unwrap()
    }

    #[test]
    fn entrypoint_and_cmd_are_joined_and_command_replaces_both() {
        let img = image(
            Some(vec!["/bin/sh"]),
            Some(vec!["/action.sh", "x"]),
            vec![],
            None,
        );
        let spec = template().build(&input(&img, None)).unwrap();
        assert_eq!(
            spec.process().as_ref().unwrap().args().as_ref().unwrap(),
            &["/bin/sh", "/action.sh", "x"]
        );
        let argv = vec!["echo".to_string(), "a b".to_string()];
        let spec = template().build(&input(&img, Some(&argv))).unwrap();
        assert_eq!(
            spec.process().as_ref().unwrap().args().as_ref().unwrap(),
            &argv
        );
        let empty = image(None, None, vec![], None);
        assert!(matches!(
            template().build(&input(&empty, None)),
            Err(SpecError::NoCommand)
        ));
    }

    #[test]
    fn environment_layers_and_workdir() {
        let img = image(
            Some(vec!["x"]),
            None,
            vec!["PATH=/img/bin", "FOO=bar", "KEEP=1"],
            Some("/work"),
        );
        let spec = template().build(&input(&img, None)).unwrap();
        let p = spec.process().as_ref().unwrap();
        let env = p.env().as_ref().unwrap();
        assert!(env.contains(&"PATH=/img/bin".to_string()), "{env:?}");
        assert!(env.contains(&"FOO=override".to_string()));
        assert!(env.contains(&"KEEP=1".to_string()));
        assert!(env.contains(&"DIREKTIV_DIR=/direktiv-data".to_string()));
        assert_eq!(env.iter().filter(|e| e.starts_with("PATH=")).count(), 1);
        assert_eq!(p.cwd(), &PathBuf::from("/work"));
        assert_eq!(p.user().uid(), 1000);
        let no_wd = image(Some(vec!["x"]), None, vec![], None);
        let spec = template().build(&input(&no_wd, None)).unwrap();
        assert_eq!(spec.process().as_ref().unwrap().cwd(), &PathBuf::from("/"));
    }

    #[test]
    fn limits_mount_and_security_defaults() {
        let img = image(Some(vec!["x"]), None, vec![], None);
        let spec = template().build(&input(&img, None)).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        let res = linux.resources().as_ref().unwrap();
        let mem = res.memory().as_ref().unwrap();
        assert_eq!(mem.limit(), Some(256 << 20));
        assert_eq!(mem.swap(), Some(256 << 20));
        let cpu = res.cpu().as_ref().unwrap();
        assert_eq!(cpu.quota(), Some(150_000));
        assert_eq!(cpu.period(), Some(100_000));
        assert!(
            res.pids().as_ref().is_some_and(|p| p.limit() > 0),
            "base spec must set a pids limit"
        );
        assert_eq!(
            linux.cgroups_path().as_ref().unwrap(),
            &PathBuf::from("/isolated/ns/a")
        );
        assert!(linux.seccomp().is_some());
        let ns: Vec<String> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| format!("{:?}", n.typ()))
            .collect();
        for want in ["Pid", "Mount", "Ipc", "Uts", "Network"] {
            assert!(
                ns.iter().any(|n| n == want),
                "{want} namespace missing: {ns:?}"
            );
        }
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.no_new_privileges(), Some(true));
        let caps = p.capabilities().as_ref().unwrap();
        assert!(!caps
            .bounding()
            .as_ref()
            .unwrap()
            .contains(&oci_spec::runtime::Capability::SysAdmin));
        let mounts = spec.mounts().as_ref().unwrap();
        let data = mounts
            .iter()
            .find(|m| m.destination() == Path::new(DATA_MOUNT))
            .unwrap();
        assert_eq!(
            data.source().as_ref().unwrap(),
            Path::new("/var/lib/isolated/actions/x/data")
        );
        // No other host path is bind-mounted.
        assert_eq!(
            mounts
                .iter()
                .filter(|m| m.typ().as_deref() == Some("bind"))
                .count(),
            1
        );
        for masked in ["/proc/kcore", "/proc/interrupts"] {
            assert!(linux
                .masked_paths()
                .as_ref()
                .is_some_and(|m| m.iter().any(|p| p == masked)));
        }
        assert!(linux
            .readonly_paths()
            .as_ref()
            .is_some_and(|m| m.iter().any(|p| p == "/proc/sys")));
        let any = to_any(&spec).unwrap();
        assert!(any.type_url.ends_with("runtime-spec/1/Spec"));
    }

    #[test]
    fn network_files_are_read_only_binds_and_the_netns_is_joined() {
        let img = image(Some(vec!["x"]), None, vec![], None);
        let mut inp = input(&img, None);
        inp.netns = Some(PathBuf::from("/s/netns/ns/a"));
        inp.files = vec![(PathBuf::from("/s/actions/ns/a/hosts"), "/etc/hosts".into())];
        let off = (
            "net.ipv6.conf.eth0.disable_ipv6".to_string(),
            "1".to_string(),
        );
        inp.sysctl = vec![off.clone()];
        let spec = template().build(&inp).unwrap();
        let hosts = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.destination() == Path::new("/etc/hosts"))
            .unwrap();
        assert_eq!(
            hosts.source().as_deref(),
            Some(Path::new("/s/actions/ns/a/hosts"))
        );
        let opts = hosts.options().as_ref().unwrap();
        assert!(opts.iter().any(|o| o == "ro") && !opts.iter().any(|o| o == "rw"));
        let net = spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .find(|n| n.typ() == LinuxNamespaceType::Network)
            .unwrap();
        assert_eq!(net.path().as_deref(), Some(Path::new("/s/netns/ns/a")));
        let sysctl = |spec: &Spec| {
            spec.linux()
                .as_ref()
                .unwrap()
                .sysctl()
                .clone()
                .unwrap_or_default()
        };
        // The network's settings are added to the base spec's; ping works
        // in both.
        assert_eq!(sysctl(&spec).get(&off.0), Some(&off.1));
        let plain = template().build(&input(&img, None)).unwrap();
        assert!(!sysctl(&plain).contains_key(&off.0));
        for s in [&spec, &plain] {
            assert_eq!(
                sysctl(s)
                    .get("net.ipv4.ping_group_range")
                    .map(String::as_str),
                Some("0 2147483647")
            );
        }
    }

    #[test]
    fn capabilities_are_the_reviewed_set_or_the_setting() {
        use oci_spec::runtime::Capability as C;
        let img = image(Some(vec!["x"]), None, vec![], None);
        let caps = |t: &SpecTemplate| {
            let spec = t.build(&input(&img, None)).unwrap();
            let c = spec
                .process()
                .as_ref()
                .unwrap()
                .capabilities()
                .clone()
                .unwrap();
            let eff = c.effective().clone().unwrap();
            assert_eq!(c.bounding().as_ref(), Some(&eff));
            assert_eq!(c.permitted().as_ref(), Some(&eff));
            assert!(c.inheritable().as_ref().is_none_or(|s| s.is_empty()));
            assert!(c.ambient().as_ref().is_none_or(|s| s.is_empty()));
            eff
        };
        let default = caps(&template());
        assert_eq!(default.len(), 10, "{default:?}");
        for dropped in [
            C::NetRaw,
            C::Mknod,
            C::Setfcap,
            C::AuditWrite,
            C::SysAdmin,
            C::NetAdmin,
        ] {
            assert!(!default.contains(&dropped), "{dropped:?} in {default:?}");
        }
        for kept in [C::Chown, C::Setuid, C::NetBindService, C::Kill] {
            assert!(default.contains(&kept), "{kept:?} missing");
        }
        let set = template()
            .with_capabilities(&["CAP_NET_RAW".into(), "chown".into(), " ".into()])
            .unwrap();
        assert_eq!(caps(&set), [C::NetRaw, C::Chown].into_iter().collect());
        assert_eq!(caps(&template().with_capabilities(&[]).unwrap()), default);
        let e = template()
            .with_capabilities(&["CAP_FLY".into()])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("CAP_FLY") && e.contains("capabilit"), "{e}");
    }

    #[test]
    fn seccomp_keeps_the_host_family_only() {
        use oci_spec::runtime::Arch;
        let archs = |host: &str| {
            let mut p = parse_seccomp(SECCOMP).unwrap();
            host_architectures_only(&mut p, host);
            p.architectures().clone().unwrap()
        };
        // 64-bit only: 32-bit and x32 syscalls get the default action (EPERM).
        assert_eq!(archs("x86_64"), [Arch::ScmpArchX86_64]);
        assert_eq!(archs("aarch64"), [Arch::ScmpArchAarch64]);
        assert_eq!(archs("riscv64").len(), 2);
        // A profile that lists the 32-bit ABIs keeps them on their host.
        let mut p = parse_seccomp(SECCOMP).unwrap();
        p.set_architectures(Some(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchAarch64,
            Arch::ScmpArchArm,
        ]));
        host_architectures_only(&mut p, "x86_64");
        assert_eq!(
            p.architectures().clone().unwrap(),
            [Arch::ScmpArchX86_64, Arch::ScmpArchX86]
        );
        let template = SpecTemplate::load(None, None).unwrap();
        let linux = template.base.linux().as_ref().unwrap();
        let loaded = linux.seccomp().as_ref().unwrap().architectures().clone();
        assert_eq!(loaded.unwrap(), archs(std::env::consts::ARCH));
    }

    #[test]
    fn unconfined_drops_seccomp() {
        let t = SpecTemplate::load(None, Some(Path::new("unconfined"))).unwrap();
        let img = image(Some(vec!["x"]), None, vec![], None);
        let spec = t.build(&input(&img, None)).unwrap();
        assert!(spec.linux().as_ref().unwrap().seccomp().is_none());
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1001:\nextra:x:2000:app,other\n";

    #[test]
    fn users_resolve_like_docker() {
        let r = |u| resolve_user(u, Some(PASSWD), Some(GROUP));
        assert_eq!(
            r("").unwrap(),
            ProcessUser {
                uid: 0,
                gid: 0,
                additional_gids: vec![]
            }
        );
        assert_eq!(
            r("app").unwrap(),
            ProcessUser {
                uid: 1000,
                gid: 1001,
                additional_gids: vec![2000]
            }
        );
        assert_eq!(r("1000").unwrap().gid, 1001);
        assert_eq!(
            r("4242").unwrap(),
            ProcessUser {
                uid: 4242,
                gid: 0,
                additional_gids: vec![]
            }
        );
        assert_eq!(
            r("app:extra").unwrap(),
            ProcessUser {
                uid: 1000,
                gid: 2000,
                additional_gids: vec![]
            }
        );
        assert_eq!(
            r("5:6").unwrap(),
            ProcessUser {
                uid: 5,
                gid: 6,
                additional_gids: vec![]
            }
        );
        assert!(r("ghost").is_err());
        assert!(r("app:ghosts").is_err());
        assert!(resolve_user("app", None, None).is_err());
    }
}
