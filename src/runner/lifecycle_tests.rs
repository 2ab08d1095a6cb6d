//! The lifecycle's branches, run without root or containerd against the
//! fake engine (issue 12): containerd unreachable then back, a snapshot
//! already there, a task create after a leaked bundle, a cancel while
//! queued, a deadline that passed while isolated was down, the start-up
//! sweep's orphans, and a cancel stored before a crash. Each test drives a
//! real `Runner` (real store, spec template, data dirs, stdio FIFOs, report
//! table) whose containerd is the fake; the image is in the cache, as after
//! a pull.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use oci_spec::image::{ConfigBuilder, ImageConfigurationBuilder};

use super::{Action, Runner, Start};
use crate::actions::{now_ms, Actions};
use crate::config::{Config, Options};
use crate::engine::fake::{Fail, Fake};
use crate::engine::{Engine, Prepare, Runtimes, TaskStatus, LABEL_ACTION_ID, LABEL_MANAGED};
use crate::image::{Image, ImageService};
use crate::network::Networks;
use crate::proto::control::{ActionInfo, ActionState};
use crate::proto::isolate::RunIsolateRequest;
use crate::report::flow::{FlowTls, Reporter};
use crate::request::ActionRequest;
use crate::spec::SpecTemplate;
use crate::store::{Store, StoredAction, Sync};

const IMAGE: &str = "registry.invalid/lifecycle@sha256:0000000000000000000000000000000000000000000000000000000000000000";
const WAIT: Duration = Duration::from_secs(20);

struct Node {
    _dir: tempfile::TempDir,
    fake: Fake,
    runner: Arc<Runner>,
    actions: Arc<Actions>,
}

fn config(dir: &std::path::Path, max_running: usize) -> Config {
    let o = Options {
        state_dir: Some(dir.to_path_buf()),
        network: Some(crate::config::NetworkMode::None),
        shim_group: Some(crate::config::ShimGroup::None),
        flow_endpoint: Some("none".into()),
        kill_grace_secs: Some(1),
        max_running: Some(max_running),
        bind: Some(String::new()),
        // The fake's snapshots are no overlay to put on a disk.
        size_disk_mib: Some(vec![0, 0, 0]),
        // Pre-created tasks would add containers of their own to the counts.
        precreate_max: Some(0),
        ..Default::default()
    };
    Config::load(o, None).unwrap()
}

impl Node {
    fn new(max_running: usize) -> Node {
        Self::on(tempfile::tempdir().unwrap(), Fake::default(), max_running)
    }

    /// A node on `dir` (a restart reuses the state dir and the fake).
    fn on(dir: tempfile::TempDir, fake: Fake, max_running: usize) -> Node {
        let cfg = Arc::new(config(dir.path(), max_running));
        std::fs::create_dir_all(cfg.actions_dir()).unwrap();
        let images = ImageService::new(
            crate::engine::store::ImageStore::new(crate::engine::Containerd::unconnected()),
            cfg.snapshotter.clone(),
            Vec::new(),
            Duration::from_secs(60),
        );
        let runner = Arc::new(Runner {
            cfg: cfg.clone(),
            engine: Arc::new(fake.clone()),
            runtimes: Runtimes::default(),
            images,
            template: SpecTemplate::load(None, None).unwrap(),
            reporter: Reporter::new("none", 1 << 20, &FlowTls::default()).unwrap(),
            networks: Networks::new(&cfg).unwrap(),
            disks: crate::disk::Disks::new(&cfg),
            store: Store::open(&cfg.store_path()).unwrap(),
            keepers: None,
            slots: tokio::sync::Semaphore::new(cfg.max_running),
            queued: Default::default(),
            budget: crate::runner::queue::Budget::for_host(
                cfg.max_total_memory_mib,
                cfg.max_total_pids,
            ),
            readiness: Default::default(),
            pool: crate::runner::pool::Pool::new(&cfg).unwrap(),
            cgroup_mount: dir.path().join("cgroup"),
            deferred: Default::default(),
        });
        Node {
            _dir: dir,
            fake,
            runner,
            actions: Arc::new(Actions::default()),
        }
    }

    fn cns(&self, ns: &str) -> String {
        self.runner.cfg.containerd_namespace(ns)
    }

