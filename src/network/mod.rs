//! Per-action networking: the network namespace an action's container
//! joins and what configures it.
//!
//! Owns the namespace's lifetime (created before the container, released
//! after the report, also after a crash) and the files the container sees
//! as `/etc/resolv.conf` and `/etc/hosts`. Does not touch the OCI spec
//! beyond the [`Attachment`] it returns.
//!
//! With `network = "cni"` each action gets a namespace of its own
//! ([`netns`]), configured by standard CNI plugins that isolated runs
//! itself ([`cni`]) from a config list ([`conf`]), kept apart from other
//! actions and from the host's loopback ([`isolation`]). What DEL needs is
//! written down before anything is created ([`record`]), so that the
//! network of an action is released from its [`NetTarget`] alone. With
//! `network = "none"` the runtime creates a fresh namespace with loopback
//! only and nothing is done here but the two files ([`resolv`]).
//!
//! State, under the state dir: `netns/<cns>/<actionId>` (the pinned
//! namespaces, in a shared mount), `cni/attachments/<cns>/<actionId>.json`
//! (the records), `cni/ipam/` (host-local leases, unless the config list
//! chooses its own `dataDir`).

pub mod cni;
pub mod conf;
pub mod isolation;
pub mod netns;
pub mod record;
pub mod resolv;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use crate::config::Config;

use self::cni::{CniResult, Params, Plugins};
use self::conf::NetConfList;
use self::isolation::Isolation;
use self::record::Record;

/// The interface an action's network appears as.
pub const IFNAME: &str = "eth0";
/// The mount points of the generated files in the container.
const RESOLV_CONF: &str = "/etc/resolv.conf";
const HOSTS: &str = "/etc/hosts";

/// Why an action's network could not be set up or released.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum NetworkError {
    /// DNS server {0:?} is not an IP address
    DnsServer(String),
    /// CNI network config {source_name}: {reason}
    Config { source_name: String, reason: String },
    /// CNI plugin {plugin} {command} failed: {reason}
    Plugin {
        plugin: String,
        command: &'static str,
        reason: String,
    },
    /// CNI plugin {plugin} returned an invalid result: {reason}
    Result { plugin: String, reason: String },
    /// cannot {what} {path}: {reason}
    Io {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// cannot isolate actions on bridge {bridge}: {reason}
    Isolation { bridge: String, reason: String },
    /// action {0} has no recorded network to check
    NotAttached(String),
}

/// The network of one action, as the spec needs it.
#[derive(Debug, Default, Clone)]
pub struct Attachment {
    /// A namespace to join; `None` lets the runtime create a private one.
    pub netns: Option<PathBuf>,
    /// Host files bind-mounted read-only at the given container paths.
    pub files: Vec<(PathBuf, String)>,
    /// Settings of the namespace the runtime applies (OCI `linux.sysctl`).
    pub sysctl: Vec<(String, String)>,
}

/// Which action a network belongs to.
pub struct NetTarget<'a> {
    pub cns: &'a str,
    pub action_id: &'a str,
    /// The action's directory, for its generated files.
    pub dir: &'a Path,
}

