//! Settings of the daemon: every one has a flag, an environment variable and
//! a key in the optional TOML file; flags win over the environment, the
//! environment over the file, the file over the default.
//!
//! Each setting is declared once, in the [`settings!`] table below, which
//! generates the flag/env/file layer ([`Options`]), the resolved [`Config`]
//! and the documentation table ([`SETTINGS`]) the README is checked against.
//! This module only reads configuration; it does not act on it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ConfigError {
    /// cannot read config file {path}: {source}
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// config file {path} is invalid: {source}
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    /// setting {name} is invalid: {reason}
    Invalid { name: &'static str, reason: String },
}

/// Settings that are choices are enums, parsed once where they are read
/// (flag, environment or file), so nothing downstream matches strings.
macro_rules! choice {
    ($(#[doc = $doc:literal])* $name:ident { $($(#[doc = $vdoc:literal])* $variant:ident),* $(,)? }) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize, serde::Serialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($(#[doc = $vdoc])* $variant),* }
    };
}

choice! {
    /// `shim_group`: how action tasks share runc v2 shims.
    ShimGroup {
        /// A shim of its own for every task, as `ctr` does.
        None,
        /// The namespace's shims, held open by keepers.
        Namespace,
    }
}

choice! {
    /// `network`: what network an action gets.
    NetworkMode {
        /// Its own namespace on a CNI network.
        Cni,
        /// A namespace with loopback only.
        None,
    }
}

choice! {
    /// `log_format`.
    LogFormat {
        Text,
        Json,
    }
}

/// `runtime_binary`: the OCI runtime the runc v2 shim runs for an action
/// (containerd's runc option `BinaryName`). Parsed once: `runc`, `crun`,
/// or an absolute path to either (or to another runc-compatible binary).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RuntimeBinary {
    /// The shim's own default: `runc` from its PATH.
    #[default]
    Runc,
    /// `crun` from the shim's PATH.
    Crun,
    /// That binary, by absolute path.
    Path(PathBuf),
}

impl RuntimeBinary {
    /// What the shim runs: a name it looks up in its PATH, or a path.
    pub fn command(&self) -> &std::ffi::OsStr {
        match self {
            RuntimeBinary::Runc => "runc".as_ref(),
            RuntimeBinary::Crun => "crun".as_ref(),
            RuntimeBinary::Path(p) => p.as_os_str(),
        }
    }

    /// The binary's file name (`runc`, `crun`, or the path's last part):
    /// names its state root, and tells crun from runc.
    pub fn name(&self) -> &str {
        match self {
            RuntimeBinary::Runc => "runc",
            RuntimeBinary::Crun => "crun",
            // A path's file name was checked to be UTF-8 when parsed.
            RuntimeBinary::Path(p) => p.file_name().and_then(|n| n.to_str()).unwrap_or("runc"),
        }
    }

    /// crun, by name or by path: it refuses hybrid cgroup hosts.
    pub fn is_crun(&self) -> bool {
        self.name().contains("crun")
    }
}

impl std::str::FromStr for RuntimeBinary {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" | "runc" => Ok(RuntimeBinary::Runc),
            "crun" => Ok(RuntimeBinary::Crun),
            p if p.starts_with('/') => {
                let path = PathBuf::from(p);
                match path.file_name().and_then(|n| n.to_str()) {
                    Some(n) if !n.is_empty() && n != ".." => Ok(RuntimeBinary::Path(path)),
                    _ => Err(format!("{p:?} names no binary (it ends in no file name)")),
                }
            }
            other => Err(format!(
                "{other:?} is neither runc, crun nor an absolute path"
            )),
        }
    }
}

impl std::fmt::Display for RuntimeBinary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.command().to_string_lossy())
    }
}

