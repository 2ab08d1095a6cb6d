//! `make test-deploy` (issue 17): the deployments under `deploy/` are checked offline,
//! without a cluster, by the tools that will read them.
//!
//! - Kubernetes: Debian's own `kubectl` (deploy/fetch-kubectl.sh, given in
//!   `ISOLATED_TEST_KUBECTL`) builds the kustomization, and decodes every workload into
//!   its typed object (`kubectl set … --local`): a field kubectl does not know is dropped
//!   by that decode, so it shows as a difference from the manifest as written, and a value
//!   of the wrong type is kubectl's own decode error. The Secrets the README tells an
//!   operator to create are made with `kubectl create secret --dry-run=client` from files,
//!   and their keys must be what the config names.
//! - Nomad: the job is parsed as HCL (hcl-rs), and the command line it gives isolated is
//!   parsed by isolated's own settings, as is the Kubernetes config.toml.
//! - Both: every path the config names is inside a volume the manifest mounts.
//!
//! Owns those checks only; it runs no daemon.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use direktiv_isolate::config::{Config, Options};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn kubectl() -> PathBuf {
    match std::env::var_os("ISOLATED_TEST_KUBECTL") {
        Some(k) => PathBuf::from(k),
        None => panic!(
            "ISOLATED_TEST_KUBECTL is not set: run `make test-deploy`, which fetches Debian's kubectl"
        ),
    }
}

/// Runs kubectl; its stdout, or a panic with its stderr.
fn run_kubectl(args: &[&str], stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut cmd = Command::new(kubectl());
    cmd.args(args)
        // No kubeconfig of the machine's may steer it, and none is needed.
        .env("KUBECONFIG", "/dev/null")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("start kubectl");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("kubectl's stdin")
            .write_all(input.as_bytes())
            .expect("write to kubectl");
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().expect("wait for kubectl");
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kubectl prints UTF-8")
}

/// The kustomization as kubectl builds it, one JSON object per resource. `label --local`
/// keeps every field as written (it decodes nothing it does not need).
fn built() -> Vec<Value> {
    let dir = repo().join("deploy/kubernetes");
    let yaml = run_kubectl(&["kustomize", dir.to_str().expect("UTF-8 path")], None);
    let json = run_kubectl(
        &[
            "label",
            "--local",
            "-f",
            "-",
            "-o",
            "json",
            "deploy-check=1",
        ],
        Some(&yaml),
    );
    // One object per resource, one after the other.
    let mut items: Vec<Value> = serde_json::Deserializer::from_str(&json)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .expect("kubectl's JSON");
    for item in &mut items {
        if let Some(labels) = item
            .pointer_mut("/metadata/labels")
            .and_then(Value::as_object_mut)
        {
            labels.remove("deploy-check");
        }
    }
    items
}

fn of_kind<'a>(items: &'a [Value], kind: &str) -> &'a Value {
    items
        .iter()
        .find(|i| i["kind"] == kind)
        .unwrap_or_else(|| panic!("the kustomization has no {kind}"))
}

/// The paths under `a` that `b` lacks or holds otherwise: what a typed decode dropped.
fn differences(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => differences(&format!("{path}.{k}"), v, w, out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                differences(&format!("{path}[{i}]"), v, w, out);
            }
        }
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => {}
        _ if a == b => {}
        _ => out.push(format!("{path} ({a} became {b})")),
    }
}

/// Decodes `item` into its typed object with kubectl (`args`: a `set … --local` that only
/// adds) and says which of its fields that lost.
fn typed_loss(item: &Value, args: &[&str]) -> Vec<String> {
    let mut all = args.to_vec();
    all.extend(["--local", "-f", "-", "-o", "json"]);
    let json = run_kubectl(&all, Some(&item.to_string()));
    let typed: Value = serde_json::from_str(&json).expect("kubectl's JSON");
    let mut out = Vec::new();
    differences("", item, &typed, &mut out);
    out
}

#[test]
fn kubernetes_manifests_decode_without_losing_a_field() {
    let items = built();
    let ds = of_kind(&items, "DaemonSet");
    // `set env` decodes the whole DaemonSet, pod template included (the variable it adds
    // is only in the typed copy, which is not what is compared).
    let lost = typed_loss(ds, &["set", "env", "DEPLOY_CHECK=1"]);
    assert!(
        lost.is_empty(),
        "kubectl does not know DaemonSet fields: {lost:?}"
    );
    let svc = of_kind(&items, "Service");
    let lost = typed_loss(svc, &["set", "selector", "app.kubernetes.io/name=isolated"]);
    assert!(
        lost.is_empty(),
        "kubectl does not know Service fields: {lost:?}"
    );
}

