//! CNI networks of the test run: each `isolated` the tests start gets a bridge and a /24 of
//! its own (a conflist in a conf dir of its own), so that runs side by side on one machine,
//! and daemons side by side in one run, never share a bridge, a subnet or an IPAM store.
//! The bridge is created here, with its gateway address, so that a test can bind a server
//! to it before any action ran; it is removed, with isolated's iptables rules naming it,
//! when the run ends (or by the next run, if this one died).
//!
//! [`Outside`] stands for the world beyond the host: a network namespace of the test's own
//! behind a veth pair, so that outbound traffic (and its NAT) is tested without sending a
//! packet anywhere but to addresses the test made.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;

/// Recorded links (bridges, veths) and `netns:<name>` namespaces of a run, one per line,
/// for the clean-up after it.
const BRIDGES_FILE: &str = "bridges";
/// Test subnets are 10.88.X.0/24.
const FIRST_OCTETS: [u8; 2] = [10, 88];

/// A bridge network for one daemon.
#[derive(Clone, Debug)]
pub struct TestNet {
    pub name: String,
    pub bridge: String,
    /// `10.88.X`
    prefix: [u8; 3],
    /// The directory to pass as `--cni-conf-dir`.
    pub conf_dir: PathBuf,
}

impl TestNet {
    /// Picks a free /24 and a fresh bridge name, creates the bridge with its gateway address,
    /// and writes the conflist into `<run_dir>/cni-<bridge>/`.
    pub fn create(run_dir: &Path) -> Result<TestNet> {
        let bridge = format!("isot{:08x}", rand::random::<u32>());
        record_bridge(run_dir, &bridge);
        let mut last_err = anyhow!("no attempt");
        for _ in 0..20 {
            let Some(prefix) = free_prefix()? else {
                continue;
            };
            let net = TestNet {
                name: format!("net-{bridge}"),
                conf_dir: run_dir.join(format!("cni-{bridge}")),
                bridge: bridge.clone(),
                prefix,
            };
            match net.bring_up() {
                Ok(()) => {
                    net.write_conflist()?;
                    return Ok(net);
                }
                Err(e) => {
                    let _ = ip(&["link", "del", &bridge]);
                    last_err = e;
                }
            }
        }
        Err(last_err.context("find a free 10.88.X.0/24 for a test bridge"))
    }

    pub fn gateway(&self) -> Ipv4Addr {
        let [a, b, c] = self.prefix;
        Ipv4Addr::new(a, b, c, 1)
    }

    pub fn subnet(&self) -> String {
        let [a, b, c] = self.prefix;
        format!("{a}.{b}.{c}.0/24")
    }

