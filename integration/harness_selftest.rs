//! Tests of the harness itself, independent of isolated: the images it builds run under
//! plain containerd (`ctr`), the private registry really demands its credentials, and the
//! flow receiver records and refuses reports as told. When these fail, the daemon's tests
//! say nothing about the daemon.

use anyhow::{bail, ensure, Context, Result};
use direktiv_isolate::proto::flow::direktiv_flow_client::DirektivFlowClient;
use direktiv_isolate::proto::flow::ReportActionResultsRequest;
use libtest_mimic::Trial;

use crate::harness::{harness_trial, Ctx, Env, ImageSpec, ACTION};

pub fn trials() -> Vec<Trial> {
    vec![
        harness_trial("harness::image_runs_under_ctr", image_runs_under_ctr),
        harness_trial(
            "harness::private_registry_demands_credentials",
            private_registry_demands_credentials,
        ),
        harness_trial("harness::flow_receiver_records_and_refuses", flow_receiver),
        harness_trial(
            "harness::containerd_takes_its_config",
            containerd_takes_its_config,
        ),
        harness_trial(
            "harness::leftover_check_sees_leaks",
            leftover_check_sees_leaks,
        ),
    ]
}

/// The config the harness writes is the one this containerd build reads as it is: no
/// migration of an older config version, no deprecated or unknown key, no CRI plugin
/// loaded (on 2.x CRI is several plugins; one left enabled loads and wants /var/lib).
async fn containerd_takes_its_config(t: Ctx) -> Result<()> {
    let warnings = t.env.containerd.config_warnings();
    ensure!(
        warnings.is_empty(),
        "{} warns about its config:\n{}",
        t.env.containerd.version(),
        warnings.join("\n")
    );
    let out = ctr(&t, &["plugins", "ls"]).await?;
    let listing = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "ctr plugins ls failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cri: Vec<&str> = listing
        .lines()
        .filter(|l| l.contains(".cri") || l.contains("podsandbox"))
        .filter(|l| l.trim_end().ends_with("ok"))
        .collect();
    ensure!(cri.is_empty(), "CRI plugins loaded:\n{}", cri.join("\n"));
    Ok(())
}

async fn ctr(t: &Ctx, args: &[&str]) -> Result<std::process::Output> {
    let mut cmd = t.env.containerd.ctr(&Env::containerd_namespace(&t.ns));
    cmd.args(args);
    let out = tokio::process::Command::from(cmd)
        .output()
        .await
        .context("run ctr")?;
    Ok(out)
}

