//! What an action on the default (cni) network reaches: a server on the host side of its
//! bridge, yes; the host's loopback services and isolated's port, no; another action, no.
//!
//! The scripts bound waits with busybox `timeout`, not the applets' own options: Debian's
//! busybox 1.35 `wget -T` segfaults after a successful fetch.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use tokio::sync::Notify;

use super::{fixed_body, inet_of, Daemon, HttpServer};
use crate::core::expect_success;
use crate::harness::cni::{Outside, TestNet};
use crate::harness::{Ctx, ImageSpec, FIRST_PULL};

/// The nameservers of the host's resolv.conf that an action can use.
fn host_nameservers() -> Vec<String> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .map(|s| s.trim().to_string())
        .filter(|s| s.parse::<IpAddr>().is_ok_and(|ip| !ip.is_loopback()))
        .collect()
}

/// busybox wget fetches a page from a server bound to the bridge's gateway address; the
/// server sees the action's own address (no NAT on the way to the host), which is also the
/// one in the action's /etc/hosts; /etc/resolv.conf lists the host's resolvers.
pub async fn fetches_from_the_host_through_the_bridge(t: Ctx) -> Result<()> {
    let net = &t.env.net;
    let token = format!("page-{:016x}", rand::random::<u64>());
    let server = HttpServer::fixed(IpAddr::V4(net.gateway()), &token).await?;
    let script = format!(
        "set -e\n\
         timeout 10 wget -q -O /direktiv-data/page http://{}/page\n\
         {{ cat /direktiv-data/page; echo; echo '--'; cat /etc/resolv.conf; echo '--'; \
            cat /etc/hosts; echo '--'; ip -4 -o addr show dev eth0; }} > /direktiv-data/data.out",
        server.addr
    );
    let image = t.push(&ImageSpec::with_script(&script)).await?;
    let id = t.action_id("fetch");
    let report = t
        .run_and_wait(t.request(&image.reference, &id), FIRST_PULL)
        .await?;
    let output = String::from_utf8(expect_success(&report)?)?;
    let parts: Vec<&str> = output.split("--\n").collect();
    ensure!(parts.len() == 4, "unexpected output {output:?}");
    ensure!(
        parts[0].trim() == token,
        "the page was {:?}, not {token:?}",
        parts[0]
    );

    let eth0 = inet_of(parts[3]).with_context(|| format!("no IPv4 on eth0: {:?}", parts[3]))?;
    ensure!(
        net.contains(eth0) && eth0 != net.gateway(),
        "eth0 has {eth0}, outside the action subnet {}",
        net.subnet()
    );
    ensure!(
        server.peers() == vec![IpAddr::V4(eth0)],
        "the server saw {:?}, not the action's {eth0}",
        server.peers()
    );
    ensure!(
        parts[2]
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == [eth0.to_string().as_str(), "action"]),
        "/etc/hosts does not map {eth0} to the hostname: {:?}",
        parts[2]
    );
    ensure!(
        parts[2].contains("127.0.0.1\tlocalhost"),
        "/etc/hosts has no localhost: {:?}",
        parts[2]
    );
    let servers: Vec<&str> = parts[1]
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .collect();
    let expected = host_nameservers();
    if !expected.is_empty() {
        ensure!(
            servers == expected,
            "resolv.conf names {servers:?}, the host's usable resolvers are {expected:?}"
        );
    }
    ensure!(
        !servers.iter().any(|s| s.starts_with("127.")),
        "resolv.conf names a loopback resolver: {:?}",
        parts[1]
    );
    Ok(())
}

/// A shell function: `probe HOST PORT` prints `HOST:PORT reached` when an HTTP request
/// there gets an answer within 3 s, `HOST:PORT blocked` otherwise.
pub(crate) const PROBE: &str = "probe() { if printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 3 nc $1 $2 \
                     >/dev/null 2>&1; then echo \"$1:$2 reached\"; else echo \"$1:$2 blocked\"; fi; }\n";

/// A server on the host's 127.0.0.1 and isolated's own port are out of reach, by the
/// loopback address and by the gateway address alike; a server on the gateway address is
/// reached by the same action (so the network itself works).
pub async fn host_loopback_is_unreachable(t: Ctx) -> Result<()> {
    let gw = t.env.net.gateway();
    let on_loopback = HttpServer::fixed(IpAddr::V4(Ipv4Addr::LOCALHOST), "loopback").await?;
    let on_gateway = HttpServer::fixed(IpAddr::V4(gw), "gateway").await?;
    let lo_port = on_loopback.addr.port();
    let isolated_port = t.env.isolated.addr().port();
    let targets = [
        format!("127.0.0.1 {lo_port}"),
        format!("{gw} {lo_port}"),
        format!("127.0.0.1 {isolated_port}"),
        format!("{gw} {isolated_port}"),
        format!("{gw} {}", on_gateway.addr.port()),
    ];
    let mut script = String::from(PROBE);
    for target in &targets {
        script.push_str(&format!("probe {target} >> /direktiv-data/data.out\n"));
    }
    let image = t.push(&ImageSpec::with_script(&script)).await?;
    let id = t.action_id("loopback");
    let report = t
        .run_and_wait(t.request(&image.reference, &id), FIRST_PULL)
        .await?;
    let output = String::from_utf8(expect_success(&report)?)?;
    let lines: Vec<&str> = output.lines().collect();
    let expected: Vec<String> = targets
        .iter()
        .enumerate()
        .map(|(i, target)| {
            let verdict = if i == targets.len() - 1 {
                "reached"
            } else {
                "blocked"
            };
            format!("{} {verdict}", target.replace(' ', ":"))
        })
        .collect();
    ensure!(
        lines == expected,
        "probes from the action:\n{output}\nexpected:\n{}",
        expected.join("\n")
    );
    ensure!(
        on_loopback.peers().is_empty(),
        "the loopback server was reached by {:?}",
        on_loopback.peers()
    );
    ensure!(
        on_gateway.peers().len() == 1,
        "the gateway server saw {:?}",
        on_gateway.peers()
    );
    Ok(())
}

