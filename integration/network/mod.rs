//! Per-action networking (ISOLATE.md §4 network error, §8 network isolation) with the real
//! CNI plugins and real iptables: what an action can reach and what it cannot, the
//! `network` modes, broken configs, and that nothing of a network outlives its action,
//! also across a restart and a crash.
//!
//! Traffic goes only to addresses the tests own: loopback, and the test bridges' gateway
//! and action addresses. Tests needing a non-default daemon start one of their own
//! ([`Daemon`]) with its own state dir, port and bridge.

mod config;
mod lifecycle;
pub(crate) mod reach;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use direktiv_isolate::proto::flow::ReportActionResultsRequest;
use direktiv_isolate::proto::isolate::RunIsolateRequest;
use libtest_mimic::Trial;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::cni::TestNet;
use crate::harness::isolated::{Isolated, IsolatedConfig};
use crate::harness::mounts::mounts_under;
use crate::harness::process::free_port;
use crate::harness::{trial, Env, NOTHING_LEFT};

pub const CODE_NETWORK: &str = "au.com.direktiv.error.network";
const STARTUP: Duration = Duration::from_secs(60);

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "network::fetches_from_the_host_through_the_bridge",
            reach::fetches_from_the_host_through_the_bridge,
        ),
        trial(
            "network::host_loopback_is_unreachable",
            reach::host_loopback_is_unreachable,
        ),
        trial(
            "network::outbound_traffic_is_masqueraded",
            reach::outbound_traffic_is_masqueraded,
        ),
        trial(
            "network::own_port_unreachable_when_bound_to_all",
            reach::own_port_unreachable_when_bound_to_all,
        ),
        trial(
            "network::concurrent_actions_are_isolated",
            reach::concurrent_actions_are_isolated,
        ),
        trial(
            "network::none_is_loopback_only",
            config::none_is_loopback_only,
        ),
        trial(
            "network::broken_config_is_a_network_error",
            config::broken_config_is_a_network_error,
        ),
        trial(
            "network::nothing_leaks_after_100_actions",
            lifecycle::nothing_leaks_after_100_actions,
        ),
        trial(
            "network::detach_works_after_a_restart",
            lifecycle::detach_works_after_a_restart,
        ),
        trial(
            "network::released_after_a_crash",
            lifecycle::released_after_a_crash,
        ),
        trial(
            "network::nothing_mounted_after_a_graceful_stop",
            lifecycle::nothing_mounted_after_a_graceful_stop,
        ),
    ]
}

/// A second `isolated` with settings of its own, sharing the run's containerd, registries
/// and flow receiver. Its containerd namespaces have a prefix of their own: a daemon
/// sweeps what carries its prefix and belongs to none of its actions, and must not take
/// the shared daemon's running actions for orphans. Stopped (by pid) when dropped.
pub struct Daemon {
    pub isolated: Isolated,
    pub state_dir: PathBuf,
    prefix: String,
    run_dir: PathBuf,
}

impl Daemon {
    /// Starts a daemon with `args` after the standard flags.
    pub async fn start(env: &Env, label: &str, args: Vec<String>) -> Result<Daemon> {
        Self::start_on(env, label, IpAddr::V4(Ipv4Addr::LOCALHOST), args).await
    }

    /// Like `start`, with the gRPC port bound to `ip` (the metrics port is off).
    pub async fn start_on(env: &Env, label: &str, ip: IpAddr, args: Vec<String>) -> Result<Daemon> {
        let tag = format!("{label}-{:08x}", rand::random::<u32>());
        let state_dir = env.dir().join(format!("state-{tag}"));
        let prefix = format!("isot-{:08x}.", rand::random::<u32>());
        let mut args = args;
        // Its own prefix, and no metrics port: the shared daemon has the default one.
        args.extend([
            "--namespace-prefix".to_string(),
            prefix.clone(),
            "--metrics-bind".to_string(),
            String::new(),
        ]);
        let mut config = IsolatedConfig::new(
            SocketAddr::new(ip, free_port()?),
            env.flow.addr(),
            env.containerd.socket(),
            state_dir.clone(),
            env.dir().join(format!("isolated-{tag}.log")),
            args,
        );
        if !ip.is_loopback() {
            // Plaintext tokens are refused beyond loopback; these trials are about what
            // an action can reach, not about who may call.
            config.tcp_token = None;
            config.extra_args.push("--allow-unauthenticated".into());
        }
        let isolated = Isolated::new(config);
        isolated
            .start(STARTUP)
            .await
            .with_context(|| format!("start the {label} daemon"))?;
        Ok(Daemon {
            isolated,
            state_dir,
            prefix,
            run_dir: env.dir().to_path_buf(),
        })
    }

    /// A daemon on a bridge of its own.
    pub async fn with_net(env: &Env, label: &str, net: &TestNet) -> Result<Daemon> {
        Self::start(
            env,
            label,
            vec!["--cni-conf-dir".into(), net.conf_dir.display().to_string()],
        )
        .await
    }

    /// The containerd namespace of Direktiv namespace `ns` on this daemon, recorded for the
    /// clean-up after the run.
    pub fn cns(&self, ns: &str) -> String {
        let cns = format!(
            "{}{}",
            self.prefix,
            direktiv_isolate::request::containerd_name(ns)
        );
        crate::harness::stale::record_namespace(&self.run_dir, &cns);
        cns
    }