impl<'de> Deserialize<'de> for RuntimeBinary {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for RuntimeBinary {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A `[namespaces.NAME]` table of the config file: settings of one
/// Direktiv namespace that differ from the node's (file only; no flag or
/// environment variable).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceOptions {
    /// This namespace's `runtime_binary`.
    pub runtime_binary: Option<RuntimeBinary>,
}

/// One row of the documentation table.
pub struct SettingDoc {
    pub key: &'static str,
    pub flag: &'static str,
    pub env: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

macro_rules! settings {
    ($( $(#[doc = $doc:literal])* $name:ident : $ty:ty = $default:expr, $env:literal, $default_doc:literal $(, $extra:ident = $val:expr)*; )*) => {
        /// The flag/environment layer and the file layer: every field optional.
        #[derive(Debug, Default, Clone, clap::Args, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Options {
            $(
                $(#[doc = $doc])*
                #[arg(long, env = $env $(, $extra = $val)*)]
                #[serde(default)]
                pub $name: Option<$ty>,
            )*
            /// `[namespaces.NAME]` tables (the config file only).
            #[arg(skip)]
            #[serde(default)]
            pub namespaces: BTreeMap<String, NamespaceOptions>,
        }

        /// Resolved settings.
        #[derive(Debug, Clone, serde::Serialize)]
        pub struct Config {
            $( $(#[doc = $doc])* pub $name: $ty, )*
            /// Per-namespace settings, by Direktiv namespace.
            #[serde(skip)]
            pub namespaces: BTreeMap<String, NamespaceOptions>,
        }

        impl Options {
            /// `self` wins over `lower`, field by field.
            pub fn or(self, lower: Options) -> Options {
                let mut namespaces = lower.namespaces;
                namespaces.extend(self.namespaces);
                Options { $( $name: self.$name.or(lower.$name), )* namespaces }
            }

            fn resolve(self) -> Config {
                Config { $( $name: self.$name.unwrap_or_else(|| $default), )* namespaces: self.namespaces }
            }
        }

        /// Every setting with its flag, environment variable and default.
        pub const SETTINGS: &[SettingDoc] = &[
            $( SettingDoc {
                key: stringify!($name),
                flag: concat!("--", stringify!($name)),
                env: $env,
                default: $default_doc,
                help: concat!($($doc),*),
            }, )*
        ];
    };
}

// Flags are the keys with `_` turned into `-` (clap does that on its own).
settings! {
    /// TCP address (host:port) of the gRPC services, where every call but gRPC health must authenticate (tls_client_ca, auth_tokens_file); empty: the local socket only.
    bind: String = "127.0.0.1:8888".into(), "DIREKTIV_ISOLATE_BIND", "127.0.0.1:8888";
    /// Unix socket serving every service to local callers, trusted for every namespace (mode 0600, root's); empty: none.
    socket: PathBuf = "/run/isolated/isolated.sock".into(), "ISOLATED_SOCKET", "/run/isolated/isolated.sock";
    /// Group that may use the local socket too (mode 0660); empty: root only.
    socket_group: String = String::new(), "ISOLATED_SOCKET_GROUP", "(none)";
    /// PEM certificate chain of the TCP listener; with tls_key it serves TLS only.
    tls_cert: PathBuf = PathBuf::new(), "ISOLATED_TLS_CERT", "(none)";
    /// PEM private key of tls_cert.
    tls_key: PathBuf = PathBuf::new(), "ISOLATED_TLS_KEY", "(none)";
    /// PEM CA whose client certificates are accepted on the TCP listener (mutual TLS), for every namespace.
    tls_client_ca: PathBuf = PathBuf::new(), "ISOLATED_TLS_CLIENT_CA", "(none)";
    /// TOML file of bearer tokens (name, sha256 of the secret, namespaces) accepted on the TCP listener; re-read when it changes.
    auth_tokens_file: PathBuf = PathBuf::new(), "ISOLATED_AUTH_TOKENS_FILE", "(none)";
    /// Serve the TCP listener without authentication when neither tls_client_ca nor auth_tokens_file is set (anyone who reaches it can run anything).
    allow_unauthenticated: bool = false, "ISOLATED_ALLOW_UNAUTHENTICATED", "false", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new();
    /// Where ReportActionResults is sent (host:port or http(s)://host:port); "none" or empty: no flow engine, results are only kept for the control API.
    flow_endpoint: String = "127.0.0.1:7777".into(), "DIREKTIV_FLOW_ENDPOINT", "127.0.0.1:7777";
    /// PEM CA that an https:// flow endpoint's certificate must chain to; empty: the system's roots.
    flow_ca: PathBuf = PathBuf::new(), "ISOLATED_FLOW_CA", "(system roots)";
    /// PEM client certificate presented to an https:// flow endpoint (mutual TLS), with flow_client_key.
    flow_client_cert: PathBuf = PathBuf::new(), "ISOLATED_FLOW_CLIENT_CERT", "(none)";
    /// PEM private key of flow_client_cert.
    flow_client_key: PathBuf = PathBuf::new(), "ISOLATED_FLOW_CLIENT_KEY", "(none)";
    /// containerd's gRPC socket (ignored with embedded_containerd).
    containerd_address: PathBuf = "/run/containerd/containerd.sock".into(), "ISOLATED_CONTAINERD_ADDRESS", "/run/containerd/containerd.sock";
    /// Start and supervise a private containerd (from PATH), its root, state, socket and config under state_dir/containerd.
    embedded_containerd: bool = false, "ISOLATED_EMBEDDED_CONTAINERD", "false", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new();
    /// Directory for action data, logs and the daemon's state.
    state_dir: PathBuf = "/var/lib/isolated".into(), "ISOLATED_STATE_DIR", "/var/lib/isolated";
    /// Prefix of the containerd namespace of each Direktiv namespace.
    namespace_prefix: String = "direktiv.".into(), "ISOLATED_NAMESPACE_PREFIX", "direktiv.";
    /// Registries (host or host:port, comma separated) reached over plain HTTP; loopback always is.
    insecure_registries: Vec<String> = Vec::new(), "ISOLATED_INSECURE_REGISTRIES", "(none)", value_delimiter = ',';
    /// Seconds before a tag is resolved against its registry again.
    tag_ttl_secs: u64 = 60, "ISOLATED_TAG_TTL_SECS", "60";
    /// Timeout in seconds of a request that sets none.
    default_timeout_secs: u64 = 1800, "ISOLATED_DEFAULT_TIMEOUT_SECS", "1800";
    /// Longest timeout in seconds; longer requests are clamped to it.
    max_timeout_secs: u64 = 1800, "ISOLATED_MAX_TIMEOUT_SECS", "1800";
    /// Actions running at once; more wait in the queue.
    max_running: usize = 32, "ISOLATED_MAX_RUNNING", "32";
    /// Most MiB of memory limits (size_memory_mib) of the actions running at once; beyond it actions wait in the queue; 0: the host's MemTotal minus an eighth (at least 1 GiB) for the host.
    max_total_memory_mib: u64 = 0, "ISOLATED_MAX_TOTAL_MEMORY_MIB", "0";
    /// Most pre-created tasks (issue 16: created, not started, for the next action of a namespace, image and size) kept per namespace, image and size; 1 or 2 by the recent rate within it; 0 turns the pool off.
    precreate_max: usize = 2, "ISOLATED_PRECREATE_MAX", "2";
    /// Seconds the pre-created tasks of a namespace, image and size stay after its last action.
    precreate_idle_secs: u64 = 60, "ISOLATED_PRECREATE_IDLE_SECS", "60";
    /// Most pids (each action's pids limit from the base spec) of the actions running at once; beyond it actions wait in the queue; 0: the smaller of the kernel's pid_max and threads-max, minus an eighth (at least 4096) for the host.
    max_total_pids: u64 = 0, "ISOLATED_MAX_TOTAL_PIDS", "0";
    /// Actions waiting for a slot before RunIsolate answers RESOURCE_EXHAUSTED.
    max_queued: usize = 1024, "ISOLATED_MAX_QUEUED", "1024";
    /// Seconds between SIGTERM and SIGKILL when an action is stopped.
    kill_grace_secs: u64 = 5, "ISOLATED_KILL_GRACE_SECS", "5";
    /// Largest accepted input (data), in bytes.
    max_input_bytes: usize = 32 << 20, "ISOLATED_MAX_INPUT_BYTES", "33554432";
    /// Largest data.out reported, in bytes.
    max_output_bytes: usize = 32 << 20, "ISOLATED_MAX_OUTPUT_BYTES", "33554432";
    /// Largest report sent to the flow engine, in bytes (the encoded request; Direktiv's gRPC server takes 4 MiB); a larger output is reported as an io error naming both sizes.
    max_report_bytes: usize = 4 << 20, "ISOLATED_MAX_REPORT_BYTES", "4194304";
    /// Seconds a report the flow engine refuses permanently (any code but UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED) is retried, from its first such answer; then it is parked as undeliverable until isolatectl report retry or drop.
    report_give_up_secs: u64 = 3600, "ISOLATED_REPORT_GIVE_UP_SECS", "3600";
    /// Largest image archive an import takes, in bytes, and the most all imports in progress spool under the state dir together (beyond it: RESOURCE_EXHAUSTED).
    max_import_bytes: u64 = 4 << 30, "ISOLATED_MAX_IMPORT_BYTES", "4294967296";
    /// Memory limits in MiB of sizes 0,1,2 (swap included).
    size_memory_mib: Vec<u64> = vec![256, 512, 1024], "ISOLATED_SIZE_MEMORY_MIB", "256,512,1024", value_delimiter = ',';
    /// Disk limits in MiB of sizes 0,1,2: what an action writes (rootfs, /tmp, /direktiv-data together) goes to a filesystem of its own of that size, past which writes fail with ENOSPC; 0: no limit (needs the overlayfs snapshotter, loop devices and e2fsprogs otherwise).
    size_disk_mib: Vec<u64> = vec![1024, 2048, 4096], "ISOLATED_SIZE_DISK_MIB", "1024,2048,4096", value_delimiter = ',';
    /// CPU quotas in CPUs of sizes 0,1,2.
    size_cpus: Vec<f64> = vec![1.0, 1.0, 2.0], "ISOLATED_SIZE_CPUS", "1,1,2", value_delimiter = ',';
    /// containerd snapshotter for images and actions.
    snapshotter: String = "overlayfs".into(), "ISOLATED_SNAPSHOTTER", "overlayfs";
    /// One runc v2 shim per namespace, kept alive by a parked keeper (namespace; other runtimes: none), or a shim per action (none).
    shim_group: ShimGroup = ShimGroup::Namespace, "ISOLATED_SHIM_GROUP", "namespace", value_parser = clap::builder::EnumValueParser::<ShimGroup>::new();
    /// Seconds a namespace's shim (and its keeper) stays after its last action.
    shim_keep_secs: u64 = 30, "ISOLATED_SHIM_KEEP_SECS", "30";
    /// Most shims of one namespace (each creates its tasks one at a time); 0 is one per CPU.
    shims_per_namespace: usize = 0, "ISOLATED_SHIMS_PER_NAMESPACE", "0";
    /// containerd runtime (shim) for action tasks.
    runtime: String = "io.containerd.runc.v2".into(), "ISOLATED_RUNTIME", "io.containerd.runc.v2";
    /// OCI runtime the runc v2 shim runs: runc, crun (from the shim's PATH) or an absolute path; a namespace's [namespaces.NAME] table may choose its own.
    runtime_binary: RuntimeBinary = RuntimeBinary::Runc, "ISOLATED_RUNTIME_BINARY", "runc";
    /// A base OCI runtime spec replacing the built-in runtime-spec/base.json.
    base_spec: PathBuf = PathBuf::new(), "ISOLATED_BASE_SPEC", "(built in)";
    /// A seccomp profile replacing the built-in runtime-spec/seccomp.json; "unconfined" disables it.
    seccomp_profile: PathBuf = PathBuf::new(), "ISOLATED_SECCOMP_PROFILE", "(built in)";
    /// Capabilities of an action's process (comma separated, e.g. CAP_CHOWN,CAP_KILL), replacing the base spec's set; empty: the base spec's (no CAP_NET_RAW, see runtime-spec/README.md).
    capabilities: Vec<String> = Vec::new(), "ISOLATED_CAPABILITIES", "(base spec's)", value_delimiter = ',';
    /// Network of each action: cni (its own namespace on a CNI network) or none (loopback only).
    network: NetworkMode = NetworkMode::Cni, "ISOLATED_NETWORK", "cni", value_parser = clap::builder::EnumValueParser::<NetworkMode>::new();
    /// Directory of the CNI plugin binaries.
    cni_bin_dir: PathBuf = "/usr/lib/cni".into(), "ISOLATED_CNI_BIN_DIR", "/usr/lib/cni";
    /// Directory of the CNI network config (*.conflist); empty: the built-in one.
    cni_conf_dir: PathBuf = PathBuf::new(), "ISOLATED_CNI_CONF_DIR", "(built in)";
    /// Seconds a CNI plugin may take for one command before it is killed.
    cni_timeout_secs: u64 = 30, "ISOLATED_CNI_TIMEOUT_SECS", "30";
    /// DNS servers for actions (comma separated); empty: the host's resolv.conf.
    dns_servers: Vec<String> = Vec::new(), "ISOLATED_DNS_SERVERS", "(host's)", value_delimiter = ',';
    /// Link-local IPv4 addresses or CIDRs (169.254.0.0/16, comma separated) actions may reach, e.g. a cloud metadata service; empty: none.
    allowed_link_local: Vec<String> = Vec::new(), "ISOLATED_ALLOWED_LINK_LOCAL", "(none)", value_delimiter = ',';
    /// Log every phase span when it closes, with its duration (for finding where time goes).
    log_span_times: bool = false, "ISOLATED_LOG_SPAN_TIMES", "false", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new();
    /// Log format: text or json.
    log_format: LogFormat = LogFormat::Text, "ISOLATED_LOG_FORMAT", "text", value_parser = clap::builder::EnumValueParser::<LogFormat>::new();
    /// Address of the Prometheus /metrics endpoint (host:port); empty disables it.
    metrics_bind: String = "127.0.0.1:9464".into(), "ISOLATED_METRICS_BIND", "127.0.0.1:9464";
}

/// A config file with every setting commented out at its default, each
/// under its help line: generated from the table, so the file `make
/// install` puts in /etc/isolated cannot drift from the code.
pub fn example_toml() -> String {
    let defaults = toml::Table::try_from(Options::default().resolve()).unwrap_or_default();
    let mut out = String::from(
        "# isolated's configuration (isolated --config FILE, or ISOLATED_CONFIG).\n\
         # Every setting is shown commented out at its default. Flags win over\n\
         # the environment, the environment over this file.\n",
    );
    for s in SETTINGS {
        let value = match defaults.get(s.key) {
            Some(v) => v.to_string(),
            // A setting without a value (none set): its documented default.
            None => format!("{:?}", s.default),
        };
        out.push_str(&format!(
            "\n# {}\n# (flag {}, environment {})\n#{} = {}\n",
            s.help.trim(),
            s.flag.replace('_', "-"),
            s.env,
            s.key,
            value
        ));
    }
    out
}

/// containerd's runc v2 shim, whose options carry `runtime_binary`.
pub const RUNC_SHIM: &str = "io.containerd.runc.v2";

/// Limits the edge enforces; a view of [`Config`].
#[derive(Debug, Clone)]
pub struct Limits {
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    pub max_input_bytes: usize,
    /// Whether the size bounds of `request` apply (not to requests accepted
    /// before they existed, which are owed their run).
    pub size_bounds: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Options::default().resolve().limits()
    }
}

impl Config {
    /// Loads the file named by `cli.config` (if any) under the flag/env layer.
    pub fn load(cli: Options, file: Option<&Path>) -> Result<Config, ConfigError> {
        let file_opts = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str::<Options>(&text).map_err(|source| ConfigError::Parse {
                    path: path.to_owned(),
                    source: Box::new(source),
                })?
            }
            None => Options::default(),
        };
        let config = cli.or(file_opts).resolve();
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |name, reason: &str| {
            Err(ConfigError::Invalid {
                name,
                reason: reason.into(),
            })
        };
        if self.size_memory_mib.len() != 3 || self.size_memory_mib.iter().any(|&m| m < 4) {
            return invalid("size_memory_mib", "needs three values of at least 4 MiB");
        }
        if self.size_disk_mib.len() != 3 || self.size_disk_mib.iter().any(|&m| m > 0 && m < 16) {
            return invalid(
                "size_disk_mib",
                "needs three values, each 0 (no limit) or at least 16 MiB",
            );
        }
        if self.size_disk_mib.iter().any(|&m| m > 0) && self.snapshotter != "overlayfs" {
            return invalid(
                "size_disk_mib",
                "needs the overlayfs snapshotter (the limit puts its upper dir on the action's disk); 0,0,0 turns it off",
            );
        }
        if self.size_cpus.len() != 3 || self.size_cpus.iter().any(|&c| c.is_nan() || c <= 0.0) {
            return invalid("size_cpus", "needs three positive values");
        }
        if self.max_running == 0 {
            return invalid("max_running", "must be positive");
        }
        if self.max_timeout_secs == 0 {
            return invalid("max_timeout_secs", "must be positive");
        }
        if self.shims_per_namespace > crate::runner::shim_keeper::MAX_SHIMS_PER_NAMESPACE {
            return invalid("shims_per_namespace", "is at most 99");
        }
        let mut binaries = std::iter::once(&self.runtime_binary).chain(
            self.namespaces
                .values()
                .filter_map(|n| n.runtime_binary.as_ref()),
        );
        if self.runtime != RUNC_SHIM && binaries.any(|b| *b != RuntimeBinary::Runc) {
            return invalid(
                "runtime_binary",
                "is an option of the runc v2 shim, but runtime names another shim",
            );
        }
        if let Err(e) = crate::metrics::parse_bind(&self.metrics_bind) {
            return invalid("metrics_bind", &e.to_string());
        }
        if let Err(reason) = self.tcp_bind() {
            return invalid("bind", &reason);
        }
        if self.tcp_bind().ok().flatten().is_none() && self.socket.as_os_str().is_empty() {
            return invalid("socket", "is empty and so is bind: nothing would be served");
        }
        let set = |p: &Path| !p.as_os_str().is_empty();
        if set(&self.tls_cert) != set(&self.tls_key) {
            return invalid("tls_cert", "and tls_key are set together or not at all");
        }
        if set(&self.tls_client_ca) && !set(&self.tls_cert) {
            return invalid(
                "tls_client_ca",
                "needs tls_cert and tls_key: client certificates are a TLS listener's",
            );
        }
        if set(&self.flow_client_cert) != set(&self.flow_client_key) {
            return invalid(
                "flow_client_cert",
                "and flow_client_key are set together or not at all",
            );
        }
        if let Err(reason) = self.link_local_allowed() {
            return invalid("allowed_link_local", &reason);
        }
        let flow_tls = set(&self.flow_ca) || set(&self.flow_client_cert);
        if flow_tls && !self.flow_endpoint.trim().starts_with("https://") {
            return invalid(
                "flow_ca",
                "(or flow_client_cert) is set, but flow_endpoint is not https://: it would not be used",
            );
        }
        Ok(())
    }

    /// The TCP listener's address; `None` for an empty `bind` (the local
    /// socket only).
    pub fn tcp_bind(&self) -> Result<Option<SocketAddr>, String> {
        let b = self.bind.trim();
        if b.is_empty() {
            return Ok(None);
        }
        b.parse()
            .map(Some)
            .map_err(|e| format!("{b:?} is not host:port: {e}"))
    }

    /// `allowed_link_local` as CIDRs (`a.b.c.d/n`); each must lie inside
    /// 169.254.0.0/16, the only range its rules open.
    pub fn link_local_allowed(&self) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        for entry in self.allowed_link_local.iter().map(|e| e.trim()) {
            if entry.is_empty() {
                continue;
            }
            let bad = |why: &str| format!("{entry:?} {why}");
            let (addr, len) = match entry.split_once('/') {
                Some((a, l)) => (
                    a,
                    l.parse::<u8>()
                        .map_err(|_| bad("has no valid prefix length"))?,
                ),
                None => (entry, 32),
            };
            let ip: std::net::Ipv4Addr = addr
                .parse()
                .map_err(|_| bad("is not an IPv4 address or CIDR"))?;
            if !ip.is_link_local() || !(16..=32).contains(&len) {
                return Err(bad("is not inside 169.254.0.0/16"));
            }
            out.push(format!("{ip}/{len}"));
        }
        Ok(out)
    }

    pub fn limits(&self) -> Limits {
        Limits {
            default_timeout: Duration::from_secs(
                self.default_timeout_secs.min(self.max_timeout_secs),
            ),
            max_timeout: Duration::from_secs(self.max_timeout_secs),
            max_input_bytes: self.max_input_bytes,
            size_bounds: true,
        }
    }

    pub fn kill_grace(&self) -> Duration {
        Duration::from_secs(self.kill_grace_secs)
    }

    pub fn report_give_up(&self) -> Duration {
        Duration::from_secs(self.report_give_up_secs)
    }

    pub fn tag_ttl(&self) -> Duration {
        Duration::from_secs(self.tag_ttl_secs)
    }

    /// The runtime binary of Direktiv namespace `namespace`: its own
    /// `[namespaces.NAME]` choice, else the node's.
    pub fn runtime_binary_of(&self, namespace: &str) -> &RuntimeBinary {
        self.namespaces
            .get(namespace)
            .and_then(|n| n.runtime_binary.as_ref())
            .unwrap_or(&self.runtime_binary)
    }

    /// The containerd namespace of a Direktiv namespace.
    pub fn containerd_namespace(&self, namespace: &str) -> String {
        format!(
            "{}{}",
            self.namespace_prefix,
            crate::request::containerd_name(namespace)
        )
    }

    /// The store's database file.
    pub fn store_path(&self) -> PathBuf {
        self.state_dir.join("isolated.redb")
    }

    /// Root of the per-action directories.
    pub fn actions_dir(&self) -> PathBuf {
        self.state_dir.join("actions")
    }

    /// Where queued actions' inputs wait (`crate::inputs`).
    pub fn inputs_dir(&self) -> PathBuf {
        self.state_dir.join("inputs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_beats_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "bind = \"127.0.0.1:1\"\nstate_dir = \"/x\"\nsize_cpus = [1, 2, 3]\n",
        )
        .unwrap();
        let cli = Options {
            bind: Some("127.0.0.1:2".into()),
            ..Default::default()
        };
        let c = Config::load(cli, Some(&file)).unwrap();
        assert_eq!(c.tcp_bind().unwrap().unwrap().port(), 2);
        assert_eq!(c.state_dir, PathBuf::from("/x"));
        assert_eq!(c.size_cpus, vec![1.0, 2.0, 3.0]);
        assert_eq!(c.flow_endpoint, "127.0.0.1:7777");
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "bnid = \"x\"\n").unwrap();
        let e = Config::load(Options::default(), Some(&file)).unwrap_err();
        assert!(e.to_string().contains("bnid"), "{e}");
    }

