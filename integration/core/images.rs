//! Images that cannot be had (ISOLATE.md §4 image error, §2 reference validation) and the
//! private registry's credentials, per tenant (§6, §8).

use std::collections::HashMap;

use anyhow::{ensure, Context, Result};

use super::{
    echo_spec, ensure_echo_works, ensure_ids_echoed, expect_error, expect_success, CODE_IMAGE,
};
use crate::harness::{Ctx, ImageSpec, FIRST_PULL};

/// A tag the open registry does not have: image error naming the reference, and the daemon
/// goes on serving.
pub async fn missing_image(t: Ctx) -> Result<()> {
    let good = t.push(&echo_spec()).await?;
    let repo = format!("itest/missing-{:08x}", rand::random::<u32>());
    let reference = format!("{}/{repo}:nope", t.env.open_registry.host());
    let id = t.action_id("missing");
    let req = t.request(&reference, &id);
    let report = t.run_and_wait(req.clone(), FIRST_PULL).await?;
    ensure_ids_echoed(&req, &report)?;
    let message = expect_error(&report, CODE_IMAGE)?;
    ensure!(
        message.contains(&repo),
        "errorMessage {message:?} does not name the reference {reference}"
    );
    ensure_echo_works(&t, &t.ns, &good, FIRST_PULL).await
}

/// Nothing listens on the registry's port: image error, and the daemon goes on serving.
pub async fn unreachable_registry(t: Ctx) -> Result<()> {
    let good = t.push(&echo_spec()).await?;
    let id = t.action_id("unreachable");
    let req = t.request("127.0.0.1:1/nothing:latest", &id);
    let report = t.run_and_wait(req, FIRST_PULL).await?;
    let message = expect_error(&report, CODE_IMAGE)?;
    ensure!(!message.is_empty(), "the image error has no reason");
    ensure_echo_works(&t, &t.ns, &good, FIRST_PULL).await
}

/// A reference that does not parse is refused before anything runs.
pub async fn unparseable_image_reference(t: Ctx) -> Result<()> {
    let good = t.push(&echo_spec()).await?;
    let id = t.action_id("badref");
    let status = t
        .run(t.request("UPPER/Case::bad", &id))
        .await
        .err()
        .context("RunIsolate accepted the image reference \"UPPER/Case::bad\"")?;
    ensure!(
        status.code() == tonic::Code::InvalidArgument,
        "expected INVALID_ARGUMENT, got {status:?}"
    );
    ensure_echo_works(&t, &t.ns, &good, FIRST_PULL).await?;
    ensure!(
        t.env.flow.count(&id) == 0,
        "a rejected request was reported"
    );
    Ok(())
}

