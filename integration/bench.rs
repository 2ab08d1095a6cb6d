//! `make bench`: isolated against `ctr run --rm` and `runc run` on one private containerd
//! and one warm image, measured in the same run and printed as a table.
//!
//! Everything runs on this machine: the harness's containerd, registry, flow receiver and
//! isolated (log level warn, so logging does not count against it). The no-op action is a
//! busybox image whose script exits 0.

mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use direktiv_isolate::client::{Authed, Bearer};
use direktiv_isolate::proto::isolate::direktiv_isolate_client::DirektivIsolateClient;
use direktiv_isolate::proto::isolate::RunIsolateRequest;
use harness::isolated::{Isolated, IsolatedConfig};
use harness::process::free_port;
use harness::{Env, ImageSpec};
use tonic::transport::Channel;

const SEQUENTIAL: usize = 50;
const THROUGHPUT: usize = 200;
const CONCURRENCY: usize = 16;
const RSS_RUNNING: usize = 64;
const NS: &str = "bench";

/// `BENCH_PARTS=none,ctr` runs only those parts (none, ctr, runc, pershim, cni, nodisk, rss);
/// the others print as NaN. All by default. `BENCH_ISOLATED_ARGS` adds flags to the
/// bench's own daemons (not to the CNI one, which is the harness's).
fn part(name: &str) -> bool {
    match std::env::var("BENCH_PARTS") {
        Ok(parts) => parts.split(',').any(|p| p.trim() == name),
        Err(_) => true,
    }
}

fn nan_stats() -> Stats {
    Stats {
        p50: f64::NAN,
        p90: f64::NAN,
        p99: f64::NAN,
    }
}

/// CPU time (ms) spent per action during a throughput run, by whom.
#[derive(Clone, Copy)]
struct CpuPerAction {
    total: f64,
    containerd: f64,
    isolated: f64,
}

impl CpuPerAction {
    fn nan() -> CpuPerAction {
        CpuPerAction {
            total: f64::NAN,
            containerd: f64::NAN,
            isolated: f64::NAN,
        }
    }
}

/// Busy CPU ticks: the whole machine, containerd, isolated (if any).
struct CpuMark([u64; 3]);

impl CpuMark {
    fn now(containerd: u32, isolated: Option<u32>) -> Result<CpuMark> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let cpu: Vec<u64> = stat
            .lines()
            .next()
            .context("empty /proc/stat")?
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
        let busy = cpu.iter().take(8).sum::<u64>() - cpu[3] - cpu[4];
        let proc_ticks = |pid: u32| -> Result<u64> {
            let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
            // Fields after the command name (which may hold spaces): utime and stime
            // are the 12th and 13th.
            let rest = &s[s.rfind(')').context("bad stat")? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
        };
        Ok(CpuMark([
            busy,
            proc_ticks(containerd)?,
            isolated.map(proc_ticks).transpose()?.unwrap_or(0),
        ]))
    }

    fn per_action(&self, earlier: &CpuMark, n: usize) -> CpuPerAction {
        let tick_ms = 1000.0
            / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
                .ok()
                .flatten()
                .unwrap_or(100) as f64;
        let d = |i: usize| (self.0[i] - earlier.0[i]) as f64 * tick_ms / n as f64;
        CpuPerAction {
            total: d(0),
            containerd: d(1),
            isolated: d(2),
        }
    }
}

impl IsolatedRun {
    fn skipped() -> IsolatedRun {
        IsolatedRun {
            seq: nan_stats(),
            b2b: nan_stats(),
            tp: f64::NAN,
            accept_seq: nan_stats(),
            accept_load: nan_stats(),
            accept_server: (f64::NAN, f64::NAN),
            cpu: CpuPerAction::nan(),
        }
    }
}

