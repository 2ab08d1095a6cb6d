//! Bearer tokens on the TCP listener: no credentials, unknown or malformed ones are
//! UNAUTHENTICATED whatever the call carries; a token scoped to namespace A is refused in
//! B for run, get, logs, watch, cancel, list and import, and nothing runs or is reported
//! for a refused call; changes to the tokens file (in place, renamed over, or broken)
//! take effect within seconds, for an open watch too.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use direktiv_isolate::proto::control::{
    ActionRef, ActionState, CancelIsolateRequest, ImportImageRequest, ListIsolatesRequest,
};
use direktiv_isolate::proto::isolate::RunIsolateRequest;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use super::{clients, health, tcp};
use crate::core::{echo_spec, expect_error, expect_success};
use crate::harness::isolated::tokens_entry;
use crate::harness::private::{action_ref, wait_state, PrivateIsolated};
use crate::harness::process::free_port;
use crate::harness::{Ctx, ImageSpec, ACTION, FIRST_PULL, NOTHING_LEFT};
use crate::operator::metrics::{sample, scrape};
use crate::reaper::CODE_CANCELLED;

/// The code of a call's failure; fails when the call succeeded.
fn refused<T>(what: &str, r: std::result::Result<T, tonic::Status>) -> Result<Code> {
    match r {
        Ok(_) => bail!("{what} was accepted"),
        Err(s) => Ok(s.code()),
    }
}

fn ensure_code<T>(what: &str, r: std::result::Result<T, tonic::Status>, code: Code) -> Result<()> {
    let got = refused(what, r)?;
    ensure!(got == code, "{what}: {got:?}, expected {code:?}");
    Ok(())
}