/// A daemon whose gRPC port listens on every address (0.0.0.0) is still out of its
/// actions' reach on the gateway address (isolated's INPUT rule for its own port), while a
/// test server on the same address is reached.
pub async fn own_port_unreachable_when_bound_to_all(t: Ctx) -> Result<()> {
    let net = TestNet::create(t.env.dir())?;
    let result = own_port(&t, &net).await;
    let failed = net.remove();
    result?;
    ensure!(failed.is_empty(), "removing the test bridge: {failed:?}");
    Ok(())
}

async fn own_port(t: &Ctx, net: &TestNet) -> Result<()> {
    let daemon = Daemon::start_on(
        t.env,
        "bound-to-all",
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        vec!["--cni-conf-dir".into(), net.conf_dir.display().to_string()],
    )
    .await?;
    let gw = net.gateway();
    let server = HttpServer::fixed(IpAddr::V4(gw), "gateway").await?;
    let port = daemon.isolated.addr().port();
    let script = format!(
        "{PROBE}probe {gw} {port} >> /direktiv-data/data.out\n\
         probe {gw} {} >> /direktiv-data/data.out\n",
        server.addr.port()
    );
    let image = t.push(&ImageSpec::with_script(&script)).await?;
    let id = t.action_id("ownport");
    let report = daemon
        .run_and_wait(t.env, t.request(&image.reference, &id), FIRST_PULL)
        .await?;
    let output = String::from_utf8(expect_success(&report)?)?;
    let expected = format!("{gw}:{port} blocked\n{gw}:{} reached\n", server.addr.port());
    ensure!(
        output == expected,
        "probes from the action:\n{output}\nexpected:\n{expected}"
    );
    // The daemon itself answers on that address from the host.
    tokio::net::TcpStream::connect((gw, port))
        .await
        .context("the daemon does not listen on the gateway address")?;
    daemon.assert_nothing_left(t.env, &t.ns).await
}

/// An action reaches a server beyond the host (a namespace of the test's own behind a veth
/// pair) through the bridge and the host's forwarding, and arrives there with the host's
/// address on that link, not its own: outbound traffic is masqueraded.
pub async fn outbound_traffic_is_masqueraded(t: Ctx) -> Result<()> {
    let outside = Outside::create(t.env.dir())?;
    let result = masqueraded(&t, &outside).await;
    let failed = outside.remove();
    result?;
    ensure!(
        failed.is_empty(),
        "removing the outside network: {failed:?}"
    );
    Ok(())
}

async fn masqueraded(t: &Ctx, outside: &Outside) -> Result<()> {
    let token = format!("outside-{:016x}", rand::random::<u64>());
    let server = HttpServer::on(outside.listen()?, fixed_body(&token))?;
    let script = format!(
        "timeout 10 wget -q -O /direktiv-data/data.out http://{}/",
        server.addr
    );
    let image = t.push(&ImageSpec::with_script(&script)).await?;
    let id = t.action_id("outbound");
    let report = t
        .run_and_wait(t.request(&image.reference, &id), FIRST_PULL)
        .await?;
    let output = String::from_utf8(expect_success(&report)?)?;
    ensure!(output == token, "the action fetched {output:?}");
    ensure!(
        server.peers() == vec![IpAddr::V4(outside.host_addr())],
        "the outside saw {:?}, not the host's {}",
        server.peers(),
        outside.host_addr()
    );
    Ok(())
}

/// Who registered at the coordinator, and when the test lets the server action go.
#[derive(Default)]
pub(crate) struct Rendezvous {
    pub(crate) hello: Mutex<HashMap<String, IpAddr>>,
    pub(crate) release: Mutex<bool>,
    pub(crate) changed: Notify,
}

impl Rendezvous {
    async fn wait_for(&self, pred: impl Fn(&Self) -> Option<String>) -> String {
        loop {
            let notified = self.changed.notified();
            if let Some(v) = pred(self) {
                return v;
            }
            if tokio::time::timeout(Duration::from_secs(90), notified)
                .await
                .is_err()
            {
                return "timeout".into();
            }
        }
    }

