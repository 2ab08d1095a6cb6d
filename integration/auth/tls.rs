//! TLS, both ways. The TCP listener with a certificate and a client CA: plaintext
//! clients are refused, a verified client certificate may do anything, a TLS client
//! without one reaches gRPC health only (or everything with a token), a certificate of
//! another CA fails the handshake; `isolatectl --addr --ca --cert --key` works. The flow
//! client: an `https://` endpoint never gets a byte of cleartext, a TLS failure is
//! retried and logged with its reason, and the report arrives over mutual TLS.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use direktiv_isolate::proto::control::{ActionState, ListIsolatesRequest};
use tokio::io::AsyncReadExt;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use super::{clients, health, tcp};
use crate::core::{echo_spec, expect_success};
use crate::harness::certs::{Ca, Pair};
use crate::harness::flow::FlowReceiver;
use crate::harness::private::PrivateIsolated;
use crate::harness::process::free_port;
use crate::harness::{Ctx, ACTION, FIRST_PULL, NOTHING_LEFT};
use crate::operator::shown;

fn pem(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("read {}", path.display()))
}

/// A client TLS config trusting `ca`, presenting `identity` when given.
fn client_tls(ca: &Ca, identity: Option<&Pair>) -> Result<ClientTlsConfig> {
    let mut c = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem(&ca.pair.cert)?))
        .domain_name("localhost");
    if let Some(id) = identity {
        c = c.identity(Identity::from_pem(pem(&id.cert)?, pem(&id.key)?));
    }
    Ok(c)
}

pub async fn mutual_tls_listener(t: Ctx) -> Result<()> {
    let dir = t
        .env
        .dir()
        .join(format!("pki-{:08x}", rand::random::<u32>()));
    let ca = Ca::new(&dir, "isolated-test-ca")?;
    let server = ca.issue("node", "node-1", true, "DNS:localhost,IP:127.0.0.1")?;
    let flow = ca.issue("flow", "flow-client", false, "")?;
    let rogue_ca = Ca::new(&dir.join("rogue"), "rogue-ca")?;
    let rogue = rogue_ca.issue("rogue", "rogue-client", false, "")?;
    let s = |p: &Path| p.display().to_string();
    let (cert, key, client_ca) = (s(&server.cert), s(&server.key), s(&ca.pair.cert));
    let p = PrivateIsolated::start(
        t.env,
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &client_ca,
        ],
    )
    .await?;
    p.adopt(&t.ns);
    let res = async {
        let image = t.push(&echo_spec()).await?;

        // A plaintext client gets nowhere.
        let plain = tcp(p.addr(), None).await;
        if let Ok(channel) = plain {
            let (_, mut c) = clients(&channel, p.token())?;
            let r = c.list_isolates(ListIsolatesRequest::default()).await;
            ensure!(
                r.is_err(),
                "a plaintext call was answered by the TLS listener"
            );
            ensure!(
                health(&channel).await.is_err(),
                "plaintext health was answered by the TLS listener"
            );
        }

        // A verified client certificate: every namespace, no token.
        let channel = tcp(p.addr(), Some(client_tls(&ca, Some(&flow))?)).await?;
        let (mut run, mut control) = clients(&channel, None)?;
        let id = t.action_id("mtls");
        let mut req = t.request(&image.reference, &id);
        req.data = Some(b"over mutual TLS".to_vec());
        run.run_isolate(req)
            .await
            .context("RunIsolate with a client certificate")?;
        let out = expect_success(&t.env.flow.wait_report(&id, FIRST_PULL).await?)?;
        ensure!(out == b"over mutual TLS", "output {out:?}");
        control
            .list_isolates(ListIsolatesRequest::default())
            .await?;

        // TLS without a certificate: health, and with a token everything.
        let anon = tcp(p.addr(), Some(client_tls(&ca, None)?)).await?;
        ensure!(
            health(&anon).await? == ServingStatus::Serving,
            "health without a certificate"
        );
        let (_, mut c) = clients(&anon, None)?;
        let code = c
            .list_isolates(ListIsolatesRequest::default())
            .await
            .err()
            .map(|s| s.code());
        ensure!(
            code == Some(Code::Unauthenticated),
            "a TLS call without certificate or token: {code:?}"
        );
        let (_, mut c) = clients(&anon, p.token())?;
        c.list_isolates(ListIsolatesRequest::default())
            .await
            .context("a token over TLS without a client certificate")?;

        // A certificate of another CA fails the handshake.
        match tcp(p.addr(), Some(client_tls(&ca, Some(&rogue))?)).await {
            Err(_) => {}
            Ok(channel) => {
                let (_, mut c) = clients(&channel, None)?;
                ensure!(
                    c.list_isolates(ListIsolatesRequest::default())
                        .await
                        .is_err(),
                    "a client certificate of another CA was accepted"
                );
            }
        }
        p.ensure_running()?;

        // isolatectl over TLS, with a certificate, and with a token.
        let addr = p.addr().to_string();
        let ctl = |extra: Vec<String>, token: Option<&str>| {
            let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_isolatectl"));
            cmd.args(["--addr", &addr, "--ca", &client_ca])
                .args(extra)
                .args(["ls", "-n", &t.ns])
                .env_remove("ISOLATECTL_TOKEN")
                .env_remove("ISOLATECTL_SOCKET")
                .kill_on_drop(true);
            if let Some(token) = token {
                cmd.env("ISOLATECTL_TOKEN", token);
            }
            cmd.output()
        };
        let with_cert = vec!["--cert".into(), s(&flow.cert), "--key".into(), s(&flow.key)];
        let out = ctl(with_cert, None).await?;
        ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&id),
            "isolatectl with a client certificate: {}",
            shown(&out)
        );
        let out = ctl(vec![], None).await?;
        ensure!(
            out.status.code() == Some(2)
                && String::from_utf8_lossy(&out.stderr).contains("no credentials"),
            "isolatectl over TLS without credentials: {}",
            shown(&out)
        );
        let out = ctl(vec![], p.token()).await?;
        ensure!(
            out.status.success(),
            "isolatectl with a token over TLS: {}",
            shown(&out)
        );

        let log = p.log_text();
        ensure!(
            log.contains("certificate CN=flow-client"),
            "the log does not name the client certificate's subject"
        );
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await?;
        Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    res.map_err(|e| p.explain(e))
}

