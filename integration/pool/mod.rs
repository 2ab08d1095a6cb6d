//! Pre-created tasks (issue 16): an action that takes one sees exactly what it would see
//! without the pool, field by field, but for the launcher's read-only mount; sequential
//! actions of one image each see only their own input; a tag moved to a new digest runs
//! at that digest on the next action; a kill -9 with a full pool leaks nothing; a node
//! at `max_running` drops its pool instead of refusing work. Every trial ends with the
//! harness's check that nothing is left (which drops the pool first: its entries wait for
//! the next action by design).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use direktiv_isolate::proto::control::isolate_control_client::IsolateControlClient;
use direktiv_isolate::proto::control::{
    ActionRef, ActionState, CancelIsolateRequest, ListPoolRequest,
};
use direktiv_isolate::spec::LAUNCHER_MOUNT;
use libtest_mimic::Trial;
use tonic::transport::Channel;

use crate::core::expect_success;
use crate::harness::private::{container_of, task_status, PrivateIsolated};
use crate::harness::{trial, Ctx, ImageSpec, ACTION, FIRST_PULL, NOTHING_LEFT};

pub fn trials() -> Vec<Trial> {
    vec![
        trial(
            "pool::an_action_sees_the_same_with_and_without_the_pool",
            same_with_and_without_the_pool,
        ),
        trial(
            "pool::sequential_actions_see_only_their_own_input",
            sequential_actions_see_only_their_own_input,
        ),
        trial(
            "pool::a_moved_tag_runs_at_its_new_digest",
            a_moved_tag_runs_at_its_new_digest,
        ),
        trial(
            "pool::kill_with_a_full_pool_leaks_nothing",
            kill_with_a_full_pool_leaks_nothing,
        ),
        trial(
            "pool::a_full_node_drops_its_pool_instead_of_refusing",
            a_full_node_drops_its_pool_instead_of_refusing,
        ),
    ]
}

