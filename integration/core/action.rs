//! The action's side of the contract (ISOLATE.md §4): data in and out, error.json, exit
//! codes, the command override, environment, working directory and user.

use std::collections::HashMap;

use anyhow::{ensure, Context, Result};

use super::{
    echo_spec, ensure_ids_echoed, expect_error, expect_success, mentions_number, CODE_EXIT, CODE_IO,
};
use crate::harness::{Ctx, ImageSpec, FIRST_PULL};

/// Every byte value goes in through data.in and comes back unchanged as the output.
pub async fn echo_round_trip(t: Ctx) -> Result<()> {
    let image = t.push(&echo_spec()).await?;
    let id = t.action_id("echo");
    let mut req = t.request(&image.reference, &id);
    let input: Vec<u8> = (0..=255u8).collect();
    req.data = Some(input.clone());
    let report = t.run_and_wait(req.clone(), FIRST_PULL).await?;
    ensure_ids_echoed(&req, &report)?;
    let output = expect_success(&report)?;
    ensure!(
        output == input,
        "output is not the input byte for byte: {} bytes {:?}",
        output.len(),
        output
    );
    Ok(())
}

/// error.json decides the report whatever the exit code; data.out is not passed on.
pub async fn error_json(t: Ctx, exit_code: u8) -> Result<()> {
    let image = t
        .push(&ImageSpec::with_script(
            r#"printf '%s' '{"errorCode":"com.example.bad","errorMessage":"it broke"}' > /direktiv-data/error.json
echo "output that must not be reported" > /direktiv-data/data.out
exit "$(cat /direktiv-data/data.in)""#,
        ))
        .await?;
    let id = t.action_id("errjson");
    let mut req = t.request(&image.reference, &id);
    req.data = Some(exit_code.to_string().into_bytes());
    let report = t.run_and_wait(req.clone(), FIRST_PULL).await?;
    ensure_ids_echoed(&req, &report)?;
    let message = expect_error(&report, "com.example.bad")?;
    ensure!(
        message == "it broke",
        "errorMessage {message:?}, expected error.json's \"it broke\""
    );
    Ok(())
}

/// Exit 0 without data.out is a success with empty output.
pub async fn success_without_data_out(t: Ctx) -> Result<()> {
    let image = t.push(&ImageSpec::with_script("true")).await?;
    let id = t.action_id("noout");
    let req = t.request(&image.reference, &id);
    let report = t.run_and_wait(req.clone(), FIRST_PULL).await?;
    ensure_ids_echoed(&req, &report)?;
    let output = expect_success(&report)?;
    ensure!(output.is_empty(), "output {output:?} without a data.out");
    Ok(())
}

/// An error.json that is not JSON is an I/O error quoting the file's first bytes.
pub async fn invalid_error_json(t: Ctx) -> Result<()> {
    let image = t
        .push(&ImageSpec::with_script(
            "printf 'not json {' > /direktiv-data/error.json",
        ))
        .await?;
    let id = t.action_id("badjson");
    let req = t.request(&image.reference, &id);
    let report = t.run_and_wait(req, FIRST_PULL).await?;
    let message = expect_error(&report, CODE_IO)?;
    ensure!(
        message.contains("not json"),
        "errorMessage {message:?} does not quote the file's first bytes"
    );
    Ok(())
}

/// A failed process without error.json: the exit code and its stderr make the message.
pub async fn nonzero_exit_without_error_json(t: Ctx) -> Result<()> {
    let image = t
        .push(&ImageSpec::with_script("echo boom >&2\nexit 3"))
        .await?;
    let id = t.action_id("exit");
    let req = t.request(&image.reference, &id);
    let report = t.run_and_wait(req.clone(), FIRST_PULL).await?;
    ensure_ids_echoed(&req, &report)?;
    let message = expect_error(&report, CODE_EXIT)?;
    ensure!(
        mentions_number(&message, 3),
        "errorMessage {message:?} does not name exit code 3"
    );
    ensure!(
        message.contains("boom"),
        "errorMessage {message:?} does not carry the stderr tail \"boom\""
    );
    Ok(())
}

