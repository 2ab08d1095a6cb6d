//! The `network` setting and the CNI config: `none` gives loopback only (and the DNS
//! servers configured); a broken config fails each action with a network error, is read
//! again for the next action, and never stops the daemon.

use anyhow::{ensure, Context, Result};

use super::{Daemon, CODE_NETWORK};
use crate::core::{echo_spec, ensure_echo_works, expect_error, expect_success};
use crate::harness::cni::TestNet;
use crate::harness::{Ctx, ImageSpec, ACTION, FIRST_PULL};

/// `network = "none"`: the only interface is lo, no namespace is pinned, and resolv.conf
/// lists the configured servers.
pub async fn none_is_loopback_only(t: Ctx) -> Result<()> {
    let daemon = Daemon::start(
        t.env,
        "none",
        vec![
            "--network".into(),
            "none".into(),
            "--dns-servers".into(),
            "192.0.2.53,2001:db8::53".into(),
        ],
    )
    .await?;
    let image = t
        .push(&ImageSpec::with_script(
            "{ tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; echo '--'; \
             cat /etc/resolv.conf; echo '--'; cat /etc/hosts; } > /direktiv-data/data.out",
        ))
        .await?;
    let id = t.action_id("none");
    let report = daemon
        .run_and_wait(t.env, t.request(&image.reference, &id), FIRST_PULL)
        .await?;
    let output = String::from_utf8(expect_success(&report)?)?;
    let parts: Vec<&str> = output.split("--\n").collect();
    ensure!(parts.len() == 3, "unexpected output {output:?}");
    ensure!(
        parts[0].trim() == "lo",
        "interfaces besides lo: {:?}",
        parts[0]
    );
    let servers: Vec<&str> = parts[1]
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver "))
        .collect();
    ensure!(
        servers == ["192.0.2.53", "2001:db8::53"],
        "resolv.conf: {:?}",
        parts[1]
    );
    ensure!(
        parts[2].contains("127.0.0.1\tlocalhost"),
        "/etc/hosts: {:?}",
        parts[2]
    );
    daemon.assert_nothing_left(t.env, &t.ns).await?;
    ensure!(
        !daemon.state_dir.join("netns").exists(),
        "network = none prepared a namespace dir"
    );
    Ok(())
}

/// Unparseable JSON, a plugin refusing its config, and a plugin that does not exist each
/// fail an action with au.com.direktiv.error.network naming the cause; nothing of the
/// failed attempts stays; fixing the file makes the next action succeed, no restart.
pub async fn broken_config_is_a_network_error(t: Ctx) -> Result<()> {
    let net = TestNet::create(t.env.dir())?;
    let conf_file = net.conf_dir.join("10-test.conflist");
    let good = std::fs::read_to_string(&conf_file)?;
    std::fs::write(&conf_file, "{ this is not json")?;
    let daemon = Daemon::with_net(t.env, "broken", &net).await?;
    let image = t.push(&echo_spec()).await?;

    let mut refused_mtu: serde_json::Value = serde_json::from_str(&good)?;
    refused_mtu["plugins"][0]["mtu"] = "not a number".into();
    let mut missing_plugin: serde_json::Value = serde_json::from_str(&good)?;
    missing_plugin["plugins"][0]["type"] = "no-such-plugin".into();
    let cases = [
        (None, vec!["10-test.conflist", "not valid JSON"]),
        (Some(refused_mtu), vec!["bridge", "ADD", "mtu"]),
        (
            Some(missing_plugin),
            vec!["no-such-plugin", "no such plugin"],
        ),
    ];
    for (i, (conf, words)) in cases.into_iter().enumerate() {
        if let Some(conf) = conf {
            std::fs::write(&conf_file, serde_json::to_vec(&conf)?)?;
        }
        let id = t.action_id(&format!("broken{i}"));
        let timeout = if i == 0 { FIRST_PULL } else { ACTION };
        let report = daemon
            .run_and_wait(t.env, t.request(&image.reference, &id), timeout)
            .await?;
        let message = expect_error(&report, CODE_NETWORK)?;
        for w in words {
            ensure!(
                message.contains(w),
                "case {i}: the message {message:?} does not mention {w:?}"
            );
        }
        ensure!(
            !message.contains('\n'),
            "case {i}: the message is not one line: {message:?}"
        );
        daemon
            .assert_nothing_left(t.env, &t.ns)
            .await
            .with_context(|| format!("case {i}"))?;
        daemon.isolated.ensure_running()?;
    }
    ensure!(
        net.ports().is_empty(),
        "veths left on {}: {:?}",
        net.bridge,
        net.ports()
    );

    std::fs::write(&conf_file, &good)?;
    run_echo_on(&t, &daemon, &image.reference).await?;
    // The shared daemon was never affected.
    ensure_echo_works(&t, &t.ns, &image, ACTION).await?;
    daemon.assert_nothing_left(t.env, &t.ns).await?;
    drop(daemon);
    let failed = net.remove();
    ensure!(failed.is_empty(), "cleaning up the test bridge: {failed:?}");
    Ok(())
}

async fn run_echo_on(t: &Ctx, daemon: &Daemon, image: &str) -> Result<()> {
    let id = t.action_id("fixed");
    let mut req = t.request(image, &id);
    req.data = Some(b"fixed".to_vec());
    let report = daemon.run_and_wait(t.env, req, ACTION).await?;
    let output = expect_success(&report)?;
    ensure!(output == b"fixed", "output {output:?}");
    Ok(())
}
