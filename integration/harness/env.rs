//! The one shared environment of a test run: a temp dir, containerd, the open and the
//! private registry, the flow receiver and isolated, all started before the trials and torn
//! down after them, plus the calls every test makes against them.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use direktiv_isolate::proto::flow::ReportActionResultsRequest;
use direktiv_isolate::proto::isolate::direktiv_isolate_client::DirektivIsolateClient;
use direktiv_isolate::proto::isolate::RunIsolateRequest;
use tonic::transport::Channel;

use super::cleanup;
use super::cni::{self, TestNet};
use super::containerd::Containerd;
use super::flow::FlowReceiver;
use super::image::{self, ImageSpec, PushedImage};
use super::isolated::{Isolated, IsolatedConfig};
use super::mounts;
use super::process::free_port;
use super::registry::{Credentials, Registry};
use super::stale;

const STARTUP: Duration = Duration::from_secs(60);
/// Inputs may be 32 MiB (ISOLATE.md §2).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
const CONTAINERD_NS_PREFIX: &str = "direktiv.";

static ENV: OnceLock<Env> = OnceLock::new();

/// What `Env::start` brings up, before the runtime joins it in `Env`.
struct Started {
    containerd: Containerd,
    open_registry: Registry,
    private_registry: Registry,
    flow: FlowReceiver,
    isolated: Isolated,
    isolated_error: Option<String>,
    net: TestNet,
}

/// The environment, once `Env::init` has succeeded.
pub fn env() -> Option<&'static Env> {
    ENV.get()
}

pub struct Env {
    rt: tokio::runtime::Runtime,
    dir: PathBuf,
    pub containerd: Containerd,
    pub open_registry: Registry,
    pub private_registry: Registry,
    pub flow: FlowReceiver,
    pub isolated: Isolated,
    /// The CNI network (bridge, subnet, conflist) of `isolated`.
    pub net: TestNet,
    /// Why isolated did not come up at start; the trials that need it fail with this.
    isolated_error: Mutex<Option<String>>,
}

