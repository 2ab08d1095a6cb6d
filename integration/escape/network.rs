//! What an action can do to the network beyond its own address: ARP spoofing another
//! action (refused by its port's bridge rules, even with CAP_NET_RAW), and reaching
//! link-local addresses (169.254.0.0/16 and the host over IPv6), in cni and none modes,
//! with `allowed_link_local` opening one address on purpose.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};

use super::{default_caps_and, probe_image};
use crate::core::expect_success;
use crate::harness::cni::{port_chain_exists, TestNet};
use crate::harness::{Ctx, ImageSpec, FIRST_PULL};
use crate::network::reach::{Rendezvous, PROBE};
use crate::network::{Daemon, HttpServer};

/// Victim A serves a page on its address; attacker B, given CAP_NET_RAW by a
/// `capabilities` override, sends gratuitous ARP (requests and replies) claiming A's
/// address with its own MAC, then listens for IPv4 sent to A. From the host meanwhile: its
/// neighbour entry for A keeps A's MAC and five fetches of A's page all get A's page.
/// Inside B: its raw and packet sockets worked (so the frames left it), and it saw none
/// of A's packets. Afterwards the ports' ebtables chains are gone.
pub async fn arp_spoof_is_refused(t: Ctx) -> Result<()> {
    let net = TestNet::create(t.env.dir())?;
    let result = arp_spoof(&t, &net).await;
    let failed = net.remove();
    result?;
    ensure!(failed.is_empty(), "removing the test bridge: {failed:?}");
    Ok(())
}

async fn arp_spoof(t: &Ctx, net: &TestNet) -> Result<()> {
    let daemon = Daemon::start(
        t.env,
        "arp",
        vec![
            "--cni-conf-dir".into(),
            net.conf_dir.display().to_string(),
            "--capabilities".into(),
            default_caps_and(&["CAP_NET_RAW"]),
            // The bridge's ports are counted while the attack runs: no pre-created
            // task's (issue 16) among them. Dropping the pool then instead waited for
            // one being made, and on a loaded machine the attacker's 4 s sniff had ended
            // and its port was gone by the count (containerd 2.1.9, matrix beside the
            // node tier). An entry runs no code of its own to spoof with.
            "--precreate-max".into(),
            "0".into(),
        ],
    )
    .await?;
    let rv = Arc::new(Rendezvous::default());
    let handler_rv = rv.clone();
    let coordinator = HttpServer::start(
        IpAddr::V4(net.gateway()),
        Arc::new(move |path, peer| Box::pin(handler_rv.clone().handle(path, peer))),
    )
    .await?;
    let c = coordinator.addr;
    let secret = format!("victim-{:016x}", rand::random::<u64>());
    let script = format!(
        r#"out=/direktiv-data/data.out
if [ "$(cat /direktiv-data/data.in)" = victim ]; then
  mkdir -p /tmp/www && echo {secret} > /tmp/www/index.html
  httpd -p 8080 -h /tmp/www
  timeout 10 wget -q -O /dev/null http://{c}/hello/victim
  timeout 120 wget -q -O $out http://{c}/wait
else
  timeout 10 wget -q -O /dev/null http://{c}/hello/attacker
  peer=$(timeout 120 wget -q -O - http://{c}/peer/attacker)
  probe raw > $out
  probe garp eth0 $peer 20 >> $out
  timeout 10 wget -q -O /dev/null http://{c}/hello/spoofed
  probe sniff eth0 $peer 4 >> $out
fi
"#
    );
    let image = t.push(&probe_image(t.env, &script)?).await?;
    let victim = t.action_id("victim");
    let attacker = t.action_id("attacker");
    for (id, role) in [(&victim, "victim"), (&attacker, "attacker")] {
        let mut req = t.request(&image.reference, id);
        req.data = Some(role.as_bytes().to_vec());
        daemon.run(req).await?;
    }
    let seen = watch_attack(t, net, &daemon, &rv, &victim, &secret).await;
    *rv.release.lock().unwrap() = true;
    rv.changed.notify_waiters();
    let victim_report = t.env.flow.wait_report(&victim, FIRST_PULL).await?;
    let attacker_report = t.env.flow.wait_report(&attacker, FIRST_PULL).await?;
    let ports = seen?;
    expect_success(&victim_report)?;
    let output = String::from_utf8(expect_success(&attacker_report)?)?;
    ensure!(
        output == "raw ok packet ok\ngarp sent 20\nsniffed 0\n",
        "the attacker saw:\n{output}"
    );
    daemon.assert_nothing_left(t.env, &t.ns).await?;
    let kept: Vec<&String> = ports.iter().filter(|p| port_chain_exists(p)).collect();
    ensure!(
        kept.is_empty(),
        "ebtables chains outlived their ports: {kept:?}"
    );
    Ok(())
}

/// Waits for the attack, then checks the host's view; returns the bridge's ports then.
async fn watch_attack(
    t: &Ctx,
    net: &TestNet,
    daemon: &Daemon,
    rv: &Rendezvous,
    victim: &str,
    secret: &str,
) -> Result<Vec<String>> {
    let deadline = tokio::time::Instant::now() + FIRST_PULL;
    let victim_ip = loop {
        let hello = rv.hello.lock().unwrap().clone();
        if let (Some(IpAddr::V4(ip)), true) = (hello.get("victim"), hello.contains_key("spoofed")) {
            break *ip;
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the actions never got to the attack: {hello:?}\n{}",
                daemon.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ports = net.ports();
    ensure!(
        ports.len() == 2,
        "the bridge has ports {ports:?}, not the two actions'"
    );
    let victim_mac = recorded_mac(&daemon.state_dir, &daemon.cns(&t.ns), victim)?;
    let neigh = Command::new("ip")
        .args(["neigh", "show", &victim_ip.to_string(), "dev", &net.bridge])
        .output()?;
    let neigh = String::from_utf8_lossy(&neigh.stdout).to_lowercase();
    ensure!(
        neigh.is_empty() || neigh.contains(&victim_mac),
        "the host's neighbour entry for the victim {victim_ip} is {neigh:?}, not its MAC {victim_mac}"
    );
    for i in 0..5 {
        let page = fetch(IpAddr::V4(victim_ip), 8080)
            .await
            .with_context(|| format!("fetch {i} of the victim's page"))?;
        ensure!(
            page.trim() == secret,
            "fetch {i} got {page:?} from the victim's address"
        );
    }
    Ok(ports)
}

/// The MAC of an action's interface as its attachment record (the CNI result) has it.
fn recorded_mac(state_dir: &std::path::Path, cns: &str, id: &str) -> Result<String> {
    let path = state_dir
        .join("cni/attachments")
        .join(cns)
        .join(format!("{id}.json"));
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("read {}", path.display()))?,
    )?;
    record["result"]["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["sandbox"].as_str().is_some_and(|s| !s.is_empty()))
        .and_then(|i| i["mac"].as_str())
        .map(str::to_lowercase)
        .ok_or_else(|| anyhow!("no container MAC in {}", path.display()))
}

/// GET / from the host, plain HTTP/1.0, within 5 s.
async fn fetch(ip: IpAddr, port: u16) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut conn = tokio::net::TcpStream::connect((ip, port)).await?;
        conn.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
        let mut text = String::new();
        conn.read_to_string(&mut text).await?;
        anyhow::Ok(text)
    };
    let text = tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .map_err(|_| anyhow!("no answer from {ip}:{port} within 5 s"))??;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or(text))
}

