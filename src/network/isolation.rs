//! Keeping actions on a CNI bridge apart from each other and from the
//! host's loopback services; the bridge plugin itself only connects them.
//!
//! Two layers, so that neither a missing `br_netfilter` nor a foreign
//! iptables rule alone lets two actions talk:
//!
//! - Layer 2: every action's host-side veth is an *isolated* bridge port
//!   (`/sys/class/net/<veth>/brport/isolated`, Linux ≥ 4.18). Isolated
//!   ports forward only to non-isolated ports and the bridge itself, so one
//!   action's frames (ARP included) never reach another action.
//! - Layer 3, in iptables chains of isolated's own, jumped to first from
//!   FORWARD and INPUT, one set of rules per bridge, each added only when
//!   missing (several daemons may share a bridge; nothing is ever flushed):
//!
//!   ```text
//!   ISOLATED-FORWARD  -i BR -o BR                  DROP    actions do not reach each other
//!                     -i BR ! -o BR                ACCEPT  actions reach the outside
//!                     -o BR ctstate REL,EST        ACCEPT  and get the replies
//!   ISOLATED-INPUT    -i BR -d 127.0.0.0/8         DROP    no host loopback, even with route_localnet
//!                     -i BR -p tcp --dport PORT    DROP    never isolated's own ports
//!   ISOLATED-POSTROUTING (nat table)
//!                     -s SUBNET ! -o BR            MASQUERADE  outbound NAT, one rule per subnet
//!   ```
//!
//!   The DROP catches packets one action routes through the host to
//!   another (and, with br_netfilter, bridged ones too); the ACCEPTs keep
//!   actions online on hosts whose FORWARD policy is DROP. The MASQUERADE
//!   rule stands in for the bridge plugin's per-action NAT chains when the
//!   config list lets isolated take `ipMasq` over ([`super::conf`]). The
//!   port rules exist only for isolated's listeners bound beyond loopback
//!   (gRPC, metrics): one on loopback is out of the actions' reach anyway,
//!   and a rule per port would pile up as ports change across restarts.
//!
//!   Link-local addresses (169.254.0.0/16: cloud metadata services, a
//!   host's link-local listeners) are dropped before routing, in the raw
//!   table, so neither INPUT nor FORWARD ever sees them; the operator's
//!   `allowed_link_local` ranges are accepted above that drop:
//!
//!   ```text
//!   ISOLATED-PREROUTING (raw table)
//!                     -i BR -d ALLOWED             ACCEPT  inserted first
//!                     -i BR -d 169.254.0.0/16      DROP    no metadata service
//!   ```
//!
//! - Per port, in the bridge family (ebtables, `nat` PREROUTING, before the
//!   bridge learns the source MAC): a chain `ISOLATED-<veth>` that lets
//!   through only frames with the action's own MAC carrying ARP or IPv4 with
//!   its own address, and drops everything else (other MACs, ARP for
//!   another address, IPv6, VLAN tags). Issue 13: with CAP_NET_RAW an action
//!   sent gratuitous ARP for another's address and received its packets;
//!   with these rules even an image given CAP_NET_RAW cannot. Made with the
//!   port, removed with it ([`unguard_ports`], also from the attachment
//!   record after a crash). ebtables-nft comes with Debian's iptables
//!   package (12 and 13) and talks nf_tables, so nodes without the legacy
//!   tools need nothing more.
//!
//! IPv6: actions get none. The spec turns it off on `eth0`
//! (`net.ipv6.conf.eth0.disable_ipv6`), the port's chain drops IPv6 frames
//! whatever the action does, and a CNI result that gives the action an
//! IPv6 address is refused (fails closed): none of the rules above has an
//! IPv6 counterpart, and the host's link-local (fe80::/10) listeners would
//! be in reach. An IPv4-only network with IPv6 off is one rule set to keep
//! right instead of two.
//!
//! The bridge also stops taking IPv6 router advertisements and redirects
//! (an action must not be able to change the host's routes), and gets a
//! fixed MAC address (see [`pin_mac`]).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use tracing::{info, warn};