async fn ctr_ok(t: &Ctx, args: &[&str]) -> Result<String> {
    let out = ctr(t, args).await?;
    if !out.status.success() {
        bail!(
            "ctr {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The echo image pulled and run with ctr the way isolated would run it: data dir bind
/// mounted at /direktiv-data, data.out copied from data.in.
async fn image_runs_under_ctr(t: Ctx) -> Result<()> {
    let image = t
        .push(&ImageSpec::with_script(
            "cat /direktiv-data/data.in > /direktiv-data/data.out",
        ))
        .await?;
    ctr_ok(&t, &["images", "pull", "--plain-http", &image.reference]).await?;

    let data = t.env.dir().join("selftest").join(&t.ns);
    std::fs::create_dir_all(&data)?;
    let input: Vec<u8> = (0..=255u8).collect();
    std::fs::write(data.join("data.in"), &input)?;
    let id = t.action_id("ctr");
    let mount = format!(
        "type=bind,src={},dst=/direktiv-data,options=rbind:rw",
        data.display()
    );
    // A leaf cgroup of its own: ctr's default `/<namespace>/<id>` would leave the
    // namespace-level cgroup directories behind on the host.
    let cgroup = format!("/isot-selftest-{id}");
    ctr_ok(
        &t,
        &[
            "run",
            "--rm",
            "--cgroup",
            &cgroup,
            "--mount",
            &mount,
            &image.reference,
            &id,
        ],
    )
    .await?;
    let output = std::fs::read(data.join("data.out")).context("read data.out")?;
    ensure!(output == input, "data.out differs from data.in: {output:?}");
    std::fs::remove_dir_all(&data)?;

    // Workdir, env and user from the config reach the process.
    let image = t
        .push(
            &ImageSpec::new()
                .dir("/work/dir", 0o755)
                .env("FOO=bar")
                .working_dir("/work/dir")
                .user("65534")
                .entrypoint(&["/bin/sh", "-c"])
                .cmd(&["echo \"$FOO $(pwd) $(id -u)\""]),
        )
        .await?;
    ctr_ok(&t, &["images", "pull", "--plain-http", &image.reference]).await?;
    let id = t.action_id("ctr");
    let cgroup = format!("/isot-selftest-{id}");
    let out = ctr_ok(
        &t,
        &["run", "--rm", "--cgroup", &cgroup, &image.reference, &id],
    )
    .await?;
    ensure!(
        out.trim() == "bar /work/dir 65534",
        "unexpected output {out:?}"
    );
    Ok(())
}

async fn private_registry_demands_credentials(t: Ctx) -> Result<()> {
    let image = t.push_private(&ImageSpec::with_script("true")).await?;
    let anonymous = ctr(&t, &["images", "pull", "--plain-http", &image.reference]).await?;
    ensure!(
        !anonymous.status.success(),
        "an anonymous pull from the private registry succeeded"
    );
    let creds = t
        .env
        .private_registry
        .credentials()
        .context("the private registry has credentials")?;
    let user = format!("{}:{}", creds.user, creds.password);
    ctr_ok(
        &t,
        &[
            "images",
            "pull",
            "--plain-http",
            "--user",
            &user,
            &image.reference,
        ],
    )
    .await?;
    let digest_ref = image.by_digest();
    let listed = ctr_ok(&t, &["images", "ls", "-q"]).await?;
    ensure!(
        listed.lines().any(|l| l == image.reference),
        "pulled image not listed: {listed}"
    );
    ensure!(digest_ref.contains(&image.digest));
    Ok(())
}

async fn flow_receiver(t: Ctx) -> Result<()> {
    let flow = &t.env.flow;
    let mut client = DirektivFlowClient::connect(format!("http://{}", flow.addr())).await?;
    let id = t.action_id("flow");
    let report = ReportActionResultsRequest {
        instance_id: Some("i".into()),
        step: Some(3),
        action_id: Some(id.clone()),
        output: Some(vec![0, 1, 2]),
        ..Default::default()
    };
    client.report_action_results(report.clone()).await?;
    let got = flow.wait_report(&id, ACTION).await?;
    ensure!(got == report, "recorded {got:?}, sent {report:?}");
    ensure!(flow.count(&id) == 1);

    let refused_id = t.action_id("flow");
    flow.refuse_action(&refused_id, true);
    let refused = ReportActionResultsRequest {
        action_id: Some(refused_id.clone()),
        ..Default::default()
    };
    let err = client
        .report_action_results(refused.clone())
        .await
        .expect_err("a refused report was acknowledged");
    ensure!(err.code() == tonic::Code::Unavailable, "got {err:?}");
    ensure!(flow.refused_count(&refused_id) == 1 && flow.count(&refused_id) == 0);
    flow.refuse_action(&refused_id, false);
    client.report_action_results(refused).await?;
    ensure!(flow.count(&refused_id) == 1);

    let missing = flow
        .wait_report("never-sent", std::time::Duration::from_millis(100))
        .await
        .expect_err("a report that was never sent arrived");
    ensure!(
        format!("{missing}").contains(&id),
        "the timeout message does not list what arrived: {missing}"
    );
    Ok(())
}

/// `leftovers` lists a container with its active snapshot, a leaf cgroup under the
/// namespace's cgroup and a data dir, and `assert_nothing_left` passes once they are gone.
async fn leftover_check_sees_leaks(t: Ctx) -> Result<()> {
    let image = t.push(&ImageSpec::with_script("true")).await?;
    ctr_ok(&t, &["images", "pull", "--plain-http", &image.reference]).await?;
    let id = t.action_id("leak");
    ctr_ok(&t, &["containers", "create", &image.reference, &id]).await?;
    let data = t.env.actions_dir(&t.ns).join(&id);
    std::fs::create_dir_all(&data)?;
    let cns = Env::containerd_namespace(&t.ns);
    // A parent of its own: runs on the same machine must not remove each other's.
    let cgroup_ns = std::path::Path::new("/sys/fs/cgroup/memory")
        .join(format!("isot-selftest-{id}"))
        .join(&cns);
    let cgroup = cgroup_ns.join(&id);
    std::fs::create_dir_all(&cgroup)?;

    let left = t.env.leftovers(&t.ns).await;
    let _ = std::fs::remove_dir(&cgroup);
    let _ = std::fs::remove_dir(&cgroup_ns);
    let _ = std::fs::remove_dir(cgroup_ns.parent().unwrap());
    let left = left?.join("\n");
    for needle in [
        format!("container {cns}/{id}"),
        format!("snapshot {cns}/{id} (ACTIVE)"),
        format!("cgroup {}", cgroup.display()),
        format!("state dir entry {}", data.display()),
    ] {
        ensure!(left.contains(&needle), "leftovers miss {needle:?}:\n{left}");
    }
    let early = t
        .env
        .assert_nothing_left(&t.ns, std::time::Duration::from_millis(200))
        .await;
    ensure!(early.is_err(), "assert_nothing_left passed with leaks");

    ctr_ok(&t, &["containers", "rm", &id]).await?;
    std::fs::remove_dir_all(t.env.actions_dir(&t.ns))?;
    t.env.assert_nothing_left(&t.ns, ACTION).await
}