pub async fn scoped_to_their_namespaces(t: Ctx) -> Result<()> {
    let ns_a = t.ns.clone();
    let ns_b = t.namespace("b");
    let (secret_a, secret_all) = (
        format!("a-{:016x}", rand::random::<u64>()),
        format!("all-{:016x}", rand::random::<u64>()),
    );
    let file = t
        .env
        .dir()
        .join(format!("tokens-{:08x}.toml", rand::random::<u32>()));
    std::fs::write(
        &file,
        format!(
            "{}{}",
            tokens_entry("tenant-a", &secret_a, &format!("[\"{ns_a}\"]")),
            tokens_entry("ops", &secret_all, "[\"*\"]")
        ),
    )?;
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let file_arg = file.display().to_string();
    let p = PrivateIsolated::start(
        t.env,
        &["--auth-tokens-file", &file_arg, "--metrics-bind", &metrics],
    )
    .await?;
    p.adopt(&ns_a);
    p.adopt(&ns_b);
    let res = async {
        let echo = t.push(&echo_spec()).await?;
        let sleeper = t.push(&ImageSpec::with_script("sleep 600")).await?;
        let channel = tcp(p.addr(), None).await?;

        // Health needs nothing; everything else needs a token.
        ensure!(health(&channel).await? == ServingStatus::Serving, "health");
        let (mut run, mut control) = clients(&channel, None)?;
        let nothing = t.action_id("nothing");
        ensure_code(
            "RunIsolate without credentials",
            run.run_isolate(t.request_in(&ns_a, &echo.reference, &nothing))
                .await,
            Code::Unauthenticated,
        )?;
        // Authentication comes before validation: an empty request is refused the same.
        ensure_code(
            "an invalid RunIsolate without credentials",
            run.run_isolate(RunIsolateRequest::default()).await,
            Code::Unauthenticated,
        )?;
        ensure_code(
            "ListIsolates without credentials",
            control.list_isolates(ListIsolatesRequest::default()).await,
            Code::Unauthenticated,
        )?;
        for bad in [
            "Bearer not-a-token".to_string(),
            format!("Basic {secret_a}"),
            format!("Bearer {}", "x".repeat(8 << 10)),
            "Bearer".into(),
        ] {
            let mut req = tonic::Request::new(ListIsolatesRequest::default());
            req.metadata_mut().insert("authorization", bad.parse()?);
            let (_, mut plain) = clients(&channel, None)?;
            ensure_code(
                &format!("ListIsolates with authorization {:.30}…", bad),
                plain.list_isolates(req).await,
                Code::Unauthenticated,
            )?;
        }
        // Far beyond HTTP/2's header limit: refused one way or another, never a crash.
        let mut req = tonic::Request::new(ListIsolatesRequest::default());
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", "y".repeat(1 << 20)).parse()?,
        );
        let (_, mut plain) = clients(&tcp(p.addr(), None).await?, None)?;
        refused(
            "a 1 MiB authorization header",
            plain.list_isolates(req).await,
        )?;
        p.ensure_running()?;

        let (mut run_a, mut control_a) = clients(&channel, Some(&secret_a))?;
        let (mut run_all, mut control_all) = clients(&channel, Some(&secret_all))?;
        let mine = t.action_id("mine");
        let mut req = t.request_in(&ns_a, &echo.reference, &mine);
        req.data = Some(b"tenant a".to_vec());
        run_a
            .run_isolate(req)
            .await
            .context("token a in its namespace")?;
        let out = expect_success(&t.env.flow.wait_report(&mine, FIRST_PULL).await?)?;
        ensure!(out == b"tenant a", "output {out:?}");

        let denied = t.action_id("denied");
        ensure_code(
            "token a's RunIsolate in namespace b",
            run_a
                .run_isolate(t.request_in(&ns_b, &echo.reference, &denied))
                .await,
            Code::PermissionDenied,
        )?;
        let victim = t.action_id("victim");
        let mut req = t.request_in(&ns_b, &sleeper.reference, &victim);
        req.timeout = Some(300);
        run_all
            .run_isolate(req)
            .await
            .context("the ops token in namespace b")?;
        p.wait_state(&ns_b, &victim, ActionState::Running, FIRST_PULL)
            .await?;

        let r = || action_ref(&ns_b, &victim);
        ensure_code(
            "token a's get in b",
            control_a.get_isolate(r()).await,
            Code::PermissionDenied,
        )?;
        ensure_code(
            "token a's logs in b",
            control_a.isolate_logs(r()).await,
            Code::PermissionDenied,
        )?;
        ensure_code(
            "token a's watch in b",
            control_a.watch_isolate(r()).await,
            Code::PermissionDenied,
        )?;
        ensure_code(
            "token a's cancel in b",
            control_a
                .cancel_isolate(CancelIsolateRequest {
                    namespace: ns_b.clone(),
                    action_id: victim.clone(),
                    reason: "not yours".into(),
                })
                .await,
            Code::PermissionDenied,
        )?;
        ensure_code(
            "token a's list of b",
            control_a
                .list_isolates(ListIsolatesRequest {
                    namespace: ns_b.clone(),
                    ..Default::default()
                })
                .await,
            Code::PermissionDenied,
        )?;
        let chunks = vec![ImportImageRequest {
            namespace: ns_b.clone(),
            chunk: b"not even an archive".to_vec(),
        }];
        ensure_code(
            "token a's import into b",
            control_a.import_image(futures::stream::iter(chunks)).await,
            Code::PermissionDenied,
        )?;
        // Its list holds its own namespace only; the ops token sees both.
        let seen: Vec<String> = control_a
            .list_isolates(ListIsolatesRequest::default())
            .await?
            .into_inner()
            .actions
            .into_iter()
            .map(|a| a.namespace)
            .collect();
        ensure!(
            seen.iter().all(|n| *n == ns_a) && seen.contains(&ns_a),
            "token a's list shows {seen:?}"
        );
        let all: Vec<String> = control_all
            .list_isolates(ListIsolatesRequest::default())
            .await?
            .into_inner()
            .actions
            .into_iter()
            .map(|a| a.namespace)
            .collect();
        ensure!(all.contains(&ns_b), "the ops token's list lacks b: {all:?}");

        // Nothing token a tried touched the victim; nothing ran for the refused run.
        let info = control_all.get_isolate(r()).await?.into_inner();
        ensure!(
            info.state() == ActionState::Running,
            "victim is {:?}",
            info.state()
        );
        control_all
            .cancel_isolate(CancelIsolateRequest {
                namespace: ns_b.clone(),
                action_id: victim.clone(),
                reason: "ops cancelled it".into(),
            })
            .await?;
        expect_error(
            &t.env.flow.wait_report(&victim, ACTION).await?,
            CODE_CANCELLED,
        )?;
        ensure!(
            t.env.flow.count(&denied) == 0 && t.env.flow.count(&nothing) == 0,
            "a refused call was reported"
        );
        let known = p
            .control()
            .await?
            .get_isolate(ActionRef {
                namespace: ns_b.clone(),
                action_id: denied.clone(),
            })
            .await;
        ensure_code("the refused action over the socket", known, Code::NotFound)?;

        let text = scrape(metrics.parse()?).await?;
        let by = |reason: &str| {
            sample(
                &text,
                &format!("isolated_auth_refusals_total{{reason=\"{reason}\"}}"),
            )
        };
        ensure!(
            by("namespace") >= 7.0
                && by("missing") >= 3.0
                && by("unknown_token") >= 1.0
                && by("malformed") >= 2.0,
            "refusal counters: namespace {}, missing {}, unknown_token {}, malformed {}",
            by("namespace"),
            by("missing"),
            by("unknown_token"),
            by("malformed")
        );
        let log = p.log_text();
        ensure!(
            log.contains("token tenant-a may not use namespace"),
            "the log does not name the refused token"
        );
        ensure!(
            log.contains("caller=token ops") || log.contains("caller=\"token ops\""),
            "the log does not name the accepted token"
        );
        for secret in [&secret_a, &secret_all] {
            ensure!(!log.contains(secret.as_str()), "a secret is in the log");
        }
        p.assert_nothing_left(&t.env.containerd, &ns_a, NOTHING_LEFT)
            .await?;
        p.assert_nothing_left(&t.env.containerd, &ns_b, NOTHING_LEFT)
            .await?;
        Ok(())
    }
    .await;
    res.map_err(|e| p.explain(e))
}

