//! The engine's classifier (issue 12) against the containerd under test: each failure
//! the lifecycle branches on is provoked for real and must come back as its kind, so a
//! containerd whose words changed (1.6, 1.7, 2.x: `ISOLATED_TEST_CONTAINERD` runs this
//! against each) fails here rather than in a crash recovery months later.

use anyhow::{ensure, Context, Result};
use direktiv_isolate::engine::containerd::ContainerdEngine;
use direktiv_isolate::engine::runtime::DEFAULT_RUNC_ROOT;
use direktiv_isolate::engine::Containerd;
use direktiv_isolate::engine::{ops, Container, Engine, EngineError, NewTask, Prepare};
use libtest_mimic::Trial;

use crate::harness::{trial, Ctx, Env};

pub fn trials() -> Vec<Trial> {
    vec![trial(
        "engine::classifier_on_this_containerd",
        classifier_on_this_containerd,
    )]
}

async fn classifier_on_this_containerd(t: Ctx) -> Result<()> {
    let (cd, version) = Containerd::connect(t.env.containerd.socket()).await?;
    let engine = ContainerdEngine::new(cd);
    let cns = Env::containerd_namespace(&t.ns);
    let id = t.action_id("engine");

    let e = engine.delete_container(&cns, &id).await.err();
    captured(&version, &e);
    ensure!(
        e.as_ref().is_some_and(EngineError::is_not_found),
        "containerd {version}: deleting a missing container gave {e:?}"
    );
    let e = engine.delete_task(&cns, &id).await.err();
    captured(&version, &e);
    ensure!(
        e.as_ref().is_some_and(EngineError::is_not_found),
        "containerd {version}: deleting a missing task gave {e:?}"
    );

    let prepare = Prepare {
        snapshotter: "overlayfs".into(),
        key: id.clone(),
        ..Default::default()
    };
    engine.prepare_snapshot(&cns, prepare.clone()).await?;
    let e = engine.prepare_snapshot(&cns, prepare).await.err();
    captured(&version, &e);
    ensure!(
        e.as_ref().is_some_and(EngineError::is_already_exists),
        "containerd {version}: preparing a snapshot twice gave {e:?}"
    );

    // A task create cut short leaves its bundle: the next create names it.
    let spec = prost_types::Any {
        type_url: "types.containerd.io/opencontainers/runtime-spec/1/Spec".into(),
        value: br#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"process":{"args":["/bin/true"],"cwd":"/"},"mounts":[{"destination":"/proc","type":"proc","source":"proc"}],"linux":{"namespaces":[{"type":"mount"},{"type":"pid"}]}}"#.to_vec(),
    };
    engine
        .create_container(
            &cns,
            Container {
                id: id.clone(),
                runtime: Some(containerd_client::services::v1::container::Runtime {
                    name: "io.containerd.runc.v2".into(),
                    options: None,
                }),
                spec: Some(spec),
                snapshotter: "overlayfs".into(),
                snapshot_key: id.clone(),
                ..Default::default()
            },
        )
        .await?;
    let bundle = t
        .env
        .containerd
        .state_dir()
        .join("io.containerd.runtime.v2.task")
        .join(&cns)
        .join(&id);
    std::fs::create_dir_all(&bundle)?;
    let task = NewTask {
        container_id: id.clone(),
        ..Default::default()
    };
    let e = engine.create_task(&cns, task).await.err();
    match &e {
        Some(EngineError::LeakedBundle { bundle: named, .. }) => ensure!(
            named == &bundle,
            "containerd {version}: the leaked bundle named is {}, not {}",
            named.display(),
            bundle.display()
        ),
        other => anyhow::bail!(
            "containerd {version}: a create over a leaked bundle gave {other:?}, not LeakedBundle"
        ),
    }
    captured(&version, &e);
    ops::remove_leaked_bundle(&bundle, &cns, &id);
    ensure!(!bundle.exists(), "the leaked bundle was not removed");

    // With no rootfs mounts the bundle's rootfs is empty: runc's init cannot
    // find the process's executable, which a shell would call exit 127.
    let task = NewTask {
        container_id: id.clone(),
        ..Default::default()
    };
    let e = engine.create_task(&cns, task).await.err();
    captured(&version, &e);
    ensure!(
        matches!(
            &e,
            Some(EngineError::Exec { path, exit_code: 127, .. }) if path == "/bin/true"
        ),
        "containerd {version}: a task whose executable is missing gave {e:?}, not Exec 127"
    );

    // runc's state dir holding the id (a create cut short after runc's own
    // create): runc refuses the id, which the lifecycle clears and retries.
    // (The failed create above may leave its bundle while the shim winds down.)
    ops::remove_leaked_bundle(&bundle, &cns, &id);
    let runc_ns = std::path::Path::new(DEFAULT_RUNC_ROOT).join(&cns);
    let runc_dir = runc_ns.join(&id);
    std::fs::create_dir_all(&runc_dir)?;
    let task = NewTask {
        container_id: id.clone(),
        ..Default::default()
    };
    let e = engine.create_task(&cns, task).await.err();
    captured(&version, &e);
    let _ = std::fs::remove_dir_all(&runc_ns);
    ensure!(
        matches!(&e, Some(EngineError::RuncIdTaken { .. })),
        "containerd {version}: a create over runc's own state of the id gave {e:?}, not RuncIdTaken"
    );

    ops::remove_action(&engine, &cns, &id, "overlayfs")
        .await
        .context("remove_action")?;
    let e = engine.delete_container(&cns, &id).await.err();
    ensure!(
        e.as_ref().is_some_and(EngineError::is_not_found),
        "after remove_action the container is still there: {e:?}"
    );
    Ok(())
}

/// Prints containerd's own words for an error, so that the classifier's unit tests
/// (src/engine/error.rs) can hold the messages of every build the matrix runs.
fn captured(version: &str, e: &Option<EngineError>) {
    if let Some(e) = e {
        eprintln!("engine: containerd {version} answered: {e:?}");
    }
}
