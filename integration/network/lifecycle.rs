//! Nothing of an action's network outlives it: not after 100 actions, not after a restart
//! of the network layer, not after a crash of the daemon.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use direktiv_isolate::config::{Config, Options};
use direktiv_isolate::network::{NetTarget, Networks};

use super::{inet_of, pinned_namespaces, Daemon};
use crate::core::expect_success;
use crate::harness::cleanup::network_leftovers;
use crate::harness::cni::{port_chain_exists, TestNet};
use crate::harness::process::free_port;
use crate::harness::{stale, Ctx, ImageSpec, ACTION, FIRST_PULL};

const ACTIONS: usize = 100;

/// The nat table's rules, all of them; an iptables that fails is a failure, not
/// an empty table.
fn nat_rules() -> Result<Vec<String>> {
    let out = Command::new("iptables")
        .args(["-w", "10", "-t", "nat", "-S"])
        .output()
        .context("run iptables")?;
    ensure!(
        out.status.success(),
        "iptables -t nat -S: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect())
}

/// The NAT rules that name `cns`: the bridge plugin's own (they carry the container
/// id), which it writes if isolated ever stops taking its ipMasq over.
fn nat_rules_of(cns: &str) -> Result<Vec<String>> {
    Ok(nat_rules()?
        .into_iter()
        .filter(|l| l.contains(cns))
        .collect())
}

/// Leases, apart from host-local's own lock and cursor files.
fn leases(state_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for net in std::fs::read_dir(state_dir.join("cni/ipam"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for f in std::fs::read_dir(net.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = f.file_name().to_string_lossy().into_owned();
            if name != "lock" && !name.starts_with("last_reserved_ip") {
                found.push(f.path().display().to_string());
            }
        }
    }
    found
}

/// Mean of the `ms=` values of log lines containing `marker`.
fn mean_ms(log: &str, marker: &str) -> Option<f64> {
    let values: Vec<f64> = log
        .lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| {
            l.split("ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// 100 actions, 16 at a time, each with an address on the bridge; afterwards no pinned
/// namespace, attachment record, IPAM lease, bridge port (veth) or NAT rule is left.
pub async fn nothing_leaks_after_100_actions(t: Ctx) -> Result<()> {
    let net = TestNet::create(t.env.dir())?;
    let daemon = Daemon::start(
        t.env,
        "leaks",
        vec![
            "--cni-conf-dir".into(),
            net.conf_dir.display().to_string(),
            "--max-running".into(),
            "16".into(),
        ],
    )
    .await?;
    let image = t
        .push(&ImageSpec::with_script(
            "ip -4 -o addr show dev eth0 > /direktiv-data/data.out",
        ))
        .await?;
    // The first pulls the image; the others find it.
    let first = t.action_id("leak");
    let report = daemon
        .run_and_wait(t.env, t.request(&image.reference, &first), FIRST_PULL)
        .await?;
    expect_success(&report)?;

    let started = Instant::now();
    let runs = (1..ACTIONS).map(|i| {
        let req = t.request(&image.reference, &t.action_id(&format!("leak{i}")));
        let daemon = &daemon;
        async move { daemon.run_and_wait(t.env, req, FIRST_PULL).await }
    });
    let reports = futures::future::join_all(runs).await;
    let elapsed = started.elapsed();
    for report in reports {
        let report = report?;
        let output = String::from_utf8(expect_success(&report)?)?;
        let ip = inet_of(&output).with_context(|| format!("no address in {output:?}"))?;
        ensure!(net.contains(ip), "{ip} is outside {}", net.subnet());
    }

    daemon.assert_nothing_left(t.env, &t.ns).await?;
    ensure!(
        net.ports().is_empty(),
        "veths left on {}: {:?}",
        net.bridge,
        net.ports()
    );
    let leases = leases(&daemon.state_dir);
    ensure!(leases.is_empty(), "IPAM leases left: {leases:?}");
    let cns = daemon.cns(&t.ns);
    let nat = nat_rules_of(&cns)?;
    ensure!(nat.is_empty(), "NAT rules left: {nat:?}");
    // isolated's own outbound NAT is one rule for the subnet, however many
    // actions came and went.
    let masquerade: Vec<String> = nat_rules()?
        .into_iter()
        .filter(|l| l.starts_with("-A ISOLATED-POSTROUTING") && l.contains(&net.subnet()))
        .collect();
    ensure!(
        masquerade.len() == 1,
        "expected one MASQUERADE rule for {}, found {masquerade:?}",
        net.subnet()
    );

    let log = daemon.isolated.log_text();
    eprintln!(
        "network: {} actions in {:.1}s after the first ({:.0} ms each at 16 at a time); \
         attach {:.0} ms, release {:.0} ms on average",
        ACTIONS - 1,
        elapsed.as_secs_f64(),
        elapsed.as_millis() as f64 / (ACTIONS - 1) as f64,
        mean_ms(&log, "network attached").unwrap_or(f64::NAN),
        mean_ms(&log, "network released").unwrap_or(f64::NAN),
    );
    drop(daemon);
    let failed = net.remove();
    ensure!(failed.is_empty(), "cleaning up the test bridge: {failed:?}");
    Ok(())
}

/// The network layer alone: an attachment survives the `Networks` that made it (as after a
/// crash), a new one (as after a restart) finds it, CHECKs it, attaches the action again
/// without leaking the first network, and releases it from the target alone, twice without
/// harm.
pub async fn detach_works_after_a_restart(t: Ctx) -> Result<()> {
    let net = TestNet::create(t.env.dir())?;
    let tag = format!("{:08x}", rand::random::<u32>());
    let state_dir = t.env.dir().join(format!("state-lib-{tag}"));
    let cfg = Config::load(
        Options {
            state_dir: Some(state_dir.clone()),
            cni_conf_dir: Some(net.conf_dir.clone()),
            network: Some(direktiv_isolate::config::NetworkMode::Cni),
            bind: Some(format!("127.0.0.1:{}", free_port()?).parse()?),
            ..Default::default()
        },
        None,
    )?;
    let cns = format!("isot-lib-{tag}.{}", t.ns);
    stale::record_namespace(t.env.dir(), &cns);
    let dir = state_dir.join("actions").join(&cns).join("a1");
    std::fs::create_dir_all(&dir)?;
    let target = NetTarget {
        cns: &cns,
        action_id: "a1",
        dir: &dir,
    };

    let netns = {
        let networks = Networks::new(&cfg)?;
        let attachment = networks.attach(&target).await?;
        networks.check(&target).await?;
        attachment.netns.context("cni mode gave no namespace")?
    };
    ensure!(
        nix::sys::statfs::statfs(&netns)?.filesystem_type() == nix::sys::statfs::NSFS_MAGIC,
        "{} is not a pinned namespace",
        netns.display()
    );
    ensure!(net.ports().len() == 1, "bridge ports: {:?}", net.ports());
    ensure!(!leases(&state_dir).is_empty(), "no lease was taken");
    let masquerade = Command::new("iptables")
        .args(["-w", "10", "-t", "nat", "-S", "ISOLATED-POSTROUTING"])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&masquerade.stdout).contains(&format!(
            "-s {} ! -o {}",
            net.subnet(),
            net.bridge
        )),
        "no masquerade rule for {}",
        net.subnet()
    );
    for file in ["resolv.conf", "hosts"] {
        ensure!(dir.join(file).is_file(), "no {file} in the action dir");
    }

    let networks = Networks::new(&cfg)?;
    let netns_dir = state_dir.join("netns");
    let stacked = crate::harness::mounts::mounts_under(&netns_dir)
        .iter()
        .filter(|m| **m == netns_dir)
        .count();
    ensure!(
        stacked == 1,
        "{} is mounted {stacked} times",
        netns_dir.display()
    );
    ensure!(
        networks.attached() == vec![(cns.clone(), "a1".to_string())],
        "attached() says {:?}",
        networks.attached()
    );
    networks.check(&target).await?;
    // An action that never started is run again after a restart: attaching anew
    // releases the old network instead of leaking it.
    let old_lease = leases(&state_dir);
    networks.attach(&target).await?;
    networks.check(&target).await?;
    let new_lease = leases(&state_dir);
    ensure!(
        net.ports().len() == 1 && new_lease.len() == 1 && new_lease != old_lease,
        "after attaching again: ports {:?}, leases {old_lease:?} then {new_lease:?}",
        net.ports()
    );
    networks.detach(&target).await;
    networks.detach(&target).await;

    let mut left = network_leftovers(&state_dir, &cns);
    left.extend(pinned_namespaces(&state_dir));
    left.extend(leases(&state_dir));
    left.extend(nat_rules_of(&cns)?);
    ensure!(left.is_empty(), "left behind: {left:?}");
    ensure!(net.ports().is_empty(), "bridge ports: {:?}", net.ports());
    ensure!(!netns.exists(), "{} still exists", netns.display());
    ensure!(
        networks.check(&target).await.is_err(),
        "CHECK passed on a released network"
    );
    ensure!(networks.attached().is_empty(), "attached() after detach");
    // What a graceful stop does last: nothing stays mounted under the state dir.
    ensure!(
        direktiv_isolate::network::netns::release_dir(&netns_dir)?,
        "{} was not mounted",
        netns_dir.display()
    );
    let mounted = crate::harness::mounts::mounts_under(&state_dir);
    ensure!(mounted.is_empty(), "still mounted: {mounted:?}");
    let failed = net.remove();
    ensure!(failed.is_empty(), "cleaning up the test bridge: {failed:?}");
    Ok(())
}

/// The daemon is killed (SIGKILL) while an action runs on its network; the namespace and
/// lease outlive it; the restarted daemon finishes the action, and then they are gone.
pub async fn released_after_a_crash(t: Ctx) -> Result<()> {
    let net = TestNet::create(t.env.dir())?;
    let daemon = Daemon::with_net(t.env, "crash", &net).await?;
    let image = t
        .push(&ImageSpec::with_script(
            "sleep 3; ip -4 -o addr show dev eth0 > /direktiv-data/data.out",
        ))
        .await?;
    let id = t.action_id("crash");
    daemon.run(t.request(&image.reference, &id)).await?;
    let record = daemon
        .state_dir
        .join("cni/attachments")
        .join(daemon.cns(&t.ns))
        .join(format!("{id}.json"));
    let deadline = Instant::now() + FIRST_PULL;
    loop {
        let text = std::fs::read_to_string(&record).unwrap_or_default();
        // Attached, and its port guarded (the chain comes right after ADD's result).
        let ports = net.ports();
        if text.contains("\"result\"") && ports.len() == 1 && port_chain_exists(&ports[0]) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the action's network was never attached\n{}",
            daemon.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.isolated.kill();
    let ports = net.ports();
    ensure!(
        ports.len() == 1 && port_chain_exists(&ports[0]),
        "the network (and its port's ebtables chain) did not outlive the crash: ports {ports:?}"
    );

    daemon.isolated.start(Duration::from_secs(60)).await?;
    // The actions' nosuid,nodev mount outlived the crash; the restart uses it as it is.
    let actions = daemon.state_dir.join("actions").canonicalize()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mounted_at = info
        .lines()
        .filter(|l| l.split(' ').nth(4) == actions.to_str())
        .count();
    ensure!(
        mounted_at == 1,
        "{} is mounted {mounted_at} times after a restart",
        actions.display()
    );
    let report = t
        .env
        .flow
        .wait_report(&id, ACTION)
        .await
        .with_context(|| daemon.log_tail())?;
    let output = String::from_utf8(expect_success(&report)?)?;
    let ip = inet_of(&output).with_context(|| format!("no address in {output:?}"))?;
    ensure!(net.contains(ip), "{ip} is outside {}", net.subnet());
    daemon.assert_nothing_left(t.env, &t.ns).await?;
    ensure!(net.ports().is_empty(), "veths left: {:?}", net.ports());
    ensure!(
        !port_chain_exists(&ports[0]),
        "the ebtables chain of {} outlived its port",
        ports[0]
    );
    let leases = leases(&daemon.state_dir);
    ensure!(leases.is_empty(), "IPAM leases left: {leases:?}");
    drop(daemon);
    let failed = net.remove();
    ensure!(failed.is_empty(), "cleaning up the test bridge: {failed:?}");
    Ok(())
}

/// A graceful stop unmounts what the daemon mounted (issue 14: `make clean` failed on
/// `<state>/netns`, still mounted after a normal stop): after an action on a CNI network
/// and a SIGTERM, nothing under the state dir is a mount point.
pub async fn nothing_mounted_after_a_graceful_stop(t: Ctx) -> Result<()> {
    let net = TestNet::create(t.env.dir())?;
    let daemon = Daemon::with_net(t.env, "unmount", &net).await?;
    let res = async {
        let image = t.push(&crate::core::echo_spec()).await?;
        let id = t.action_id("mounted");
        let report = daemon
            .run_and_wait(t.env, t.request(&image.reference, &id), FIRST_PULL)
            .await?;
        expect_success(&report)?;
        let netns = daemon.state_dir.join("netns").canonicalize()?;
        ensure!(
            crate::harness::mounts::mounts_under(&netns).contains(&netns),
            "{} was never mounted: the trial proves nothing",
            netns.display()
        );
        daemon.assert_nothing_left(t.env, &t.ns).await?;
        let status = daemon
            .isolated
            .stop(Duration::from_secs(20))
            .context("the daemon was not running")?;
        ensure!(status.success(), "the graceful stop exited with {status}");
        let state = daemon.state_dir.canonicalize()?;
        let mounted = crate::harness::mounts::mounts_under(&state);
        ensure!(
            mounted.is_empty(),
            "still mounted under {} after a graceful stop: {mounted:?}",
            state.display()
        );
        ensure!(
            daemon
                .isolated
                .log_text()
                .contains("unmounted the network namespaces' directory"),
            "the daemon did not say it unmounted it"
        );
        Ok(())
    }
    .await;
    let failed = net.remove();
    res.with_context(|| daemon.log_tail())?;
    ensure!(failed.is_empty(), "cleaning up the test bridge: {failed:?}");
    Ok(())
}