/// A container's mounts and the pod's volumes, as (mountPath, volume).
fn mounts(ds: &Value) -> Vec<(String, Value, Value)> {
    let spec = &ds["spec"]["template"]["spec"];
    let volumes = spec["volumes"].as_array().expect("volumes");
    spec["containers"][0]["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .map(|m| {
            let name = &m["name"];
            let volume = volumes
                .iter()
                .find(|v| &v["name"] == name)
                .unwrap_or_else(|| panic!("no volume {name}"))
                .clone();
            (
                m["mountPath"].as_str().expect("mountPath").to_string(),
                m.clone(),
                volume,
            )
        })
        .collect()
}

/// The mount that holds `path`, if one does.
fn mount_of<'a>(
    mounts: &'a [(String, Value, Value)],
    path: &Path,
) -> Option<&'a (String, Value, Value)> {
    mounts
        .iter()
        .filter(|(at, _, _)| path.starts_with(at))
        .max_by_key(|(at, _, _)| at.len())
}

/// The config as isolated reads it: `args` on the command line over `file`.
fn isolated_config(args: &[String], file: Option<&Path>) -> Config {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        options: Options,
    }
    let cli =
        Cli::try_parse_from(std::iter::once("isolated".to_string()).chain(args.iter().cloned()))
            .unwrap_or_else(|e| panic!("isolated does not take {args:?}: {e}"));
    Config::load(cli.options, file).unwrap_or_else(|e| panic!("isolated refuses its config: {e}"))
}

#[test]
fn the_daemonset_gives_isolated_the_node_it_needs() {
    let items = built();
    let ds = of_kind(&items, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true, "actions' network is the node's");
    assert_eq!(
        pod["hostPID"], true,
        "the shim keepers check pids of the node"
    );
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], true);

    // The config the ConfigMap carries is one isolated takes, and every path it names is
    // on a volume: the node's where the node's containerd or runc must see it.
    let cm = of_kind(&items, "ConfigMap");
    let toml = cm["data"]["config.toml"]
        .as_str()
        .expect("config.toml in the ConfigMap");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("config.toml");
    std::fs::write(&file, toml).expect("write config");
    let args: Vec<String> = c["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_string())
        .collect();
    assert_eq!(args, ["--config", "/etc/isolated/config.toml"]);
    let cfg = isolated_config(&[], Some(&file));
    let mounts = mounts(ds);
    let config_mount =
        mount_of(&mounts, Path::new("/etc/isolated/config.toml")).expect("config mounted");
    assert_eq!(config_mount.1["subPath"], "config.toml");
    assert_eq!(
        config_mount.2["configMap"]["name"]
            .as_str()
            .map(|n| n.starts_with("isolated-config")),
        Some(true)
    );
    let host = |path: &Path, propagation: Option<&str>| {
        let (at, m, v) =
            mount_of(&mounts, path).unwrap_or_else(|| panic!("{} is on no volume", path.display()));
        assert_eq!(
            v["hostPath"]["path"].as_str(),
            Some(at.as_str()),
            "{} must be the node's own path",
            path.display()
        );
        if let Some(p) = propagation {
            assert_eq!(m["mountPropagation"], p, "{}", path.display());
        }
    };
    host(&cfg.state_dir, Some("Bidirectional"));
    host(&cfg.socket, None);
    host(Path::new(&cfg.containerd_address), None);
    host(Path::new("/sys/fs/cgroup"), None);
    let secret = |path: &Path, name: &str| {
        let (_, _, v) =
            mount_of(&mounts, path).unwrap_or_else(|| panic!("{} is on no volume", path.display()));
        assert_eq!(v["secret"]["secretName"], name, "{}", path.display());
    };
    secret(&cfg.tls_cert, "isolated-tls");
    secret(&cfg.tls_key, "isolated-tls");
    secret(&cfg.tls_client_ca, "isolated-tls");
    secret(&cfg.auth_tokens_file, "isolated-auth");

    // The Secrets as the README makes them hold exactly the files the config names.
    for (name, paths) in [
        (
            "isolated-tls",
            vec![&cfg.tls_cert, &cfg.tls_key, &cfg.tls_client_ca],
        ),
        ("isolated-auth", vec![&cfg.auth_tokens_file]),
    ] {
        let mut args = vec![
            "create".to_string(),
            "secret".into(),
            "generic".into(),
            name.into(),
            "--dry-run=client".into(),
            "-o".into(),
            "json".into(),
        ];
        for p in &paths {
            let f = dir.path().join(p.file_name().expect("file name"));
            std::fs::write(&f, "x").expect("write");
            args.push(format!("--from-file={}", f.display()));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let s: Value = serde_json::from_str(&run_kubectl(&args, None)).expect("secret JSON");
        let mut keys: Vec<&str> = s["data"]
            .as_object()
            .expect("data")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        let mut want: Vec<&str> = paths
            .iter()
            .map(|p| p.file_name().and_then(|f| f.to_str()).expect("file name"))
            .collect();
        want.sort();
        assert_eq!(keys, want, "secret {name}");
    }

    // Ready from gRPC health over the local socket the config serves.
    let probe: Vec<&str> = c["readinessProbe"]["exec"]["command"]
        .as_array()
        .expect("an exec readiness probe")
        .iter()
        .map(|a| a.as_str().expect("string"))
        .collect();
    assert_eq!(
        probe,
        [
            "/usr/local/bin/isolatectl",
            "--socket",
            cfg.socket.to_str().expect("UTF-8"),
            "health"
        ]
    );

    // The headless Service balances over the port isolated binds.
    let svc = of_kind(&items, "Service");
    assert_eq!(
        svc["spec"]["clusterIP"], "None",
        "headless, for dns:/// and round_robin"
    );
    let port = cfg.tcp_bind().expect("bind").expect("a TCP bind").port();
    assert_eq!(svc["spec"]["ports"][0]["port"], port);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "grpc");
    assert_eq!(c["ports"][0]["name"], "grpc");
    assert_eq!(c["ports"][0]["containerPort"], port);
    assert_eq!(
        svc["spec"]["selector"],
        ds["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"],
        ds["spec"]["template"]["metadata"]["labels"]
    );
}

