//! The soak (issue 12): many mixed actions at concurrency 16 on two daemons of the
//! trial's own, one of them with a CNI network (a fifth of the actions), every kind of
//! end the contract has (ok, error.json, non-zero exit, timeout, oom, cancel); each
//! reported once with the right code, and afterwards nothing left: no task, container,
//! snapshot, lease, shim beyond the keepers, network namespace, veth, IP lease, mount,
//! cgroup or data dir, and each daemon's RSS back within 10 % of where it was once warm.
//!
//! `make test` runs 1,000 actions; `make soak` 10,000 (`ISOLATE_SOAK_ACTIONS`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::ListRequest;
use direktiv_isolate::proto::control::{ActionState, CancelIsolateRequest};
use direktiv_isolate::proto::isolate::RunIsolateRequest;

use crate::core::expect_error;
use crate::harness::cni::TestNet;
use crate::harness::containerd::with_ns;
use crate::harness::private::{action_ref, control_client, wait_state};
use crate::harness::{Ctx, ImageSpec, ACTION, FIRST_PULL};
use crate::network::Daemon;

const CONCURRENCY: usize = 16;

/// What an action of the soak does, and the errorCode its report must carry.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Ok,
    ErrorJson,
    Exit,
    Timeout,
    Oom,
    Cancel,
}

impl Kind {
    fn of(i: usize) -> Kind {
        match i % 10 {
            0..=3 => Kind::Ok,
            4 => Kind::ErrorJson,
            5 => Kind::Exit,
            6 => Kind::Timeout,
            7 => Kind::Oom,
            8 => Kind::Cancel,
            _ => Kind::Ok,
        }
    }

    fn code(self) -> Option<&'static str> {
        match self {
            Kind::Ok => None,
            Kind::ErrorJson => Some("soak.failed"),
            Kind::Exit => Some("au.com.direktiv.error.exit"),
            Kind::Timeout => Some("au.com.direktiv.error.timeout"),
            Kind::Oom => Some("au.com.direktiv.error.oom"),
            Kind::Cancel => Some("au.com.direktiv.error.cancelled"),
        }
    }

    /// The input that makes the one soak image behave so.
    fn input(self, id: &str) -> String {
        match self {
            Kind::Ok => format!("ok {id}"),
            Kind::ErrorJson => "errorjson".into(),
            Kind::Exit => "exit".into(),
            Kind::Timeout | Kind::Cancel => "sleep".into(),
            Kind::Oom => "oom".into(),
        }
    }
}

fn soak_image() -> ImageSpec {
    ImageSpec::with_script(
        r#"read what rest < /direktiv-data/data.in
case "$what" in
  ok) cat /direktiv-data/data.in > /direktiv-data/data.out ;;
  errorjson) printf '{"errorCode":"soak.failed","errorMessage":"as asked"}' > /direktiv-data/error.json ;;
  exit) echo "exiting 3" >&2; exit 3 ;;
  sleep) sleep 60 ;;
  oom) dd if=/dev/zero of=/dev/null bs=64M count=1 ;;
esac
"#,
    )
}

/// Resident set of `pid` in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

pub async fn soak_mixed(t: Ctx) -> Result<()> {
    let net = TestNet::create(t.env.dir())?;
    let res = soak(&t, &net).await;
    let failed = net.remove();
    res?;
    ensure!(failed.is_empty(), "removing the test bridge: {failed:?}");
    Ok(())
}

