//! `isolatectl` against the harness's isolated: run (output, error, exit codes), ls, get,
//! logs, cancel, and image import followed by a run of the imported image.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use super::{ctl, shown};
use crate::core::{echo_spec, expect_error, expect_success};
use crate::harness::{image, Ctx, ImageSpec, ACTION, FIRST_PULL};

/// Output on stdout and exit 0; an action's error on stderr and exit 1; no daemon exit 2.
pub async fn run_output_error_and_exit_codes(t: Ctx) -> Result<()> {
    let addr = t.env.isolated.socket();
    let echo = t.push(&echo_spec()).await?;
    let id = t.action_id("ctl-ok");
    let out = ctl(
        addr,
        &[
            "run",
            "-n",
            &t.ns,
            "-i",
            &echo.reference,
            "-d",
            "hello from isolatectl",
            "--action-id",
            &id,
        ],
        FIRST_PULL,
    )
    .await?;
    ensure!(
        out.status.code() == Some(0),
        "run of an echo action: {}",
        shown(&out)
    );
    ensure!(
        out.stdout == b"hello from isolatectl",
        "stdout is not the output: {}",
        shown(&out)
    );
    // The flow engine got the same result: isolatectl is a client, not the reporter.
    let report = t.env.flow.wait_report(&id, ACTION).await?;
    ensure!(expect_success(&report)? == b"hello from isolatectl");

    let failing = t
        .push(&ImageSpec::with_script("echo kaputt >&2\nexit 3"))
        .await?;
    let id = t.action_id("ctl-fail");
    let out = ctl(
        addr,
        &[
            "run",
            "-n",
            &t.ns,
            "-i",
            &failing.reference,
            "--action-id",
            &id,
            "--json",
        ],
        FIRST_PULL,
    )
    .await?;
    ensure!(
        out.status.code() == Some(1),
        "a failing action must exit 1: {}",
        shown(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains("au.com.direktiv.error.exit") && stderr.contains("kaputt"),
        "stderr does not carry the error: {}",
        shown(&out)
    );
    let json: Value = serde_json::from_slice(&out.stdout).context("--json prints JSON")?;
    ensure!(
        json["error_code"] == "au.com.direktiv.error.exit",
        "json: {json}"
    );
    expect_error(
        &t.env.flow.wait_report(&id, ACTION).await?,
        "au.com.direktiv.error.exit",
    )?;

    // Nobody listens on port 1, nor on a socket that does not exist: one readable line
    // and exit 2.
    let out = ctl(
        addr,
        &[
            "run",
            "-n",
            &t.ns,
            "-i",
            &echo.reference,
            "--addr",
            "127.0.0.1:1",
        ],
        Duration::from_secs(30),
    )
    .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2)
            && stderr.lines().count() == 1
            && stderr.contains("cannot reach isolated at 127.0.0.1:1"),
        "no daemon: {}",
        shown(&out)
    );
    let nowhere = t.env.dir().join("no-such.sock");
    let out = ctl(&nowhere, &["ls"], Duration::from_secs(30)).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2)
            && stderr.lines().count() == 1
            && stderr.contains("cannot reach isolated at socket")
            && stderr.contains("no-such.sock"),
        "no socket: {}",
        shown(&out)
    );
    // A usage error is exit 2 too.
    let out = ctl(addr, &["run", "-n", &t.ns], Duration::from_secs(30)).await?;
    ensure!(
        out.status.code() == Some(2),
        "missing --image: {}",
        shown(&out)
    );
    // An input over the node's message limit (32 MiB of input plus 1 MiB) is one line
    // naming the sizes, not a transport error (issue 14); one over isolatectl's own is
    // refused before it is sent. Neither runs anything.
    for (bytes, says) in [
        (
            40_000_000usize,
            "the node takes messages of at most 33.0 MiB (34603008 bytes)",
        ),
        (70_000_000, "isolatectl sends at most 63.0 MiB"),
    ] {
        let file = t.env.dir().join(format!("input-{bytes}.bin"));
        std::fs::write(&file, vec![b'x'; bytes])?;
        let file_arg = file.display().to_string();
        let out = ctl(
            addr,
            &[
                "run",
                "-n",
                &t.ns,
                "-i",
                &echo.reference,
                "--data-file",
                &file_arg,
            ],
            Duration::from_secs(60),
        )
        .await?;
        let _ = std::fs::remove_file(&file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2)
                && stderr.lines().count() == 1
                && stderr.contains(&format!("({bytes} bytes)"))
                && stderr.contains(says),
            "an input of {bytes} bytes: {}",
            shown(&out)
        );
    }
    Ok(())
}