    #[test]
    fn choices_are_parsed_once_and_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "network = \"none\"\nshim_group = \"none\"\n").unwrap();
        let c = Config::load(Options::default(), Some(&file)).unwrap();
        assert_eq!(c.network, NetworkMode::None);
        assert_eq!(c.shim_group, ShimGroup::None);
        assert_eq!(c.log_format, LogFormat::Text);
        std::fs::write(&file, "network = \"bridge\"\n").unwrap();
        let e = Config::load(Options::default(), Some(&file)).unwrap_err();
        assert!(e.to_string().contains("bridge"), "{e}");
    }

    #[test]
    fn runtime_binary_is_runc_crun_or_a_path_and_namespaces_choose_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "runtime_binary = \"crun\"\n\n[namespaces.legacy]\nruntime_binary = \"runc\"\n\n\
             [namespaces.new]\nruntime_binary = \"/opt/runc-1.3/runc\"\n",
        )
        .unwrap();
        let c = Config::load(Options::default(), Some(&file)).unwrap();
        assert_eq!(c.runtime_binary, RuntimeBinary::Crun);
        assert_eq!(c.runtime_binary_of("legacy"), &RuntimeBinary::Runc);
        assert_eq!(
            c.runtime_binary_of("new"),
            &RuntimeBinary::Path("/opt/runc-1.3/runc".into())
        );
        assert_eq!(c.runtime_binary_of("new").name(), "runc");
        assert_eq!(c.runtime_binary_of("other"), &RuntimeBinary::Crun);
        assert!(c.runtime_binary_of("other").is_crun());
        // The flag (or environment) wins over the file's node-wide value,
        // not over a namespace's own.
        let cli = Options {
            runtime_binary: Some(RuntimeBinary::Runc),
            ..Default::default()
        };
        let c = Config::load(cli, Some(&file)).unwrap();
        assert_eq!(c.runtime_binary_of("other"), &RuntimeBinary::Runc);
        assert_eq!(c.runtime_binary_of("new").name(), "runc");

        for (text, needle) in [
            ("runtime_binary = \"youki\"\n", "youki"),
            ("runtime_binary = \"bin/crun\"\n", "bin/crun"),
            ("[namespaces.a]\nruntime = \"x\"\n", "runtime"),
            (
                "runtime = \"io.containerd.runsc.v1\"\n[namespaces.a]\nruntime_binary = \"crun\"\n",
                "runtime_binary",
            ),
        ] {
            std::fs::write(&file, text).unwrap();
            let e = Config::load(Options::default(), Some(&file)).unwrap_err();
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
        }
        assert_eq!(
            "/usr/bin/crun".parse::<RuntimeBinary>().unwrap().name(),
            "crun"
        );
        assert!("/".parse::<RuntimeBinary>().is_err());
    }

    #[test]
    fn bad_sizes_are_refused() {
        let cli = Options {
            size_memory_mib: Some(vec![1, 2]),
            ..Default::default()
        };
        assert!(Config::load(cli, None).is_err());
        let disk = |mib: Vec<u64>, snapshotter: &str| {
            Config::load(
                Options {
                    size_disk_mib: Some(mib),
                    snapshotter: Some(snapshotter.into()),
                    ..Default::default()
                },
                None,
            )
        };
        assert_eq!(
            disk(vec![0, 64, 4096], "overlayfs").unwrap().size_disk_mib,
            [0, 64, 4096]
        );
        assert!(disk(vec![1024, 2048], "overlayfs").is_err());
        assert!(disk(vec![8, 2048, 4096], "overlayfs").is_err());
        let e = disk(vec![1024, 2048, 4096], "native").unwrap_err();
        assert!(e.to_string().contains("overlayfs"), "{e}");
        assert!(disk(vec![0, 0, 0], "native").is_ok());
        assert_eq!(
            Config::load(Options::default(), None)
                .unwrap()
                .size_disk_mib,
            [1024, 2048, 4096]
        );
    }

    #[test]
    fn example_config_loads_and_names_every_setting() {
        let text = example_toml();
        let uncommented: String = text
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| l.contains(" = ") && !l.starts_with(' '))
            .map(|l| format!("{l}\n"))
            .collect();
        let opts: Options = toml::from_str(&uncommented).unwrap();
        let cfg = opts.resolve();
        cfg.check().unwrap();
        assert_eq!(cfg.bind, Options::default().resolve().bind);
        for s in SETTINGS {
            assert!(
                text.contains(&format!("\n#{} = ", s.key)),
                "{} missing",
                s.key
            );
        }
    }

    /// README's configuration table is the settings table, row for row, in
    /// both directions.
    #[test]
    fn readme_table_matches_the_settings() {
        let readme = include_str!("../README.md");
        let section = readme
            .split("\n## Configuration")
            .nth(1)
            .expect("README has a Configuration section");
        let section = section.split("\n## ").next().unwrap_or(section);
        let unquote = |c: &str| c.trim().trim_matches('`').to_string();
        let rows: Vec<Vec<String>> = section
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| l.trim_matches('|').split(" | ").map(unquote).collect())
            .collect();
        let documented: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
        for s in SETTINGS {
            let row = rows
                .iter()
                .find(|r| r[0] == s.key)
                .unwrap_or_else(|| panic!("README's table has no row for {}", s.key));
            assert_eq!(row.len(), 4, "row of {}", s.key);
            assert_eq!(row[1], s.env, "environment of {}", s.key);
            assert_eq!(row[2], s.default, "default of {}", s.key);
            assert_eq!(row[3], s.help.trim(), "meaning of {}", s.key);
        }
        for key in documented {
            assert!(
                SETTINGS.iter().any(|s| s.key == key),
                "README documents {key}, which is no setting"
            );
        }
    }

    #[test]
    fn allowed_link_local_takes_link_local_ranges_only() {
        let mut c = Config::load(Options::default(), None).unwrap();
        assert_eq!(c.link_local_allowed().unwrap(), Vec::<String>::new());
        c.allowed_link_local = vec!["169.254.169.254".into(), " 169.254.0.0/16".into()];
        assert_eq!(
            c.link_local_allowed().unwrap(),
            vec!["169.254.169.254/32", "169.254.0.0/16"]
        );
        for bad in ["10.0.0.1", "169.254.0.0/8", "fe80::1", "169.254.1.1/x"] {
            c.allowed_link_local = vec![bad.into()];
            let e = c.link_local_allowed().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn every_setting_is_documented() {
        for s in SETTINGS {
            assert!(!s.help.is_empty(), "{} has no help", s.key);
            assert!(s.env.starts_with("ISOLATED_") || s.env.starts_with("DIREKTIV_"));
        }
    }
}