fn main() {
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    let env = match Env::init() {
        Ok(env) => env,
        Err(e) => {
            eprintln!("bench: the environment did not start: {e:?}");
            std::process::exit(1);
        }
    };
    let result = env.block_on(bench(env));
    let leaks = env.teardown();
    if !leaks.is_empty() {
        eprintln!("bench: teardown cleaned up:\n  {}", leaks.join("\n  "));
    }
    if let Err(e) = result {
        eprintln!("bench failed: {e:#}");
        std::process::exit(1);
    }
}

struct Stats {
    p50: f64,
    p90: f64,
    p99: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What one isolated achieved.
struct IsolatedRun {
    seq: Stats,
    b2b: Stats,
    tp: f64,
    accept_seq: Stats,
    accept_load: Stats,
    /// Upper bounds of the buckets holding p50 and p99 of isolated's own
    /// accept histogram over the concurrent run.
    accept_server: (f64, f64),
    cpu: CpuPerAction,
}

async fn bench(env: &'static Env) -> Result<()> {
    env.register_namespace(NS);
    let image = env
        .push_image(
            &env.open_registry,
            "bench/noop",
            "v1",
            &ImageSpec::with_script("exit 0"),
        )
        .await?;
    let cns = Env::containerd_namespace(NS);

    // Like for like with `ctr run`, whose containers get a private network
    // namespace with loopback only: an isolated with `network = "none"`.
    // The shared one (CNI bridge) is measured after it.
    let plain = private_isolated(env, "plain", &["--network", "none", "--precreate-max", "2"])?;
    // The same without pre-created tasks (issue 16).
    let plain_off = private_isolated(
        env,
        "plain-nopool",
        &["--network", "none", "--precreate-max", "0"],
    )?;
    // The shared one has the CNI bridge and the pool; this one a bridge of its own, no pool.
    let off_net = harness::cni::TestNet::create(env.dir())?;
    let conf_dir = off_net.conf_dir.display().to_string();
    let cni_off = private_isolated(
        env,
        "cni-nopool",
        &["--cni-conf-dir", &conf_dir, "--precreate-max", "0"],
    )?;
    let per_action = private_isolated(
        env,
        "per-action",
        &["--network", "none", "--shim-group", "none"],
    )?;
    // The disk limit's cost (an ext4 image loop-mounted per action): `plain` without it.
    let no_disk = private_isolated(
        env,
        "no-disk",
        &["--network", "none", "--size-disk-mib", "0,0,0"],
    )?;
    per_action.start(Duration::from_secs(60)).await?;
    plain.start(Duration::from_secs(60)).await?;
    no_disk.start(Duration::from_secs(60)).await?;
    plain_off.start(Duration::from_secs(60)).await?;
    cni_off.start(Duration::from_secs(60)).await?;
    let result = async {
        let idle_rss = status_kib(&plain, "VmRSS:")?;
        let none = if part("none") {
            measure_isolated(env, &plain, &image.reference, "none", true).await?
        } else {
            // ctr needs the image in the namespace.
            one(&mut client(&plain).await?, env, &image.reference, "pull").await?;
            IsolatedRun::skipped()
        };

        // An idle pool: the plain daemon's entries once it is quiet (before
        // precreate_idle_secs lets them go).
        let (pool_entries, shim_pss) = if part("none") {
            wait_pool(&plain).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            pool_memory(env, &cns)?
        } else {
            (Vec::new(), 0)
        };

        // ctr run --rm, same image (isolated pulled it into this namespace), same containerd.
        let ctr_run = |id: String| {
            let mut cmd = env.containerd.ctr(&cns);
            cmd.args(["run", "--rm", &image.reference, &id, "/bin/sh", "-c", "exit 0"]);
            cmd
        };
        let (ctr_seq, ctr_tp, ctr_cpu) = if part("ctr") {
            let mut lat = Vec::new();
            for i in 0..SEQUENTIAL {
                lat.push(ms(time_cmd(ctr_run(format!("ctr-seq-{i}")))?));
            }
            let cpu0 = CpuMark::now(env.containerd.pid(), None)?;
            let tp = parallel(THROUGHPUT, CONCURRENCY, |i| ctr_run(format!("ctr-tp-{i}")))?;
            let cpu = CpuMark::now(env.containerd.pid(), None)?.per_action(&cpu0, THROUGHPUT);
            (stats(lat), tp, cpu)
        } else {
            (nan_stats(), f64::NAN, CpuPerAction::nan())
        };

        // runc run of a prepared bundle: the floor.
        let bundle = runc_bundle(env.dir())?;
        let runc_root = env.dir().join("runc-root");
        let runc_run = |id: String| {
            let mut cmd = Command::new("runc");
            cmd.arg("--root").arg(&runc_root).args(["run", "-b"]).arg(&bundle).arg(id);
            cmd
        };
        let (runc_seq, runc_tp) = if part("runc") {
            let mut lat = Vec::new();
            for i in 0..SEQUENTIAL {
                lat.push(ms(time_cmd(runc_run(format!("runc-seq-{i}")))?));
            }
            let tp = parallel(THROUGHPUT, CONCURRENCY, |i| runc_run(format!("runc-tp-{i}")))?;
            (stats(lat), tp)
        } else {
            (nan_stats(), f64::NAN)
        };

        // Right after ctr and runc, the variants: a shim per action (the runc v2
        // shim's default, as ctr has it), and the default CNI network.
        let none_off = if part("none") {
            measure_isolated(env, &plain_off, &image.reference, "none-nopool", false).await?
        } else {
            IsolatedRun::skipped()
        };
        let pershim = if part("pershim") {
            measure_isolated(env, &per_action, &image.reference, "pershim", true).await?
        } else {
            IsolatedRun::skipped()
        };
        let cni = if part("cni") {
            measure_isolated(env, &env.isolated, &image.reference, "cni", true).await?
        } else {
            IsolatedRun::skipped()
        };
        let cni_nopool = if part("cni") {
            measure_isolated(env, &cni_off, &image.reference, "cni-nopool", false).await?
        } else {
            IsolatedRun::skipped()
        };
        let nodisk = if part("nodisk") {
            measure_isolated(env, &no_disk, &image.reference, "nodisk", true).await?
        } else {
            IsolatedRun::skipped()
        };

        let peak_rss = if part("rss") { peak_rss(env, &plain).await? } else { 0 };

        println!();
        println!("| measure | isolated | ctr run --rm | runc run | isolated / ctr | isolated, a shim per action | isolated with CNI | isolated without disk limit |");
        println!("|---|---|---|---|---|---|---|---|");
        for (name, i, c, r, g, n, d) in [
            ("p50", none.seq.p50, ctr_seq.p50, runc_seq.p50, pershim.seq.p50, cni.seq.p50, nodisk.seq.p50),
            ("p90", none.seq.p90, ctr_seq.p90, runc_seq.p90, pershim.seq.p90, cni.seq.p90, nodisk.seq.p90),
            ("p99", none.seq.p99, ctr_seq.p99, runc_seq.p99, pershim.seq.p99, cni.seq.p99, nodisk.seq.p99),
        ] {
            println!(
                "| warm no-op, {SEQUENTIAL} sequential, {name} ms | {i:.1} | {c:.1} | {r:.1} | {:.2} | {g:.1} | {n:.1} | {d:.1} |",
                i / c
            );
        }
        println!(
            "| {THROUGHPUT} at concurrency {CONCURRENCY}, actions/s | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {:.1} |",
            none.tp,
            ctr_tp,
            runc_tp,
            none.tp / ctr_tp,
            pershim.tp,
            cni.tp,
            nodisk.tp
        );
        // ctr's own process is in the machine's total; isolated has no part in ctr's runs.
        let cell = |v: f64| if v.is_finite() { format!("{v:.1}") } else { "-".into() };
        let ratio = |a: f64, b: f64| {
            if (a / b).is_finite() {
                format!("{:.2}", a / b)
            } else {
                "-".into()
            }
        };
        for (name, f) in [
            ("machine", (|c: &CpuPerAction| c.total) as fn(&CpuPerAction) -> f64),
            ("containerd", |c| c.containerd),
            ("isolated", |c| c.isolated),
        ] {
            let ctr = if name == "isolated" { f64::NAN } else { f(&ctr_cpu) };
            println!(
                "| CPU ms per action at concurrency {CONCURRENCY}: {name} | {} | {} | - | {} | {} | {} | {} |",
                cell(f(&none.cpu)),
                cell(ctr),
                ratio(f(&none.cpu), ctr),
                cell(f(&pershim.cpu)),
                cell(f(&cni.cpu)),
                cell(f(&nodisk.cpu))
            );
        }
        println!();
        println!("Pre-created tasks (issue 16); sequential: each sent once the previous is reported and the pool holds an entry; back to back: at once.");
        println!();
        println!("| measure | network none, pool on | pool off | on / off | on / ctr (target ≤ 0.30) | on / runc (target ≤ 1.5) | CNI, pool on | CNI, pool off | CNI on / ctr (target ≤ 0.35) |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for (name, on, off, con, coff, c, r) in [
            ("sequential p50", none.seq.p50, none_off.seq.p50, cni.seq.p50, cni_nopool.seq.p50, ctr_seq.p50, runc_seq.p50),
            ("sequential p90", none.seq.p90, none_off.seq.p90, cni.seq.p90, cni_nopool.seq.p90, ctr_seq.p90, runc_seq.p90),
            ("sequential p99", none.seq.p99, none_off.seq.p99, cni.seq.p99, cni_nopool.seq.p99, ctr_seq.p99, runc_seq.p99),
            ("back to back p50", none.b2b.p50, none_off.b2b.p50, cni.b2b.p50, cni_nopool.b2b.p50, ctr_seq.p50, runc_seq.p50),
            ("back to back p99", none.b2b.p99, none_off.b2b.p99, cni.b2b.p99, cni_nopool.b2b.p99, ctr_seq.p99, runc_seq.p99),
        ] {
            println!(
                "| warm no-op, {SEQUENTIAL} {name} ms | {on:.1} | {off:.1} | {:.2} | {:.2} | {:.2} | {con:.1} | {coff:.1} | {:.2} |",
                on / off, on / c, on / r, con / c
            );
        }
        println!(
            "| {THROUGHPUT} at concurrency {CONCURRENCY}, actions/s (target: on ≥ off) | {:.1} | {:.1} | {:.2} | - | - | {:.1} | {:.1} | - |",
            none.tp, none_off.tp, none.tp / none_off.tp, cni.tp, cni_nopool.tp
        );
        let n = pool_entries.len().max(1) as f64;
        let (pss, rss) = pool_entries
            .iter()
            .fold((0, 0), |(p, r), (ep, er)| (p + ep, r + er));
        println!(
            "| idle pool: {} entries, per entry Pss / Rss MiB of its parked process (target ≤ 4) | {:.2} / {:.2} | the namespace's shim(s), shared with its actions and keeper, Pss MiB: {:.1} |",
            pool_entries.len(),
            pss as f64 / n / 1024.0,
            rss as f64 / n / 1024.0,
            shim_pss as f64 / 1024.0
        );
        println!();
        println!("| isolated | value |");
        println!("|---|---|");
        println!(
            "| RunIsolate accept p50 / p99 ms, sequential (durable write included) | {:.2} / {:.2} |",
            none.accept_seq.p50, none.accept_seq.p99
        );
        println!(
            "| RunIsolate accept p50 / p99 ms, at concurrency {CONCURRENCY} | {:.2} / {:.2} |",
            none.accept_load.p50, none.accept_load.p99
        );
        println!(
            "| RunIsolate accept p50 / p99 ms, at concurrency {CONCURRENCY}, isolated's own histogram (bucket bound) | ≤ {:.2} / ≤ {:.2} |",
            none.accept_server.0, none.accept_server.1
        );
        println!(
            "| disk limit per action (ext4 image copy, loop mount, umount), sequential p50 ms | {:.1} |",
            none.seq.p50 - nodisk.seq.p50
        );
        println!(
            "| disk limit per action at concurrency {CONCURRENCY}, machine CPU ms | {:.1} |",
            none.cpu.total - nodisk.cpu.total
        );
        println!("| RSS idle MiB | {:.1} |", idle_rss as f64 / 1024.0);
        println!("| RSS peak MiB ({RSS_RUNNING} actions running) | {:.1} |", peak_rss as f64 / 1024.0);
        Ok(())
    }
    .await;
    plain.stop(Duration::from_secs(20));
    per_action.stop(Duration::from_secs(20));
    no_disk.stop(Duration::from_secs(20));
    plain_off.stop(Duration::from_secs(20));
    cni_off.stop(Duration::from_secs(20));
    for left in off_net.remove() {
        eprintln!("bench: {left}");
    }
    result
}

/// `isolated_accept_duration_seconds` buckets from the daemon's metrics
/// endpoint: (upper bound in ms, cumulative count).
fn accept_buckets(isolated: &Isolated) -> Option<Vec<(f64, u64)>> {
    use std::io::{Read, Write};
    let args = &isolated.config().extra_args;
    let bind = args
        .iter()
        .position(|a| a == "--metrics-bind")
        .and_then(|i| args.get(i + 1))?;
    let mut conn = std::net::TcpStream::connect(bind.as_str()).ok()?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("isolated_accept_duration_seconds_bucket{le=\"") else {
            continue;
        };
        let (le, count) = rest.split_once("\"} ")?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse::<f64>().ok()? * 1000.0
        };
        out.push((le, count.trim().parse().ok()?));
    }
    (!out.is_empty()).then_some(out)
}

