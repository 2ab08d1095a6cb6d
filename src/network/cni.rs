//! The CNI exec protocol (CNI spec 1.0, "Execution Protocol" and "Result
//! types"): running a plugin binary with the `CNI_*` environment and its
//! config on stdin, under a timeout; parsing its result or its error; and
//! running a configuration list: ADD in order with each result handed on as
//! `prevResult`, CHECK in order, DEL in reverse order.
//!
//! Nothing here knows about actions or namespaces files: the caller gives
//! the container id, the netns path and the interface name.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tracing::debug;

use super::conf::NetConfList;
use super::NetworkError;

/// The most of a plugin's output quoted in an error.
const QUOTE_MAX: usize = 400;

/// A CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Check,
    Del,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Check => "CHECK",
            Command::Del => "DEL",
        }
    }
}

/// How plugins are found and how long they may take.
#[derive(Debug, Clone)]
pub struct Plugins {
    pub bin_dir: PathBuf,
    pub timeout: Duration,
}

/// The attachment a command is about: CNI's (container id, netns, ifname).
#[derive(Debug, Clone)]
pub struct Params<'a> {
    pub container_id: &'a str,
    /// `None` when the namespace is gone: plugins then release what they
    /// hold outside it (the spec allows an empty CNI_NETNS on DEL).
    pub netns: Option<&'a Path>,
    pub ifname: &'a str,
}

/// The environment of one plugin run. Built from nothing but PATH, so
/// isolated's own settings never leak into plugins.
pub fn environment(command: Command, p: &Params, bin_dir: &Path) -> Vec<(String, String)> {
    let path = std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    vec![
        ("PATH".into(), path),
        ("CNI_COMMAND".into(), command.as_str().into()),
        ("CNI_CONTAINERID".into(), p.container_id.into()),
        (
            "CNI_NETNS".into(),
            p.netns.map(|n| n.display().to_string()).unwrap_or_default(),
        ),
        ("CNI_IFNAME".into(), p.ifname.into()),
        ("CNI_ARGS".into(), String::new()),
        ("CNI_PATH".into(), bin_dir.display().to_string()),
    ]
}

/// A plugin's error, as the spec's "Error" type has it on stdout.
#[derive(Debug, Deserialize)]
struct PluginError {
    #[serde(default)]
    code: u32,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    details: String,
}

/// The well-known error codes of the spec.
fn code_meaning(code: u32) -> Option<&'static str> {
    Some(match code {
        1 => "incompatible CNI version",
        2 => "unsupported field in network configuration",
        3 => "container unknown or does not exist",
        4 => "invalid necessary environment variables",
        5 => "I/O failure",
        6 => "failed to decode content",
        7 => "invalid network config",
        11 => "try again later",
        _ => return None,
    })
}

/// One line saying why a plugin failed: its error JSON when it printed one,
/// otherwise whatever it wrote, with its exit status.
pub fn describe_failure(status: Option<i32>, stdout: &[u8], stderr: &[u8]) -> String {
    let exit = match status {
        Some(c) => format!("exit status {c}"),
        None => "killed by a signal".to_string(),
    };
    if let Ok(e) = serde_json::from_slice::<PluginError>(stdout) {
        if !e.msg.is_empty() || e.code != 0 {
            let mut s = format!("code {}", e.code);
            if let Some(m) = code_meaning(e.code) {
                s.push_str(&format!(" ({m})"));
            }
            if !e.msg.is_empty() {
                s.push_str(&format!(": {}", e.msg));
            }
            if !e.details.is_empty() {
                s.push_str(&format!("; {}", e.details));
            }
            return one_line(&s);
        }
    }
    let said = [stdout, stderr]
        .iter()
        .map(|b| String::from_utf8_lossy(b).trim().to_string())
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if said.is_empty() {
        one_line(&exit)
    } else {
        one_line(&format!("{exit}: {said}"))
    }
}

/// Newlines folded, long text cut: messages end up in one report line.
fn one_line(s: &str) -> String {
    let s: String = s
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if s.chars().count() > QUOTE_MAX {
        let cut: String = s.chars().take(QUOTE_MAX).collect();
        format!("{cut}…")
    } else {
        s
    }
}