    pub(crate) async fn handle(self: Arc<Self>, path: String, peer: IpAddr) -> String {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        match parts.as_slice() {
            ["hello", name] => {
                self.hello.lock().unwrap().insert(name.to_string(), peer);
                self.changed.notify_waiters();
                "ok".into()
            }
            ["peer", name] => {
                let me = name.to_string();
                self.wait_for(|s| {
                    s.hello
                        .lock()
                        .unwrap()
                        .iter()
                        .find(|(n, _)| **n != me)
                        .map(|(_, ip)| ip.to_string())
                })
                .await
            }
            ["wait"] => {
                self.wait_for(|s| (*s.release.lock().unwrap()).then(|| "go".into()))
                    .await
            }
            _ => "?".into(),
        }
    }
}

/// Two actions at once: distinct addresses in the subnet; one serves HTTP on its address,
/// the other can neither fetch from it nor ping it (ICMP echo over a ping socket), while it
/// can ping the gateway and the host can fetch from the first (so the server was up and
/// the probe means something).
pub async fn concurrent_actions_are_isolated(t: Ctx) -> Result<()> {
    let net = &t.env.net;
    let gw = net.gateway();
    let rv = Arc::new(Rendezvous::default());
    let handler_rv = rv.clone();
    let coordinator = HttpServer::start(
        IpAddr::V4(gw),
        Arc::new(move |path, peer| Box::pin(handler_rv.clone().handle(path, peer))),
    )
    .await?;
    let c = coordinator.addr;
    let secret = format!("secret-{:016x}", rand::random::<u64>());
    let script = format!(
        r#"role=$(cat /direktiv-data/data.in)
out=/direktiv-data/data.out
if [ "$role" = server ]; then
  mkdir -p /tmp/www && echo {secret} > /tmp/www/index.html
  httpd -p 8080 -h /tmp/www
  timeout 10 wget -q -O /dev/null http://{c}/hello/server
  timeout 120 wget -q -O $out http://{c}/wait
else
  timeout 10 wget -q -O /dev/null http://{c}/hello/client
  peer=$(timeout 120 wget -q -O - http://{c}/peer/client)
  echo "peer $peer" > $out
  if timeout 5 wget -q -O - http://$peer:8080/ >/dev/null 2>&1; then echo "http reached" >> $out; else echo "http blocked" >> $out; fi
  if probe ping $peer | grep -q reached; then echo "ping reached" >> $out; else echo "ping blocked" >> $out; fi
  if probe ping {gw} | grep -q reached; then echo "gateway reached" >> $out; else echo "gateway blocked" >> $out; fi
fi"#
    );
    // Ping through a ping socket (the probe): busybox's ping wants a raw socket, and
    // actions have no CAP_NET_RAW (issue 13).
    let image = t.push(&crate::escape::probe_image(t.env, &script)?).await?;
    let server_id = t.action_id("server");
    let client_id = t.action_id("client");
    let mut server_req = t.request(&image.reference, &server_id);
    server_req.data = Some(b"server".to_vec());
    let mut client_req = t.request(&image.reference, &client_id);
    client_req.data = Some(b"client".to_vec());
    t.run(server_req)
        .await
        .context("RunIsolate of the server action")?;
    t.run(client_req)
        .await
        .context("RunIsolate of the client action")?;

    let client_report = t.env.flow.wait_report(&client_id, FIRST_PULL).await;
    // Whatever the client saw, the server's page must be up now; then let it go.
    let (server_ip, client_ip) = {
        let hello = rv.hello.lock().unwrap();
        (hello.get("server").copied(), hello.get("client").copied())
    };
    let from_host = match server_ip {
        Some(ip) => fetch(ip, 8080).await,
        None => Err(anyhow::anyhow!("the server action never said hello")),
    };
    *rv.release.lock().unwrap() = true;
    rv.changed.notify_waiters();
    let server_report = t.env.flow.wait_report(&server_id, FIRST_PULL).await?;
    expect_success(&server_report)?;

    let output = String::from_utf8(expect_success(&client_report?)?)?;
    let (Some(IpAddr::V4(server_ip)), Some(IpAddr::V4(client_ip))) = (server_ip, client_ip) else {
        bail!("addresses not seen: server {server_ip:?}, client {client_ip:?}");
    };
    ensure!(
        server_ip != client_ip && net.contains(server_ip) && net.contains(client_ip),
        "addresses {server_ip} and {client_ip} are not two addresses of {}",
        net.subnet()
    );
    let page = from_host.context("the host could not fetch the server action's page")?;
    ensure!(page.trim() == secret, "the host fetched {page:?}");
    let expected = format!("peer {server_ip}\nhttp blocked\nping blocked\ngateway reached\n");
    ensure!(
        output == expected,
        "the client action saw:\n{output}\nexpected:\n{expected}"
    );
    Ok(())
}

/// GET / from the host, plain HTTP/1.0.
async fn fetch(ip: IpAddr, port: u16) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((ip, port)),
    )
    .await
    .context("connect timed out")??;
    conn.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut buf))
        .await
        .context("read timed out")??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or(text))
}