/// Polls the daemon's pool until namespace `ns` has at least `min` entries (of `digest`,
/// when given).
async fn wait_pool(
    control: &mut IsolateControlClient<Channel>,
    ns: &str,
    digest: Option<&str>,
    min: u32,
    timeout: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = pool_entries(control, ns, digest).await?;
        if n >= min {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("namespace {ns}: {n} pre-created tasks after {timeout:?}, expected {min}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn pool_entries(
    control: &mut IsolateControlClient<Channel>,
    ns: &str,
    digest: Option<&str>,
) -> Result<u32> {
    let keys = control
        .list_pool(ListPoolRequest {
            drop: false,
            namespace: ns.to_string(),
        })
        .await?
        .into_inner()
        .keys;
    Ok(keys
        .iter()
        .filter(|k| digest.is_none_or(|d| k.digest == d))
        .map(|k| k.entries)
        .sum())
}

/// What the action's PID 1 sees, one section per file, run as a user of the image in its
/// working directory, with limits from its size.
const INSPECT: &str = r#"o=/tmp/inspect; mkdir -p $o
ls -a /direktiv-data > $o/ls
for f in /direktiv-data/* /direktiv-data/.[!.]*; do [ -e "$f" ] && stat -c '%n %a %u %g %s' "$f"; done > $o/stat
tr '\0' '\n' < /proc/1/cmdline > $o/cmdline
tr '\0' '\n' < /proc/1/environ > $o/environ
cat /proc/1/status > $o/status
cat /proc/1/mountinfo > $o/mountinfo
cat /proc/1/cgroup > $o/cgroup
cat /proc/1/limits > $o/limits
hostname > $o/hostname
id > $o/id
readlink /proc/1/cwd > $o/cwd
readlink /proc/1/exe > $o/exe
for f in memory/memory.limit_in_bytes memory/memory.memsw.limit_in_bytes pids/pids.max cpu/cpu.cfs_quota_us cpu/cpu.cfs_period_us; do echo "$f $(cat /sys/fs/cgroup/$f 2>&1)"; done > $o/cgroup_limits
cd $o && for f in *; do echo "== $f"; cat $f; done > /direktiv-data/data.out"#;

fn sections(out: &[u8]) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = String::new();
    for line in String::from_utf8_lossy(out).lines() {
        match line.strip_prefix("== ") {
            Some(name) => current = name.to_string(),
            None => map
                .entry(current.clone())
                .or_default()
                .push(line.to_string()),
        }
    }
    map
}

/// A mountinfo line as the action sees the mount: where, how and what, without the
/// kernel's ids, device numbers, the host-side root and source (the state dir, the
/// snapshot's layers), which differ between any two actions.
fn mount_view(line: &str) -> String {
    let (left, right) = line.split_once(" - ").unwrap_or((line, ""));
    let l: Vec<&str> = left.split(' ').collect();
    let fstype = right.split(' ').next().unwrap_or("");
    format!(
        "{} {} {}",
        l.get(4).unwrap_or(&""),
        l.get(5).unwrap_or(&""),
        fstype
    )
}

/// Fields of /proc/1/status that are about who and how the process runs (not its pid,
/// memory or scheduling counters, nor its state at the instant it is read: "R (running)"
/// against "S (sleeping)" was once all that differed, on containerd 2.1.9).
const STATUS_FIELDS: &[&str] = &[
    "Name:",
    "Umask:",
    "Uid:",
    "Gid:",
    "Groups:",
    "NStgid:",
    "NSpid:",
    "SigBlk:",
    "SigIgn:",
    "SigCgt:",
    "CapInh:",
    "CapPrm:",
    "CapEff:",
    "CapBnd:",
    "CapAmb:",
    "NoNewPrivs:",
    "Seccomp:",
    "Seccomp_filters:",
    "Cpus_allowed_list:",
];

/// The pool is on by default (`precreate_max = 2`); these trials say so themselves, so
/// that they keep testing it whatever the default becomes.
const POOL_ON: [&str; 2] = ["--precreate-max", "2"];

/// The same request (same action id, instance, step and input) on two daemons that
/// differ only in `precreate_max`, the pooled one after its pool holds an entry: PID 1's
/// argv, environment, user and groups, working directory, executable, capabilities,
/// signal masks, seccomp, rlimits, cgroup limits and hostname are the same, the data
/// directory holds the same one file, and the mounts differ by the launcher's read-only
/// mount alone (runtime-spec/README.md).
pub async fn same_with_and_without_the_pool(t: Ctx) -> Result<()> {
    let args = ["--network", "none"];
    let on = PrivateIsolated::start(t.env, &[&args[..], &POOL_ON[..]].concat()).await?;
    let off =
        PrivateIsolated::start(t.env, &[&args[..], &["--precreate-max", "0"]].concat()).await?;
    on.adopt(&t.ns);
    off.adopt(&t.ns);
    let res = async {
        let image = t
            .push(
                &ImageSpec::with_script(INSPECT)
                    .dir("/tmp", 0o1777)
                    .dir("/work", 0o755)
                    .file("/etc/passwd", "root:x:0:0::/:/bin/sh\nact:x:1000:1000::/work:/bin/sh\n", 0o644)
                    .file("/etc/group", "root:x:0:\nact:x:1000:\nextra:x:1001:act\n", 0o644)
                    .user("act")
                    .working_dir("/work")
                    .env("FROM_IMAGE=yes"),
            )
            .await?;
        let id = t.action_id("same");
        let mut outputs = Vec::new();
        for (n, (p, pooled)) in [(&on, true), (&off, false)].into_iter().enumerate() {
            // A first action pulls the image and, with the pool on, leaves an entry.
            let warm = t.action_id("warm");
            p.accept(t.request(&image.reference, &warm)).await?;
            expect_success(&t.env.flow.wait_report(&warm, FIRST_PULL).await?)?;
            if pooled {
                wait_pool(&mut p.control().await?, &t.ns, Some(&image.digest), 1, ACTION).await?;
            }
            let mut req = t.request(&image.reference, &id);
            req.step = Some(7);
            req.data = Some(b"the input".to_vec());
            p.accept(req).await?;
            // The same id on both daemons: the n-th report of it is this run's.
            let reports = t.env.flow.wait_reports(&id, n + 1, ACTION).await?;
            let out = expect_success(reports.last().context("no report")?)?;
            p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT).await?;
            outputs.push(sections(&out));
        }
        let (on_seen, off_seen) = (&outputs[0], &outputs[1]);
        let mut diff = Vec::new();
        for name in on_seen.keys().chain(off_seen.keys()).collect::<std::collections::BTreeSet<_>>() {
            let empty = Vec::new();
            let (a, b) = (
                on_seen.get(name).unwrap_or(&empty),
                off_seen.get(name).unwrap_or(&empty),
            );
            match name.as_str() {
                "mountinfo" => {
                    let mut a: Vec<String> = a.iter().map(|l| mount_view(l)).collect();
                    let mut b: Vec<String> = b.iter().map(|l| mount_view(l)).collect();
                    a.sort();
                    b.sort();
                    let only_on: Vec<&String> = a.iter().filter(|l| !b.contains(l)).collect();
                    let only_off: Vec<&String> = b.iter().filter(|l| !a.contains(l)).collect();
                    let launcher_only = only_on.len() == 1
                        && only_on[0].starts_with(&format!("{LAUNCHER_MOUNT} ro,"))
                        && only_off.is_empty()
                        && a.len() == b.len() + 1;
                    if !launcher_only {
                        diff.push(format!(
                            "mounts: only with the pool {only_on:?}, only without {only_off:?} (expected the launcher's read-only {LAUNCHER_MOUNT} alone)"
                        ));
                    }
                }
                "status" => {
                    let keep = |v: &Vec<String>| -> Vec<String> {
                        v.iter()
                            .filter(|l| STATUS_FIELDS.iter().any(|f| l.starts_with(f)))
                            .cloned()
                            .collect()
                    };
                    if keep(a) != keep(b) {
                        diff.push(format!("status: {:?} vs {:?}", keep(a), keep(b)));
                    }
                }
                "cgroup" => {
                    // The cgroup is named by the container's id (the entry's or the
                    // action's) in the daemon's namespace: the same place otherwise.
                    let norm = |v: &Vec<String>| -> Vec<String> {
                        v.iter()
                            .map(|l| match l.split_once("/isolated/") {
                                Some((head, _)) => format!("{head}/isolated/<container>"),
                                None => l.clone(),
                            })
                            .collect()
                    };
                    if norm(a) != norm(b) {
                        diff.push(format!("cgroup: {:?} vs {:?}", norm(a), norm(b)));
                    }
                }
                _ => {
                    if a != b {
                        diff.push(format!("{name}: {a:?} with the pool vs {b:?} without"));
                    }
                }
            }
        }
        ensure!(
            off_seen.get("ls").is_some_and(|l| l == &[".", "..", "data.in"]),
            "the data dir should hold data.in alone: {:?}",
            off_seen.get("ls")
        );
        ensure!(
            on_seen
                .get("mountinfo")
                .is_some_and(|m| m.iter().any(|l| l.contains(LAUNCHER_MOUNT))),
            "the action on the pooled daemon did not take a pre-created task"
        );
        ensure!(diff.is_empty(), "differences:\n  {}", diff.join("\n  "));
        Ok(())
    }
    .await;
    res.map_err(|e| on.explain(e))
}

/// Twenty actions of one image one after the other, each but the first on a
/// pre-created task (waited for before it is sent): each sees only its own input in a data
/// directory holding data.in alone, and none leaves its container behind.
pub async fn sequential_actions_see_only_their_own_input(t: Ctx) -> Result<()> {
    let p = PrivateIsolated::start(t.env, &POOL_ON).await?;
    let cns = p.adopt(&t.ns);
    let res = async {
        let image = t
            .push(&ImageSpec::with_script(
                r#"ls=$(ls -A /direktiv-data | tr '\n' ' ')
pooled=$(grep -c ' /.isolate/launch ' /proc/1/mountinfo)
echo "$ls|$pooled|$(cat /direktiv-data/data.in)" > /direktiv-data/data.out
echo leftover > /tmp/mine; echo leftover > /direktiv-data/mine"#,
            ))
            .await?;
        let mut control = p.control().await?;
        for i in 0..20 {
            if i > 0 {
                wait_pool(&mut control, &t.ns, Some(&image.digest), 1, ACTION).await?;
            }
            let id = t.action_id(&format!("seq{i}"));
            let mut req = t.request(&image.reference, &id);
            let input = format!("input of {id}");
            req.data = Some(input.clone().into_bytes());
            p.accept(req).await?;
            let report = t
                .env
                .flow
                .wait_report(&id, if i == 0 { FIRST_PULL } else { ACTION })
                .await?;
            let out = String::from_utf8(expect_success(&report)?)?;
            let want = format!("data.in |{}|{input}\n", if i == 0 { 0 } else { 1 });
            ensure!(out == want, "action {i}: saw {out:?}, expected {want:?}");
            // The control API names the container it ran in: the entry's it took.
            let ran_in = control
                .get_isolate(ActionRef {
                    namespace: t.ns.clone(),
                    action_id: id.clone(),
                })
                .await?
                .into_inner()
                .container_id;
            ensure!(
                if i == 0 {
                    ran_in == id
                } else {
                    ran_in.starts_with("pool-")
                },
                "action {i} ({id}) shows container_id {ran_in:?}"
            );
            // Its container (its own or the entry's it took) goes with it.
            let deadline = tokio::time::Instant::now() + NOTHING_LEFT;
            loop {
                let container = container_of(&t.env.containerd, &cns, &id).await?;
                let status = task_status(&t.env.containerd, &cns, &container).await?;
                if container == id && status.is_none() {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    bail!("action {i}'s container {container} is still there (task {status:?})");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }
    .await;
    res.map_err(|e| p.explain(e))
}

/// A tag pushed again with other content: the next action runs the new digest (the tag
/// is resolved at request time as without the pool), and the old digest's entries are
/// retired.
pub async fn a_moved_tag_runs_at_its_new_digest(t: Ctx) -> Result<()> {
    let p = PrivateIsolated::start(t.env, &["--tag-ttl-secs", "0", "--precreate-max", "2"]).await?;
    p.adopt(&t.ns);
    let res = async {
        let v1 = t
            .push(&ImageSpec::with_script("echo v1 > /direktiv-data/data.out"))
            .await?;
        let first = t.action_id("v1");
        p.accept(t.request(&v1.reference, &first)).await?;
        let out = expect_success(&t.env.flow.wait_report(&first, FIRST_PULL).await?)?;
        ensure!(out == b"v1\n", "first action: {out:?}");
        let mut control = p.control().await?;
        wait_pool(&mut control, &t.ns, Some(&v1.digest), 1, ACTION).await?;

        let v2 = t
            .env
            .push_image(
                &t.env.open_registry,
                &v1.repository,
                &v1.tag,
                &ImageSpec::with_script("echo v2 > /direktiv-data/data.out"),
            )
            .await?;
        ensure!(
            v2.digest != v1.digest,
            "the second push has the first's digest"
        );
        let second = t.action_id("v2");
        p.accept(t.request(&v1.reference, &second)).await?;
        let out = expect_success(&t.env.flow.wait_report(&second, FIRST_PULL).await?)?;
        ensure!(out == b"v2\n", "after the tag moved: {out:?}, expected v2");
        let old = pool_entries(&mut control, &t.ns, Some(&v1.digest)).await?;
        ensure!(
            old == 0,
            "{old} pre-created tasks of the old digest are left"
        );
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await
    }
    .await;
    res.map_err(|e| p.explain(e))
}

/// kill -9 of a daemon whose pool holds entries: the next start sweeps them (nothing is
/// left before any new action), and the next action runs.
pub async fn kill_with_a_full_pool_leaks_nothing(t: Ctx) -> Result<()> {
    let p = PrivateIsolated::start(
        t.env,
        &[&crate::durability::FAST_GRACE[..], &POOL_ON[..]].concat(),
    )
    .await?;
    p.adopt(&t.ns);
    let res = async {
        let image = t.push(&crate::core::echo_spec()).await?;
        // Busy enough for the adaptive size to keep two.
        for i in 0..6 {
            let id = t.action_id(&format!("fill{i}"));
            p.accept(t.request(&image.reference, &id)).await?;
            expect_success(&t.env.flow.wait_report(&id, FIRST_PULL).await?)?;
        }
        let mut control = p.control().await?;
        wait_pool(&mut control, &t.ns, Some(&image.digest), 2, ACTION).await?;
        p.kill();
        let left = p.leftovers(&t.env.containerd, &t.ns).await?;
        ensure!(
            !left.is_empty(),
            "a killed daemon's pool should be there to sweep"
        );
        p.start_again().await?;
        // Nothing of the killed daemon's pool, before any new action (the new daemon's pool
        // is empty: the check's drop has nothing to remove).
        let left = p.leftovers(&t.env.containerd, &t.ns).await?;
        ensure!(
            left.is_empty(),
            "left after the restart:\n  {}",
            left.join("\n  ")
        );
        let id = t.action_id("after");
        let mut req = t.request(&image.reference, &id);
        req.data = Some(b"after the restart".to_vec());
        p.accept(req).await?;
        let out = expect_success(&t.env.flow.wait_report(&id, ACTION).await?)?;
        ensure!(out == b"after the restart", "after the restart: {out:?}");
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await
    }
    .await;
    res.map_err(|e| p.explain(e))
}

/// `max_running = 1`, an entry waiting, and the one slot taken by a sleeper of another
/// image: the next action is accepted and queued, not refused, and the entries are
/// dropped; once the sleeper is cancelled, it runs.
pub async fn a_full_node_drops_its_pool_instead_of_refusing(t: Ctx) -> Result<()> {
    let p = PrivateIsolated::start(
        t.env,
        &[
            "--max-running",
            "1",
            "--kill-grace-secs",
            "1",
            "--precreate-max",
            "2",
        ],
    )
    .await?;
    p.adopt(&t.ns);
    let res = async {
        let echo = t.push(&crate::core::echo_spec()).await?;
        let sleeper = t.push(&ImageSpec::with_script("sleep 600")).await?;
        let first = t.action_id("first");
        p.accept(t.request(&echo.reference, &first)).await?;
        expect_success(&t.env.flow.wait_report(&first, FIRST_PULL).await?)?;
        let mut control = p.control().await?;
        wait_pool(&mut control, &t.ns, Some(&echo.digest), 1, ACTION).await?;

        let sleep_id = t.action_id("sleeper");
        p.accept(t.request(&sleeper.reference, &sleep_id)).await?;
        p.wait_state(&t.ns, &sleep_id, ActionState::Running, FIRST_PULL)
            .await?;
        let queued = t.action_id("queued");
        let mut req = t.request(&echo.reference, &queued);
        req.data = Some(b"queued".to_vec());
        p.accept(req)
            .await
            .context("a full node refused the action")?;
        let deadline = tokio::time::Instant::now() + ACTION;
        while pool_entries(&mut control, &t.ns, None).await? > 0 {
            if tokio::time::Instant::now() >= deadline {
                bail!("the full node kept its pre-created tasks for {ACTION:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let info = p.get(&t.ns, &queued).await?;
        ensure!(
            info.state() == ActionState::Accepted,
            "the queued action is {:?}, expected accepted while the sleeper runs",
            info.state()
        );
        control
            .cancel_isolate(CancelIsolateRequest {
                namespace: t.ns.clone(),
                action_id: sleep_id.clone(),
                reason: "the trial is done".into(),
            })
            .await?;
        t.env.flow.wait_report(&sleep_id, ACTION).await?;
        let out = expect_success(&t.env.flow.wait_report(&queued, ACTION).await?)?;
        ensure!(out == b"queued", "the queued action's output: {out:?}");
        p.assert_nothing_left(&t.env.containerd, &t.ns, NOTHING_LEFT)
            .await
    }
    .await;
    res.map_err(|e| p.explain(e))
}
