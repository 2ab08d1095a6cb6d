//! `isolatectl`: the operator's command line for one `isolated` node. Runs
//! an action and prints its result, lists, shows, cancels actions and their
//! logs, retries or drops reports the flow engine would not take, and
//! imports, lists and removes a namespace's images, all through the node's
//! control service and `RunIsolate`: over the local socket by default, or
//! over TCP with a bearer token and/or TLS (`direktiv_isolate::client`).
//! Also makes new bearer tokens (`token new`), without any daemon.
//!
//! Owns presentation and exit codes only: 0 success, 1 an action (or the
//! call) failed, 2 a usage error or no daemon to talk to. Every decision
//! about actions is the daemon's.

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use direktiv_isolate::actions::state_name;
use direktiv_isolate::auth::{tls, tokens};
use direktiv_isolate::client::{self, Authed, Bearer, ClientError, Target};
use direktiv_isolate::proto::control::isolate_control_client::IsolateControlClient;
use direktiv_isolate::proto::control::{
    ActionInfo, ActionRef, ActionState, CancelIsolateRequest, CapacityRequest, CapacityResponse,
    DrainRequest, ImageInfo, ImportImageRequest, ListImagesRequest, ListIsolatesRequest,
    ListPoolRequest, PoolInfo, RemoveImageRequest,
};
use direktiv_isolate::proto::isolate::direktiv_isolate_client::DirektivIsolateClient;
use direktiv_isolate::proto::isolate::RunIsolateRequest;
use direktiv_isolate::text::one_line;
use serde_json::{json, Value};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Inputs and outputs may be 32 MiB each (ISOLATE.md §2, §4), plus room.
const MAX_MESSAGE: usize = 64 << 20;
/// The request's fields besides the input, at most: a command of 64 KiB,
/// 64 registries of 8 KiB (ISOLATE.md §8), ids and the image.
const REQUEST_OVERHEAD: usize = 1 << 20;
/// The node's input limit unless its operator changed it (`max_input_bytes`).
const DEFAULT_MAX_INPUT: usize = 32 << 20;
const IMPORT_CHUNK: usize = 1 << 20;

#[derive(Parser)]
#[command(
    name = "isolatectl",
    version,
    about = "Runs and inspects Direktiv actions on an isolated node",
    after_help = "Exit codes: 0 success, 1 the action or the call failed, 2 usage error or no daemon."
)]
struct Cli {
    #[command(flatten)]
    conn: ConnArgs,
    /// Print JSON on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where isolated is and how to prove who we are.
#[derive(clap::Args)]
struct ConnArgs {
    /// isolated's local socket (used unless --addr is given).
    #[arg(
        long,
        env = "ISOLATECTL_SOCKET",
        default_value = "/run/isolated/isolated.sock",
        global = true
    )]
    socket: PathBuf,
    /// isolated's TCP address (host:port, http://… or https://…) instead of the socket.
    #[arg(long, env = "ISOLATECTL_ADDR", global = true)]
    addr: Option<String>,
    /// Bearer token for --addr (prefer ISOLATECTL_TOKEN or --token-file: arguments are visible to other users).
    #[arg(long, env = "ISOLATECTL_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// File whose first line is the bearer token for --addr.
    #[arg(
        long,
        env = "ISOLATECTL_TOKEN_FILE",
        conflicts_with = "token",
        global = true
    )]
    token_file: Option<PathBuf>,
    /// CA (PEM) that isolated's certificate must chain to; implies TLS for --addr.
    #[arg(long, env = "ISOLATECTL_CA", global = true)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with --key; implies TLS for --addr.
    #[arg(long, env = "ISOLATECTL_CERT", requires = "key", global = true)]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, env = "ISOLATECTL_KEY", requires = "cert", global = true)]
    key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run an action, follow it to its end, print its output (or its error).
    Run(RunArgs),
    /// List the actions the node knows (running, undeliverable, and recently reported).
    Ls {
        /// Only this namespace.
        #[arg(long, short)]
        namespace: Option<String>,
        /// Only actions in this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// The pre-created tasks waiting for actions instead (per namespace, image digest and size).
        #[arg(long, conflicts_with = "state")]
        pool: bool,
        /// With --pool: remove every pre-created task first (they come back with the next actions).
        #[arg(long = "drop", requires = "pool")]
        drop_pool: bool,
    },
    /// Show one action: state, times, result.
    Get(ActionArgs),
    /// Print the kept tails of an action's stdout (on stdout) and stderr (on stderr).
    Logs(ActionArgs),
    /// Stop a running action; it is reported as cancelled.
    Cancel {
        #[command(flatten)]
        action: ActionArgs,
        /// Why, for the report's errorMessage.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Reports the flow engine refused for longer than report_give_up_secs (undeliverable).
    #[command(subcommand)]
    Report(ReportCmd),
    /// Images of a namespace.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Whether the node takes work (gRPC health of isolate.DirektivIsolate): exit 0 when SERVING, 1 when not (a readiness probe).
    Health,
    /// What the node can take now: free running and queue places, and whether an image is cached in a namespace.
    Capacity {
        /// With --image: the namespace to look in.
        #[arg(long, short, requires = "image")]
        namespace: Option<String>,
        /// Whether this image is cached in --namespace.
        #[arg(long, requires = "namespace")]
        image: Option<String>,
    },
    /// Stop the node taking work: running actions finish, queued ones stay for its next start (node-wide).
    Drain {
        /// Return once no action runs.
        #[arg(long)]
        wait: bool,
    },
    /// Bearer tokens for isolated's auth_tokens_file.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Import the images of an OCI archive (OCI image layout as tar) into a namespace.
    Import {
        /// The archive (`-` reads it from stdin).
        file: PathBuf,
        /// The Direktiv namespace that gets the images.
        #[arg(long, short, default_value = "default")]
        namespace: String,
    },
    /// List the images of a namespace: name, digest, size, imported or pulled.
    Ls {
        /// The Direktiv namespace.
        #[arg(long, short, default_value = "default")]
        namespace: String,
    },
    /// Remove an image from a namespace (its content goes once nothing uses it).
    Rm {
        /// The image, as `image ls` shows it or as an action names it.
        name: String,
        /// The Direktiv namespace.
        #[arg(long, short, default_value = "default")]
        namespace: String,
    },
}

