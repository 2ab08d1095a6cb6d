//! `isolated`: the node daemon. Reads its settings, checks it can work
//! (root, the state dir's lock, containerd, the port), serves the gRPC
//! services and stops gracefully on SIGTERM/SIGINT, at once on a second
//! one. Errors end here as one line and a non-zero exit. What stopping
//! releases is decided here; what each part holds is that part's.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use direktiv_isolate::actions::Actions;
use direktiv_isolate::auth::{tls, Gate, TcpPolicy};
use direktiv_isolate::config::{Config, LogFormat, Options, ShimGroup};
use direktiv_isolate::control::ControlService;
use direktiv_isolate::disk::Disks;
use direktiv_isolate::embedded::Embedded;
use direktiv_isolate::engine::containerd::ContainerdEngine;
use direktiv_isolate::engine::store::ImageStore;
use direktiv_isolate::engine::Containerd;
use direktiv_isolate::engine::{Engine, Runtimes};
use direktiv_isolate::hostdir;
use direktiv_isolate::image::ImageService;
use direktiv_isolate::listen::{self, LocalSocket};
use direktiv_isolate::lock::StateLock;
use direktiv_isolate::metrics;
use direktiv_isolate::network::Networks;
use direktiv_isolate::proto::control::isolate_control_server::IsolateControlServer;
use direktiv_isolate::proto::isolate::direktiv_isolate_server::DirektivIsolateServer;
use direktiv_isolate::recover::recover;
use direktiv_isolate::report::flow::{FlowTls, Reporter};
use direktiv_isolate::runner::shim_keeper::ShimKeepers;
use direktiv_isolate::runner::Runner;
use direktiv_isolate::server::IsolateService;
use direktiv_isolate::spec::SpecTemplate;
use direktiv_isolate::store::Store;
use direktiv_isolate::text::error_chain;
use tokio::signal::unix::{signal, SignalKind};
use tonic::service::interceptor::InterceptedService;
use tracing::{info, warn};

#[derive(Parser)]
#[command(
    name = "isolated",
    version,
    about = "Runs Direktiv actions as containers through containerd",
    // A flag given twice: the last one wins, as in most daemons' command
    // lines, so a wrapper's defaults can be overridden after them.
    args_override_self = true
)]
struct Cli {
    /// TOML file with settings (flags and environment win over it).
    #[arg(long, env = "ISOLATED_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    options: Options,
    /// Prints a config file with every setting commented out at its
    /// default, and exits (what `make install` puts in /etc/isolated).
    #[arg(long, hide = true)]
    print_config: bool,
}

/// How long running actions get to finish after SIGTERM before isolated
/// exits anyway (their containers keep running under containerd), counted
/// from the signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long calls in flight (a RunIsolate's durable write, an import) get
/// after the signal before their connections are dropped. Watches end at
/// the signal itself; without a bound, one long call held the stop open
/// for as long as its action ran (issue 14: 42 s).
const SERVER_GRACE: Duration = Duration::from_secs(2);
/// How long the runtime waits for blocking work (file and store I/O) when
/// `run` has returned: what is unfinished is in the store.
const RUNTIME_GRACE: Duration = Duration::from_secs(1);

fn main() {
    tls::install_crypto_provider();
    let cli = Cli::parse();
    if cli.print_config {
        print!("{}", direktiv_isolate::config::example_toml());
        return;
    }
    let cfg = match Config::load(cli.options, cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("isolated: {e}");
            std::process::exit(2);
        }
    };
    init_logging(cfg.log_format, cfg.log_span_times);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("isolated: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = rt.block_on(run(cfg));
    rt.shutdown_timeout(RUNTIME_GRACE);
    if let Err(e) = result {
        tracing::error!("{e:#}");
        eprintln!("isolated: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(format: LogFormat, span_times: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal, not in a log file.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_span_events(if span_times {
            tracing_subscriber::fmt::format::FmtSpan::CLOSE
        } else {
            tracing_subscriber::fmt::format::FmtSpan::NONE
        })
        .with_writer(std::io::stderr);
    if format == LogFormat::Json {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init();
    } else {
        builder.init();
    }
}

