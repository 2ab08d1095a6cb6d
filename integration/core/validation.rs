//! Requests refused at the edge (ISOLATE.md §2): the gRPC status they get, and that nothing
//! of them ever runs or is reported.

use anyhow::{bail, ensure, Result};
use direktiv_isolate::proto::isolate::RunIsolateRequest;

use super::{echo_spec, ensure_echo_works, expect_success};
use crate::harness::{Ctx, ImageSpec, FIRST_PULL};

/// Each malformed request gets INVALID_ARGUMENT and no report, while good requests around
/// them, including ids at the limits of the rules, run.
pub async fn rejects_bad_requests(t: Ctx) -> Result<()> {
    let image = t.push(&echo_spec()).await?;
    let base = |label: &str| t.request(&image.reference, &t.action_id(label));
    let with = |label: &str, change: &dyn Fn(&mut RunIsolateRequest)| {
        let mut r = base(label);
        change(&mut r);
        (label.to_string(), r)
    };
    let cases = vec![
        with("no-namespace", &|r| r.namespace = None),
        with("empty-namespace", &|r| r.namespace = Some(String::new())),
        with("upper-namespace", &|r| r.namespace = Some("Bad-NS".into())),
        with("dash-last-namespace", &|r| {
            r.namespace = Some("a..b-".into())
        }),
        with("no-action-id", &|r| r.action_id = None),
        with("dotdot-action-id", &|r| r.action_id = Some("a..b".into())),
        with("long-action-id", &|r| r.action_id = Some("a".repeat(65))),
        with("dash-first-action-id", &|r| {
            r.action_id = Some(format!("-{}", r.action_id.clone().unwrap_or_default()))
        }),
        with("no-image", &|r| r.image = None),
        with("negative-timeout", &|r| r.timeout = Some(-1)),
        with("size-3", &|r| r.size = Some(3)),
        with("size-minus-1", &|r| r.size = Some(-1)),
        with("unbalanced-quote", &|r| {
            r.command = Some("/bin/sh -c 'echo unbalanced".into())
        }),
    ];

    let mut wrong = Vec::new();
    for (label, req) in &cases {
        match t.run(req.clone()).await {
            Err(s) if s.code() == tonic::Code::InvalidArgument => {}
            Err(s) => wrong.push(format!("{label}: {:?} {}", s.code(), s.message())),
            Ok(()) => wrong.push(format!("{label}: accepted")),
        }
    }
    ensure!(
        wrong.is_empty(),
        "requests that should get INVALID_ARGUMENT:\n  {}",
        wrong.join("\n  ")
    );

    // Reports come in order of completion, so a later good action's report is the point
    // after which a report for any rejected request would have shown.
    ensure_echo_works(&t, &t.ns, &image, FIRST_PULL).await?;
    for (label, req) in &cases {
        if let Some(id) = &req.action_id {
            ensure!(
                t.env.flow.count(id) == 0,
                "{label}: rejected request {id} was reported"
            );
        }
    }

    // The longest action id the rules allow, with every allowed kind of character.
    let id = format!("A.b_c-{}", "x".repeat(58 - 8)) + &format!("{:08x}", rand::random::<u32>());
    ensure!(id.len() == 64);
    let mut req = t.request(&image.reference, &id);
    req.data = Some(b"limits".to_vec());
    let report = t.run_and_wait(req, FIRST_PULL).await?;
    ensure!(
        expect_success(&report)? == b"limits",
        "the 64-char action id ran with the wrong output"
    );
    Ok(())
}

