//! The registry's answer stands (ISOLATE.md §6, §8; issue 13): once a resolution is older
//! than the tag TTL, or was made with other credentials, an "unauthorized" or "not found"
//! fails the action with the image error, although the image is cached (or imported) in
//! the namespace; digest references are checked with the caller's credentials too; an
//! imported copy does not shadow a registry that answers. Each trial has a daemon of its
//! own with a 1 s TTL, so the shared one keeps the default.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use direktiv_isolate::proto::control::ImportImageRequest;
use direktiv_isolate::proto::flow::ReportActionResultsRequest;

use super::{echo_spec, expect_error, expect_success, CODE_IMAGE};
use crate::harness::private::PrivateIsolated;
use crate::harness::{image, registry, Ctx, ImageSpec, FIRST_PULL, NOTHING_LEFT};

const TTL: [&str; 2] = ["--tag-ttl-secs", "1"];
/// Longer than the 1 s TTL: what was resolved before is stale after it.
const PAST_TTL: Duration = Duration::from_millis(1500);

/// Runs `reference` in `ns` on `p` with `registries`, its action id as input; the report.
async fn run(
    t: &Ctx,
    p: &PrivateIsolated,
    reference: &str,
    label: &str,
    registries: Option<&HashMap<String, String>>,
) -> Result<(Vec<u8>, ReportActionResultsRequest)> {
    let id = t.action_id(label);
    let mut req = t.request(reference, &id);
    req.data = Some(id.clone().into_bytes());
    if let Some(r) = registries {
        req.registries = r.clone();
    }
    p.accept(req).await?;
    let report = t.env.flow.wait_report(&id, FIRST_PULL).await?;
    Ok((id.into_bytes(), report))
}

/// An image error that names `what` and says the registry's answer (`answers`, any of).
fn refused(report: &ReportActionResultsRequest, what: &str, answers: &[&str]) -> Result<()> {
    let message = expect_error(report, CODE_IMAGE)?;
    let lower = message.to_lowercase();
    ensure!(
        message.contains(what) && answers.iter().any(|a| lower.contains(a)),
        "errorMessage {message:?} does not name {what} and the registry's answer ({answers:?})"
    );
    Ok(())
}

const UNAUTHORIZED: &[&str] = &["401", "unauthorized", "not authorized"];
const NOT_FOUND: &[&str] = &["404", "not found", "unknown"];

/// A private image pulled with credentials, by tag and by digest: a request without them
/// in the same namespace is refused at once (another credential) and after the TTL, with
/// the image cached; the credentials still run it.
pub async fn unauthorized_after_ttl(t: Ctx) -> Result<()> {
    let p = PrivateIsolated::start(t.env, &TTL).await?;
    p.adopt(&t.ns);
    let res = async {
        let registry = &t.env.private_registry;
        let creds = registry
            .credentials()
            .context("private registry credentials")?;
        let good = HashMap::from([(registry.host().to_string(), creds.direktiv_value())]);
        let image = t.push_private(&echo_spec()).await?;
        for reference in [image.reference.clone(), image.by_digest()] {
            let (input, report) = run(&t, &p, &reference, "creds", Some(&good)).await?;
            ensure!(
                expect_success(&report)? == input,
                "{reference} with credentials"
            );
            let (_, report) = run(&t, &p, &reference, "anon", None).await?;
            refused(&report, &image.repository, UNAUTHORIZED)
                .with_context(|| format!("{reference} without credentials, cached"))?;
            tokio::time::sleep(PAST_TTL).await;
            let (_, report) = run(&t, &p, &reference, "anon-ttl", None).await?;
            refused(&report, &image.repository, UNAUTHORIZED)
                .with_context(|| format!("{reference} without credentials, after the TTL"))?;
            tokio::time::sleep(PAST_TTL).await;
            let (input, report) = run(&t, &p, &reference, "creds-ttl", Some(&good)).await?;
            ensure!(
                expect_success(&report)? == input,
                "{reference} with credentials after the TTL"
            );
        }
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await
    }
    .await;
    res.map_err(|e| p.explain(e))
}

/// A tag that ran, deleted from the registry: after the TTL the action fails with the
/// image error naming the image, not the cached copy's output.
pub async fn not_found_after_tag_deleted(t: Ctx) -> Result<()> {
    let p = PrivateIsolated::start(t.env, &TTL).await?;
    p.adopt(&t.ns);
    let res = async {
        let image = t.push(&echo_spec()).await?;
        let (input, report) = run(&t, &p, &image.reference, "before", None).await?;
        ensure!(expect_success(&report)? == input, "before the delete");
        registry::delete_manifest(&image.host, &image.repository, &image.digest).await?;
        tokio::time::sleep(PAST_TTL).await;
        let (_, report) = run(&t, &p, &image.reference, "deleted", None).await?;
        refused(&report, &image.repository, NOT_FOUND).context("the tag was deleted")?;
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await
    }
    .await;
    res.map_err(|e| p.explain(e))
}

/// Imports `spec` named `name` into the test's namespace on `p`.
async fn import(t: &Ctx, p: &PrivateIsolated, spec: &ImageSpec, name: &str) -> Result<()> {
    let archive = image::oci_archive(spec, name)?;
    let chunks: Vec<ImportImageRequest> = archive
        .chunks(1 << 20)
        .map(|c| ImportImageRequest {
            namespace: t.ns.clone(),
            chunk: c.to_vec(),
        })
        .collect();
    p.control()
        .await?
        .import_image(futures::stream::iter(chunks))
        .await
        .with_context(|| format!("import {name}"))?;
    Ok(())
}

/// Images imported under names a tenant uses: where the registry has the name, its image
/// runs, not the imported one; where it answers "not found" or "unauthorized", the action
/// fails with the image error instead of running the imported copy.
pub async fn imported_copy_does_not_shadow_the_registry(t: Ctx) -> Result<()> {
    let p = PrivateIsolated::start(t.env, &TTL).await?;
    p.adopt(&t.ns);
    let res = async {
        let imported = ImageSpec::with_script("echo imported > /direktiv-data/data.out");
        let ours = t
            .push(&ImageSpec::with_script(
                "echo registry > /direktiv-data/data.out",
            ))
            .await?;
        import(&t, &p, &imported, &ours.reference).await?;
        let (_, report) = run(&t, &p, &ours.reference, "answered", None).await?;
        let out = expect_success(&report)?;
        ensure!(
            out == b"registry\n",
            "the imported copy ran instead of the registry's image: {:?}",
            String::from_utf8_lossy(&out)
        );

        let missing = format!("{}/{}-missing:v1", ours.host, ours.repository);
        import(&t, &p, &imported, &missing).await?;
        let (_, report) = run(&t, &p, &missing, "missing", None).await?;
        refused(&report, "-missing", NOT_FOUND)
            .context("imported, the registry has no such tag")?;

        let private = t.push_private(&echo_spec()).await?;
        import(&t, &p, &imported, &private.reference).await?;
        let (_, report) = run(&t, &p, &private.reference, "private", None).await?;
        refused(&report, &private.repository, UNAUTHORIZED)
            .context("imported under a private image's name, no credentials")?;
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await
    }
    .await;
    res.map_err(|e| p.explain(e))
}