async fn run(mut cfg: Config) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("isolated must run as root: it creates containers, cgroups and mounts");
    }
    // Root inside a restricted container may still lack what containerd's
    // shims and the data directories need.
    for cap in [caps::Capability::CAP_SYS_ADMIN, caps::Capability::CAP_CHOWN] {
        if !caps::has_cap(None, caps::CapSet::Effective, cap).unwrap_or(false) {
            bail!("isolated needs {cap} in its effective capability set");
        }
    }
    // Each namespace's OCI runtime, with its state under the embedded
    // containerd's directory when that is the one in use. A crun that this
    // host's cgroups would make fail every action stops the start here,
    // before anything is made.
    let embedded_dir = cfg
        .embedded_containerd
        .then(|| Embedded::dir_of(&cfg.state_dir));
    let runtimes = Runtimes::from_config(&cfg, embedded_dir.as_deref());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo to tell the host's cgroup layout")?;
    runtimes.check_host(&mountinfo)?;
    // Before anything is touched: a second isolated on this state dir
    // would take the first one's embedded containerd for a leftover and
    // stop it (issue 14). Held until the process ends.
    let _lock = StateLock::acquire(&cfg.state_dir)?;
    let template = SpecTemplate::load(
        non_empty(&cfg.base_spec).as_deref(),
        non_empty(&cfg.seccomp_profile).as_deref(),
    )?
    .with_capabilities(&cfg.capabilities)?;
    // Root only, whoever made it, and nothing an action writes honours
    // setuid or device nodes on the host (ISOLATE.md §8, issue 13).
    hostdir::secure_state_dir(&cfg.state_dir)?;
    std::fs::create_dir_all(cfg.actions_dir())
        .with_context(|| format!("cannot create state directory {}", cfg.state_dir.display()))?;
    if hostdir::mount_actions_dir(&cfg.actions_dir())? {
        info!(dir = %cfg.actions_dir().display(), "mounted the actions' directory nosuid,nodev");
    }
    // Nothing runs yet, so no action is creating one of these right now.
    remove_empty_dirs(&cfg.actions_dir());
    runtimes.prepare()?;
    // The embedded containerd replaces the configured address.
    let embedded = match cfg.embedded_containerd {
        true => Some(Embedded::start(&cfg.state_dir).await?),
        false => None,
    };
    if let Some(e) = &embedded {
        cfg.containerd_address = e.socket().to_owned();
    }
    let (cd, version) = Containerd::connect(&cfg.containerd_address).await?;
    info!(containerd = %version, address = %cfg.containerd_address.display(), "connected to containerd");

    let max_message = cfg.max_input_bytes.max(cfg.max_output_bytes) + (1 << 20);
    let reporter = Reporter::new(&cfg.flow_endpoint, max_message, &flow_tls(&cfg))?;
    // Who may call over TCP is settled before anything is served: a bad
    // tokens file or certificate stops the start here, with its name.
    let policy = TcpPolicy::from_config(&cfg)?;
    let networks = Networks::new(&cfg)?;
    let disks = Disks::new(&cfg);
    disks.prepare().await?;
    let store = Store::open(&cfg.store_path())?;
    // Archives of imports cut short by a crash: no import outlives its call.
    let _ = std::fs::remove_dir_all(cfg.state_dir.join("imports"));
    let tcp = match &policy {
        Some(p) => Some(listen::tcp(p.bind).await?),
        None => None,
    };
    let mut local = match cfg.socket.as_os_str().is_empty() {
        true => None,
        false => Some(LocalSocket::bind(&cfg.socket, &cfg.socket_group)?),
    };
    let cfg = Arc::new(cfg);
    let images = ImageService::new(
        ImageStore::new(cd.clone()),
        cfg.snapshotter.clone(),
        cfg.insecure_registries.clone(),
        cfg.tag_ttl(),
    );
    // The group annotation is the runc v2 shim's; another runtime would run
    // the keepers as sandboxes of their own and share nothing.
    let runc_shim = cfg.runtime == direktiv_isolate::config::RUNC_SHIM;
    if cfg.shim_group == ShimGroup::Namespace && !runc_shim {
        warn!(runtime = %cfg.runtime, "shim_group = \"namespace\" needs the runc v2 shim; every task gets a shim of its own");
    }
    // Every call of the lifecycle goes through the engine (issue 12).
    let engine: Arc<dyn Engine> = Arc::new(ContainerdEngine::new(cd.clone()));
    let keepers = match cfg.shim_group {
        ShimGroup::Namespace if runc_shim => Some(
            ShimKeepers::new(
                engine.clone(),
                runtimes.clone(),
                &cfg.runtime,
                &cfg.state_dir,
                Duration::from_secs(cfg.shim_keep_secs),
                match cfg.shims_per_namespace {
                    0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                    n => n,
                },
            )
            .context("cannot set up the shim keepers")?,
        ),
        _ => None,
    };
    let budget = direktiv_isolate::runner::queue::Budget::for_host(
        cfg.max_total_memory_mib,
        cfg.max_total_pids,
    );
    let (memory_mib, pids) = budget.totals();
    tracing::info!(
        memory_mib,
        pids,
        "budget of the running actions' memory and pids limits"
    );
    let runner = Arc::new(Runner {
        cfg: cfg.clone(),
        engine,
        runtimes,
        images,
        template,
        reporter,
        networks,
        disks,
        store,
        keepers,
        slots: tokio::sync::Semaphore::new(cfg.max_running),
        queued: Default::default(),
        budget,
        readiness: Default::default(),
        pool: direktiv_isolate::runner::pool::Pool::new(&cfg)
            .context("cannot write the launcher of pre-created tasks under the state dir")?,
        cgroup_mount: direktiv_isolate::engine::ops::CGROUP_MOUNT.into(),
        deferred: Default::default(),
    });
    let actions = Arc::new(Actions::default());
    recover(&runner, &actions)
        .await
        .context("cannot read the store to recover accepted actions")?;
    tokio::spawn(runner.clone().expire_pool());
    tokio::spawn(runner.clone().redo_releases());
    // Stops the listeners, and ends every watch (the control service).
    let stop = tokio_util::sync::CancellationToken::new();
    let control = ControlService {
        actions: actions.clone(),
        store: runner.store.clone(),
        images: runner.images.clone(),
        engine: runner.engine.clone(),
        namespace_prefix: cfg.namespace_prefix.clone(),
        import_dir: cfg.state_dir.join("imports"),
        import_budget: direktiv_isolate::image::import::SpoolBudget::new(cfg.max_import_bytes),
        stopping: stop.clone(),
        runner: runner.clone(),
    };
    let stop_metrics = tokio_util::sync::CancellationToken::new();
    if let Some(bind) = metrics::parse_bind(&cfg.metrics_bind)? {
        metrics::serve(bind, actions.clone(), stop_metrics.clone()).await?;
        info!(%bind, "metrics on /metrics");
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<DirektivIsolateServer<IsolateService>>()
        .await;
    health
        .set_serving::<IsolateControlServer<ControlService>>()
        .await;
    // NOT_SERVING while the node cannot take work (issue 17).
    tokio::spawn(runner.readiness.clone().keep_health(
        runner.clone(),
        health.clone(),
        stop.clone(),
    ));
    let isolate = Arc::new(IsolateService {
        runner: runner.clone(),
        actions: actions.clone(),
        limits: cfg.limits(),
        max_queued: cfg.max_queued,
    });
    let control = Arc::new(control);
    // Every service on both listeners, each behind its listener's gate;
    // health behind none, so probes need no credentials.
    let router = |gate: Gate, tls: Option<tonic::transport::ServerTlsConfig>| {
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = builder
                .tls_config(tls)
                .map_err(|e| anyhow::anyhow!("cannot set up TLS: {}", error_chain(&e)))?;
        }
        anyhow::Ok(
            builder
                .add_service(health_service.clone())
                .add_service(InterceptedService::new(
                    IsolateControlServer::from_arc(control.clone())
                        .max_decoding_message_size(max_message)
                        .max_encoding_message_size(max_message),
                    gate.clone(),
                ))
                .add_service(InterceptedService::new(
                    DirektivIsolateServer::from_arc(isolate.clone())
                        .max_decoding_message_size(max_message)
                        .max_encoding_message_size(max_message),
                    gate,
                )),
        )
    };
    let mut servers: Vec<futures::future::BoxFuture<'static, Result<(), tonic::transport::Error>>> =
        Vec::new();
    if let Some(incoming) = local.as_mut().and_then(|l| l.incoming()) {
        let r = router(Gate::local(), None)?;
        servers.push(Box::pin(r.serve_with_incoming_shutdown(
            incoming,
            stop.clone().cancelled_owned(),
        )));
    }
    if let (Some(incoming), Some(policy)) = (tcp, policy) {
        let tls = match &policy.tls {
            Some(t) => Some(tls::server_config(&t.cert, &t.key, t.client_ca.as_deref())?),
            None => None,
        };
        if let Some(tokens) = &policy.tokens {
            tokens.watch(stop.clone());
        }
        info!(bind = %policy.bind, tls = policy.tls.is_some(), client_certificates = policy.client_certs,
              tokens = policy.tokens.is_some(), "serving TCP");
        let r = router(Gate::tcp(policy), tls)?;
        servers.push(Box::pin(r.serve_with_incoming_shutdown(
            incoming,
            stop.clone().cancelled_owned(),
        )));
    }
    if let Some(l) = &local {
        info!(socket = %l.path().display(), "serving the local socket");
    }
    info!(flow = %cfg.flow_endpoint, "serving");
    let on_forced_exit: Box<dyn Fn() + Send + Sync> = match &embedded {
        Some(e) => Box::new(e.sigterm_hook()),
        None => Box::new(|| {}),
    };
    tokio::spawn(signals(stop.clone(), on_forced_exit));

    let served = futures::future::try_join_all(servers);
    tokio::pin!(served);
    let listener_ended = tokio::select! {
        r = &mut served => Some(r),
        _ = stop.cancelled() => None,
    };
    let stopping_since = tokio::time::Instant::now();
    // Queued actions stay accepted for the next start instead of starting
    // now, in a grace period that may not let them finish (issue 17).
    runner.readiness.drain("isolated is stopping");
    // One listener failing stops the other.
    stop.cancel();
    match listener_ended {
        Some(r) => {
            r.context("gRPC server failed")?;
        }
        None => match tokio::time::timeout(SERVER_GRACE, &mut served).await {
            Ok(r) => {
                r.context("gRPC server failed")?;
            }
            Err(_) => warn!(
                grace_ms = SERVER_GRACE.as_millis() as u64,
                "calls still open after the grace period; dropping their connections"
            ),
        },
    }
    drop(local);

    info!(
        running = actions.in_flight(),
        grace_secs = SHUTDOWN_GRACE.as_secs(),
        "stopped accepting; letting running actions finish"
    );
    // Beside the running actions' grace, not after it: pre-created tasks are in no
    // store, so a graceful stop removes them (issue 16).
    let (drained, ()) = tokio::join!(
        tokio::time::timeout_at(stopping_since + SHUTDOWN_GRACE, actions.drained()),
        runner.close_pool()
    );
    if drained.is_err() {
        warn!(
            unfinished = actions.in_flight(),
            "exiting with actions unfinished; they resume at the next start"
        );
    }
    if let Some(k) = &runner.keepers {
        k.remove_idle().await;
    }
    if drained.is_ok() {
        // No action uses the network namespaces' mount any more, nor its
        // directory under actions/ (issue 14: `make clean` failed on it).
        runner.networks.release_dir();
        remove_empty_dirs(&cfg.actions_dir());
        if let Err(e) = hostdir::unmount_actions_dir(&cfg.actions_dir()) {
            warn!(error = %e, "the actions' directory stays mounted");
        }
    }
    stop_metrics.cancel();
    if let Some(e) = embedded {
        e.shutdown().await;
    }
    info!("stopped");
    Ok(())
}