/// An image whose own entrypoint would write "entrypoint ran", so a command that does not
/// replace entrypoint and cmd shows up in the output.
fn entrypoint_spec() -> ImageSpec {
    ImageSpec::new()
        .env("FOO=bar")
        .entrypoint(&[
            "/bin/sh",
            "-c",
            "echo 'entrypoint ran' > /direktiv-data/data.out",
        ])
        .cmd(&["cmd-arg"])
}

/// Quotes, escapes and empty words in `command` split by POSIX shell rules, and the result
/// replaces both Entrypoint and Cmd.
pub async fn command_override_splits_like_a_shell(t: Ctx) -> Result<()> {
    let image = t.push(&entrypoint_spec()).await?;
    let id = t.action_id("cmd");
    let mut req = t.request(&image.reference, &id);
    req.command = Some(
        r##"/bin/sh -c 'printf "%s|" "$0" "$@" > /direktiv-data/data.out; printf "#%s" "$#" >> /direktiv-data/data.out' "a b" 'c "d"' e\ f """##
            .to_string(),
    );
    let report = t.run_and_wait(req.clone(), FIRST_PULL).await?;
    ensure_ids_echoed(&req, &report)?;
    let output = String::from_utf8(expect_success(&report)?)?;
    ensure!(
        output == r#"a b|c "d"|e f||#3"#,
        "argv as the action saw it: {output:?}, expected {:?} (words: `a b`, `c \"d\"`, `e f`, ``)",
        r#"a b|c "d"|e f||#3"#
    );
    Ok(())
}

/// `command` is split, not handed to a shell: `$FOO` stays literal and `;` is no operator.
pub async fn command_is_not_run_by_a_shell(t: Ctx) -> Result<()> {
    let image = t.push(&entrypoint_spec()).await?;
    let id = t.action_id("noshell");
    let mut req = t.request(&image.reference, &id);
    req.command = Some(
        r#"/bin/sh -c 'printf "%s|" "$@" > /direktiv-data/data.out' argv0 $FOO a;b"#.to_string(),
    );
    let report = t.run_and_wait(req.clone(), FIRST_PULL).await?;
    let output = String::from_utf8(expect_success(&report)?)?;
    ensure!(
        output == "$FOO|a;b|",
        "argv after argv0: {output:?}, expected \"$FOO|a;b|\" (a shell would have expanded $FOO to bar)"
    );
    Ok(())
}

/// The image's Env plus the DIREKTIV_* variables with the request's values, and the
/// image's WorkingDir.
pub async fn environment_and_working_dir(t: Ctx) -> Result<()> {
    let image = t
        .push(
            &ImageSpec::with_script(
                "env > /direktiv-data/data.out\necho \"CWD=$(pwd)\" >> /direktiv-data/data.out",
            )
            .env("FOO=bar")
            .dir("/work/dir", 0o755)
            .working_dir("/work/dir"),
        )
        .await?;
    let id = t.action_id("env");
    let req = t.request(&image.reference, &id);
    let report = t.run_and_wait(req.clone(), FIRST_PULL).await?;
    let output = String::from_utf8(expect_success(&report)?)?;
    let vars: HashMap<&str, &str> = output.lines().filter_map(|l| l.split_once('=')).collect();
    let step = req.step.context("request has a step")?.to_string();
    let expected = [
        ("FOO", "bar"),
        ("PATH", crate::harness::image::DEFAULT_PATH),
        ("DIREKTIV_DIR", "/direktiv-data"),
        ("DIREKTIV_NAMESPACE", t.ns.as_str()),
        (
            "DIREKTIV_INSTANCE_ID",
            req.instance_id.as_deref().unwrap_or(""),
        ),
        ("DIREKTIV_ACTION_ID", id.as_str()),
        ("DIREKTIV_STEP", step.as_str()),
        ("CWD", "/work/dir"),
    ];
    let wrong: Vec<String> = expected
        .iter()
        .filter(|(k, v)| vars.get(k) != Some(v))
        .map(|(k, v)| format!("{k}: expected {v:?}, got {:?}", vars.get(k)))
        .collect();
    ensure!(
        wrong.is_empty(),
        "environment differs:\n  {}\nthe action saw:\n{output}",
        wrong.join("\n  ")
    );
    Ok(())
}