use super::cni::CniResult;
use super::NetworkError;

pub const FORWARD_CHAIN: &str = "ISOLATED-FORWARD";
pub const INPUT_CHAIN: &str = "ISOLATED-INPUT";
pub const POSTROUTING_CHAIN: &str = "ISOLATED-POSTROUTING";
pub const PREROUTING_CHAIN: &str = "ISOLATED-PREROUTING";
/// The prefix of each port's ebtables chain (`ISOLATED-<veth>`, at most 24
/// of ebtables' 31 characters).
pub const PORT_CHAIN_PREFIX: &str = "ISOLATED-";
/// IPv4 link-local: cloud metadata (169.254.169.254) and friends.
pub const LINK_LOCAL: &str = "169.254.0.0/16";

/// How long installed rules are trusted before they are checked again (an
/// operator's `iptables -F` must not leave actions unisolated for long).
const RECHECK: Duration = Duration::from_secs(60);

/// Seconds iptables waits for the xtables lock another program holds.
const XTABLES_WAIT: &str = "10";

/// One rule: its table, chain and match/target arguments; `first` ones
/// are inserted at the top of the chain instead of appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub table: &'static str,
    pub chain: &'static str,
    pub args: Vec<String>,
    pub first: bool,
}

fn rule(chain: &'static str, args: &[&str], comment: &str, target: &str) -> Rule {
    let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    v.extend(["-m", "comment", "--comment", comment, "-j", target].map(String::from));
    let table = match chain {
        POSTROUTING_CHAIN => "nat",
        PREROUTING_CHAIN => "raw",
        _ => "filter",
    };
    Rule {
        table,
        chain,
        args: v,
        first: false,
    }
}

/// The rules of one bridge (see the module doc). `ports` are isolated's
/// own listening ports; `masquerade` the subnets whose outbound NAT
/// isolated does; `link_local` the ranges of 169.254.0.0/16 actions may
/// reach (`allowed_link_local`).
pub fn bridge_rules(
    bridge: &str,
    ports: &[u16],
    masquerade: &[String],
    link_local: &[String],
) -> Vec<Rule> {
    let b = bridge;
    let mut rules = vec![
        rule(
            PREROUTING_CHAIN,
            &["-i", b, "-d", LINK_LOCAL],
            "isolated: actions do not reach link-local addresses",
            "DROP",
        ),
        rule(
            FORWARD_CHAIN,
            &["-i", b, "-o", b],
            "isolated: actions do not reach each other",
            "DROP",
        ),
        rule(
            FORWARD_CHAIN,
            &["-i", b, "!", "-o", b],
            "isolated: actions reach the outside",
            "ACCEPT",
        ),
        rule(
            FORWARD_CHAIN,
            &[
                "-o",
                b,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
            ],
            "isolated: replies reach actions",
            "ACCEPT",
        ),
        rule(
            INPUT_CHAIN,
            &["-i", b, "-d", "127.0.0.0/8"],
            "isolated: actions do not reach host loopback",
            "DROP",
        ),
    ];
    for port in ports {
        let port = port.to_string();
        rules.push(rule(
            INPUT_CHAIN,
            &["-i", b, "-p", "tcp", "--dport", &port],
            "isolated: actions do not reach isolated",
            "DROP",
        ));
    }
    for allowed in link_local {
        // Above the drop, whenever it was added: an operator's range
        // added later must still come first. One removed from the setting
        // stays open until removed by hand, as a stale port rule does.
        rules.push(Rule {
            first: true,
            ..rule(
                PREROUTING_CHAIN,
                &["-i", b, "-d", allowed],
                "isolated: allowed_link_local",
                "ACCEPT",
            )
        });
    }
    for subnet in masquerade {
        rules.push(rule(
            POSTROUTING_CHAIN,
            &["-s", subnet, "!", "-o", b],
            "isolated: actions reach the outside as the host",
            "MASQUERADE",
        ));
    }
    rules
}