#[test]
fn the_nomad_job_runs_isolated_on_every_node() {
    let text = std::fs::read_to_string(repo().join("deploy/nomad/isolated.nomad.hcl"))
        .expect("read the job");
    let body: hcl::Body =
        hcl::from_str(&text).unwrap_or_else(|e| panic!("the Nomad job is not HCL: {e}"));
    let v: Value = serde_json::to_value(hcl::Value::from(body)).expect("JSON");
    let job = &v["job"]["isolated"];
    assert_eq!(job["type"], "system", "one isolated per node");
    let group = &job["group"]["isolated"];
    let task = &group["task"]["isolated"];
    assert_eq!(task["driver"], "raw_exec");
    assert_eq!(task["kill_signal"], "SIGTERM");
    assert_eq!(task["config"]["command"], "/usr/local/bin/isolated");

    // isolated takes the command line, with Nomad's secrets dir in place.
    let args: Vec<String> = task["config"]["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| {
            a.as_str()
                .expect("string arg")
                .replace("${NOMAD_SECRETS_DIR}", "/secrets")
        })
        .collect();
    let (config_flag, rest) = args.split_at(2);
    assert_eq!(config_flag, ["--config", "/etc/isolated/config.toml"]);
    let cfg = isolated_config(rest, None);
    // Every file it names is one the job's templates render.
    let templates = task["template"].as_array().expect("templates");
    let rendered: Vec<String> = templates
        .iter()
        .map(|t| {
            t["destination"]
                .as_str()
                .expect("destination")
                .replace("${NOMAD_SECRETS_DIR}", "/secrets")
        })
        .collect();
    for p in [
        &cfg.tls_cert,
        &cfg.tls_key,
        &cfg.tls_client_ca,
        &cfg.auth_tokens_file,
    ] {
        assert!(
            rendered.iter().any(|r| Path::new(r) == p.as_path()),
            "{} is rendered by no template ({rendered:?})",
            p.display()
        );
    }
    // The service's port is the one isolated binds, checked by gRPC health.
    let port = cfg.tcp_bind().expect("bind").expect("a TCP bind").port();
    assert_eq!(group["network"]["port"]["grpc"]["static"], port);
    let check = &group["service"]["check"];
    assert_eq!(check["type"], "grpc");
    assert_eq!(check["grpc_service"], "isolate.DirektivIsolate");
    assert_eq!(check["grpc_use_tls"], true);
}