/// Polls `check` every 100 ms until it holds; fails after `limit`, naming `what`.
async fn within<F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        if started.elapsed() > limit {
            bail!("{what} not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(started.elapsed())
}

pub async fn file_changes_take_effect(t: Ctx) -> Result<()> {
    let secret = |n: &str| format!("{n}-{:016x}", rand::random::<u64>());
    let (one, two) = (secret("one"), secret("two"));
    // The third as an operator makes one: `isolatectl token new`, the secret on stdout,
    // the entry to paste on stderr.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_isolatectl"))
        .args(["token", "new", "three", "--namespace", "*"])
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "token new: {}",
        crate::operator::shown(&out)
    );
    let three = String::from_utf8(out.stdout)?.trim().to_string();
    let stderr = String::from_utf8(out.stderr)?;
    let entry_three = &stderr[stderr.find("[[token]]").context("no entry printed")?..];
    ensure!(
        three.len() == 64 && !stderr.contains(&three),
        "token new printed {three:?} and {stderr:?}"
    );
    let dir = t
        .env
        .dir()
        .join(format!("reload-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("tokens.toml");
    std::fs::write(&file, tokens_entry("one", &one, "[\"*\"]"))?;
    let file_arg = file.display().to_string();
    let p = PrivateIsolated::start(t.env, &["--auth-tokens-file", &file_arg]).await?;
    p.adopt(&t.ns);
    let res = async {
        let channel = tcp(p.addr(), None).await?;
        let works = |token: String| {
            let channel = channel.clone();
            async move {
                let Ok((_, mut c)) = clients(&channel, Some(&token)) else {
                    return false;
                };
                c.list_isolates(ListIsolatesRequest::default())
                    .await
                    .is_ok()
            }
        };
        ensure!(works(one.clone()).await, "token one at start");

        // Written in place: one goes, two comes, on the connection already open.
        std::fs::write(&file, tokens_entry("two", &two, "[\"*\"]"))?;
        let took = within("token one refused", Duration::from_secs(6), || {
            let w = works(one.clone());
            async move { !w.await }
        })
        .await?;
        ensure!(
            works(two.clone()).await,
            "token two after the in-place write"
        );
        eprintln!("auth: an in-place change took effect after {took:?}");

        // A long call in flight: a watch by token two ends once two is removed.
        let sleeper = t.push(&ImageSpec::with_script("sleep 600")).await?;
        let id = t.action_id("watched");
        let (mut run, mut control) = clients(&channel, Some(&two))?;
        let mut req = t.request(&sleeper.reference, &id);
        req.timeout = Some(300);
        run.run_isolate(req).await?;
        wait_state(
            &mut p.control().await?,
            &t.ns,
            &id,
            ActionState::Running,
            FIRST_PULL,
        )
        .await?;
        let mut stream = control
            .watch_isolate(action_ref(&t.ns, &id))
            .await?
            .into_inner();
        stream
            .message()
            .await?
            .context("the watch's first message")?;

        // Renamed over: three comes, two goes.
        let tmp = dir.join("tokens.toml.new");
        std::fs::write(&tmp, entry_three)?;
        std::fs::rename(&tmp, &file)?;
        within("token three accepted", Duration::from_secs(6), || {
            works(three.clone())
        })
        .await?;
        ensure!(!works(two.clone()).await, "token two after the rename");
        // The next state change reaches the watcher as a refusal.
        p.control()
            .await?
            .cancel_isolate(CancelIsolateRequest {
                namespace: t.ns.clone(),
                action_id: id.clone(),
                reason: "reload trial".into(),
            })
            .await?;
        let next = tokio::time::timeout(ACTION, async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return Err(anyhow!("the watch ended without a refusal")),
                    Err(s) => return Ok(s.code()),
                }
            }
        })
        .await
        .map_err(|_| anyhow!("the revoked watch went on"))??;
        ensure!(
            next == Code::Unauthenticated,
            "the revoked watch ended with {next:?}"
        );
        expect_error(&t.env.flow.wait_report(&id, ACTION).await?, CODE_CANCELLED)?;

        // Broken: refused with a warning, and three stays in force.
        std::fs::write(&file, "[[token]\nname = ")?;
        within(
            "the refusal of the broken file in the log",
            Duration::from_secs(6),
            || {
                let found = p.log_text().contains("the changed tokens file is refused");
                async move { found }
            },
        )
        .await?;
        ensure!(
            works(three.clone()).await,
            "token three after a broken rewrite"
        );
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await?;
        Ok(())
    }
    .await;
    res.map_err(|e| p.explain(e))
}