/// The upper bound (ms) of the bucket holding quantile `q` of what was
/// observed between two scrapes.
fn bucket_quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> f64 {
    let delta: Vec<(f64, u64)> = after
        .iter()
        .zip(before)
        .map(|(a, b)| (a.0, a.1.saturating_sub(b.1)))
        .collect();
    let total = delta.last().map_or(0, |d| d.1);
    delta
        .iter()
        .find(|(_, c)| *c as f64 >= q * total as f64)
        .map_or(f64::NAN, |(le, _)| *le)
}

/// Peak RSS (KiB) with 64 actions running at once.
async fn peak_rss(env: &'static Env, plain: &Isolated) -> Result<u64> {
    let sleeper = env
        .push_image(
            &env.open_registry,
            "bench/sleep",
            "v1",
            &ImageSpec::with_script("sleep 3"),
        )
        .await?;
    let mut client = client(plain).await?;
    one(&mut client, env, &sleeper.reference, "sleep-warm").await?;
    let mut ids = Vec::new();
    for i in 0..RSS_RUNNING {
        let id = format!("rss-{i}");
        client.run_isolate(request(&sleeper.reference, &id)).await?;
        ids.push(id);
    }
    for id in &ids {
        let r = env.flow.wait_report(id, Duration::from_secs(300)).await?;
        ensure!(r.error_code.is_none(), "{id} failed: {:?}", r.error_message);
    }
    status_kib(plain, "VmHWM:")
}