#[derive(Subcommand)]
enum ReportCmd {
    /// Deliver an undeliverable report again now, with a fresh give-up clock.
    Retry(ActionArgs),
    /// Remove an undeliverable report for good: the flow engine never gets it.
    Drop {
        #[command(flatten)]
        action: ActionArgs,
        /// Do not ask for confirmation (needed when stdin is not a terminal).
        #[arg(long, short)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Print a fresh secret (on stdout) and the tokens-file entry that accepts it (on
    /// stderr); the daemon only ever stores the entry's hash.
    New {
        /// The token's name, as isolated's log shows it.
        name: String,
        /// A Direktiv namespace it may use (repeatable); "*" is all.
        #[arg(long, short, required = true)]
        namespace: Vec<String>,
    },
}

#[derive(clap::Args)]
struct ActionArgs {
    /// The action's id.
    action_id: String,
    /// Its Direktiv namespace.
    #[arg(long, short, default_value = "default")]
    namespace: String,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Image reference (a name alone means docker.io/library/NAME:latest).
    #[arg(long, short)]
    image: String,
    /// Direktiv namespace to run in.
    #[arg(long, short, default_value = "default")]
    namespace: String,
    /// Command replacing the image's entrypoint and cmd (split like a shell would, not run by one).
    #[arg(long, short)]
    command: Option<String>,
    /// Input bytes (data.in).
    #[arg(long, short, conflicts_with = "data_file")]
    data: Option<String>,
    /// File with the input bytes; `-` is stdin. Without --data or --data-file, a
    /// piped stdin is the input.
    #[arg(long)]
    data_file: Option<PathBuf>,
    /// Timeout in seconds (0: the node's default).
    #[arg(long, default_value_t = 0)]
    timeout: i64,
    /// Size: 0/small, 1/medium, 2/large.
    #[arg(long, default_value = "small", value_parser = parse_size)]
    size: i32,
    /// Registry credentials, host=user!password (repeatable).
    #[arg(long = "registry", value_name = "HOST=USER!PASSWORD")]
    registries: Vec<String>,
    /// Action id (default: a fresh ctl-<hex>).
    #[arg(long)]
    action_id: Option<String>,
    /// instanceId passed through to the report.
    #[arg(long)]
    instance_id: Option<String>,
    /// step passed through to the report.
    #[arg(long)]
    step: Option<i32>,
}

#[derive(Clone, Copy, ValueEnum)]
enum StateArg {
    Accepted,
    Pulling,
    Running,
    Finished,
    Reported,
    Undeliverable,
}

impl From<StateArg> for ActionState {
    fn from(s: StateArg) -> ActionState {
        match s {
            StateArg::Accepted => ActionState::Accepted,
            StateArg::Pulling => ActionState::Pulling,
            StateArg::Running => ActionState::Running,
            StateArg::Finished => ActionState::Finished,
            StateArg::Reported => ActionState::Reported,
            StateArg::Undeliverable => ActionState::Undeliverable,
        }
    }
}

fn parse_size(s: &str) -> Result<i32, String> {
    match s {
        "0" | "small" => Ok(0),
        "1" | "medium" => Ok(1),
        "2" | "large" => Ok(2),
        _ => Err("use 0/small, 1/medium or 2/large".into()),
    }
}

/// Why isolatectl stops, with its exit code.
struct Failure {
    code: u8,
    message: String,
}

type Outcome<T> = Result<T, Failure>;

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

fn failed(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

/// A gRPC error as one line: no daemon and bad arguments are exit 2,
/// anything the daemon refused for another reason exit 1.
fn call_failed(what: &str, s: tonic::Status) -> Failure {
    let code = match s.code() {
        Code::Unavailable | Code::InvalidArgument | Code::Unimplemented | Code::Unauthenticated => {
            2
        }
        _ => 1,
    };
    let detail = if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        s.message().to_string()
    };
    Failure {
        code,
        message: format!("{what}: {detail}"),
    }
}

fn main() -> std::process::ExitCode {
    tls::install_crypto_provider();
    let cli = Cli::parse();
    if let Cmd::Completions { shell } = cli.cmd {
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "isolatectl",
            &mut std::io::stdout(),
        );
        return std::process::ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("isolatectl: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(f) => {
            eprintln!("isolatectl: {}", f.message);
            std::process::ExitCode::from(f.code)
        }
    }
}

