//! The Prometheus endpoint: counters and histograms move when an action runs; the gRPC
//! health service answers SERVING on the main port.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::core::{echo_spec, expect_success};
use crate::harness::{Ctx, FIRST_PULL};

pub fn metrics_addr(t: &Ctx) -> Result<SocketAddr> {
    let args = &t.env.isolated.config().extra_args;
    let pos = args
        .iter()
        .position(|a| a == "--metrics-bind")
        .context("the harness starts isolated with --metrics-bind")?;
    Ok(args
        .get(pos + 1)
        .context("--metrics-bind has a value")?
        .parse()?)
}

pub async fn scrape(addr: SocketAddr) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to the metrics endpoint {addr}"))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut body)).await??;
    ensure!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "scrape: {body}"
    );
    Ok(body)
}

/// The value of the sample `name` (with its labels as written), 0 when absent.
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter_map(|rest| rest.strip_prefix(' '))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .next()
        .unwrap_or(0.0)
}

pub async fn move_and_health_serves(t: Ctx) -> Result<()> {
    let addr = metrics_addr(&t)?;
    let image = t.push(&echo_spec()).await?;
    let before = scrape(addr).await?;
    let id = t.action_id("metrics");
    let mut req = t.request(&image.reference, &id);
    req.data = Some(b"counted".to_vec());
    expect_success(&t.run_and_wait(req, FIRST_PULL).await?)?;
    // The report is acknowledged before its duration is recorded: poll a little.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let moved = [
        "isolated_actions_total{code=\"ok\"}",
        "isolated_accept_duration_seconds_count",
        "isolated_pull_duration_seconds_count",
        "isolated_start_duration_seconds_count",
        "isolated_run_duration_seconds_count",
        "isolated_report_duration_seconds_count",
        "isolated_pulled_bytes_total",
    ];
    loop {
        let after = scrape(addr).await?;
        let stuck: Vec<&str> = moved
            .iter()
            .copied()
            .filter(|m| sample(&after, m) <= sample(&before, m))
            .collect();
        if stuck.is_empty() {
            for gauge in ["isolated_actions_waiting", "isolated_actions_running"] {
                ensure!(
                    after.contains(&format!("\n{gauge} ")),
                    "{gauge} is missing:\n{after}"
                );
            }
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "these did not move after an action: {stuck:?}\nbefore:\n{before}\nafter:\n{after}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", t.env.isolated.addr()))?
            .connect()
            .await?;
    let mut health = HealthClient::new(channel);
    for service in [
        "",
        "isolate.DirektivIsolate",
        "isolated.control.v1.IsolateControl",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .map_err(|s| anyhow!("health check of {service:?}: {s}"))?
            .into_inner()
            .status();
        ensure!(
            status == ServingStatus::Serving,
            "health of {service:?} is {status:?}"
        );
    }
    Ok(())
}