/// A long action is listed as running, shows its state and its logs, and is cancelled;
/// the `run` following it ends with the cancelled error and exit 1.
pub async fn ls_get_logs_cancel(t: Ctx) -> Result<()> {
    let addr = t.env.isolated.socket();
    let sleeper = t
        .push(&ImageSpec::with_script(
            "echo started-and-waiting\nexec sleep 300",
        ))
        .await?;
    let id = t.action_id("ctl-sleep");
    let run = {
        let (ns, image, id) = (t.ns.clone(), sleeper.reference.clone(), id.clone());
        tokio::spawn(async move {
            ctl(
                addr,
                &["run", "-n", &ns, "-i", &image, "--action-id", &id],
                FIRST_PULL,
            )
            .await
        })
    };

    // Running, and its stdout line is in the logs.
    let deadline = tokio::time::Instant::now() + FIRST_PULL;
    loop {
        let out = ctl(
            addr,
            &["ls", "-n", &t.ns, "--state", "running", "--json"],
            ACTION,
        )
        .await?;
        let list: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("ls --json: {}", shown(&out)))?;
        let running = list
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i["action_id"] == id.as_str()));
        let logs = ctl(addr, &["logs", "-n", &t.ns, &id], ACTION).await?;
        if running && String::from_utf8_lossy(&logs.stdout).contains("started-and-waiting") {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "action {id} never showed as running with its log line; last ls: {list}, logs: {}",
            shown(&logs)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = ctl(addr, &["ls", "-n", &t.ns], ACTION).await?;
    let table = String::from_utf8_lossy(&out.stdout);
    ensure!(
        table.starts_with("NAMESPACE")
            && table
                .lines()
                .any(|l| l.contains(&id) && l.contains("running")),
        "ls table: {}",
        shown(&out)
    );
    let out = ctl(addr, &["get", "-n", &t.ns, &id, "--json"], ACTION).await?;
    let info: Value = serde_json::from_slice(&out.stdout).with_context(|| shown(&out))?;
    ensure!(
        info["state"] == "running" && info["image"] == sleeper.reference.as_str(),
        "get: {info}"
    );

    let out = ctl(
        addr,
        &["cancel", "-n", &t.ns, &id, "--reason", "test says stop"],
        ACTION,
    )
    .await?;
    ensure!(out.status.code() == Some(0), "cancel: {}", shown(&out));
    let out = run.await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1)
            && stderr.contains("au.com.direktiv.error.cancelled")
            && stderr.contains("test says stop"),
        "the run of a cancelled action: {}",
        shown(&out)
    );
    let message = expect_error(
        &t.env.flow.wait_report(&id, ACTION).await?,
        "au.com.direktiv.error.cancelled",
    )?;
    ensure!(
        message.contains("test says stop"),
        "report message {message:?}"
    );

    // Unknown actions: exit 1 with a line naming them.
    let out = ctl(addr, &["get", "-n", &t.ns, "no-such-action"], ACTION).await?;
    ensure!(
        out.status.code() == Some(1)
            && String::from_utf8_lossy(&out.stderr).contains("no-such-action"),
        "get of an unknown action: {}",
        shown(&out)
    );
    Ok(())
}