/// Removes the empty `actions/<namespace>/` directories (each action's own
/// directory is removed with the action, its namespace's is not). Only
/// while no action runs: one being prepared may have just created its
/// namespace's directory.
fn remove_empty_dirs(actions_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(actions_dir) else {
        return;
    };
    for e in entries.flatten() {
        // Fails, as it should, for a directory that is not empty.
        let _ = std::fs::remove_dir(e.path());
    }
}

fn flow_tls(cfg: &Config) -> FlowTls {
    FlowTls {
        ca: non_empty(&cfg.flow_ca),
        identity: non_empty(&cfg.flow_client_cert).zip(non_empty(&cfg.flow_client_key)),
    }
}

fn non_empty(p: &std::path::Path) -> Option<PathBuf> {
    (!p.as_os_str().is_empty()).then(|| p.to_owned())
}

/// The first SIGTERM or SIGINT starts the graceful stop (`stop`); a second
/// one exits at once: tokio's handler stays installed after the first, so
/// without this every further Ctrl-C was swallowed (issue 14). Nothing is
/// lost by that exit: accepted actions are in the store, their tasks keep
/// running under containerd, and the next start re-attaches to them.
async fn signals(
    stop: tokio_util::sync::CancellationToken,
    on_forced_exit: Box<dyn Fn() + Send + Sync>,
) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the default action (exit) still applies.
        return;
    };
    let (name, _) = next_signal(&mut term, &mut int).await;
    info!(
        signal = name,
        grace_secs = SHUTDOWN_GRACE.as_secs(),
        "stopping gracefully; a second signal exits at once"
    );
    stop.cancel();
    let (name, code) = next_signal(&mut term, &mut int).await;
    warn!(
        signal = name,
        "second signal: exiting now; unfinished actions resume at the next start"
    );
    on_forced_exit();
    std::process::exit(code);
}

/// The next SIGTERM or SIGINT: its name and the exit code of a process it
/// ends (128 + its number, as a shell reports it).
async fn next_signal(
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> (&'static str, i32) {
    tokio::select! {
        _ = term.recv() => ("SIGTERM", 128 + 15),
        _ = int.recv() => ("SIGINT", 128 + 2),
    }
}