/// A second RunIsolate for an action id that is still running is ALREADY_EXISTS, and the
/// action is reported once.
pub async fn duplicate_action_id_while_running(t: Ctx) -> Result<()> {
    let image = t
        .push(&ImageSpec::with_script(
            "sleep 3\ncat /direktiv-data/data.in > /direktiv-data/data.out",
        ))
        .await?;
    let id = t.action_id("dup");
    let mut req = t.request(&image.reference, &id);
    req.data = Some(b"first".to_vec());
    if let Err(s) = t.run(req.clone()).await {
        bail!("first RunIsolate refused: {s:?}");
    }
    let mut again = req.clone();
    again.data = Some(b"second".to_vec());
    match t.run(again).await {
        Err(s) if s.code() == tonic::Code::AlreadyExists => {}
        Err(s) => bail!("second RunIsolate: expected ALREADY_EXISTS, got {s:?}"),
        Ok(()) => bail!("second RunIsolate with the same actionId was accepted"),
    }
    let report = t.env.flow.wait_report(&id, FIRST_PULL).await?;
    ensure!(
        expect_success(&report)? == b"first",
        "the report is not the first request's"
    );
    t.env
        .assert_nothing_left(&t.ns, crate::harness::NOTHING_LEFT)
        .await?;
    ensure!(
        t.env.flow.count(&id) == 1,
        "action {id} reported {} times",
        t.env.flow.count(&id)
    );
    Ok(())
}

/// What a caller can make the daemon hold (ISOLATE.md §8, issue 13): a command above 64
/// KiB, more than 64 registries, a value above 8 KiB are INVALID_ARGUMENT naming the field
/// and the limit (a password never), nothing of them is reported, and a command at the
/// limit runs.
pub async fn size_bounds_are_invalid_argument(t: Ctx) -> Result<()> {
    let image = t.push(&echo_spec()).await?;
    let host = t.env.open_registry.host().to_string();
    let secret = format!("s3cret{}", "p".repeat(8 << 10));
    let password_names = ["registries", host.as_str(), "8192"];
    let cases: Vec<(&str, &[&str], RunIsolateRequest)> = vec![
        ("command", &["command", "65536"], {
            let mut r = t.request(&image.reference, &t.action_id("command"));
            r.command = Some(format!("/bin/echo {}", "c".repeat(64 << 10)));
            r
        }),
        ("registries", &["registries", "64"], {
            let mut r = t.request(&image.reference, &t.action_id("registries"));
            r.registries = (0..65)
                .map(|i| (format!("r{i}.example"), "u!p".to_string()))
                .collect();
            r
        }),
        ("password", &password_names, {
            let mut r = t.request(&image.reference, &t.action_id("password"));
            r.registries = [(host.clone(), format!("u!{secret}"))].into();
            r
        }),
        ("instanceId", &["instanceId", "8192"], {
            let mut r = t.request(&image.reference, &t.action_id("instance"));
            r.instance_id = Some("i".repeat((8 << 10) + 1));
            r
        }),
    ];
    let mut wrong = Vec::new();
    for (label, names, req) in &cases {
        match t.run(req.clone()).await {
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                if !names.iter().all(|n| s.message().contains(n)) {
                    wrong.push(format!(
                        "{label}: {:?} does not name {names:?}",
                        s.message()
                    ));
                }
                if s.message().contains("s3cret") {
                    wrong.push(format!("{label}: the message carries the password"));
                }
            }
            Err(s) => wrong.push(format!("{label}: {:?} {}", s.code(), s.message())),
            Ok(()) => wrong.push(format!("{label}: accepted")),
        }
    }
    ensure!(
        wrong.is_empty(),
        "requests beyond the size bounds:\n  {}",
        wrong.join("\n  ")
    );
    // At the limit: accepted and run.
    let mut req = t.request(&image.reference, &t.action_id("at-limit"));
    let fill = (64 << 10) - "/bin/echo ".len();
    req.command = Some(format!("/bin/echo {}", "c".repeat(fill)));
    let report = t.run_and_wait(req, FIRST_PULL).await?;
    expect_success(&report)?;
    for (label, _, req) in &cases {
        let id = req.action_id.as_deref().unwrap_or_default();
        ensure!(
            t.env.flow.count(id) == 0,
            "{label}: rejected request {id} was reported"
        );
    }
    ensure!(
        !t.env.isolated.log_text().contains("s3cret"),
        "isolated's log carries the oversized password"
    );
    Ok(())
}