/// The jumps into isolated's chains: (table, built-in chain, chain).
pub fn jumps() -> [(&'static str, &'static str, &'static str); 4] {
    [
        ("filter", "FORWARD", FORWARD_CHAIN),
        ("filter", "INPUT", INPUT_CHAIN),
        ("nat", "POSTROUTING", POSTROUTING_CHAIN),
        ("raw", "PREROUTING", PREROUTING_CHAIN),
    ]
}

/// Enforces the rules above; remembers which bridges are done.
pub struct Isolation {
    ports: Vec<u16>,
    link_local: Vec<String>,
    installed: Mutex<HashMap<String, Instant>>,
}

impl Isolation {
    /// `ports`: isolated's listening ports that actions could reach;
    /// `link_local`: the link-local ranges they may reach.
    pub fn new(ports: Vec<u16>, link_local: Vec<String>) -> Self {
        Isolation {
            ports,
            link_local,
            installed: Mutex::new(HashMap::new()),
        }
    }

    /// Makes sure `bridge`'s iptables rules are in place. Runs before the
    /// action's veth exists, so no action is ever on the bridge unguarded.
    pub async fn ensure_rules(
        &self,
        bridge: &str,
        masquerade: &[String],
    ) -> Result<(), NetworkError> {
        let key = format!("{bridge} {}", masquerade.join(" "));
        let mut installed = self.installed.lock().await;
        let rules = bridge_rules(bridge, &self.ports, masquerade, &self.link_local);
        let b = bridge.to_string();
        match installed.get(&key) {
            Some(t) if t.elapsed() < RECHECK => return Ok(()),
            // Installed before: the recheck (rules someone flushed) runs
            // beside the actions, not in front of every attach for its
            // dozen iptables calls.
            Some(_) => {
                installed.insert(key, Instant::now());
                tokio::task::spawn_blocking(move || {
                    if let Err(reason) = install(&rules) {
                        warn!(bridge = %b, %reason, "cannot re-install the isolation rules");
                    }
                });
                return Ok(());
            }
            None => {}
        }
        tokio::task::spawn_blocking(move || install(&rules))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|reason| NetworkError::Isolation { bridge: b, reason })?;
        installed.insert(key, Instant::now());
        Ok(())
    }
}

fn iptables(table: &str, args: &[&str]) -> Result<std::process::Output, String> {
    Command::new("iptables")
        .args(["-w", XTABLES_WAIT, "-t", table])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run iptables: {e}"))
}