struct Clients {
    control: IsolateControlClient<Authed>,
    isolate: DirektivIsolateClient<Authed>,
    health: HealthClient<Authed>,
}

/// The local socket unless --addr is given; over TCP, TLS with --ca,
/// --cert or an https:// address, and the token on every call.
async fn connect(cli: &ConnArgs) -> Outcome<Clients> {
    let token = match &cli.token_file {
        Some(f) => Some(
            client::read_token_file(f)
                .map_err(|e| usage(format!("cannot read the token file {}: {e}", f.display())))?,
        ),
        None => cli.token.clone(),
    };
    let target = match &cli.addr {
        None => {
            if token.is_some() || cli.ca.is_some() || cli.cert.is_some() {
                return Err(usage(
                    "--token, --token-file, --ca and --cert are for --addr: the local socket needs none",
                ));
            }
            Target::Socket(cli.socket.clone())
        }
        Some(addr) => {
            let tls = match (cli.ca.is_some() || cli.cert.is_some(), &cli.cert, &cli.key) {
                (false, _, _) => None,
                (true, cert, key) => Some(
                    tls::client_config(
                        cli.ca.as_deref(),
                        cert.as_deref().zip(key.as_deref()),
                        ["--ca", "--cert", "--key"],
                    )
                    .map_err(|e| usage(e.to_string()))?,
                ),
            };
            Target::Tcp {
                addr: addr.clone(),
                tls,
            }
        }
    };
    let channel = client::connect(&target).await.map_err(|e| {
        usage(match e {
            ClientError::Unreachable { .. } => format!(
                "{e} (is it running? --socket, ISOLATECTL_SOCKET, or --addr for TCP; the socket is root's unless socket_group is set)"
            ),
            e => e.to_string(),
        })
    })?;
    let bearer = Bearer::new(token.as_deref()).map_err(|e| usage(e.to_string()))?;
    Ok(Clients {
        control: IsolateControlClient::with_interceptor(channel.clone(), bearer.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        isolate: DirektivIsolateClient::with_interceptor(channel.clone(), bearer.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        health: HealthClient::with_interceptor(channel, bearer),
    })
}

/// An input this client cannot even send: refused here with a line naming
/// the limit, before a byte goes out (issue 14: a raw transport error).
fn check_input_size(len: usize) -> Outcome<()> {
    if len + REQUEST_OVERHEAD > MAX_MESSAGE {
        return Err(usage(format!(
            "the input is {} ({len} bytes); isolatectl sends at most {} ({} bytes), and a node takes {} unless its max_input_bytes says more",
            human_bytes(len),
            human_bytes(MAX_MESSAGE - REQUEST_OVERHEAD),
            MAX_MESSAGE - REQUEST_OVERHEAD,
            human_bytes(DEFAULT_MAX_INPUT),
        )));
    }
    Ok(())
}

/// The node's refusal of a request too large for its gRPC limit
/// (OUT_OF_RANGE from tonic's decoder, RESOURCE_EXHAUSTED from grpc-go's)
/// as a line naming the input's size and the limit, not the transport's.
fn refused_size(input: usize, s: &tonic::Status) -> Option<Failure> {
    let message = s.message();
    let about_size = matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted)
        && (message.contains("message length too large")
            || message.contains("larger than max")
            || message.contains("message too large"));
    if !about_size {
        return None;
    }
    // tonic: "... found N bytes, the limit is: M bytes"; grpc-go: "... (N vs. M)".
    let limit = message
        .rsplit_once("the limit is: ")
        .and_then(|(_, rest)| rest.split(' ').next())
        .or_else(|| {
            message
                .rsplit_once(" vs. ")
                .and_then(|(_, rest)| rest.split(')').next())
        })
        .and_then(|n| n.trim().parse::<usize>().ok());
    let limit = match limit {
        Some(m) => format!("messages of at most {} ({m} bytes)", human_bytes(m)),
        None => "smaller messages".to_string(),
    };
    Some(usage(format!(
        "the node refused the action: the input is {} ({input} bytes), and the node takes {limit}; its max_input_bytes (default {}) bounds the input",
        human_bytes(input),
        human_bytes(DEFAULT_MAX_INPUT),
    )))
}

async fn dispatch(cli: Cli) -> Outcome<u8> {
    let json = cli.json;
    match cli.cmd {
        Cmd::Run(args) => {
            // Read the input before connecting: a bad --data-file is a usage
            // error whether or not the daemon is up.
            let data = read_input(&args)?;
            check_input_size(data.len())?;
            let registries = parse_registries(&args.registries)?;
            let c = connect(&cli.conn).await?;
            run(c, args, data, registries, json).await
        }
        Cmd::Ls {
            namespace,
            pool: true,
            drop_pool,
            ..
        } => {
            let mut c = connect(&cli.conn).await?;
            let pool = c
                .control
                .list_pool(ListPoolRequest {
                    drop: drop_pool,
                    namespace: namespace.clone().unwrap_or_default(),
                })
                .await
                .map_err(|s| call_failed("cannot list the pre-created tasks", s))?
                .into_inner();
            let keys: Vec<&PoolInfo> = pool.keys.iter().collect();
            if json {
                print_json(&json!({
                    "dropped": pool.dropped,
                    "keys": keys.iter().map(|k| json!({
                        "namespace": k.namespace,
                        "image": k.image,
                        "digest": k.digest,
                        "size": k.size,
                        "entries": k.entries,
                        "target": k.target,
                    })).collect::<Vec<_>>(),
                }));
            } else {
                if drop_pool {
                    println!("removed {} pre-created tasks", pool.dropped);
                }
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.namespace.clone(),
                            k.image.clone(),
                            k.digest.clone(),
                            k.size.to_string(),
                            k.entries.to_string(),
                            k.target.to_string(),
                        ]
                    })
                    .collect();
                print_columns(
                    &["NAMESPACE", "IMAGE", "DIGEST", "SIZE", "ENTRIES", "TARGET"],
                    &rows,
                );
            }
            Ok(0)
        }
        Cmd::Ls {
            namespace, state, ..
        } => {
            let mut c = connect(&cli.conn).await?;
            let req = ListIsolatesRequest {
                namespace: namespace.unwrap_or_default(),
                state: state.map_or(ActionState::Unspecified, ActionState::from) as i32,
            };
            let list = c
                .control
                .list_isolates(req)
                .await
                .map_err(|s| call_failed("cannot list actions", s))?
                .into_inner()
                .actions;
            if json {
                print_json(&Value::Array(list.iter().map(info_json).collect()));
            } else {
                print_table(&list);
            }
            Ok(0)
        }
        Cmd::Get(a) => {
            let mut c = connect(&cli.conn).await?;
            let info = c
                .control
                .get_isolate(a.to_ref())
                .await
                .map_err(|s| call_failed("cannot get the action", s))?
                .into_inner();
            if json {
                print_json(&info_json(&info));
            } else {
                print_info(&info);
            }
            Ok(0)
        }
        Cmd::Logs(a) => {
            let mut c = connect(&cli.conn).await?;
            let logs = c
                .control
                .isolate_logs(a.to_ref())
                .await
                .map_err(|s| call_failed("cannot get the logs", s))?
                .into_inner();
            if json {
                print_json(&json!({
                    "stdout": String::from_utf8_lossy(&logs.stdout),
                    "stderr": String::from_utf8_lossy(&logs.stderr),
                }));
            } else {
                let _ = std::io::stdout().write_all(&logs.stdout);
                let _ = std::io::stderr().write_all(&logs.stderr);
            }
            Ok(0)
        }
        Cmd::Cancel { action, reason } => {
            let mut c = connect(&cli.conn).await?;
            let req = CancelIsolateRequest {
                namespace: action.namespace.clone(),
                action_id: action.action_id.clone(),
                reason: reason.unwrap_or_else(|| "cancelled with isolatectl".into()),
            };
            let info = c
                .control
                .cancel_isolate(req)
                .await
                .map_err(|s| call_failed("cannot cancel the action", s))?
                .into_inner();
            if json {
                print_json(&info_json(&info));
            } else {
                println!(
                    "cancelling {} in {} (was {})",
                    info.action_id,
                    info.namespace,
                    state_name(info.state())
                );
            }
            Ok(0)
        }
        Cmd::Report(ReportCmd::Retry(a)) => {
            let mut c = connect(&cli.conn).await?;
            let info = c
                .control
                .retry_report(a.to_ref())
                .await
                .map_err(|s| call_failed("cannot retry the report", s))?
                .into_inner();
            if json {
                print_json(&info_json(&info));
            } else {
                println!(
                    "delivering the report of {} in {} again",
                    info.action_id, info.namespace
                );
            }
            Ok(0)
        }
        Cmd::Report(ReportCmd::Drop { action, yes }) => {
            let mut c = connect(&cli.conn).await?;
            if !yes {
                let info = c
                    .control
                    .get_isolate(action.to_ref())
                    .await
                    .map_err(|s| call_failed("cannot get the action", s))?
                    .into_inner();
                confirm_drop(&info)?;
            }
            let info = c
                .control
                .drop_report(action.to_ref())
                .await
                .map_err(|s| call_failed("cannot drop the report", s))?
                .into_inner();
            if json {
                print_json(&info_json(&info));
            } else {
                println!(
                    "dropped the report of {} in {}",
                    info.action_id, info.namespace
                );
            }
            Ok(0)
        }
        Cmd::Image(ImageCmd::Ls { namespace }) => {
            let mut c = connect(&cli.conn).await?;
            let res = c
                .control
                .list_images(ListImagesRequest {
                    namespace: namespace.clone(),
                })
                .await
                .map_err(|s| call_failed("cannot list the images", s))?
                .into_inner();
            if json {
                print_json(&json!({
                    "namespace": namespace,
                    "containerd_namespace": res.containerd_namespace,
                    "images": res.images.iter().map(image_json).collect::<Vec<_>>(),
                }));
            } else {
                print_images(&res.images);
            }
            Ok(0)
        }
        Cmd::Image(ImageCmd::Rm { name, namespace }) => {
            let mut c = connect(&cli.conn).await?;
            let removed = c
                .control
                .remove_image(RemoveImageRequest {
                    namespace: namespace.clone(),
                    name,
                })
                .await
                .map_err(|s| call_failed("cannot remove the image", s))?
                .into_inner();
            if json {
                print_json(&image_json(&removed));
            } else {
                println!(
                    "removed {} ({}) from {namespace}",
                    removed.name, removed.digest
                );
            }
            Ok(0)
        }
        Cmd::Health => {
            let mut c = connect(&cli.conn).await?;
            let status = c
                .health
                .check(HealthCheckRequest {
                    service: "isolate.DirektivIsolate".into(),
                })
                .await
                .map_err(|s| call_failed("cannot ask the node's health", s))?
                .into_inner()
                .status();
            let serving = status == ServingStatus::Serving;
            // Why not, when the caller may ask (health itself needs no credentials).
            let why = match serving {
                true => None,
                false => c
                    .control
                    .node_capacity(CapacityRequest::default())
                    .await
                    .ok()
                    .map(|r| r.into_inner().not_serving_reason),
            };
            if json {
                print_json(&json!({ "status": status.as_str_name(), "reason": why }));
            } else {
                match why {
                    Some(why) if !why.is_empty() => println!("{}: {why}", status.as_str_name()),
                    _ => println!("{}", status.as_str_name()),
                }
            }
            Ok(if serving { 0 } else { 1 })
        }
        Cmd::Capacity { namespace, image } => {
            let mut c = connect(&cli.conn).await?;
            let cap = c
                .control
                .node_capacity(CapacityRequest {
                    namespace: namespace.clone().unwrap_or_default(),
                    image: image.clone().unwrap_or_default(),
                })
                .await
                .map_err(|s| call_failed("cannot ask the node's capacity", s))?
                .into_inner();
            print_capacity(&cap, image.as_deref().zip(namespace.as_deref()), json);
            Ok(0)
        }
        Cmd::Drain { wait } => {
            let mut c = connect(&cli.conn).await?;
            let cap = c
                .control
                .drain(DrainRequest { wait })
                .await
                .map_err(|s| call_failed("cannot drain the node", s))?
                .into_inner();
            if !json {
                println!(
                    "draining: accepting nothing more; {} running, {} queued for the next start",
                    cap.running, cap.queued
                );
            }
            print_capacity(&cap, None, json);
            Ok(0)
        }
        Cmd::Image(ImageCmd::Import { file, namespace }) => {
            let bytes = read_file_or_stdin(&file)?;
            let mut c = connect(&cli.conn).await?;
            let images = import(&mut c, &namespace, bytes).await?;
            if json {
                print_json(&json!({ "namespace": namespace, "images": images }));
            } else {
                for i in &images {
                    println!("{i}");
                }
            }
            Ok(0)
        }
        Cmd::Token(TokenCmd::New { name, namespace }) => {
            let (secret, entry) = tokens::new_token(&name, &namespace);
            // Checked by the daemon's own parser, so what is printed loads.
            tokens::Tokens::from_text(&entry).map_err(|e| usage(e.to_string()))?;
            if json {
                print_json(&json!({ "name": name, "secret": secret, "entry": entry }));
            } else {
                println!("{secret}");
                eprintln!(
                    "isolatectl: the secret above is shown once; give it to the caller \
                     (authorization: Bearer <secret>) and add this to isolated's auth_tokens_file:\n\n{entry}"
                );
            }
            Ok(0)
        }
        Cmd::Completions { .. } => Ok(0),
    }
}