/// Runs one plugin once; returns its stdout on success.
async fn exec(
    plugins: &Plugins,
    plugin: &str,
    command: Command,
    p: &Params<'_>,
    stdin: &Value,
) -> Result<Vec<u8>, NetworkError> {
    let fail = |reason: String| NetworkError::Plugin {
        plugin: plugin.to_string(),
        command: command.as_str(),
        reason,
    };
    let binary = plugins.bin_dir.join(plugin);
    if !binary.is_file() {
        return Err(fail(format!(
            "no such plugin in {}",
            plugins.bin_dir.display()
        )));
    }
    let input = serde_json::to_vec(stdin).map_err(|e| fail(e.to_string()))?;
    let mut cmd = tokio::process::Command::new(&binary);
    cmd.env_clear()
        .envs(environment(command, p, &plugins.bin_dir))
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot run {}: {e}", binary.display())))?;
    let mut child_stdin = child.stdin.take();
    let run = async {
        let write = async {
            if let Some(mut s) = child_stdin.take() {
                // A plugin that exits early closes the pipe; its exit
                // status then says why, not this write.
                let _ = s.write_all(&input).await;
            }
        };
        let (_, out) = tokio::join!(write, child.wait_with_output());
        out
    };
    let out = tokio::time::timeout(plugins.timeout, run)
        .await
        .map_err(|_| {
            fail(format!(
                "no answer within {}s (killed)",
                plugins.timeout.as_secs()
            ))
        })?
        .map_err(|e| fail(format!("cannot wait for it: {e}")))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(fail(describe_failure(
            out.status.code(),
            &out.stdout,
            &out.stderr,
        )))
    }
}

/// ADD over the whole list. Returns the last plugin's result as raw JSON
/// (what DEL and CHECK get as prevResult later) and typed.
pub async fn add(
    plugins: &Plugins,
    list: &NetConfList,
    p: &Params<'_>,
) -> Result<(Value, CniResult), NetworkError> {
    let mut prev: Option<Value> = None;
    for i in 0..list.plugins.len() {
        let plugin = list.plugin_type(i);
        let started = std::time::Instant::now();
        let out = exec(
            plugins,
            plugin,
            Command::Add,
            p,
            &list.plugin_config(i, prev.as_ref()),
        )
        .await?;
        debug!(
            plugin,
            ms = started.elapsed().as_millis() as u64,
            "CNI ADD done"
        );
        let raw: Value = serde_json::from_slice(&out).map_err(|e| NetworkError::Result {
            plugin: plugin.to_string(),
            reason: format!(
                "not JSON ({e}): {}",
                one_line(&String::from_utf8_lossy(&out))
            ),
        })?;
        prev = Some(raw);
    }
    let raw = prev.unwrap_or(Value::Null);
    let parsed = CniResult::parse(&raw).map_err(|reason| NetworkError::Result {
        plugin: list.plugin_type(list.plugins.len() - 1).to_string(),
        reason,
    })?;
    Ok((raw, parsed))
}

/// CHECK over the whole list, with the ADD result as prevResult. Lists
/// older than 0.4.0, or with disableCheck, pass without running anything.
pub async fn check(
    plugins: &Plugins,
    list: &NetConfList,
    p: &Params<'_>,
    result: &Value,
) -> Result<(), NetworkError> {
    if !list.supports_check() {
        return Ok(());
    }
    for i in 0..list.plugins.len() {
        exec(
            plugins,
            list.plugin_type(i),
            Command::Check,
            p,
            &list.plugin_config(i, Some(result)),
        )
        .await?;
    }
    Ok(())
}