/// The image's User runs the process, and it can still write its results to the data dir.
pub async fn image_user_is_honoured(t: Ctx) -> Result<()> {
    let image = t
        .push(
            &ImageSpec::with_script(
                "{ id -u; id -g; } > /direktiv-data/data.out\ncat /direktiv-data/data.in >> /direktiv-data/data.out",
            )
            .user("65534:65534"),
        )
        .await?;
    let id = t.action_id("user");
    let mut req = t.request(&image.reference, &id);
    req.data = Some(b"readable".to_vec());
    let report = t.run_and_wait(req, FIRST_PULL).await?;
    let output = String::from_utf8(expect_success(&report)?)?;
    ensure!(
        output == "65534\n65534\nreadable",
        "uid, gid and data.in as seen by the image's user 65534:65534: {output:?}"
    );
    Ok(())
}

/// A command whose executable is missing, or is not executable, fails as a shell would
/// say it: exit 127 or 126 with the path in the message (ISOLATE.md §10), not an internal
/// error.
pub async fn missing_or_unexecutable_command(t: Ctx) -> Result<()> {
    let image = t
        .push(&ImageSpec::with_script("true").file("/not-executable", "#!/bin/sh\n", 0o644))
        .await?;
    for (path, code) in [("/no/such/binary", 127), ("/not-executable", 126)] {
        let mut req = t.request(&image.reference, &t.action_id("cmd"));
        req.command = Some(format!("{path} --flag"));
        let report = t.run_and_wait(req, FIRST_PULL).await?;
        let message = expect_error(&report, "au.com.direktiv.error.exit")?;
        ensure!(
            message.contains(&format!("exit code {code}")) && message.contains(path),
            "{path}: errorMessage {message:?} should name exit code {code} and the path"
        );
    }
    Ok(())
}

/// Namespaces Direktiv accepts and containerd's identifiers would not (`my--ns`) are
/// their own tenants, apart from the ones they look like (`my-ns`): the same action id
/// at once in both, each with its own input and output (ISOLATE.md §2).
pub async fn doubled_separators_are_their_own_namespace(t: Ctx) -> Result<()> {
    let image = t.push(&super::echo_spec()).await?;
    let doubled = format!("{}--x", t.ns);
    let single = format!("{}-x", t.ns);
    for ns in [&doubled, &single] {
        t.env.register_namespace(ns);
    }
    let id = t.action_id("twin");
    let mut reqs = Vec::new();
    for ns in [&doubled, &single] {
        let mut req = t.request_in(ns, &image.reference, &id);
        req.data = Some(format!("from {ns}").into_bytes());
        reqs.push(req);
    }
    // Both accepted: the same id in two namespaces is no duplicate.
    for req in &reqs {
        t.run(req.clone())
            .await
            .map_err(|s| anyhow::anyhow!("RunIsolate: {s}"))?;
    }
    let reports = t.env.flow.wait_reports(&id, 2, FIRST_PULL).await?;
    let mut outputs: Vec<String> = reports
        .iter()
        .map(|r| String::from_utf8_lossy(r.output.as_deref().unwrap_or_default()).into_owned())
        .collect();
    outputs.sort();
    let mut expected = vec![format!("from {doubled}"), format!("from {single}")];
    expected.sort();
    ensure!(
        outputs == expected,
        "outputs {outputs:?}, expected {expected:?}"
    );
    for ns in [&doubled, &single] {
        t.env
            .assert_nothing_left(ns, crate::harness::NOTHING_LEFT)
            .await?;
    }
    Ok(())
}