impl ActionArgs {
    fn to_ref(&self) -> ActionRef {
        ActionRef {
            namespace: self.namespace.clone(),
            action_id: self.action_id.clone(),
        }
    }
}

fn read_file_or_stdin(path: &PathBuf) -> Outcome<Vec<u8>> {
    if path.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| usage(format!("cannot read stdin: {e}")))?;
        return Ok(buf);
    }
    std::fs::read(path).map_err(|e| usage(format!("cannot read {}: {e}", path.display())))
}

fn read_input(args: &RunArgs) -> Outcome<Vec<u8>> {
    if let Some(d) = &args.data {
        return Ok(d.clone().into_bytes());
    }
    if let Some(f) = &args.data_file {
        return read_file_or_stdin(f);
    }
    if std::io::stdin().is_terminal() {
        return Ok(Vec::new());
    }
    read_file_or_stdin(&PathBuf::from("-"))
}

fn parse_registries(values: &[String]) -> Outcome<HashMap<String, String>> {
    values
        .iter()
        .map(|v| {
            let (host, creds) = v
                .split_once('=')
                .ok_or_else(|| usage("--registry takes HOST=USER!PASSWORD"))?;
            if host.is_empty() || !creds.contains('!') {
                return Err(usage("--registry takes HOST=USER!PASSWORD"));
            }
            Ok((host.to_string(), creds.to_string()))
        })
        .collect()
}