/// A second isolated on the harness's containerd and flow receiver.
fn private_isolated(env: &Env, name: &str, args: &[&str]) -> Result<Isolated> {
    let mut extra_args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    // The harness keeps ISOLATED_* out of the daemons' environment; settings
    // to try go here, e.g. BENCH_ISOLATED_ARGS="--shims-per-namespace 4".
    if let Ok(more) = std::env::var("BENCH_ISOLATED_ARGS") {
        extra_args.extend(more.split_whitespace().map(String::from));
    }
    if std::env::var_os("BENCH_SPANS").is_some() {
        // With RUST_LOG=info: every phase's duration in the daemon's log.
        extra_args.push("--log-span-times".into());
    }
    extra_args.extend([
        "--metrics-bind".to_string(),
        format!("127.0.0.1:{}", free_port()?),
    ]);
    Ok(Isolated::new(IsolatedConfig::new(
        format!("127.0.0.1:{}", free_port()?).parse()?,
        env.flow.addr(),
        env.containerd.socket(),
        env.dir().join(format!("bench-{name}")),
        env.dir().join(format!("bench-{name}.log")),
        extra_args,
    )))
}

/// Over TCP with the harness's token, as a flow engine on another machine would call.
async fn client(isolated: &Isolated) -> Result<DirektivIsolateClient<Authed>> {
    let channel = Channel::from_shared(format!("http://{}", isolated.addr()))?
        .connect()
        .await?;
    Ok(DirektivIsolateClient::with_interceptor(
        channel,
        Bearer::new(isolated.token())?,
    ))
}