fn iptables_ok(table: &str, args: &[&str]) -> Result<(), String> {
    let out = iptables(table, args)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables -t {table} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Creates the chains and jumps if missing, then appends missing rules.
fn install(rules: &[Rule]) -> Result<(), String> {
    for (table, builtin, chain) in jumps() {
        if !iptables(table, &["-S", chain])?.status.success() {
            // Another daemon may create it at the same moment.
            if let Err(e) = iptables_ok(table, &["-N", chain]) {
                if !iptables(table, &["-S", chain])?.status.success() {
                    return Err(e);
                }
            }
        }
        let jump = ["-j", chain];
        if iptables(table, &[&["-C", builtin][..], &jump].concat())?
            .status
            .success()
        {
            warn_unless_first(table, builtin, chain)?;
        } else {
            iptables_ok(table, &[&["-I", builtin, "1"][..], &jump].concat())?;
            info!(
                table,
                chain, builtin, "installed the jump to isolated's chain"
            );
        }
    }
    for r in rules {
        let args: Vec<&str> = r.args.iter().map(String::as_str).collect();
        if !iptables(r.table, &[&["-C", r.chain][..], &args].concat())?
            .status
            .success()
        {
            let add: &[&str] = match r.first {
                true => &["-I", r.chain, "1"],
                false => &["-A", r.chain],
            };
            iptables_ok(r.table, &[add, &args].concat())?;
        }
    }
    Ok(())
}

/// A rule above the jump could accept what the chain would drop. Moving
/// the jump cannot be done atomically with the iptables command, so this
/// says so; the bridge-port isolation still holds.
fn warn_unless_first(table: &str, builtin: &str, chain: &str) -> Result<(), String> {
    let out = iptables(table, &["-S", builtin])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().find(|l| l.starts_with("-A "));
    if first != Some(format!("-A {builtin} -j {chain}").as_str()) {
        warn!(
            table,
            chain,
            builtin,
            first_rule = first.unwrap_or(""),
            "isolated's chain is not the first rule of its built-in chain; rules above it apply first"
        );
    }
    Ok(())
}

/// Marks the action's host-side ports isolated and hardens the bridge.
/// Fails closed: an action that cannot be isolated does not run.
pub fn isolate_ports(bridge: &str, result: &CniResult) -> Result<(), NetworkError> {
    let fail = |reason: String| NetworkError::Isolation {
        bridge: bridge.to_string(),
        reason,
    };
    let ports: Vec<&str> = result.host_interfaces().filter(|n| *n != bridge).collect();
    if ports.is_empty() {
        return Err(fail(
            "the bridge plugin's result names no host-side interface".into(),
        ));
    }
    let v6: Vec<String> = result
        .container_ips()
        .iter()
        .filter(|ip| ip.is_ipv6())
        .map(|ip| ip.to_string())
        .collect();
    if !v6.is_empty() {
        return Err(fail(format!(
            "the network gives the action IPv6 addresses ({}); isolated keeps actions \
             apart over IPv4 only: give the bridge IPv4 ranges",
            v6.join(", ")
        )));
    }
    let guard = PortGuard::of(result).map_err(fail)?;
    for port in &ports {
        guard.install(port).map_err(fail)?;
    }
    for port in ports {
        let flag = Path::new("/sys/class/net")
            .join(port)
            .join("brport/isolated");
        if flag.exists() {
            std::fs::write(&flag, "1")
                .map_err(|e| fail(format!("cannot write {}: {e}", flag.display())))?;
        } else if !br_netfilter_on() {
            return Err(fail(format!(
                "{port} cannot be made an isolated bridge port (kernel older than 4.18, or \
                 not a port of {bridge}) and br_netfilter is off"
            )));
        }
    }
    pin_mac(bridge).map_err(fail)?;
    let conf = Path::new("/proc/sys/net/ipv6/conf").join(bridge);
    if conf.is_dir() {
        for key in ["accept_ra", "accept_redirects"] {
            let p = conf.join(key);
            std::fs::write(&p, "0")
                .map_err(|e| fail(format!("cannot write {}: {e}", p.display())))?;
        }
    }
    Ok(())
}

/// What an action's port may send: its interface's MAC, ARP and IPv4 from
/// its own addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortGuard {
    mac: String,
    ipv4: Vec<String>,
}

impl PortGuard {
    /// From the ADD result: the container interface's MAC and addresses.
    pub fn of(result: &CniResult) -> Result<PortGuard, String> {
        let mac = result
            .interfaces
            .iter()
            .find(|i| !i.sandbox.is_empty() && i.name == super::IFNAME)
            .or_else(|| result.interfaces.iter().find(|i| !i.sandbox.is_empty()))
            .map(|i| i.mac.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let valid = mac.split(':').count() == 6
            && mac
                .split(':')
                .all(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok());
        if !valid {
            return Err(format!(
                "the result names no MAC address of the action's interface ({mac:?})"
            ));
        }
        let ipv4: Vec<String> = result
            .container_ips()
            .iter()
            .filter(|ip| ip.is_ipv4())
            .map(|ip| ip.to_string())
            .collect();
        if ipv4.is_empty() {
            return Err("the result gives the action no IPv4 address".into());
        }
        Ok(PortGuard { mac, ipv4 })
    }

    /// The ebtables-restore input that makes `port`'s chain and its jump.
    pub fn restore_input(&self, port: &str) -> String {
        let chain = port_chain(port);
        let mac = &self.mac;
        let mut out = format!(
            "*nat\n:{chain} DROP\n\
             -A {chain} -s ! {mac} -j DROP\n\
             -A {chain} -p ARP --arp-mac-src ! {mac} -j DROP\n"
        );
        for ip in &self.ipv4 {
            out.push_str(&format!("-A {chain} -p ARP --arp-ip-src {ip} -j RETURN\n"));
            out.push_str(&format!("-A {chain} -p IPv4 --ip-src {ip} -j RETURN\n"));
        }
        out.push_str(&format!("-A PREROUTING -i {port} -j {chain}\nCOMMIT\n"));
        out
    }

    /// Installs `port`'s chain (replacing a leftover of the same name).
    fn install(&self, port: &str) -> Result<(), String> {
        let input = self.restore_input(port);
        if ebtables_restore(&input).is_err() {
            remove_port_chain(port);
            ebtables_restore(&input)?;
        }
        Ok(())
    }
}

/// The ebtables chain of a port.
pub fn port_chain(port: &str) -> String {
    format!("{PORT_CHAIN_PREFIX}{port}")
}

fn ebtables_restore(input: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("ebtables-restore")
        .arg("--noflush")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ebtables-restore: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("cannot write to ebtables-restore: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("ebtables-restore: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ebtables-restore failed: {}",
            crate::text::one_line(String::from_utf8_lossy(&out.stderr).trim())
        ))
    }
}