/// The private registry's image runs only with that registry's credentials from the
/// request, per namespace: one tenant's successful pull does not open it to another.
/// Neither the password nor the basic-auth header value ever reaches the log or a report.
pub async fn private_registry_credentials(t: Ctx) -> Result<()> {
    let registry = &t.env.private_registry;
    let creds = registry
        .credentials()
        .context("the private registry has credentials")?
        .clone();
    let host = registry.host().to_string();
    let image = t.push_private(&echo_spec()).await?;
    let good: HashMap<String, String> = HashMap::from([(host.clone(), creds.direktiv_value())]);
    // No `!`: cannot be split into user and password.
    let malformed: HashMap<String, String> =
        HashMap::from([(host.clone(), format!("{}{}", creds.user, creds.password))]);
    let ns_a = t.ns.clone();
    let ns_b = t.namespace("b");
    let mut messages = Vec::new();

    let run = |ns: &str, label: &str, registries: Option<&HashMap<String, String>>| {
        let id = t.action_id(label);
        let mut req = t.request_in(ns, &image.reference, &id);
        req.data = Some(id.clone().into_bytes());
        if let Some(r) = registries {
            req.registries = r.clone();
        }
        req
    };

    let report = t
        .run_and_wait(run(&ns_a, "a-anon", None), FIRST_PULL)
        .await?;
    messages.push(expect_error(&report, CODE_IMAGE).context("namespace A, no credentials")?);

    let req = run(&ns_a, "a-creds", Some(&good));
    let report = t.run_and_wait(req.clone(), FIRST_PULL).await?;
    ensure!(
        report.error_code.is_none() && report.output == req.data,
        "namespace A with credentials: {report:?}"
    );

    let report = t
        .run_and_wait(run(&ns_b, "b-anon", None), FIRST_PULL)
        .await?;
    messages.push(
        expect_error(&report, CODE_IMAGE)
            .context("namespace B without credentials, after A pulled the image")?,
    );

    let report = t
        .run_and_wait(run(&ns_b, "b-malformed", Some(&malformed)), FIRST_PULL)
        .await?;
    messages
        .push(expect_error(&report, CODE_IMAGE).context("namespace B, credentials without `!`")?);
    t.env
        .isolated
        .ensure_running()
        .context("after a malformed credential")?;

    let req = run(&ns_b, "b-creds", Some(&good));
    let report = t.run_and_wait(req.clone(), FIRST_PULL).await?;
    ensure!(
        report.error_code.is_none() && report.output == req.data,
        "namespace B with credentials: {report:?}"
    );

    let basic = base64(format!("{}:{}", creds.user, creds.password).as_bytes());
    for m in &messages {
        ensure!(
            !m.contains(&creds.password) && !m.contains(&basic),
            "a report's errorMessage carries the registry password: {m:?}"
        );
    }
    let log = t.env.isolated.log_text();
    ensure!(
        !log.contains(&creds.password),
        "isolated's log contains the registry password"
    );
    ensure!(
        !log.contains(&basic),
        "isolated's log contains the basic-auth header value"
    );
    Ok(())
}

/// Standard base64 with padding, to look for an `Authorization: Basic` value in the log.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The image cache (ISOLATE.md §6): concurrent first requests for one image in one
/// namespace share one pull (one manifest GET at the registry); within the tag TTL a
/// moved tag is not resolved again, so the namespace keeps running what it pulled; the
/// cache is per namespace, so another namespace resolves the tag anew.
pub async fn image_cache_and_single_flight(t: Ctx) -> Result<()> {
    let repo = format!("itest/cache-{:08x}", rand::random::<u32>());
    let one = ImageSpec::with_script("echo one > /direktiv-data/data.out");
    let two = ImageSpec::with_script("echo two > /direktiv-data/data.out");
    let registry = &t.env.open_registry;
    let image = t.env.push_image(registry, &repo, "v1", &one).await?;
    let manifest_gets = || -> Result<usize> {
        let log = std::fs::read_to_string(registry.log_path()).context("read the registry log")?;
        let uri = format!("/v2/{repo}/manifests/");
        Ok(log
            .lines()
            .filter(|l| l.contains("http.request.method=GET") && l.contains(&uri))
            .filter(|l| l.contains("response completed"))
            .count())
    };

    let mut runs = Vec::new();
    for i in 0..6 {
        let req = t.request(&image.reference, &t.action_id(&format!("flight{i}")));
        runs.push(t.run_and_wait(req, FIRST_PULL));
    }
    for report in futures::future::join_all(runs).await {
        ensure!(
            expect_success(&report?)? == b"one\n",
            "a concurrent first run did not see v1"
        );
    }
    let gets = manifest_gets()?;
    ensure!(
        gets == 1,
        "6 concurrent first runs fetched the manifest {gets} times, not once"
    );

    // The tag moves; within the TTL this namespace keeps the image it has.
    t.env.push_image(registry, &repo, "v1", &two).await?;
    let req = t.request(&image.reference, &t.action_id("cached"));
    let out = expect_success(&t.run_and_wait(req, FIRST_PULL).await?)?;
    ensure!(
        out == b"one\n",
        "the tag was re-resolved within its TTL: {out:?}"
    );
    ensure!(
        manifest_gets()? == 1,
        "a cached tag was fetched again within its TTL"
    );

    // Another namespace has its own cache and sees where the tag points now.
    let other = t.namespace("other");
    let req = t.request_in(&other, &image.reference, &t.action_id("fresh"));
    let out = expect_success(&t.run_and_wait(req, FIRST_PULL).await?)?;
    ensure!(
        out == b"two\n",
        "another namespace did not resolve the tag anew: {out:?}"
    );
    Ok(())
}