async fn measure_isolated(
    env: &'static Env,
    isolated: &Isolated,
    image: &str,
    tag: &str,
    pooled: bool,
) -> Result<IsolatedRun> {
    let mut c = client(isolated).await?;
    // Warm: the image is pulled and unpacked once, as on a busy node.
    for i in 0..3 {
        one(&mut c, env, image, &format!("{tag}-warm-{i}")).await?;
    }
    // Sequential, each sent once the previous is reported and (with the pool) the pool
    // holds an entry again: an image run recently, as issue 16 has it...
    let (mut lat, mut accept) = (Vec::new(), Vec::new());
    for i in 0..SEQUENTIAL {
        if pooled {
            wait_pool(isolated).await?;
        }
        let (total, acc) = one(&mut c, env, image, &format!("{tag}-seq-{i}")).await?;
        lat.push(ms(total));
        accept.push(ms(acc));
    }
    // ... and back to back, where the pool's refill races the next action.
    let mut b2b = Vec::new();
    for i in 0..SEQUENTIAL {
        let (total, _) = one(&mut c, env, image, &format!("{tag}-b2b-{i}")).await?;
        b2b.push(ms(total));
    }
    let containerd = env.containerd.pid();
    let accepts0 = accept_buckets(isolated);
    let cpu0 = CpuMark::now(containerd, isolated.pid())?;
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::new();
    for i in 0..THROUGHPUT {
        let permit = sem.clone().acquire_owned().await?;
        let (mut c, image, id) = (c.clone(), image.to_string(), format!("{tag}-tp-{i}"));
        tasks.push(tokio::spawn(async move {
            let r = one(&mut c, env, &image, &id).await;
            drop(permit);
            r.map(|(_, acc)| ms(acc))
        }));
    }
    let mut load = Vec::new();
    for t in tasks {
        load.push(t.await??);
    }
    let tp = THROUGHPUT as f64 / started.elapsed().as_secs_f64();
    let cpu = CpuMark::now(containerd, isolated.pid())?.per_action(&cpu0, THROUGHPUT);
    let accept_server = match (accepts0, accept_buckets(isolated)) {
        (Some(before), Some(after)) => (
            bucket_quantile(&before, &after, 0.5),
            bucket_quantile(&before, &after, 0.99),
        ),
        _ => (f64::NAN, f64::NAN),
    };
    Ok(IsolatedRun {
        seq: stats(lat),
        b2b: stats(b2b),
        tp,
        accept_seq: stats(accept),
        accept_load: stats(load),
        accept_server,
        cpu,
    })
}

