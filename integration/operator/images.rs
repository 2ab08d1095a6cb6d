//! A namespace's images through `isolatectl image ls|rm`, the recent-results history
//! across a restart, and the containerd namespace `ls` shows for an escaped Direktiv
//! namespace (issue 14), against a private isolated (it is restarted).

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use super::{ctl, shown};
use crate::core::{echo_spec, expect_success};
use crate::harness::private::PrivateIsolated;
use crate::harness::{image, Ctx, ImageSpec, ACTION, FIRST_PULL, NOTHING_LEFT};

/// `isolatectl ARGS --json` that must succeed, as JSON.
async fn ctl_json(p: &PrivateIsolated, args: &[&str]) -> Result<Value> {
    let mut args = args.to_vec();
    args.push("--json");
    let out = ctl(p.socket(), &args, ACTION).await?;
    ensure!(
        out.status.code() == Some(0),
        "isolatectl {args:?}: {}",
        shown(&out)
    );
    serde_json::from_slice(&out.stdout).with_context(|| shown(&out))
}

fn image_named<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["images"]
        .as_array()?
        .iter()
        .find(|i| i["name"] == name)
}

/// A pulled and an imported image are listed with digest, size and source; actions
/// finished before a restart are still listed and shown after it, with their output;
/// `my--ns`'s row names its containerd namespace; `image rm` removes one (a second rm is
/// a clear "no image").
pub async fn image_ls_rm_and_history_after_a_restart(t: Ctx) -> Result<()> {
    let p = PrivateIsolated::start(t.env, &[]).await?;
    let doubled = format!("{}--m", t.ns);
    t.env.register_namespace(&doubled);
    p.adopt(&t.ns);
    p.adopt(&doubled);
    let res = async {
        let pulled = t.push(&echo_spec()).await?;
        let id = t.action_id("before-restart");
        let mut req = t.request(&pulled.reference, &id);
        req.data = Some(format!("kept in the history: {id}").into_bytes());
        let input = req.data.clone().unwrap_or_default();
        p.accept(req).await?;
        ensure!(expect_success(&t.env.flow.wait_report(&id, FIRST_PULL).await?)? == input);
        let twin = t.action_id("doubled");
        p.accept(t.request_in(&doubled, &pulled.reference, &twin))
            .await?;
        t.env.flow.wait_report(&twin, ACTION).await?;

        let tag = format!("v{:08x}", rand::random::<u32>());
        let imported = format!("127.0.0.1:1/itest/listed:{tag}");
        let archive = p.dir().join("listed.tar");
        std::fs::write(
            &archive,
            image::oci_archive(&ImageSpec::with_script("true"), &imported)?,
        )?;
        ctl_json(
            &p,
            &[
                "image",
                "import",
                &archive.display().to_string(),
                "-n",
                &t.ns,
            ],
        )
        .await?;

        let listed = ctl_json(&p, &["image", "ls", "-n", &t.ns]).await?;
        ensure!(
            listed["containerd_namespace"] == p.cns(&t.ns).as_str(),
            "image ls: {listed}"
        );
        for (name, source) in [(&pulled.reference, "pulled"), (&imported, "imported")] {
            let i = image_named(&listed, name)
                .with_context(|| format!("image ls does not list {name}: {listed}"))?;
            ensure!(
                i["source"] == source
                    && i["digest"]
                        .as_str()
                        .is_some_and(|d| d.starts_with("sha256:"))
                    && i["size"].as_u64().is_some_and(|s| s > 1000),
                "{name} is listed as {i}"
            );
        }

        p.stop();
        p.start_again().await?;
        let list = ctl_json(&p, &["ls", "-n", &t.ns]).await?;
        let row = list
            .as_array()
            .and_then(|l| l.iter().find(|a| a["action_id"] == id.as_str()))
            .with_context(|| format!("after a restart ls does not list {id}: {list}"))?;
        ensure!(
            row["state"] == "reported" && row["output"] == String::from_utf8_lossy(&input).as_ref(),
            "after a restart {id} is listed as {row}"
        );
        let got = ctl_json(&p, &["get", "-n", &t.ns, &id]).await?;
        ensure!(got["state"] == "reported", "get after a restart: {got}");

        let out = ctl(p.socket(), &["ls"], ACTION).await?;
        let table = String::from_utf8_lossy(&out.stdout);
        let mapped = format!("{doubled} ({})", p.cns(&doubled));
        ensure!(
            table
                .lines()
                .any(|l| l.contains(&twin) && l.contains(&mapped)),
            "ls does not show {mapped} for {twin}: {}",
            shown(&out)
        );

        let removed = ctl_json(&p, &["image", "rm", "-n", &t.ns, &imported]).await?;
        ensure!(removed["name"] == imported.as_str(), "image rm: {removed}");
        let listed = ctl_json(&p, &["image", "ls", "-n", &t.ns]).await?;
        ensure!(
            image_named(&listed, &imported).is_none()
                && image_named(&listed, &pulled.reference).is_some(),
            "after image rm: {listed}"
        );
        let out = ctl(p.socket(), &["image", "rm", "-n", &t.ns, &imported], ACTION).await?;
        ensure!(
            out.status.code() == Some(1)
                && String::from_utf8_lossy(&out.stderr)
                    .contains(&format!("no image {imported} in namespace {}", t.ns)),
            "a second image rm: {}",
            shown(&out)
        );
        for ns in [&t.ns, &doubled] {
            p.assert_nothing_left(&t.env.containerd, ns, NOTHING_LEFT)
                .await?;
        }
        Ok(())
    }
    .await;
    res.map_err(|e| p.explain(e))
}