/// Streams the archive in chunks, the namespace in the first message.
async fn import(c: &mut Clients, namespace: &str, bytes: Vec<u8>) -> Outcome<Vec<String>> {
    let total = bytes.len();
    let ns = namespace.to_string();
    let chunks: Vec<ImportImageRequest> = if bytes.is_empty() {
        vec![ImportImageRequest {
            namespace: ns,
            chunk: Vec::new(),
        }]
    } else {
        bytes
            .chunks(IMPORT_CHUNK)
            .enumerate()
            .map(|(i, chunk)| ImportImageRequest {
                namespace: if i == 0 { ns.clone() } else { String::new() },
                chunk: chunk.to_vec(),
            })
            .collect()
    };
    let progress = Progress::new();
    progress.line(&format!(
        "importing {} into {namespace}",
        human_bytes(total)
    ));
    let res = c
        .control
        .import_image(futures::stream::iter(chunks))
        .await
        .map_err(|s| call_failed("import failed", s))?
        .into_inner();
    progress.done();
    Ok(res.images)
}

async fn run(
    mut c: Clients,
    args: RunArgs,
    data: Vec<u8>,
    registries: HashMap<String, String>,
    json: bool,
) -> Outcome<u8> {
    let action_id = args
        .action_id
        .clone()
        .unwrap_or_else(|| format!("ctl-{:08x}", rand::random::<u32>()));
    let req = RunIsolateRequest {
        namespace: Some(args.namespace.clone()),
        instance_id: args.instance_id.clone(),
        step: args.step,
        timeout: Some(args.timeout),
        action_id: Some(action_id.clone()),
        image: Some(args.image.clone()),
        command: args.command.clone(),
        data: Some(data),
        registries,
        size: Some(args.size),
    };
    let input = req.data.as_ref().map_or(0, Vec::len);
    c.isolate.run_isolate(req).await.map_err(|s| {
        refused_size(input, &s).unwrap_or_else(|| call_failed("the node refused the action", s))
    })?;
    let aref = ActionRef {
        namespace: args.namespace.clone(),
        action_id: action_id.clone(),
    };
    let mut stream = c
        .control
        .watch_isolate(aref.clone())
        .await
        .map_err(|s| call_failed("cannot follow the action", s))?
        .into_inner();

    let progress = Progress::new();
    let started = Instant::now();
    let mut state = ActionState::Unspecified;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut interrupted = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let info = loop {
        tokio::select! {
            msg = stream.message() => {
                let info = match msg {
                    Ok(Some(info)) => info,
                    Ok(None) => {
                        progress.done();
                        return Err(usage(format!("lost track of action {action_id}: the node ended the watch before it finished")));
                    }
                    Err(s) => {
                        progress.done();
                        return Err(call_failed("lost track of the action", s));
                    }
                };
                if matches!(info.state(), ActionState::Finished | ActionState::Reported) {
                    break info;
                }
                if info.state() != state {
                    state = info.state();
                    let what = match state {
                        ActionState::Pulling => format!("pulling {}", info.image),
                        other => state_name(other).to_string(),
                    };
                    progress.line(&format!("{action_id}: {what}"));
                }
            }
            _ = tick.tick() => progress.tick(started.elapsed()),
            _ = &mut ctrl_c, if !interrupted => {
                // The action outlives isolatectl unless it is cancelled:
                // Ctrl-C means "stop it", and its report follows as usual.
                interrupted = true;
                progress.line(&format!("{action_id}: interrupted, cancelling"));
                let req = CancelIsolateRequest {
                    namespace: aref.namespace.clone(),
                    action_id: aref.action_id.clone(),
                    reason: "interrupted in isolatectl".into(),
                };
                let _ = c.control.cancel_isolate(req).await;
            }
        }
    };
    progress.done();
    let ok = info.error_code.is_empty();
    if json {
        print_json(&info_json(&info));
    } else if ok {
        let mut out = std::io::stdout();
        let _ = out.write_all(&info.output);
        // Exact bytes into a pipe or file; on a terminal the output ends its
        // line, or the prompt (or the line below) would start inside it.
        if out.is_terminal() && !info.output.is_empty() && !info.output.ends_with(b"\n") {
            let _ = out.write_all(b"\n");
        }
        let _ = out.flush();
    }
    if ok {
        progress.last_line(&format!(
            "{action_id}: done in {:.1}s",
            started.elapsed().as_secs_f64()
        ));
        Ok(0)
    } else {
        Err(failed(format!(
            "action {action_id} failed: {}: {}",
            info.error_code, info.error_message
        )))
    }
}