impl Env {
    /// Starts everything and makes it available through `env()`. On failure nothing that
    /// was started is left running and the temp dir is gone.
    pub fn init() -> Result<&'static Env> {
        direktiv_isolate::auth::tls::install_crypto_provider();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        stale::remove_stale_runs();
        // A short path: unix socket paths must stay under 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix(stale::TEMP_PREFIX)
            .tempdir_in("/tmp")?
            .keep();
        stale::claim(&dir)?;
        match rt.block_on(Self::start(&dir)) {
            Ok(s) => {
                let env = Env {
                    rt,
                    dir,
                    containerd: s.containerd,
                    open_registry: s.open_registry,
                    private_registry: s.private_registry,
                    flow: s.flow,
                    isolated: s.isolated,
                    isolated_error: Mutex::new(s.isolated_error),
                    net: s.net,
                };
                if ENV.set(env).is_err() {
                    panic!("Env::init called twice");
                }
                Ok(ENV.get().unwrap())
            }
            Err(e) => {
                // The processes were stopped when `start`'s locals were dropped.
                cni::remove_recorded(&dir);
                remove_dir(&dir);
                Err(e)
            }
        }
    }

    async fn start(dir: &Path) -> Result<Started> {
        let containerd = Containerd::start(&dir.join("cd"), STARTUP)
            .await
            .context("start containerd")?;
        let credentials = Credentials {
            user: "isolate-test".into(),
            password: format!("pw-{:016x}", rand::random::<u64>()),
        };
        let (open_dir, auth_dir) = (dir.join("reg-open"), dir.join("reg-auth"));
        let (open_registry, private_registry) = tokio::try_join!(
            Registry::start("open-registry", &open_dir, None, STARTUP),
            Registry::start("private-registry", &auth_dir, Some(credentials), STARTUP),
        )
        .context("start the registries")?;
        let flow = FlowReceiver::start()
            .await
            .context("start the flow receiver")?;
        let net = TestNet::create(dir).context("create the test network")?;
        let isolated = Isolated::new(IsolatedConfig::new(
            format!("127.0.0.1:{}", free_port()?).parse()?,
            flow.addr(),
            containerd.socket(),
            dir.join("state"),
            dir.join("isolated.log"),
            vec![
                // Each phase's duration in the log: where a slow test spent its time.
                "--log-span-times".into(),
                "--cni-conf-dir".into(),
                net.conf_dir.display().to_string(),
                // Its own metrics port: the default one may be a developer's isolated.
                "--metrics-bind".into(),
                format!("127.0.0.1:{}", free_port()?),
            ],
        ));
        // The harness's own trials still run when the daemon does not start.
        let isolated_error = match isolated.start(STARTUP).await {
            Ok(()) => None,
            Err(e) => {
                let msg = format!("{e:#}");
                eprintln!("harness: isolated did not start: {msg}");
                Some(msg)
            }
        };
        Ok(Started {
            containerd,
            open_registry,
            private_registry,
            flow,
            isolated,
            isolated_error,
            net,
        })
    }

    /// Runs `fut` to completion on the shared runtime (from a trial's thread).
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.rt.block_on(fut)
    }

    /// The run's temp dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn state_dir(&self) -> &Path {
        &self.isolated.config().state_dir
    }

    /// `direktiv.<ns>`
    pub fn containerd_namespace(ns: &str) -> String {
        format!(
            "{CONTAINERD_NS_PREFIX}{}",
            direktiv_isolate::request::containerd_name(ns)
        )
    }

    /// `<state-dir>/actions/direktiv.<ns>`, where isolated keeps the data dirs of `ns`.
    pub fn actions_dir(&self, ns: &str) -> PathBuf {
        self.state_dir()
            .join("actions")
            .join(Self::containerd_namespace(ns))
    }

    /// Notes a Direktiv namespace the run uses, for the clean-up after it (even after a
    /// crash).
    pub fn register_namespace(&self, ns: &str) {
        stale::record_namespace(&self.dir, &Self::containerd_namespace(ns));
    }

    /// Fails (with the reason and log tail) unless isolated started and is still up.
    pub fn require_isolated(&self) -> Result<()> {
        if let Some(e) = self.isolated_error.lock().unwrap().as_ref() {
            return Err(anyhow!("isolated did not start: {e}"));
        }
        self.isolated.ensure_running()
    }

    pub async fn isolate_client(&self) -> Result<DirektivIsolateClient<Channel>> {
        super::private::isolate_client(self.isolated.socket()).await
    }

    /// Calls RunIsolate; the gRPC status is the result.
    pub async fn run(&self, req: RunIsolateRequest) -> Result<(), tonic::Status> {
        let mut client = self
            .isolate_client()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
        client.run_isolate(req).await.map(|_| ())
    }

    /// RunIsolate, then the report of its action id.
    pub async fn run_and_wait(
        &self,
        req: RunIsolateRequest,
        timeout: Duration,
    ) -> Result<ReportActionResultsRequest> {
        let action_id = req.action_id.clone().unwrap_or_default();
        self.run(req)
            .await
            .map_err(|s| anyhow!("RunIsolate({action_id}) failed: {s}"))?;
        self.flow.wait_report(&action_id, timeout).await
    }

    pub async fn push_image(
        &self,
        registry: &Registry,
        repository: &str,
        tag: &str,
        spec: &ImageSpec,
    ) -> Result<PushedImage> {
        image::push(registry, repository, tag, spec).await
    }

    /// Stops everything this run started, removes what it left in containerd, unmounts
    /// what is mounted under the temp dir and removes it. Returns the leaks it cleaned up.
    pub fn teardown(&self) -> Vec<String> {
        let mut leaks = Vec::new();
        self.isolated.stop(Duration::from_secs(20));
        self.flow.shutdown();
        match self.rt.block_on(self.containerd.sweep()) {
            Ok(swept) => leaks.extend(swept),
            Err(e) => leaks.push(format!("could not sweep containerd: {e:#}")),
        }
        self.containerd.stop(Duration::from_secs(10));
        for pid in stale::shims_of(&self.dir) {
            leaks.push(format!("shim pid {pid} still running, killed"));
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // The runc shim keeps its state in /run/containerd/runc/<namespace> whatever
        // containerd's state dir is and leaves that directory behind; isolated leaves the
        // namespace level of its cgroup paths. The run's namespaces are its own.
        for ns in stale::recorded_namespaces(&self.dir) {
            let _ = std::fs::remove_dir(Path::new("/run/containerd/runc").join(&ns));
            leaks.extend(cleanup::remove_namespace_cgroups(&ns));
        }
        self.open_registry.stop(Duration::from_secs(5));
        self.private_registry.stop(Duration::from_secs(5));
        // Bridges are host-wide: removed even when the temp dir is kept.
        leaks.extend(cni::remove_recorded(&self.dir));
        if std::env::var_os("ISOLATE_TEST_KEEP").is_some() {
            // Unclaimed, so that the next run does not take it for a crashed run's.
            stale::release(&self.dir);
            eprintln!(
                "harness: ISOLATE_TEST_KEEP set, keeping {}",
                self.dir.display()
            );
            return leaks;
        }
        remove_dir(&self.dir);
        leaks
    }
}

/// Unmounts everything below `dir`, then removes it.
fn remove_dir(dir: &Path) {
    let unmounted = mounts::unmount_under(dir);
    for dev in mounts::detach_loops_under(dir) {
        eprintln!("harness: detached {dev}");
    }
    if !unmounted.is_empty() {
        eprintln!(
            "harness: unmounted {} leftover mount(s) under {}",
            unmounted.len(),
            dir.display()
        );
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        eprintln!("harness: could not remove {}: {e}", dir.display());
    }
}