/// A TCP server that records the first bytes of every connection and closes it: what
/// the flow client sends before any answer.
struct Recorder {
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Recorder {
    async fn start(addr: SocketAddr) -> Result<Recorder> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = vec![0u8; 64];
                let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .unwrap_or(0);
                buf.truncate(n);
                s.lock().unwrap().push(buf);
                // A plaintext answer, so the client's TLS layer has something to
                // refuse with a reason of its own.
                use tokio::io::AsyncWriteExt;
                let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        Ok(Recorder {
            seen,
            task: Some(task),
        })
    }

    fn connections(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap().clone()
    }
}

impl Recorder {
    /// Stops listening, and waits until the port is free again.
    async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

pub async fn flow_reports_over_tls_only(t: Ctx) -> Result<()> {
    let dir = t
        .env
        .dir()
        .join(format!("pki-{:08x}", rand::random::<u32>()));
    let ca = Ca::new(&dir, "flow-test-ca")?;
    let receiver_pair = ca.issue("flow", "flow-engine", true, "DNS:localhost,IP:127.0.0.1")?;
    let node = ca.issue("node", "isolated-node", false, "")?;
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    // First a listener that only records: the endpoint says https://, so what it gets
    // must be a TLS handshake, never HTTP/2 in the clear.
    let recorder = Recorder::start(addr).await?;
    let s = |p: &Path| p.display().to_string();
    let endpoint = format!("https://localhost:{port}");
    let (ca_arg, cert, key) = (s(&ca.pair.cert), s(&node.cert), s(&node.key));
    let p = PrivateIsolated::start(
        t.env,
        &[
            "--flow-endpoint",
            &endpoint,
            "--flow-ca",
            &ca_arg,
            "--flow-client-cert",
            &cert,
            "--flow-client-key",
            &key,
        ],
    )
    .await?;
    p.adopt(&t.ns);
    let res = async {
        let image = t.push(&echo_spec()).await?;
        let id = t.action_id("tls-report");
        let mut req = t.request(&image.reference, &id);
        req.data = Some(b"for the TLS flow engine".to_vec());
        p.accept(req).await?;
        let deadline = tokio::time::Instant::now() + FIRST_PULL;
        while recorder.connections().len() < 2 {
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the flow client did not try twice: {:?}",
                    recorder.connections()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for first in recorder.connections() {
            ensure!(
                first.first() == Some(&0x16),
                "the flow client sent something other than a TLS handshake: {:?}",
                String::from_utf8_lossy(&first)
            );
            ensure!(
                !first.starts_with(b"PRI * HTTP/2.0"),
                "the report went out in cleartext"
            );
        }
        let info = p.get(&t.ns, &id).await?;
        ensure!(
            info.state() == ActionState::Finished && info.report_attempts >= 2,
            "after failed TLS attempts: state {:?}, attempts {}",
            info.state(),
            info.report_attempts
        );
        let log = p.log_text();
        let reasons: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("flow endpoint did not take the report"))
            .collect();
        ensure!(
            reasons.iter().any(|l| l.contains("corrupt message")),
            "no log line gives the TLS failure's reason: {reasons:#?}"
        );

        // Then a real flow engine with its certificate, demanding the node's.
        recorder.stop().await;
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                pem(&receiver_pair.cert)?,
                pem(&receiver_pair.key)?,
            ))
            .client_ca_root(Certificate::from_pem(pem(&ca.pair.cert)?));
        let receiver = FlowReceiver::start_tls_on(addr, tls).await?;
        let report = receiver.wait_report(&id, ACTION).await?;
        let out = expect_success(&report)?;
        ensure!(out == b"for the TLS flow engine", "output {out:?}");
        p.wait_state(&t.ns, &id, ActionState::Reported, ACTION)
            .await?;
        receiver.shutdown();
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await?;
        Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    res.map_err(|e| p.explain(e))
}