    /// Whether `ip` is in this network's /24.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        ip.octets()[..3] == self.prefix
    }

    fn bring_up(&self) -> Result<()> {
        ip(&["link", "add", "name", &self.bridge, "type", "bridge"])?;
        // As the bridge plugin does: otherwise the bridge's MAC follows its ports.
        let mac = std::fs::read_to_string(
            Path::new("/sys/class/net")
                .join(&self.bridge)
                .join("address"),
        )?;
        ip(&["link", "set", &self.bridge, "address", mac.trim()])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.gateway()),
            "dev",
            &self.bridge,
        ])?;
        ip(&["link", "set", &self.bridge, "up"])?;
        // Someone else may have taken the /24 between the check and the add.
        let [a, b, c] = self.prefix;
        let mine = format!("{a}.{b}.{c}.0/24");
        let routes = routes()?;
        if routes.iter().filter(|r| r.0 == mine).count() > 1 {
            bail!("{mine} is routed twice");
        }
        Ok(())
    }

    /// The conflist of the built-in network with this bridge and subnet.
    pub fn conflist(&self) -> serde_json::Value {
        json!({
            "cniVersion": "1.0.0",
            "name": self.name,
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": self.subnet(), "gateway": self.gateway().to_string()}]],
                    "routes": [{"dst": "0.0.0.0/0"}]
                }
            }]
        })
    }

    fn write_conflist(&self) -> Result<()> {
        std::fs::create_dir_all(&self.conf_dir)?;
        std::fs::write(
            self.conf_dir.join("10-test.conflist"),
            serde_json::to_vec_pretty(&self.conflist())?,
        )
        .with_context(|| format!("write the conflist into {}", self.conf_dir.display()))
    }

    /// Host-side interfaces still attached to the bridge.
    pub fn ports(&self) -> Vec<String> {
        std::fs::read_dir(Path::new("/sys/class/net").join(&self.bridge).join("brif"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes the bridge and the rules naming it.
    pub fn remove(&self) -> Vec<String> {
        remove_bridge(&self.bridge)
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// IPv4 routes of the main table as (dst, dev).
fn routes() -> Result<Vec<(String, String)>> {
    let out = Command::new("ip")
        .args(["-4", "-j", "route", "show", "table", "all"])
        .output()
        .context("run ip route")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["dst"].as_str().unwrap_or_default().to_string(),
                        r["dev"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

/// A random 10.88.X that no route overlaps, if the draw found one.
fn free_prefix() -> Result<Option<[u8; 3]>> {
    let x = rand::random_range(1..255u8);
    let prefix = [FIRST_OCTETS[0], FIRST_OCTETS[1], x];
    Ok((!subnet_in_use(prefix)?).then_some(prefix))
}

/// A network namespace beyond the host, reached through a veth pair on a /24 of its own:
/// `<prefix>.1` on the host, `<prefix>.2` inside.
pub struct Outside {
    pub netns: String,
    pub host_if: String,
    prefix: [u8; 3],
}

impl Outside {
    pub fn create(run_dir: &Path) -> Result<Outside> {
        let tag = format!("{:08x}", rand::random::<u32>());
        let netns = format!("isotout{tag}");
        let host_if = format!("isoo{tag}");
        let peer = format!("isoi{tag}");
        record_bridge(run_dir, &format!("netns:{netns}"));
        record_bridge(run_dir, &host_if);
        ip(&["netns", "add", &netns])?;
        let mut last_err = anyhow!("no attempt");
        for _ in 0..20 {
            let Some(prefix) = free_prefix()? else {
                continue;
            };
            let out = Outside {
                netns: netns.clone(),
                host_if: host_if.clone(),
                prefix,
            };
            match out.bring_up(&peer) {
                Ok(()) => return Ok(out),
                Err(e) => {
                    let _ = ip(&["link", "del", &host_if]);
                    last_err = e;
                }
            }
        }
        let _ = ip(&["netns", "del", &netns]);
        Err(last_err.context("find a free 10.88.X.0/24 for the outside network"))
    }

    fn bring_up(&self, peer: &str) -> Result<()> {
        let [a, b, c] = self.prefix;
        let ns = self.netns.as_str();
        ip(&[
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            ns,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{a}.{b}.{c}.1/24"),
            "dev",
            &self.host_if,
        ])?;
        ip(&["link", "set", &self.host_if, "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{a}.{b}.{c}.2/24"),
            "dev",
            peer,
        ])?;
        ip(&["-n", ns, "link", "set", peer, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// The host's address on the link.
    pub fn host_addr(&self) -> Ipv4Addr {
        let [a, b, c] = self.prefix;
        Ipv4Addr::new(a, b, c, 1)
    }

    /// The outside's address.
    pub fn addr(&self) -> Ipv4Addr {
        let [a, b, c] = self.prefix;
        Ipv4Addr::new(a, b, c, 2)
    }

    /// A listening socket on the outside's address, made inside its namespace (by a thread
    /// of its own that ends there); it stays in that namespace wherever it is used.
    pub fn listen(&self) -> Result<std::net::TcpListener> {
        let path = PathBuf::from("/run/netns").join(&self.netns);
        let addr = self.addr();
        std::thread::spawn(move || -> Result<std::net::TcpListener> {
            let ns =
                std::fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
            let l = std::net::TcpListener::bind((addr, 0)).context("bind")?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .join()
        .map_err(|_| anyhow!("the listening thread panicked"))?
    }

    /// Removes the namespace and the veth pair.
    pub fn remove(&self) -> Vec<String> {
        let mut failed = remove_bridge(&self.host_if);
        if let Err(e) = ip(&["netns", "del", &self.netns]) {
            failed.push(format!("{e:#}"));
        }
        failed
    }
}

/// Whether any route's destination overlaps 10.88.X.0/24.
fn subnet_in_use(prefix: [u8; 3]) -> Result<bool> {
    let candidate = u32::from(Ipv4Addr::new(prefix[0], prefix[1], prefix[2], 0));
    for (dst, _) in routes()? {
        if dst == "default" {
            continue;
        }
        let (addr, len) = dst.split_once('/').unwrap_or((&dst, "32"));
        let (Ok(addr), Ok(len)) = (addr.parse::<Ipv4Addr>(), len.parse::<u32>()) else {
            continue;
        };
        let len = len.min(24);
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        if u32::from(addr) & mask == candidate & mask {
            return Ok(true);
        }
    }
    Ok(false)
}

fn record_bridge(run_dir: &Path, bridge: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join(BRIDGES_FILE))
    {
        let _ = writeln!(f, "{bridge}");
    }
}

/// Removes every bridge the run at `run_dir` recorded. Returns what could not be removed.
pub fn remove_recorded(run_dir: &Path) -> Vec<String> {
    std::fs::read_to_string(run_dir.join(BRIDGES_FILE))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .flat_map(|l| match l.strip_prefix("netns:") {
            Some(ns) if Path::new("/run/netns").join(ns).exists() => ip(&["netns", "del", ns])
                .err()
                .map(|e| format!("{e:#}"))
                .into_iter()
                .collect(),
            Some(_) => Vec::new(),
            None => remove_bridge(l),
        })
        .collect()
}

/// Deletes `bridge` (if it exists) and every rule of isolated's chains that names it.
/// Whether isolated's ebtables chain of bridge port `port` exists (`ISOLATED-<port>`, made
/// with the port, removed with it).
pub fn port_chain_exists(port: &str) -> bool {
    Command::new("ebtables")
        .args(["-t", "nat", "-L", &format!("ISOLATED-{port}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn remove_bridge(bridge: &str) -> Vec<String> {
    let mut failed = Vec::new();
    if Path::new("/sys/class/net").join(bridge).exists() {
        if let Err(e) = ip(&["link", "del", bridge]) {
            failed.push(format!("{e:#}"));
        }
    }
    for (table, chain) in [
        ("filter", "ISOLATED-FORWARD"),
        ("filter", "ISOLATED-INPUT"),
        ("nat", "ISOLATED-POSTROUTING"),
        ("raw", "ISOLATED-PREROUTING"),
    ] {
        let Ok(out) = Command::new("iptables")
            .args(["-w", "10", "-t", table, "-S", chain])
            .output()
        else {
            continue;
        };
        let needle_in = format!("-i {bridge} ");
        let needle_out = format!("-o {bridge} ");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if !(line.contains(&needle_in) || line.contains(&needle_out)) {
                continue;
            }
            let Some(rule) = line.strip_prefix(&format!("-A {chain} ")) else {
                continue;
            };
            let Ok(args) = shell_words::split(rule) else {
                continue;
            };
            let ok = Command::new("iptables")
                .args(["-w", "10", "-t", table, "-D", chain])
                .args(&args)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                failed.push(format!("iptables rule {line}"));
            }
        }
    }
    failed
}