/// DEL over the whole list in reverse order, with the ADD result as
/// prevResult from spec 0.4.0 on. Unlike libcni it goes on past a failing
/// plugin, so that one failure does not keep the others' state (a lease,
/// NAT rules) forever; the first error is returned.
pub async fn del(
    plugins: &Plugins,
    list: &NetConfList,
    p: &Params<'_>,
    result: Option<&Value>,
) -> Result<(), NetworkError> {
    let result = result.filter(|_| list.at_least_0_4());
    let mut first_error = None;
    for i in (0..list.plugins.len()).rev() {
        let conf = list.plugin_config(i, result);
        if let Err(e) = exec(plugins, list.plugin_type(i), Command::Del, p, &conf).await {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The parts of a CNI result isolated uses (spec 0.3.0 to 1.0.0; the
/// per-IP `version` of 0.3.x/0.4.0 is ignored, the address says it).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub dns: Dns,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default)]
    pub mac: String,
    /// Empty for interfaces on the host side.
    #[serde(default)]
    pub sandbox: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct IpConfig {
    /// CIDR notation: `10.213.0.5/16`.
    pub address: String,
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default)]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Dns {
    #[serde(default)]
    pub nameservers: Vec<String>,
    #[serde(default)]
    pub domain: String,
    #[serde(default)]
    pub search: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

impl CniResult {
    pub fn parse(raw: &Value) -> Result<CniResult, String> {
        let r = CniResult::deserialize(raw).map_err(|e| format!("not a CNI result: {e}"))?;
        for ip in &r.ips {
            parse_cidr(&ip.address)?;
            if let Some(i) = ip.interface {
                if i >= r.interfaces.len() {
                    return Err(format!(
                        "ip {} names interface {i} of {}",
                        ip.address,
                        r.interfaces.len()
                    ));
                }
            }
        }
        Ok(r)
    }

    /// The addresses given to the container's own interfaces.
    pub fn container_ips(&self) -> Vec<IpAddr> {
        self.ips
            .iter()
            .filter(|ip| {
                ip.interface
                    .and_then(|i| self.interfaces.get(i))
                    .is_none_or(|iface| !iface.sandbox.is_empty())
            })
            .filter_map(|ip| parse_cidr(&ip.address).ok().map(|(a, _)| a))
            .collect()
    }

    /// Interfaces on the host side (no sandbox), e.g. a bridge's veth ends.
    pub fn host_interfaces(&self) -> impl Iterator<Item = &str> {
        self.interfaces
            .iter()
            .filter(|i| i.sandbox.is_empty())
            .map(|i| i.name.as_str())
    }
}

/// `10.0.0.5/16` → (10.0.0.5, 16).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let bad = || format!("{s:?} is not an address in CIDR notation");
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(bad());
    }
    Ok((addr, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_environment_is_complete_and_nothing_else() {
        let p = Params {
            container_id: "direktiv.ns--a1",
            netns: Some(Path::new("/s/netns/direktiv.ns/a1")),
            ifname: "eth0",
        };
        let env = environment(Command::Add, &p, Path::new("/usr/lib/cni"));
        let get = |k: &str| env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CNI_COMMAND"), Some("ADD"));
        assert_eq!(get("CNI_CONTAINERID"), Some("direktiv.ns--a1"));
        assert_eq!(get("CNI_NETNS"), Some("/s/netns/direktiv.ns/a1"));
        assert_eq!(get("CNI_IFNAME"), Some("eth0"));
        assert_eq!(get("CNI_PATH"), Some("/usr/lib/cni"));
        assert_eq!(get("CNI_ARGS"), Some(""));
        assert!(get("PATH").is_some());
        assert_eq!(env.len(), 7);
        let gone = Params { netns: None, ..p };
        let env = environment(Command::Del, &gone, Path::new("/b"));
        assert!(env.contains(&("CNI_NETNS".into(), String::new())));
        assert!(env.contains(&("CNI_COMMAND".into(), "DEL".into())));
    }

    #[test]
    fn a_bridge_result_is_parsed() {
        // What the bridge plugin 1.1.1 prints for cniVersion 1.0.0.
        let raw = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "isolated0", "mac": "aa:bb:cc:dd:ee:01"},
                {"name": "veth1234abcd", "mac": "aa:bb:cc:dd:ee:02"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/s/netns/x"}
            ],
            "ips": [{"interface": 2, "address": "10.213.0.7/16", "gateway": "10.213.0.1"}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        });
        let r = CniResult::parse(&raw).unwrap();
        assert_eq!(
            r.container_ips(),
            vec!["10.213.0.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(r.ips[0].gateway, Some("10.213.0.1".parse().unwrap()));
        assert_eq!(
            r.host_interfaces().collect::<Vec<_>>(),
            vec!["isolated0", "veth1234abcd"]
        );
    }

    #[test]
    fn an_old_result_and_odd_results() {
        let raw = json!({
            "cniVersion": "0.4.0",
            "ips": [{"version": "4", "address": "10.1.0.2/24"}],
            "dns": {"nameservers": ["10.1.0.1"], "search": ["svc"]}
        });
        let r = CniResult::parse(&raw).unwrap();
        assert_eq!(r.container_ips().len(), 1);
        assert_eq!(r.dns.nameservers, vec!["10.1.0.1"]);
        for bad in [
            json!({"ips": [{"address": "10.1.0.2"}]}),
            json!({"ips": [{"address": "10.1.0.2/33"}]}),
            json!({"ips": [{"address": "10.1.0.2/24", "interface": 1}]}),
            json!({"ips": "x"}),
            json!("text"),
        ] {
            assert!(CniResult::parse(&bad).is_err(), "{bad}");
        }
        assert!(CniResult::parse(&json!({})).unwrap().ips.is_empty());
    }

    #[test]
    fn failures_are_one_line_with_the_plugin_error() {
        let out = br#"{"cniVersion":"1.0.0","code":7,"msg":"invalid subnet","details":"line 1"}"#;
        assert_eq!(
            describe_failure(Some(1), out, b"ignored"),
            "code 7 (invalid network config): invalid subnet; line 1"
        );
        let out = br#"{"code":100,"msg":"failed to set bridge addr: \"x\" already has an IP"}"#;
        assert!(describe_failure(Some(1), out, b"").starts_with("code 100: failed"));
        assert_eq!(
            describe_failure(Some(2), b"", b"panic: oops\n\ngoroutine 1\n"),
            "exit status 2: panic: oops; goroutine 1"
        );
        assert_eq!(describe_failure(None, b"", b""), "killed by a signal");
        let long = vec![b'x'; 5000];
        assert!(describe_failure(Some(1), &long, b"").chars().count() < QUOTE_MAX + 20);
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("fd00::5/64").unwrap(),
            ("fd00::5".parse().unwrap(), 64)
        );
        assert!(parse_cidr("fd00::5/129").is_err());
        assert!(parse_cidr("x/1").is_err());
    }
}