/// Waits until the daemon's pool holds an entry for the bench's namespace.
async fn wait_pool(isolated: &Isolated) -> Result<()> {
    use direktiv_isolate::proto::control::ListPoolRequest;
    let mut control = harness::private::control_client(isolated.socket()).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let keys = control
            .list_pool(ListPoolRequest {
                drop: false,
                namespace: NS.into(),
            })
            .await?
            .into_inner()
            .keys;
        if keys.iter().any(|k| k.entries > 0) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the pool holds no entry after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Pss and Rss (KiB) of each idle pre-created task's process (the parked init) in
/// `cns`, and Pss of their shims (shared by the namespace's tasks, the keeper's).
fn pool_memory(env: &Env, cns: &str) -> Result<(Vec<(u64, u64)>, u64)> {
    let out = env.containerd.ctr(cns).args(["task", "ls"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rollup = |pid: u32, key: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    };
    let mut entries = Vec::new();
    let mut shims = std::collections::BTreeSet::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 2 || !f[0].starts_with(direktiv_isolate::runner::pool::POOL_ID_PREFIX) {
            continue;
        }
        let Ok(pid) = f[1].parse::<u32>() else {
            continue;
        };
        entries.push((rollup(pid, "Pss:"), rollup(pid, "Rss:")));
        if let Some(ppid) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(')').next().map(str::to_string))
            .and_then(|s| {
                s.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u32>().ok())
            })
        {
            shims.insert(ppid);
        }
    }
    let shim_pss = shims.iter().map(|p| rollup(*p, "Pss:")).sum();
    Ok((entries, shim_pss))
}