/// An interface of the trial's own (a bridge without ports: this kernel may lack the
/// dummy type) holding two link-local addresses, each with a server; removed when
/// dropped.
struct LinkLocal {
    name: String,
    open: HttpServer,
    closed: HttpServer,
}

impl LinkLocal {
    async fn create() -> Result<LinkLocal> {
        let name = format!("isoll{:08x}", rand::random::<u32>());
        let [a, b] = [rand::random_range(1..=254u8), rand::random_range(1..=253u8)];
        let open = Ipv4Addr::new(169, 254, a, b);
        let closed = Ipv4Addr::new(169, 254, a, b + 1);
        let ip = |args: &[&str]| -> Result<()> {
            let out = Command::new("ip").args(args).output()?;
            ensure!(
                out.status.success(),
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        ip(&["link", "add", &name, "type", "bridge"])?;
        let made = async {
            for addr in [open, closed] {
                ip(&["addr", "add", &format!("{addr}/32"), "dev", &name])?;
            }
            ip(&["link", "set", &name, "up"])?;
            let open = HttpServer::fixed(IpAddr::V4(open), "metadata").await?;
            let closed = HttpServer::fixed(IpAddr::V4(closed), "metadata").await?;
            anyhow::Ok((open, closed))
        }
        .await;
        match made {
            Ok((open, closed)) => Ok(LinkLocal { name, open, closed }),
            Err(e) => {
                let _ = Command::new("ip").args(["link", "del", &name]).status();
                Err(e)
            }
        }
    }
}

impl Drop for LinkLocal {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

/// The bridge's IPv6 link-local address, if it has one.
fn link_local_v6(dev: &str) -> Option<Ipv6Addr> {
    let out = Command::new("ip")
        .args(["-6", "-o", "addr", "show", "dev", dev, "scope", "link"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)?
        .split('/')
        .next()?
        .parse()
        .ok()
}

/// Two link-local addresses on the host, each with a server; a server on the host's [::].
/// On the shared daemon's network: neither link-local address is reached, IPv6 is off on
/// eth0 (no address, sysctl 1) and the bridge's fe80:: address is not reached either, while
/// the gateway is (so the network works). A daemon with `allowed_link_local` set to the
/// first address reaches that one and not the second. A `network = "none"` daemon's
/// action reaches neither.
pub async fn link_local_and_ipv6_are_unreachable(t: Ctx) -> Result<()> {
    let ll = LinkLocal::create().await?;
    let on_gateway = HttpServer::fixed(IpAddr::V4(t.env.net.gateway()), "gateway").await?;
    let on_any6 = HttpServer::fixed(IpAddr::V6(Ipv6Addr::UNSPECIFIED), "v6").await?;
    let (open, closed) = (ll.open.addr, ll.closed.addr);
    let bridge_v6 = link_local_v6(&t.env.net.bridge);
    let mut script = format!(
        "{PROBE}out=/direktiv-data/data.out\n\
         probe {} {} >> $out\nprobe {} {} >> $out\n",
        open.ip(),
        open.port(),
        closed.ip(),
        closed.port()
    );
    let v6_probes = format!(
        "echo \"eth0 disable_ipv6 $(cat /proc/sys/net/ipv6/conf/eth0/disable_ipv6)\" >> $out\n\
         echo \"eth0 inet6 $(ip -6 -o addr show dev eth0 | wc -l)\" >> $out\n\
         probe {gw} {gw_port} >> $out\n{fe80}",
        gw = t.env.net.gateway(),
        gw_port = on_gateway.addr.port(),
        fe80 = match bridge_v6 {
            Some(a) => format!("probe {a}%eth0 {} >> $out\n", on_any6.addr.port()),
            None => String::new(),
        }
    );
    let image = t
        .push(&ImageSpec::with_script(&format!("{script}{v6_probes}")))
        .await?;
    let id = t.action_id("linklocal");
    let report = t
        .run_and_wait(t.request(&image.reference, &id), FIRST_PULL)
        .await?;
    let output = String::from_utf8(expect_success(&report)?)?;
    let mut expected = format!(
        "{open} blocked\n{closed} blocked\neth0 disable_ipv6 1\neth0 inet6 0\n{} reached\n",
        on_gateway.addr
    );
    if let Some(a) = bridge_v6 {
        expected.push_str(&format!("{a}%eth0:{} blocked\n", on_any6.addr.port()));
    }
    ensure!(
        output == expected,
        "cni, default:\n{output}\nexpected:\n{expected}"
    );

    // Opened on purpose, on a daemon and bridge of its own.
    let net = TestNet::create(t.env.dir())?;
    let allowed = async {
        let daemon = Daemon::start(
            t.env,
            "allowll",
            vec![
                "--cni-conf-dir".into(),
                net.conf_dir.display().to_string(),
                "--allowed-link-local".into(),
                open.ip().to_string(),
            ],
        )
        .await?;
        let image = t.push(&ImageSpec::with_script(&script)).await?;
        let id = t.action_id("allowed");
        let report = daemon
            .run_and_wait(t.env, t.request(&image.reference, &id), FIRST_PULL)
            .await?;
        let output = String::from_utf8(expect_success(&report)?)?;
        let expected = format!("{open} reached\n{closed} blocked\n");
        ensure!(
            output == expected,
            "cni, allowed_link_local {}:\n{output}",
            open.ip()
        );
        daemon.assert_nothing_left(t.env, &t.ns).await
    }
    .await;
    let failed = net.remove();
    allowed?;
    ensure!(failed.is_empty(), "removing the test bridge: {failed:?}");

    // Loopback only.
    let daemon = Daemon::start(t.env, "nonell", vec!["--network".into(), "none".into()]).await?;
    script.push_str("ip -6 -o addr | grep -v ' lo ' | wc -l >> $out\n");
    let image = t.push(&ImageSpec::with_script(&script)).await?;
    let id = t.action_id("none");
    let report = daemon
        .run_and_wait(t.env, t.request(&image.reference, &id), FIRST_PULL)
        .await?;
    let output = String::from_utf8(expect_success(&report)?)?;
    let expected = format!("{open} blocked\n{closed} blocked\n0\n");
    ensure!(output == expected, "network none:\n{output}");
    daemon.assert_nothing_left(t.env, &t.ns).await
}