    /// The image every action runs, cached in `ns` as after a pull; its
    /// user is this process's, so the data dir's chown needs no root.
    fn cache_image(&self, ns: &str) {
        let user = format!(
            "{}:{}",
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw()
        );
        let config = ImageConfigurationBuilder::default()
            .config(
                ConfigBuilder::default()
                    .entrypoint(vec!["/action".to_string()])
                    .user(user)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        let reference = crate::request::parse_reference(IMAGE).unwrap();
        self.runner.images.cache_for_test(
            &self.cns(ns),
            &reference,
            Image {
                name: IMAGE.into(),
                manifest_digest: "sha256:0".into(),
                resolved_digest: "sha256:0".into(),
                config,
                top_chain: Some("sha256:top".into()),
            },
        );
    }

    fn request(&self, ns: &str, id: &str, timeout: i64) -> RunIsolateRequest {
        RunIsolateRequest {
            namespace: Some(ns.into()),
            action_id: Some(id.into()),
            image: Some(IMAGE.into()),
            timeout: Some(timeout),
            data: Some(format!("input of {id}").into_bytes()),
            ..Default::default()
        }
    }

    /// Accepts an action as RunIsolate does and hands it to the runner.
    async fn accept(&self, wire: RunIsolateRequest) {
        self.cache_image(wire.namespace());
        let req = ActionRequest::validate(wire.clone(), &self.runner.cfg.limits()).unwrap();
        let handle = self.actions.claim(&req).unwrap();
        let place = self.runner.queued.reserve(100).unwrap();
        let record = StoredAction {
            request: Some(wire),
            state: ActionState::Accepted as i32,
            accepted_at_ms: now_ms(),
            ..Default::default()
        };
        self.runner.store.put(&record, Sync::Durable).await.unwrap();
        let action = Action::new(&self.runner.cfg, req, handle).queued(place);
        self.runner.spawn(action, record, Start::Fresh);
    }

    /// Polls until `f` holds, failing after `WAIT` with `what`.
    async fn until(&self, what: &str, f: impl Fn(&Node) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !f(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {what} within {WAIT:?}; calls: {:?}",
                self.fake.calls()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn info(&self, ns: &str, id: &str) -> Option<ActionInfo> {
        self.actions.get(ns, id)
    }

    async fn reported(&self, ns: &str, id: &str) -> ActionInfo {
        self.until(&format!("report of {id}"), |n| {
            n.info(ns, id)
                .is_some_and(|i| i.state() == ActionState::Reported)
        })
        .await;
        self.info(ns, id).unwrap()
    }

    async fn task_running(&self, ns: &str, id: &str) {
        let cns = self.cns(ns);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(t) = self.fake.task(&cns, id).await {
                if t.status == TaskStatus::Running {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "task {id} never ran; calls: {:?}",
                self.fake.calls()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The action writes `out` as its result and exits 0.
    fn finish(&self, ns: &str, id: &str, out: &[u8]) {
        let cns = self.cns(ns);
        let data = self
            .runner
            .cfg
            .actions_dir()
            .join(&cns)
            .join(id)
            .join("data");
        std::fs::write(data.join("data.out"), out).unwrap();
        self.fake.exit(&cns, id, 0);
    }

    fn nothing_left(&self, ns: &str, id: &str) {
        let cns = self.cns(ns);
        assert!(self.fake.is_empty(&cns), "{:?}", self.fake.objects(&cns));
        let dir = self.runner.cfg.actions_dir().join(&cns).join(id);
        assert!(!dir.exists(), "{} is left", dir.display());
    }
}

#[tokio::test]
async fn runs_to_its_report_and_releases_everything() {
    let n = Node::new(4);
    n.accept(n.request("ns", "a1", 60)).await;
    n.task_running("ns", "a1").await;
    n.finish("ns", "a1", b"result");
    let info = n.reported("ns", "a1").await;
    assert_eq!(info.error_code, "", "{}", info.error_message);
    assert_eq!(info.output, b"result");
    n.nothing_left("ns", "a1");
    // The stored record is gone once delivered.
    assert!(n.runner.store.load_all().unwrap().is_empty());
}

#[tokio::test]
async fn containerd_unavailable_then_back() {
    let n = Node::new(4);
    n.fake.set_down(true);
    n.accept(n.request("ns", "down", 60)).await;
    n.until("a failed call while containerd is down", |n| {
        n.fake.calls().iter().any(|c| c.starts_with("ping"))
    })
    .await;
    // Nothing is reported while containerd is away: it is nobody's fault.
    let info = n.info("ns", "down").unwrap();
    assert!(
        info.state() != ActionState::Finished && info.state() != ActionState::Reported,
        "{info:?}"
    );
    n.fake.set_down(false);
    n.task_running("ns", "down").await;
    n.finish("ns", "down", b"after the outage");
    let info = n.reported("ns", "down").await;
    assert_eq!(info.output, b"after the outage", "{}", info.error_message);
    n.nothing_left("ns", "down");
}

/// A release that meets containerd away (beside the delivery, containerd stopped just
/// after the report) is not forgotten: it waits, whole, and is done once containerd is
/// back.
#[tokio::test]
async fn a_release_that_meets_containerd_away_is_done_once_it_is_back() {
    let n = Node::new(4);
    let cns = n.cns("ns");
    n.fake.container(&cns, "left");
    let dir = n.runner.cfg.actions_dir().join(&cns).join("left");
    std::fs::create_dir_all(&dir).unwrap();
    n.fake.set_down(true);
    n.runner.remove_leftovers(&cns, "left", &dir).await;
    assert_eq!(n.runner.deferred.len(), 1, "not kept for later");
    assert!(!n.fake.is_empty(&cns), "containerd answered while down");
    assert!(dir.exists(), "the directory went before its task's delete");
    tokio::spawn(n.runner.clone().redo_releases());
    n.fake.set_down(false);
    n.until("the deferred release", |n| {
        n.fake.is_empty(&n.cns("ns")) && n.runner.deferred.is_empty()
    })
    .await;
    n.until("its directory removed", |_| !dir.exists()).await;
}

/// A release whose task containerd refuses to delete (every try of `ops::remove_action`
/// fails, containerd up, twice: the release and its first retry) keeps all of it: the
/// container, and the directory the task's rootfs wrote to, are not removed from under
/// the task; it is tried again after a pause and finishes once containerd lets it.
#[tokio::test]
async fn a_release_whose_task_delete_is_refused_is_tried_again() {
    let n = Node::new(4);
    let cns = n.cns("ns");
    tokio::spawn(n.runner.clone().redo_releases());
    n.accept(n.request("ns", "refused", 60)).await;
    n.task_running("ns", "refused").await;
    for _ in 0..6 {
        n.fake.fail_next("delete_task", Fail::Other);
    }
    n.finish("ns", "refused", b"kept");
    let info = n.reported("ns", "refused").await;
    assert_eq!(info.output, b"kept", "{}", info.error_message);
    n.until("the refused release kept", |n| n.runner.deferred.len() == 1)
        .await;
    // Its first retry (1 s on) is refused too: this holds until the second (2 s later).
    let dir = n.runner.cfg.actions_dir().join(&cns).join("refused");
    assert!(!n.fake.is_empty(&cns), "the container went before its task");
    assert!(dir.exists(), "the directory went before its task's delete");
    n.until("the release tried again", |n| {
        n.runner.deferred.is_empty() && n.fake.is_empty(&n.cns("ns"))
    })
    .await;
    n.nothing_left("ns", "refused");
}

#[tokio::test]
async fn a_snapshot_left_by_an_earlier_run_is_replaced() {
    let n = Node::new(4);
    let cns = n.cns("ns");
    n.fake
        .prepare_snapshot(
            &cns,
            Prepare {
                key: "again".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    n.accept(n.request("ns", "again", 60)).await;
    n.task_running("ns", "again").await;
    let calls = n.fake.calls();
    let prepares: Vec<usize> = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| c.starts_with("prepare_snapshot"))
        .map(|(i, _)| i)
        .collect();
    let removed = calls
        .iter()
        .position(|c| c.starts_with("remove_snapshot"))
        .expect("the old snapshot removed");
    assert!(
        prepares.len() == 3 && prepares[1] < removed && removed < prepares[2],
        "{calls:?}"
    );
    n.finish("ns", "again", b"ok");
    assert_eq!(n.reported("ns", "again").await.output, b"ok");
    n.nothing_left("ns", "again");
}

#[tokio::test]
async fn task_create_is_retried_after_a_leaked_bundle() {
    let n = Node::new(4);
    let bundle = n
        .runner
        .cfg
        .state_dir
        .join("io.containerd.runtime.v2.task")
        .join(n.cns("ns"))
        .join("leak");
    std::fs::create_dir_all(&bundle).unwrap();
    n.fake
        .fail_next("create_task", Fail::LeakedBundle(bundle.clone()));
    n.accept(n.request("ns", "leak", 60)).await;
    n.task_running("ns", "leak").await;
    assert!(!bundle.exists(), "the leaked bundle stays");
    n.finish("ns", "leak", b"ok");
    assert_eq!(n.reported("ns", "leak").await.error_code, "");
    n.nothing_left("ns", "leak");
}

#[tokio::test]
async fn a_failure_containerd_names_is_reported_and_cleaned_up() {
    let n = Node::new(4);
    n.fake.fail_next("create_container", Fail::Other);
    n.accept(n.request("ns", "broken", 60)).await;
    let info = n.reported("ns", "broken").await;
    assert_eq!(info.error_code, "au.com.direktiv.error.internal");
    assert!(
        info.error_message.contains("create_container"),
        "{}",
        info.error_message
    );
    n.nothing_left("ns", "broken");
}

#[tokio::test]
async fn cancel_while_queued_never_starts_it() {
    let n = Node::new(1);
    n.accept(n.request("ns", "first", 60)).await;
    n.task_running("ns", "first").await;
    n.accept(n.request("ns", "queued", 60)).await;
    let (_, cancel) = n.actions.cancel("ns", "queued", "not needed").unwrap();
    cancel.fire();
    let info = n.reported("ns", "queued").await;
    assert_eq!(info.error_code, "au.com.direktiv.error.cancelled");
    assert!(info.error_message.contains("not needed"));
    let made = |c: &String| {
        c.ends_with("/queued")
            && ["prepare_snapshot", "create_", "start_task"]
                .iter()
                .any(|op| c.starts_with(op))
    };
    assert!(
        !n.fake.calls().iter().any(made),
        "the cancelled action was created: {:?}",
        n.fake.calls()
    );
    n.finish("ns", "first", b"ok");
    n.reported("ns", "first").await;
    assert_eq!(n.runner.queued.waiting(), 0, "a queue place leaked");
}

/// A record left running by an earlier life, its task still there.
async fn running_before_the_crash(
    n: &Node,
    id: &str,
    deadline_ms: i64,
    cancel_reason: &str,
) -> StoredAction {
    let cns = n.cns("ns");
    n.fake.container(&cns, id);
    n.fake
        .create_task(
            &cns,
            crate::engine::NewTask {
                container_id: id.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    n.fake.start_task(&cns, id).await.unwrap();
    std::fs::create_dir_all(n.runner.cfg.actions_dir().join(&cns).join(id).join("data")).unwrap();
    let mut wire = n.request("ns", id, 30);
    wire.data = None;
    let record = StoredAction {
        request: Some(wire),
        state: ActionState::Running as i32,
        accepted_at_ms: now_ms() - 60_000,
        started_at_ms: now_ms() - 40_000,
        deadline_ms,
        cancel_reason: cancel_reason.into(),
        report: None,
        ..Default::default()
    };
    n.runner.store.put(&record, Sync::Durable).await.unwrap();
    record
}

#[tokio::test]
async fn a_deadline_passed_while_isolated_was_down_is_a_timeout() {
    let n = Node::new(4);
    running_before_the_crash(&n, "late", now_ms() - 10_000, "").await;
    let found = crate::recover::recover(&n.runner, &n.actions)
        .await
        .unwrap();
    assert_eq!(found.resumed, 1);
    let info = n.reported("ns", "late").await;
    assert_eq!(info.error_code, "au.com.direktiv.error.timeout", "{info:?}");
    n.nothing_left("ns", "late");
}

#[tokio::test]
async fn a_cancel_stored_before_a_crash_is_carried_out() {
    let n = Node::new(4);
    running_before_the_crash(
        &n,
        "stopme",
        now_ms() + 600_000,
        "action was cancelled: by the operator",
    )
    .await;
    crate::recover::recover(&n.runner, &n.actions)
        .await
        .unwrap();
    let info = n.reported("ns", "stopme").await;
    assert_eq!(info.error_code, "au.com.direktiv.error.cancelled");
    assert!(info.error_message.contains("by the operator"));
    n.nothing_left("ns", "stopme");
}

#[tokio::test]
async fn the_sweep_removes_orphans_and_keeps_what_it_knows() {
    let n = Node::new(4);
    let cns = n.cns("ns");
    // Known: stored and running. Orphans: a container and a snapshot of
    // isolated's that no record names. Foreign: unlabelled, left alone.
    running_before_the_crash(&n, "known", now_ms() + 600_000, "").await;
    n.fake.container(&cns, "orphan-c");
    n.fake
        .prepare_snapshot(
            &cns,
            Prepare {
                key: "orphan-s".into(),
                labels: HashMap::from([
                    (LABEL_MANAGED.to_string(), "true".to_string()),
                    (LABEL_ACTION_ID.to_string(), "orphan-s".to_string()),
                ]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    n.fake
        .create_container(
            "other-tenant",
            crate::engine::Container {
                id: "theirs".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    std::fs::create_dir_all(n.runner.cfg.actions_dir().join(&cns).join("stray")).unwrap();
    let found = crate::recover::recover(&n.runner, &n.actions)
        .await
        .unwrap();
    assert_eq!(found.orphans_removed, 3, "{found:?}");
    let left = n.fake.objects(&cns);
    assert_eq!(left, vec!["container known", "task known"], "{left:?}");
    assert_eq!(n.fake.objects("other-tenant"), vec!["container theirs"]);
    assert!(!n.runner.cfg.actions_dir().join(&cns).join("stray").exists());
    n.finish("ns", "known", b"ok");
    assert_eq!(n.reported("ns", "known").await.error_code, "");
}

#[tokio::test]
async fn a_spooled_input_reaches_data_in_and_goes_with_the_action() {
    let n = Node::new(4);
    n.cache_image("ns");
    let cns = n.cns("ns");
    // Accepted before a restart, as RunIsolate stores it: the input in the spool, the
    // record without it.
    let spool = crate::inputs::path(&n.runner.cfg.inputs_dir(), &cns, "spooled");
    crate::inputs::write(spool.clone(), b"from the spool".to_vec())
        .await
        .unwrap();
    let mut wire = n.request("ns", "spooled", 30);
    wire.data = None;
    let record = StoredAction {
        request: Some(wire),
        state: ActionState::Accepted as i32,
        accepted_at_ms: now_ms(),
        ..Default::default()
    };
    n.runner.store.put(&record, Sync::Durable).await.unwrap();
    // And one whose record is gone: its spooled input is swept.
    let stray = crate::inputs::path(&n.runner.cfg.inputs_dir(), &cns, "gone");
    crate::inputs::write(stray.clone(), b"x".to_vec())
        .await
        .unwrap();
    let found = crate::recover::recover(&n.runner, &n.actions)
        .await
        .unwrap();
    assert_eq!(found.restarted, 1);
    assert!(!stray.exists(), "the input of an unknown action is left");
    n.task_running("ns", "spooled").await;
    let data = n.runner.cfg.actions_dir().join(&cns).join("spooled/data");
    assert_eq!(
        std::fs::read(data.join("data.in")).unwrap(),
        b"from the spool"
    );
    n.finish("ns", "spooled", b"ok");
    assert_eq!(n.reported("ns", "spooled").await.output, b"ok");
    n.nothing_left("ns", "spooled");
    assert!(!spool.exists(), "the spooled input outlived its action");
}

/// A bug that panics in an action's task (here: containerd's fake panics
/// at the task's start) ends that action as an internal error naming the
/// panic, reported and released, instead of leaving it in flight; the
/// next action runs as usual.
#[tokio::test]
async fn a_panicked_action_task_is_reported_as_an_internal_error() {
    let n = Node::new(4);
    n.fake.fail_next("start_task", Fail::Panic);
    n.accept(n.request("ns", "boom", 60)).await;
    let info = n.reported("ns", "boom").await;
    assert_eq!(info.error_code, "au.com.direktiv.error.internal");
    assert!(
        info.error_message.contains("panicked")
            && info.error_message.contains("injected panic in start_task"),
        "{}",
        info.error_message
    );
    n.nothing_left("ns", "boom");
    assert!(n.runner.store.load_all().unwrap().is_empty());

    n.accept(n.request("ns", "after", 60)).await;
    n.task_running("ns", "after").await;
    n.finish("ns", "after", b"fine");
    assert_eq!(n.reported("ns", "after").await.output, b"fine");
}

/// containerd >= 1.7 deletes a task that exited while it was down when it
/// comes back, exit status and all: the action's result files stand for
/// it. Without any, the report says what was lost, as an internal error.
#[tokio::test]
async fn an_exit_lost_with_containerd_is_read_from_the_result_files() {
    let n = Node::new(4);
    for (id, out) in [
        ("kept", Some(&b"written before the exit"[..])),
        ("none", None),
    ] {
        n.accept(n.request("ns", id, 60)).await;
        n.task_running("ns", id).await;
        n.fake.set_down(true);
        if let Some(out) = out {
            let data = n
                .runner
                .cfg
                .actions_dir()
                .join(n.cns("ns"))
                .join(id)
                .join("data");
            std::fs::write(data.join("data.out"), out).unwrap();
        }
        n.fake.vanish(&n.cns("ns"), id);
        n.until("a lost wait", |n| {
            n.fake
                .calls()
                .iter()
                .filter(|c| *c == &format!("wait_task {}/{id}", n.cns("ns")))
                .count()
                >= 2
        })
        .await;
        n.fake.set_down(false);
        let info = n.reported("ns", id).await;
        match out {
            Some(out) => assert_eq!(info.output, out, "{}", info.error_message),
            None => {
                assert_eq!(info.error_code, "au.com.direktiv.error.internal");
                assert!(
                    info.error_message
                        .contains("exited while containerd was down"),
                    "{}",
                    info.error_message
                );
            }
        }
        n.nothing_left("ns", id);
    }
}