fn request(image: &str, id: &str) -> RunIsolateRequest {
    RunIsolateRequest {
        namespace: Some(NS.into()),
        action_id: Some(id.into()),
        instance_id: Some("bench".into()),
        step: Some(0),
        image: Some(image.into()),
        timeout: Some(60),
        ..Default::default()
    }
}

/// One action through isolated: (RunIsolate → report, RunIsolate alone).
async fn one(
    c: &mut DirektivIsolateClient<Authed>,
    env: &Env,
    image: &str,
    id: &str,
) -> Result<(Duration, Duration)> {
    let t0 = Instant::now();
    c.run_isolate(request(image, id))
        .await
        .map_err(|s| anyhow::anyhow!("RunIsolate({id}): {s}"))?;
    let accepted = t0.elapsed();
    let r = env.flow.wait_report(id, Duration::from_secs(120)).await?;
    let total = t0.elapsed();
    if let Some(code) = r.error_code {
        bail!(
            "{id} failed: {code}: {}",
            r.error_message.unwrap_or_default()
        );
    }
    Ok((total, accepted))
}

fn time_cmd(mut cmd: Command) -> Result<Duration> {
    let t0 = Instant::now();
    let out = cmd.output().context("spawn")?;
    let d = t0.elapsed();
    ensure!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(d)
}

/// Runs `n` commands, `c` at a time, on threads; returns commands per second.
fn parallel(n: usize, c: usize, make: impl Fn(usize) -> Command + Sync) -> Result<f64> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..c)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if i >= n {
                            return Ok(());
                        }
                        time_cmd(make(i))?;
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
        }
        Ok(())
    })?;
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// A runc bundle with a busybox rootfs and a no-op process.
fn runc_bundle(dir: &Path) -> Result<PathBuf> {
    let bundle = dir.join("runc-bundle");
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin"))?;
    for d in ["proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))?;
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh"))?;
    let status = Command::new("runc")
        .arg("spec")
        .current_dir(&bundle)
        .status()?;
    ensure!(status.success(), "runc spec failed");
    let path = bundle.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(["/bin/sh", "-c", "exit 0"]);
    std::fs::write(&path, serde_json::to_vec(&spec)?)?;
    Ok(bundle)
}

fn status_kib(isolated: &Isolated, key: &str) -> Result<u64> {
    let pid = isolated.pid().context("isolated is not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}