/// An OCI archive built here is imported into one namespace and runs there under a name
/// whose registry refuses connections (an offline node); another namespace cannot run it.
pub async fn image_import_then_run_offline(t: Ctx) -> Result<()> {
    let addr = t.env.isolated.socket();
    let tag = format!("v{:08x}", rand::random::<u32>());
    let name = format!("127.0.0.1:1/itest/imported:{tag}");
    let spec = ImageSpec::with_script(
        "printf 'imported:' > /direktiv-data/data.out\ncat /direktiv-data/data.in >> /direktiv-data/data.out",
    );
    let archive = t.env.dir().join(format!("import-{tag}.tar"));
    std::fs::write(&archive, image::oci_archive(&spec, &name)?)?;
    let archive_arg = archive.display().to_string();

    let out = ctl(
        addr,
        &["image", "import", &archive_arg, "-n", &t.ns, "--json"],
        FIRST_PULL,
    )
    .await?;
    ensure!(out.status.code() == Some(0), "import: {}", shown(&out));
    let json: Value = serde_json::from_slice(&out.stdout).with_context(|| shown(&out))?;
    ensure!(json["images"][0] == name.as_str(), "imported names: {json}");

    let id = t.action_id("imported");
    let out = ctl(
        addr,
        &[
            "run",
            "-n",
            &t.ns,
            "-i",
            &name,
            "-d",
            "yes",
            "--action-id",
            &id,
        ],
        ACTION,
    )
    .await?;
    ensure!(
        out.status.code() == Some(0) && out.stdout == b"imported:yes",
        "run of the imported image: {}",
        shown(&out)
    );
    expect_success(&t.env.flow.wait_report(&id, ACTION).await?)?;

    // Imports are per namespace: another tenant has nothing to fall back on.
    let other = t.namespace("other");
    let id = t.action_id("not-imported");
    let out = ctl(
        addr,
        &["run", "-n", &other, "-i", &name, "--action-id", &id],
        ACTION,
    )
    .await?;
    // Said as what it most often is, a typo or the wrong namespace (issue 14).
    let says = format!("no image {name} in namespace {other}, and its registry did not answer");
    ensure!(
        out.status.code() == Some(1)
            && String::from_utf8_lossy(&out.stderr).contains("au.com.direktiv.error.image")
            && String::from_utf8_lossy(&out.stderr).contains(&says),
        "another namespace ran an image imported elsewhere, or did not say {says:?}: {}",
        shown(&out)
    );

    // A docker-archive is refused with a line saying what to do instead.
    let docker = t.env.dir().join(format!("docker-{tag}.tar"));
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "manifest.json", &b"[]"[..])?;
    std::fs::write(&docker, b.into_inner()?)?;
    let out = ctl(
        addr,
        &[
            "image",
            "import",
            &docker.display().to_string(),
            "-n",
            &t.ns,
        ],
        ACTION,
    )
    .await?;
    ensure!(
        out.status.code() == Some(2)
            && String::from_utf8_lossy(&out.stderr).contains("docker-archive"),
        "docker-archive import: {}",
        shown(&out)
    );
    let _ = std::fs::remove_file(archive);
    let _ = std::fs::remove_file(docker);
    Ok(())
}

/// README's quick start with the script `make demo-image` runs: import, a run that prints
/// the greeting, a run that fails through error.json.
pub async fn quick_start_demo_image(t: Ctx) -> Result<()> {
    let addr = t.env.isolated.socket();
    let archive = t
        .env
        .dir()
        .join(format!("demo-{:08x}.tar", rand::random::<u32>()));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/dist/demo-image.sh");
    let out = tokio::process::Command::new("sh")
        .arg(script)
        .arg(&archive)
        .output()
        .await?;
    ensure!(out.status.success(), "dist/demo-image.sh: {}", shown(&out));
    let archive_arg = archive.display().to_string();
    let out = ctl(
        addr,
        &["image", "import", &archive_arg, "-n", &t.ns],
        ACTION,
    )
    .await?;
    ensure!(
        out.status.code() == Some(0) && out.stdout == b"demo.invalid/echo:latest\n",
        "import of the demo image: {}",
        shown(&out)
    );
    let out = ctl(
        addr,
        &["run", "-n", &t.ns, "-i", "demo.invalid/echo", "-d", "world"],
        ACTION,
    )
    .await?;
    ensure!(
        out.status.code() == Some(0) && out.stdout == b"{\"hello\": \"world\"}\n",
        "the demo action: {}",
        shown(&out)
    );
    let out = ctl(
        addr,
        &["run", "-n", &t.ns, "-i", "demo.invalid/echo", "-d", "fail"],
        ACTION,
    )
    .await?;
    ensure!(
        out.status.code() == Some(1)
            && String::from_utf8_lossy(&out.stderr).contains("demo.failed: you asked me to fail"),
        "the demo action asked to fail: {}",
        shown(&out)
    );
    let _ = std::fs::remove_file(archive);
    Ok(())
}