/// Removes a port's chain and jump, whichever of them exist.
fn remove_port_chain(port: &str) {
    let chain = port_chain(port);
    let input =
        format!("*nat\n-D PREROUTING -i {port} -j {chain}\n-F {chain}\n-X {chain}\nCOMMIT\n");
    if ebtables_restore(&input).is_ok() {
        return;
    }
    // One of the three was gone already: each on its own.
    for args in [
        vec!["-D", "PREROUTING", "-i", port, "-j", &chain],
        vec!["-F", &chain],
        vec!["-X", &chain],
    ] {
        let _ = Command::new("ebtables")
            .args(["-t", "nat"])
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Removes the chains of the host-side ports named in an ADD result (at
/// release, also from a record after a crash). Bridges themselves are not
/// ports.
pub fn unguard_ports(bridge: Option<&str>, result: &CniResult) {
    for port in result.host_interfaces().filter(|n| Some(*n) != bridge) {
        remove_port_chain(port);
    }
}

/// Fixes the bridge's MAC address unless someone already did. A bridge
/// whose address was never set takes the lowest MAC among its ports and
/// changes it as actions come and go, and actions then send to the
/// gateway's old MAC (lost) until their ARP entry expires. The bridge
/// plugin fixes it only when it adds the gateway address itself, not on a
/// bridge made beforehand with its address.
fn pin_mac(bridge: &str) -> Result<(), String> {
    /// `addr_assign_type` of an address set by hand (NET_ADDR_SET).
    const SET: &str = "3";
    let dir = Path::new("/sys/class/net").join(bridge);
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .map(|s| s.trim().to_string())
            .map_err(|e| format!("cannot read {}: {e}", dir.join(f).display()))
    };
    if read("addr_assign_type")? == SET {
        return Ok(());
    }
    let mac = read("address")?;
    let out = Command::new("ip")
        .args(["link", "set", "dev", bridge, "address", &mac])
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cannot fix the MAC address of {bridge}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    info!(bridge, mac, "fixed the bridge's MAC address");
    Ok(())
}

/// Whether bridged IPv4 traffic passes through iptables.
fn br_netfilter_on() -> bool {
    std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
        .is_ok_and(|v| v.trim() == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_name_the_bridge_and_the_port() {
        let rules = bridge_rules("isolated0", &[8888], &["10.213.0.0/16".into()], &[]);
        let text: Vec<String> = rules
            .iter()
            .map(|r| format!("{} {}", r.chain, r.args.join(" ")))
            .collect();
        assert_eq!(
            text,
            vec![
                "ISOLATED-PREROUTING -i isolated0 -d 169.254.0.0/16 -m comment --comment isolated: actions do not reach link-local addresses -j DROP",
                "ISOLATED-FORWARD -i isolated0 -o isolated0 -m comment --comment isolated: actions do not reach each other -j DROP",
                "ISOLATED-FORWARD -i isolated0 ! -o isolated0 -m comment --comment isolated: actions reach the outside -j ACCEPT",
                "ISOLATED-FORWARD -o isolated0 -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment isolated: replies reach actions -j ACCEPT",
                "ISOLATED-INPUT -i isolated0 -d 127.0.0.0/8 -m comment --comment isolated: actions do not reach host loopback -j DROP",
                "ISOLATED-INPUT -i isolated0 -p tcp --dport 8888 -m comment --comment isolated: actions do not reach isolated -j DROP",
                "ISOLATED-POSTROUTING -s 10.213.0.0/16 ! -o isolated0 -m comment --comment isolated: actions reach the outside as the host -j MASQUERADE",
            ]
        );
        assert_eq!(rules[0].table, "raw");
        assert_eq!(rules[6].table, "nat");
        assert!(rules[1..6].iter().all(|r| r.table == "filter"));
        assert!(rules.iter().all(|r| !r.first));
        assert_eq!(bridge_rules("b", &[], &[], &[]).len(), 5);
        let open = bridge_rules("b", &[], &[], &["169.254.169.254/32".into()]);
        let accept = open.iter().find(|r| r.first).unwrap();
        assert_eq!(
            (accept.table, accept.chain, accept.args.join(" ")),
            (
                "raw",
                PREROUTING_CHAIN,
                "-i b -d 169.254.169.254/32 -m comment --comment isolated: allowed_link_local -j ACCEPT".to_string()
            )
        );
    }

    fn bridge_result(extra_ip: Option<&str>) -> CniResult {
        let mut ips = vec![serde_json::json!({"interface": 2, "address": "10.213.0.7/16"})];
        if let Some(ip) = extra_ip {
            ips.push(serde_json::json!({"interface": 2, "address": ip}));
        }
        CniResult::parse(&serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "isolated0", "mac": "aa:bb:cc:dd:ee:01"},
                {"name": "veth1234abcd", "mac": "aa:bb:cc:dd:ee:02"},
                {"name": "eth0", "mac": "AA:BB:CC:DD:EE:03", "sandbox": "/s/netns/x"}
            ],
            "ips": ips,
        }))
        .unwrap()
    }

    #[test]
    fn a_port_sends_its_own_mac_and_address_only() {
        let g = PortGuard::of(&bridge_result(None)).unwrap();
        assert_eq!(
            g.restore_input("veth1234abcd"),
            "*nat\n:ISOLATED-veth1234abcd DROP\n\
             -A ISOLATED-veth1234abcd -s ! aa:bb:cc:dd:ee:03 -j DROP\n\
             -A ISOLATED-veth1234abcd -p ARP --arp-mac-src ! aa:bb:cc:dd:ee:03 -j DROP\n\
             -A ISOLATED-veth1234abcd -p ARP --arp-ip-src 10.213.0.7 -j RETURN\n\
             -A ISOLATED-veth1234abcd -p IPv4 --ip-src 10.213.0.7 -j RETURN\n\
             -A PREROUTING -i veth1234abcd -j ISOLATED-veth1234abcd\nCOMMIT\n"
        );
        // ebtables' chain names are at most 31 characters; veths 15.
        assert!(port_chain("veth1234567890a").len() <= 31);
        let mut no_mac = bridge_result(None);
        no_mac.interfaces[2].mac.clear();
        assert!(PortGuard::of(&no_mac).unwrap_err().contains("no MAC"));
    }

    #[test]
    fn ipv6_addresses_fail_closed() {
        let e = isolate_ports("isolated0", &bridge_result(Some("fd00::7/64")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("IPv6") && e.contains("fd00::7"), "{e}");
    }

    #[test]
    fn ports_without_host_interfaces_fail_closed() {
        let r = CniResult::default();
        let e = isolate_ports("isolated0", &r).unwrap_err().to_string();
        assert!(e.contains("no host-side interface"), "{e}");
    }
}