/// The progress display on stderr: a live line on a terminal, plain lines
/// otherwise (logs, CI), nothing on stdout.
struct Progress {
    live: bool,
    last: std::cell::RefCell<String>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            live: std::io::stderr().is_terminal(),
            last: Default::default(),
        }
    }

    fn line(&self, text: &str) {
        if self.live {
            *self.last.borrow_mut() = text.to_string();
            eprint!("\r\x1b[K{text}");
        } else {
            eprintln!("isolatectl: {text}");
        }
    }

    /// A line that ends the display: always ends with a newline (issue 14:
    /// the last line of `run` had none, so the prompt followed it).
    fn last_line(&self, text: &str) {
        if self.live {
            self.last.borrow_mut().clear();
            eprintln!("\r\x1b[K{text}");
        } else {
            eprintln!("isolatectl: {text}");
        }
    }

    fn tick(&self, elapsed: Duration) {
        if self.live && !self.last.borrow().is_empty() {
            const SPIN: [char; 4] = ['|', '/', '-', '\\'];
            let c = SPIN[(elapsed.as_millis() / 100 % 4) as usize];
            eprint!(
                "\r\x1b[K{} {c} {:.1}s",
                self.last.borrow(),
                elapsed.as_secs_f64()
            );
        }
    }

    fn done(&self) {
        if self.live && !self.last.borrow().is_empty() {
            eprintln!("\r\x1b[K{}", self.last.borrow());
            self.last.borrow_mut().clear();
        }
    }
}