impl NetTarget<'_> {
    /// CNI's container id. Neither a namespace nor an action id may hold
    /// two separators in a row, so `--` splits the pair unambiguously.
    pub fn container_id(&self) -> String {
        format!("{}--{}", self.cns, self.action_id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    None,
    Cni,
}

/// Where the network state lives.
struct Paths {
    netns: PathBuf,
    records: PathBuf,
    ipam: PathBuf,
}

impl Paths {
    fn netns(&self, t: &NetTarget) -> PathBuf {
        self.netns.join(t.cns).join(t.action_id)
    }

    fn record(&self, t: &NetTarget) -> PathBuf {
        self.records
            .join(t.cns)
            .join(format!("{}.json", t.action_id))
    }
}

/// Sets up and tears down action networks.
pub struct Networks {
    mode: Mode,
    dns: Vec<IpAddr>,
    paths: Paths,
    conf_dir: PathBuf,
    plugins: Plugins,
    isolation: Isolation,
    dns_warned: AtomicBool,
}

impl Networks {
    /// Checks the settings and, in cni mode, prepares the state dirs. A
    /// broken config list does not stop the daemon: it is read again for
    /// every action (so a fix applies to the next one), and until then
    /// actions fail with a network error.
    pub fn new(cfg: &Config) -> Result<Self, NetworkError> {
        let mode = match cfg.network {
            crate::config::NetworkMode::None => Mode::None,
            crate::config::NetworkMode::Cni => Mode::Cni,
        };
        let dns = cfg
            .dns_servers
            .iter()
            .map(|s| {
                s.trim()
                    .parse()
                    .map_err(|_| NetworkError::DnsServer(s.clone()))
            })
            .collect::<Result<Vec<IpAddr>, _>>()?;
        let cni_dir = cfg.state_dir.join("cni");
        let paths = Paths {
            netns: cfg.state_dir.join("netns"),
            records: cni_dir.join("attachments"),
            ipam: cni_dir.join("ipam"),
        };
        let networks = Networks {
            mode,
            dns,
            paths,
            conf_dir: cfg.cni_conf_dir.clone(),
            plugins: Plugins {
                bin_dir: cfg.cni_bin_dir.clone(),
                timeout: Duration::from_secs(cfg.cni_timeout_secs.max(1)),
            },
            // Checked when the config was loaded.
            isolation: Isolation::new(
                reachable_ports(cfg),
                cfg.link_local_allowed().unwrap_or_default(),
            ),
            dns_warned: AtomicBool::new(false),
        };
        if mode == Mode::Cni {
            netns::prepare_dir(&networks.paths.netns)?;
            for dir in [&networks.paths.records, &networks.paths.ipam] {
                std::fs::create_dir_all(dir).map_err(|e| NetworkError::Io {
                    what: "create",
                    path: dir.clone(),
                    reason: e.to_string(),
                })?;
            }
            networks.log_config();
        }
        Ok(networks)
    }

    /// Unmounts the namespaces' directory at a graceful stop, once no
    /// action uses it; whatever happens is logged, since the stop goes on.
    pub fn release_dir(&self) {
        match netns::release_dir(&self.paths.netns) {
            Ok(true) => {
                info!(dir = %self.paths.netns.display(), "unmounted the network namespaces' directory")
            }
            Ok(false) => {}
            Err(e) => warn!(error = %e, "the network namespaces' directory stays mounted"),
        }
    }

    /// Says at start-up which network actions get, or why they will fail.
    fn log_config(&self) {
        match conf::load(&self.conf_dir) {
            Ok(list) => {
                let missing: Vec<&str> = (0..list.plugins.len())
                    .map(|i| list.plugin_type(i))
                    .chain(["loopback"])
                    .filter(|p| !self.plugins.bin_dir.join(p).is_file())
                    .collect();
                if missing.is_empty() {
                    info!(
                        config = %list.source,
                        network = %list.name,
                        bridge = list.bridge().as_deref().unwrap_or("(none)"),
                        "actions get a CNI network"
                    );
                } else {
                    error!(
                        config = %list.source,
                        bin_dir = %self.plugins.bin_dir.display(),
                        missing = %missing.join(", "),
                        "CNI plugins are missing; actions will fail with a network error"
                    );
                }
                if list.bridge().is_none() {
                    warn!(
                        config = %list.source,
                        "the network is not a bridge: keeping actions apart is up to its plugins"
                    );
                }
            }
            Err(e) => error!("{e}; actions will fail with a network error until it is fixed"),
        }
    }

    /// Prepares the network of one action. On failure nothing of it is
    /// left.
    pub async fn attach(&self, t: &NetTarget<'_>) -> Result<Attachment, NetworkError> {
        // An earlier attempt of the same action (a retry, or a run cut
        // short by a crash and started again) may have left a network: it
        // is released, never overwritten, or its lease would be lost.
        self.detach(t).await;
        match self.mode {
            Mode::None => Ok(Attachment {
                netns: None,
                files: self.write_files(t, &[], None)?,
                sysctl: Vec::new(),
            }),
            Mode::Cni => self.attach_cni(t).await,
        }
    }

    async fn attach_cni(&self, t: &NetTarget<'_>) -> Result<Attachment, NetworkError> {
        let started = Instant::now();
        let mut list = conf::load(&self.conf_dir)?.with_ipam_data_dir(&self.paths.ipam);
        let masquerade = list.take_over_ip_masq();
        let bridge = list.bridge();
        if let Some(b) = &bridge {
            self.isolation.ensure_rules(b, &masquerade).await?;
        }
        let record_path = self.paths.record(t);
        let mut record = Record {
            container_id: t.container_id(),
            ifname: IFNAME.into(),
            netns: self.paths.netns(t),
            bin_dir: self.plugins.bin_dir.clone(),
            conflist: list.to_value(),
            result: None,
        };
        // Written first: whatever exists after this point is found again.
        record.write(&record_path, true)?;
        if let Err(e) = netns::create(&record.netns).await {
            let _ = Record::remove(&record_path);
            return Err(e);
        }
        let result = match self
            .add(&list, bridge.as_deref(), &mut record, &record_path)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                self.release(&record, &record_path).await;
                return Err(e);
            }
        };
        let ips = result.container_ips();
        let files = match self.write_files(t, &ips, Some(&result.dns)) {
            Ok(f) => f,
            Err(e) => {
                self.release(&record, &record_path).await;
                return Err(e);
            }
        };
        info!(
            ip = %ips.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(","),
            ms = started.elapsed().as_millis() as u64,
            "network attached"
        );
        Ok(Attachment {
            netns: Some(record.netns.clone()),
            files,
            sysctl: ipv6_off(),
        })
    }

    /// Loopback, then the list, then the ports' isolation; the record gets
    /// the result as soon as there is one.
    async fn add(
        &self,
        list: &NetConfList,
        bridge: Option<&str>,
        record: &mut Record,
        record_path: &Path,
    ) -> Result<CniResult, NetworkError> {
        let params = Params {
            container_id: &record.container_id,
            netns: Some(&record.netns),
            ifname: &record.ifname,
        };
        // A namespace joined by path keeps lo down: runc only brings it up
        // in namespaces it creates itself.
        let lo = loopback_list(&list.cni_version)?;
        let lo_params = Params {
            ifname: "lo",
            ..params.clone()
        };
        cni::add(&self.plugins, &lo, &lo_params).await?;
        let (raw, result) = cni::add(&self.plugins, list, &params).await?;
        record.result = Some(raw);
        // Not synced: without the result DEL still works, and the
        // namespace and veth do not outlive a power loss anyway.
        record.write(record_path, false)?;
        if let Some(b) = bridge {
            // Off the async workers: the port's ebtables chain is a process
            // run (ebtables-restore), tens of milliseconds on a busy node.
            let (b, r) = (b.to_string(), result.clone());
            tokio::task::spawn_blocking(move || isolation::isolate_ports(&b, &r))
                .await
                .map_err(|e| NetworkError::Isolation {
                    bridge: bridge.unwrap_or_default().to_string(),
                    reason: e.to_string(),
                })??;
        }
        Ok(result)
    }

    /// DEL, then the namespace, then the record: each step is attempted
    /// whatever the one before did, and a failure is logged, not returned,
    /// since nobody could act on it. The loopback plugin gets no DEL: it
    /// holds nothing outside the namespace.
    async fn release(&self, record: &Record, record_path: &Path) {
        let started = Instant::now();
        let list = match NetConfList::parse(&record.conflist.to_string(), "the attachment record") {
            Ok(l) => Some(l),
            Err(e) => {
                error!(record = %record_path.display(), "{e}; cannot run CNI DEL, its lease may stay");
                None
            }
        };
        if let Some(list) = list {
            // A bare file is no namespace: plugins would fail to enter it
            // and then keep their lease.
            let netns = netns::is_namespace(&record.netns).then_some(record.netns.as_path());
            let params = Params {
                container_id: &record.container_id,
                netns,
                ifname: &record.ifname,
            };
            let plugins = Plugins {
                bin_dir: record.bin_dir.clone(),
                timeout: self.plugins.timeout,
            };
            if let Err(e) = cni::del(&plugins, &list, &params, record.result.as_ref()).await {
                warn!(error = %e, "CNI DEL failed");
            }
            // The port's bridge rules go with the port.
            let bridge = list.bridge();
            if let (Some(b), Some(raw)) = (&bridge, &record.result) {
                if let Ok(result) = CniResult::parse(raw) {
                    let b = b.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        isolation::unguard_ports(Some(&b), &result)
                    })
                    .await;
                }
            }
        }
        if let Err(e) = netns::remove(&record.netns) {
            warn!(error = %e, "cannot remove the network namespace");
        }
        if let Err(e) = Record::remove(record_path) {
            warn!(error = %e, "cannot remove the attachment record");
        }
        debug!(
            ms = started.elapsed().as_millis() as u64,
            "network released"
        );
    }

    /// Releases everything `attach` made. Idempotent, and works from the
    /// target alone, whatever the mode and config are now, so it can run
    /// after a crash.
    pub async fn detach(&self, t: &NetTarget<'_>) {
        let record_path = self.paths.record(t);
        match Record::read(&record_path) {
            Ok(Some(record)) => self.release(&record, &record_path).await,
            Ok(None) => {
                if let Err(e) = netns::remove(&self.paths.netns(t)) {
                    warn!(error = %e, "cannot remove the network namespace");
                }
            }
            Err(e) => {
                error!("{e}; cannot run CNI DEL, its lease may stay");
                let _ = netns::remove(&self.paths.netns(t));
                let _ = Record::remove(&record_path);
            }
        }
    }

    /// CNI CHECK of an attached action: whether its network is still as
    /// ADD left it (for an action found running after a restart).
    pub async fn check(&self, t: &NetTarget<'_>) -> Result<(), NetworkError> {
        let record_path = self.paths.record(t);
        let record = Record::read(&record_path)?
            .filter(|r| r.result.is_some())
            .ok_or_else(|| NetworkError::NotAttached(t.container_id()))?;
        let list = NetConfList::parse(&record.conflist.to_string(), "the attachment record")?;
        let params = Params {
            container_id: &record.container_id,
            netns: Some(&record.netns),
            ifname: &record.ifname,
        };
        let plugins = Plugins {
            bin_dir: record.bin_dir.clone(),
            timeout: self.plugins.timeout,
        };
        let result = record.result.as_ref().unwrap_or(&serde_json::Value::Null);
        cni::check(&plugins, &list, &params, result).await
    }

    /// The (containerd namespace, action id) of every action whose network
    /// is recorded or whose namespace exists: after a crash, those that
    /// belong to no known action are to be detached.
    pub fn attached(&self) -> Vec<(String, String)> {
        let mut found = Vec::new();
        let mut scan = |root: &Path, strip: Option<&str>| {
            let Ok(tenants) = std::fs::read_dir(root) else {
                return;
            };
            for tenant in tenants.flatten() {
                let cns = tenant.file_name().to_string_lossy().into_owned();
                let Ok(entries) = std::fs::read_dir(tenant.path()) else {
                    continue;
                };
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let id = match strip {
                        Some(ext) => match name.strip_suffix(ext) {
                            Some(id) => id.to_string(),
                            None => continue,
                        },
                        None => name,
                    };
                    if !found.contains(&(cns.clone(), id.clone())) {
                        found.push((cns.clone(), id));
                    }
                }
            }
        };
        scan(&self.paths.records, Some(".json"));
        scan(&self.paths.netns, None);
        found
    }

    /// Writes the action's resolv.conf and hosts into its directory.
    fn write_files(
        &self,
        t: &NetTarget,
        ips: &[IpAddr],
        cni_dns: Option<&cni::Dns>,
    ) -> Result<Vec<(PathBuf, String)>, NetworkError> {
        let (host, upstream) = resolv::host_resolv_conf();
        let (resolv_conf, warning) =
            resolv::resolv_conf(&self.dns, cni_dns, &host, upstream.as_deref());
        if let Some(w) = warning {
            // Once: it holds for every action until the host's config changes.
            if self.mode == Mode::Cni && !self.dns_warned.swap(true, Ordering::Relaxed) {
                warn!("{w}");
            }
        }
        let files = [
            (t.dir.join("resolv.conf"), resolv_conf, RESOLV_CONF),
            (t.dir.join("hosts"), resolv::hosts(ips), HOSTS),
        ];
        files
            .into_iter()
            .map(|(path, text, target)| {
                std::fs::write(&path, text).map_err(|e| NetworkError::Io {
                    what: "write",
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                Ok((path, target.to_string()))
            })
            .collect()
    }
}

/// No IPv6 on the action's interface (ISOLATE.md §8): its link-local
/// address reached a daemon bound to [::] on the host (issue 13). Per
/// interface, not `all`: `lo` keeps ::1, which `localhost` resolves to
/// first for some runtimes. The port's bridge rules drop IPv6 frames as
/// well ([`isolation`]). Nothing to turn off on a kernel without IPv6
/// (`ipv6.disable=1`), where runc would fail on the missing key.
fn ipv6_off() -> Vec<(String, String)> {
    match Path::new("/proc/sys/net/ipv6").is_dir() {
        true => vec![(format!("net.ipv6.conf.{IFNAME}.disable_ipv6"), "1".into())],
        false => Vec::new(),
    }
}

/// isolated's own listening ports that an action could reach: those not
/// bound to loopback.
fn reachable_ports(cfg: &Config) -> Vec<u16> {
    let metrics = cfg.metrics_bind.trim().parse::<SocketAddr>().ok();
    [cfg.tcp_bind().ok().flatten(), metrics]
        .into_iter()
        .flatten()
        .filter(|a| !a.ip().is_loopback())
        .map(|a| a.port())
        .collect()
}

/// The loopback plugin as a list of its own, in the main list's version.
fn loopback_list(cni_version: &str) -> Result<NetConfList, NetworkError> {
    let doc = serde_json::json!({
        "cniVersion": cni_version,
        "name": "isolated-loopback",
        "plugins": [{"type": "loopback"}],
    });
    NetConfList::parse(&doc.to_string(), "built-in loopback")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_keep_tenant_and_action_apart() {
        let dir = Path::new("/x");
        let a = NetTarget {
            cns: "direktiv.a-b",
            action_id: "c",
            dir,
        };
        let b = NetTarget {
            cns: "direktiv.a",
            action_id: "b-c",
            dir,
        };
        assert_eq!(a.container_id(), "direktiv.a-b--c");
        assert_ne!(a.container_id(), b.container_id());
    }

    #[test]
    fn only_ports_beyond_loopback_need_a_rule() {
        let mut cfg = crate::config::Config::load(Default::default(), None).unwrap();
        assert!(reachable_ports(&cfg).is_empty());
        cfg.bind = "0.0.0.0:8888".into();
        cfg.metrics_bind = "[::]:9464".into();
        assert_eq!(reachable_ports(&cfg), vec![8888, 9464]);
        cfg.metrics_bind = String::new();
        assert_eq!(reachable_ports(&cfg), vec![8888]);
    }

    #[test]
    fn ipv6_goes_off_on_the_action_interface_only() {
        let off = ipv6_off();
        if Path::new("/proc/sys/net/ipv6").is_dir() {
            assert_eq!(
                off,
                vec![(
                    "net.ipv6.conf.eth0.disable_ipv6".to_string(),
                    "1".to_string()
                )]
            );
        } else {
            assert!(off.is_empty());
        }
    }

    #[test]
    fn the_loopback_list_follows_the_main_version() {
        let l = loopback_list("0.4.0").unwrap();
        assert_eq!(l.plugin_type(0), "loopback");
        assert_eq!(l.cni_version, "0.4.0");
    }

    #[test]
    fn paths_are_per_tenant_and_action() {
        let p = Paths {
            netns: "/s/netns".into(),
            records: "/s/cni/attachments".into(),
            ipam: "/s/cni/ipam".into(),
        };
        let t = NetTarget {
            cns: "direktiv.ns",
            action_id: "a.json",
            dir: Path::new("/x"),
        };
        assert_eq!(p.netns(&t), Path::new("/s/netns/direktiv.ns/a.json"));
        assert_eq!(
            p.record(&t),
            Path::new("/s/cni/attachments/direktiv.ns/a.json.json")
        );
    }
}