    pub async fn run(&self, req: RunIsolateRequest) -> Result<()> {
        if let Some(ns) = &req.namespace {
            self.cns(ns);
        }
        let mut client = crate::harness::private::isolate_client(self.isolated.socket()).await?;
        client
            .run_isolate(req)
            .await
            .map_err(|s| anyhow!("RunIsolate failed: {s}"))?;
        Ok(())
    }

    pub async fn run_and_wait(
        &self,
        env: &Env,
        req: RunIsolateRequest,
        timeout: Duration,
    ) -> Result<ReportActionResultsRequest> {
        let id = req.action_id.clone().unwrap_or_default();
        self.run(req).await?;
        env.flow
            .wait_report(&id, timeout)
            .await
            .with_context(|| self.log_tail())
    }

    /// What is left of Direktiv namespace `ns`'s actions on this daemon (containerd
    /// objects, cgroups, directories, network state) and of any pinned namespace.
    pub async fn leftovers(&self, env: &Env, ns: &str) -> Result<Vec<String>> {
        crate::harness::cleanup::drop_pool(self.isolated.socket(), ns).await;
        let mut left = env.leftovers_in(&self.cns(ns), &self.state_dir).await?;
        left.extend(pinned_namespaces(&self.state_dir));
        Ok(left)
    }

    /// Polls `leftovers` until empty, failing with what is left after `NOTHING_LEFT`.
    pub async fn assert_nothing_left(&self, env: &Env, ns: &str) -> Result<()> {
        self.assert_nothing_left_within(env, ns, NOTHING_LEFT).await
    }

    /// Polls `leftovers` until empty, failing with what is left after `limit`.
    pub async fn assert_nothing_left_within(
        &self,
        env: &Env,
        ns: &str,
        limit: Duration,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = self.leftovers(env, ns).await?;
            if left.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(anyhow!(
                    "left behind:\n  {}\n{}",
                    left.join("\n  "),
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_tail(&self) -> String {
        format!(
            "daemon log {}:\n{}",
            self.isolated.log_path().display(),
            self.isolated.log_tail(40)
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.isolated.stop(Duration::from_secs(20));
    }
}

/// Network namespaces still pinned under a state dir (mounts below `<state>/netns/`).
pub fn pinned_namespaces(state_dir: &Path) -> Vec<String> {
    let netns = state_dir.join("netns");
    mounts_under(&netns)
        .into_iter()
        .filter(|m| m != &netns)
        .map(|m| format!("pinned namespace {}", m.display()))
        .collect()
}

pub type Handler =
    Arc<dyn Fn(String, IpAddr) -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// A minimal HTTP/1.0 server for actions to talk to: answers every GET with what the
/// handler returns for its path, and records who connected.
///
/// It runs on a thread and runtime of its own: the shared runtime's two workers are busy
/// with every other trial, and an action's probe must not time out because its server was
/// not scheduled.
pub struct HttpServer {
    pub addr: SocketAddr,
    peers: Arc<Mutex<Vec<IpAddr>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl HttpServer {
    pub async fn start(ip: IpAddr, handler: Handler) -> Result<HttpServer> {
        let listener = std::net::TcpListener::bind((ip, 0))
            .with_context(|| format!("bind a test server to {ip}"))?;
        listener.set_nonblocking(true)?;
        Self::on(listener, handler)
    }

    /// Serves on a listening socket made elsewhere (in another network namespace).
    pub fn on(listener: std::net::TcpListener, handler: Handler) -> Result<HttpServer> {
        let addr = listener.local_addr()?;
        let peers = Arc::new(Mutex::new(Vec::new()));
        let seen = peers.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("http-{addr}"))
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::select! {
                        _ = serve(listener, handler, seen) => {}
                        _ = stopped => {}
                    }
                })
            })?;
        Ok(HttpServer {
            addr,
            peers,
            stop: Some(stop),
        })
    }

    /// A server answering every path with `body`.
    pub async fn fixed(ip: IpAddr, body: &str) -> Result<HttpServer> {
        Self::start(ip, fixed_body(body)).await
    }
}

async fn serve(listener: tokio::net::TcpListener, handler: Handler, seen: Arc<Mutex<Vec<IpAddr>>>) {
    while let Ok((conn, peer)) = listener.accept().await {
        seen.lock().unwrap().push(peer.ip());
        tokio::spawn(answer(conn, peer.ip(), handler.clone()));
    }
}

/// Reads one request's head and answers it with the handler's body.
async fn answer(mut conn: tokio::net::TcpStream, peer: IpAddr, handler: Handler) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16384 {
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
    let body = handler(path, peer).await;
    let head = "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n";
    let response = format!("{head}Content-Length: {}\r\n\r\n{body}", body.len());
    let _ = conn.write_all(response.as_bytes()).await;
    let _ = conn.shutdown().await;
}

/// A handler answering every path with `body`.
pub fn fixed_body(body: &str) -> Handler {
    let body = body.to_string();
    Arc::new(move |_, _| {
        let b = body.clone();
        Box::pin(async move { b })
    })
}

impl HttpServer {
    /// The addresses that connected so far.
    pub fn peers(&self) -> Vec<IpAddr> {
        self.peers.lock().unwrap().clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The IPv4 address in `ip -4 -o addr` output (`2: eth0    inet 10.88.3.2/24 ...`).
pub fn inet_of(ip_output: &str) -> Option<Ipv4Addr> {
    let mut words = ip_output.split_whitespace();
    words.find(|w| *w == "inet")?;
    words.next()?.split('/').next()?.parse().ok()
}