fn human_bytes(n: usize) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn time_of(ms: i64) -> Option<String> {
    (ms > 0).then(|| {
        let t = UNIX_EPOCH + Duration::from_millis(ms as u64);
        humantime::format_rfc3339_millis(t).to_string()
    })
}

fn info_json(i: &ActionInfo) -> Value {
    let mut v = json!({
        "namespace": i.namespace,
        "action_id": i.action_id,
        "instance_id": i.instance_id,
        "step": i.step,
        "image": i.image,
        "size": i.size,
        "timeout_seconds": i.timeout_seconds,
        "state": state_name(i.state()),
        "accepted_at": time_of(i.accepted_at_ms),
        "started_at": time_of(i.started_at_ms),
        "finished_at": time_of(i.finished_at_ms),
        "reported_at": time_of(i.reported_at_ms),
        "report_attempts": i.report_attempts,
        "containerd_namespace": i.containerd_namespace,
        "container_id": i.container_id,
    });
    if !i.report_last_code.is_empty() {
        v["report_last_code"] = json!(i.report_last_code);
        v["report_last_message"] = json!(i.report_last_message);
    }
    if i.dropped_at_ms > 0 {
        v["dropped_at"] = json!(time_of(i.dropped_at_ms));
    }
    if i.output_dropped {
        v["output_dropped"] = json!(true);
    }
    if matches!(
        i.state(),
        ActionState::Finished | ActionState::Reported | ActionState::Undeliverable
    ) {
        if i.error_code.is_empty() {
            // Outputs are any bytes: text when they are text.
            match std::str::from_utf8(&i.output) {
                Ok(text) => v["output"] = json!(text),
                Err(_) => {
                    v["output_base64"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(&i.output))
                }
            }
        } else {
            v["error_code"] = json!(i.error_code);
            v["error_message"] = json!(i.error_message);
        }
    }
    v
}

fn print_capacity(c: &CapacityResponse, image: Option<(&str, &str)>, json: bool) {
    if json {
        let mut v = json!({
            "serving": c.serving,
            "notServingReason": c.not_serving_reason,
            "draining": c.draining,
            "running": c.running,
            "maxRunning": c.max_running,
            "queued": c.queued,
            "maxQueued": c.max_queued,
            "freeRunning": c.free_running,
            "freeQueue": c.free_queue,
            "totalMemoryMib": c.total_memory_mib,
            "freeMemoryMib": c.free_memory_mib,
            "totalPids": c.total_pids,
            "freePids": c.free_pids,
        });
        if image.is_some() {
            v["imageCached"] = json!(c.image_cached);
        }
        print_json(&v);
        return;
    }
    match c.serving {
        true => println!("serving"),
        false => println!("not serving: {}", c.not_serving_reason),
    }
    println!(
        "running {}/{} ({} free), queued {}/{} ({} free)",
        c.running, c.max_running, c.free_running, c.queued, c.max_queued, c.free_queue
    );
    println!(
        "memory {} of {} MiB free, pids {} of {} free",
        c.free_memory_mib, c.total_memory_mib, c.free_pids, c.total_pids
    );
    if let Some((image, ns)) = image {
        let cached = if c.image_cached {
            "cached"
        } else {
            "not cached"
        };
        println!("image {image} in namespace {ns}: {cached}");
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn age(ms: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let s = ((now - ms).max(0) / 1000) as u64;
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn result_of(i: &ActionInfo) -> String {
    let done = matches!(
        i.state(),
        ActionState::Finished | ActionState::Reported | ActionState::Undeliverable
    );
    match i.state() {
        _ if !done => "-".into(),
        _ if i.error_code.is_empty() => "ok".into(),
        _ => i.error_code.clone(),
    }
}

/// The namespace, with the containerd namespace it maps to when the name
/// had to be escaped there (`my--ns (direktiv.my-Dns)`). Escaping keeps the
/// length, so the containerd name ends with the Direktiv one exactly when
/// it was not escaped.
fn namespace_of(i: &ActionInfo) -> String {
    if i.containerd_namespace.is_empty() || i.containerd_namespace.ends_with(&i.namespace) {
        i.namespace.clone()
    } else {
        format!("{} ({})", i.namespace, i.containerd_namespace)
    }
}

/// The flow engine's last refusal of the report, one line.
fn last_answer(i: &ActionInfo) -> String {
    if i.report_last_code.is_empty() {
        return String::new();
    }
    one_line(&format!(
        "{}: {}",
        i.report_last_code, i.report_last_message
    ))
    .into_owned()
}

/// Rows under a header, columns padded to their widest cell.
fn print_columns(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let mut out = std::io::stdout().lock();
    for r in std::iter::once(&header).chain(rows) {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
}

fn print_table(list: &[ActionInfo]) {
    // The flow engine's last answer only when a report was refused, so the
    // usual listing stays narrow.
    let answers = list.iter().any(|i| !i.report_last_code.is_empty());
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            let mut row = vec![
                namespace_of(i),
                i.action_id.clone(),
                state_name(i.state()).to_string(),
                age(i.accepted_at_ms),
                result_of(i),
                i.image.clone(),
            ];
            if answers {
                row.push(last_answer(i));
            }
            row
        })
        .collect();
    let mut header = vec!["NAMESPACE", "ACTION", "STATE", "AGE", "RESULT", "IMAGE"];
    if answers {
        header.push("FLOW ENGINE'S LAST ANSWER");
    }
    print_columns(&header, &rows);
}

fn image_json(i: &ImageInfo) -> Value {
    json!({
        "name": i.name,
        "digest": i.digest,
        "size": i.size,
        "source": (!i.source.is_empty()).then_some(&i.source),
        "updated_at": time_of(i.updated_at_ms),
    })
}

fn print_images(images: &[ImageInfo]) {
    let rows: Vec<Vec<String>> = images
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                i.digest.clone(),
                human_bytes(i.size as usize),
                if i.source.is_empty() {
                    "-".to_string()
                } else {
                    i.source.clone()
                },
            ]
        })
        .collect();
    print_columns(&["NAME", "DIGEST", "SIZE", "SOURCE"], &rows);
}