async fn soak(t: &Ctx, net: &TestNet) -> Result<()> {
    let total: usize = std::env::var("ISOLATE_SOAK_ACTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    // A 32 MiB small size, so an oom is quick; a 1 s grace, so a timeout is.
    let common = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--kill-grace-secs",
            "1",
            "--size-memory-mib",
            "32,512,1024",
            "--max-running",
            "32",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let plain = Daemon::start(t.env, "soak", common(&["--network", "none"])).await?;
    let conf = net.conf_dir.display().to_string();
    let cni = Daemon::start(t.env, "soak-cni", common(&["--cni-conf-dir", &conf])).await?;
    let image = t.push(&soak_image()).await?;
    let daemons = Arc::new([plain, cni]);

    let run_one = |i: usize| {
        let daemons = daemons.clone();
        let image = image.reference.clone();
        let ns = t.ns.clone();
        let env = t.env;
        async move {
            let kind = Kind::of(i);
            // Every fifth action on the CNI daemon.
            let d = &daemons[usize::from(i % 5 == 0)];
            let id = format!("soak{i}-{:06x}", rand::random::<u32>() >> 8);
            let req = RunIsolateRequest {
                namespace: Some(ns.clone()),
                action_id: Some(id.clone()),
                image: Some(image),
                data: Some(kind.input(&id).into_bytes()),
                timeout: Some(if matches!(kind, Kind::Timeout) {
                    1
                } else {
                    120
                }),
                ..Default::default()
            };
            d.run(req).await?;
            if matches!(kind, Kind::Cancel) {
                let mut control = control_client(d.isolated.socket()).await?;
                wait_state(&mut control, &ns, &id, ActionState::Running, FIRST_PULL).await?;
                control
                    .cancel_isolate(CancelIsolateRequest {
                        namespace: ns.clone(),
                        action_id: id.clone(),
                        reason: "soak".into(),
                    })
                    .await?;
            }
            let report = env.flow.wait_report(&id, FIRST_PULL).await?;
            match kind.code() {
                None => {
                    let out = crate::core::expect_success(&report)?;
                    ensure!(out == kind.input(&id).as_bytes(), "{id}: output {out:?}");
                }
                Some(code) => {
                    expect_error(&report, code).with_context(|| format!("{id} ({kind:?})"))?;
                }
            }
            anyhow::Ok(id)
        }
    };

    // Warm both daemons (pulls, shims, first CNI set-up), then measure.
    let warm: Vec<String> = futures::future::try_join_all((0..20).map(run_one)).await?;
    let rss_warm: Vec<u64> = daemons
        .iter()
        .map(|d| rss_kib(d.isolated.pid().unwrap_or(0)))
        .collect::<Result<_>>()?;
    let started = std::time::Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::new();
    for i in 20..total {
        let permit = gate.clone().acquire_owned().await?;
        let fut = run_one(i);
        tasks.push(tokio::spawn(async move {
            let r = fut.await;
            drop(permit);
            r
        }));
    }
    let mut ids = warm;
    for task in tasks {
        ids.push(task.await??);
    }
    let took = started.elapsed();
    eprintln!(
        "soak: {} actions at concurrency {CONCURRENCY} in {:.1}s ({:.1}/s)",
        total - 20,
        took.as_secs_f64(),
        (total - 20) as f64 / took.as_secs_f64()
    );
    for id in &ids {
        let n = t.env.flow.count(id);
        ensure!(n == 1, "{id} reported {n} times");
    }
    for (d, label) in daemons.iter().zip(["soak", "soak-cni"]) {
        // Reported means released; wait until each daemon says so for all.
        let mut control = control_client(d.isolated.socket()).await?;
        for id in ids.iter().rev().take(50) {
            if let Ok(info) = control.get_isolate(action_ref(&t.ns, id)).await {
                if info.get_ref().state() != ActionState::Reported {
                    wait_state(&mut control, &t.ns, id, ActionState::Reported, ACTION).await?;
                }
            }
        }
        d.assert_nothing_left(t.env, &t.ns)
            .await
            .with_context(|| format!("daemon {label}"))?;
        let cns = d.cns(&t.ns);
        let leases = LeasesClient::new(t.env.containerd.channel().await?)
            .list(with_ns(ListRequest::default(), &cns))
            .await?
            .into_inner()
            .leases;
        ensure!(leases.is_empty(), "{label}: leases left: {leases:?}");
        let mounts = crate::harness::mounts::mounts_under(&d.state_dir);
        // The daemon's own while it runs: the namespaces' dir and the actions' nosuid,nodev
        // mount.
        let own = [d.state_dir.join("netns"), d.state_dir.join("actions")];
        let stray: Vec<_> = mounts.iter().filter(|m| !own.contains(m)).collect();
        ensure!(stray.is_empty(), "{label}: mounts left: {stray:?}");
        let leases_dir = d.state_dir.join("cni/ipam");
        let ip_leases = ip_lease_files(&leases_dir);
        ensure!(
            ip_leases.is_empty(),
            "{label}: IP leases left: {ip_leases:?}"
        );
    }
    let veths = std::process::Command::new("ip")
        .args(["-o", "link", "show", "master", &net.bridge])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&veths.stdout).trim().is_empty(),
        "veths left on {}: {}",
        net.bridge,
        String::from_utf8_lossy(&veths.stdout)
    );
    for (i, d) in daemons.iter().enumerate() {
        let now = rss_kib(d.isolated.pid().unwrap_or(0))?;
        let warm = rss_warm[i];
        eprintln!("soak: daemon {i} RSS warm {warm} KiB, after {now} KiB");
        ensure!(
            now as f64 <= warm as f64 * 1.10,
            "daemon {i}: RSS {now} KiB after the soak, {warm} KiB once warm (more than 10 % up)"
        );
    }
    // Shims beyond the keepers: a graceful stop removes the keepers too, and then no
    // shim of these namespaces may be left.
    let namespaces: Vec<String> = daemons.iter().map(|d| d.cns(&t.ns)).collect();
    drop(
        Arc::try_unwrap(daemons)
            .ok()
            .context("the daemons are still shared")?,
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let shims = shims_of(&namespaces);
        if shims.is_empty() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("shims left after the daemons stopped: {shims:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// host-local's lease files (named by address) under `dir`.
fn ip_lease_files(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(nets) = std::fs::read_dir(dir) else {
        return out;
    };
    for net in nets.flatten() {
        if let Ok(files) = std::fs::read_dir(net.path()) {
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.parse::<std::net::IpAddr>().is_ok() {
                    out.push(f.path().display().to_string());
                }
            }
        }
    }
    out
}

/// runc shims whose command line names one of `namespaces`.
fn shims_of(namespaces: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains("containerd-shim-runc-v2")
            && namespaces
                .iter()
                .any(|ns| text.contains(&format!("-namespace {ns} ")))
        {
            found.push(text);
        }
    }
    found
}