/// Asks on the terminal before a report is dropped for good; without a
/// terminal to ask on, refuses (a script says --yes).
fn confirm_drop(info: &ActionInfo) -> Outcome<()> {
    let what = format!(
        "the report of action {} in namespace {}",
        info.action_id, info.namespace
    );
    if info.state() != ActionState::Undeliverable {
        return Err(failed(format!(
            "{what} is not undeliverable (the action is {})",
            state_name(info.state())
        )));
    }
    if !std::io::stdin().is_terminal() {
        return Err(usage(format!(
            "not dropping {what} without confirmation: stdin is not a terminal (pass --yes)"
        )));
    }
    eprint!(
        "Drop {what} for good? The flow engine will never get it. Its last answer: {}\n[y/N] ",
        last_answer(info)
    );
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| usage(format!("cannot read the answer: {e}")))?;
    match line.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => Err(failed(format!("not dropped: {what} stays undeliverable"))),
    }
}

fn print_info(i: &ActionInfo) {
    let mut lines = vec![
        ("namespace", i.namespace.clone()),
        ("containerd ns", i.containerd_namespace.clone()),
        ("container", i.container_id.clone()),
        ("action", i.action_id.clone()),
        ("instance", i.instance_id.clone()),
        ("step", i.step.to_string()),
        ("image", i.image.clone()),
        ("size", i.size.to_string()),
        ("timeout", format!("{}s", i.timeout_seconds)),
        ("state", state_name(i.state()).to_string()),
    ];
    for (k, ms) in [
        ("accepted", i.accepted_at_ms),
        ("started", i.started_at_ms),
        ("finished", i.finished_at_ms),
        ("reported", i.reported_at_ms),
        ("dropped", i.dropped_at_ms),
    ] {
        if let Some(t) = time_of(ms) {
            lines.push((k, t));
        }
    }
    lines.push(("report attempts", i.report_attempts.to_string()));
    if !i.report_last_code.is_empty() {
        lines.push(("last answer", last_answer(i)));
    }
    lines.push(("result", result_of(i)));
    if !i.error_code.is_empty() {
        lines.push(("error", i.error_message.clone()));
    } else if i.output_dropped {
        lines.push(("output", "(not kept: above 64 KiB)".to_string()));
    } else if result_of(i) == "ok" {
        lines.push(("output", String::from_utf8_lossy(&i.output).into_owned()));
    }
    for (k, v) in lines {
        println!("{:<16} {v}", format!("{k}:"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn registries_and_sizes() {
        let r = parse_registries(&["r.example:5000=me!p!w".into()])
            .ok()
            .unwrap();
        assert_eq!(r["r.example:5000"], "me!p!w");
        assert!(parse_registries(&["nohost".into()]).is_err());
        assert!(parse_registries(&["h=nopassword".into()]).is_err());
        assert_eq!(parse_size("large"), Ok(2));
        assert!(parse_size("huge").is_err());
    }

    #[test]
    fn inputs_too_large_are_refused_naming_the_limit() {
        assert!(check_input_size(32 << 20).is_ok());
        let f = check_input_size(MAX_MESSAGE).err().unwrap();
        assert_eq!(f.code, 2);
        assert!(f.message.contains("63.0 MiB"), "{}", f.message);
        // What tonic's decoder says on the node, and what grpc-go's says.
        let tonic = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 40000000 bytes, the limit is: 34603008 bytes",
        );
        let f = refused_size(40_000_000, &tonic).unwrap();
        assert!(
            f.message.contains("34603008 bytes") && f.message.contains("40000000 bytes"),
            "{}",
            f.message
        );
        let go = tonic::Status::resource_exhausted(
            "grpc: received message larger than max (40000000 vs. 4194304)",
        );
        assert!(refused_size(40_000_000, &go)
            .unwrap()
            .message
            .contains("4194304 bytes"));
        // Other refusals keep their own words.
        let busy = tonic::Status::resource_exhausted("more than 1024 actions are queued");
        assert!(refused_size(10, &busy).is_none());
    }

    #[test]
    fn json_of_a_binary_output() {
        let info = ActionInfo {
            state: ActionState::Reported as i32,
            output: vec![0xff, 0],
            ..Default::default()
        };
        let v = info_json(&info);
        assert_eq!(v["output_base64"], "/wA=");
        assert_eq!(v["state"], "reported");
    }
}
