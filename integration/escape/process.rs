//! What an action's processes may do: the capability set (no CAP_NET_RAW), no raw or
//! packet sockets while ping sockets work, no mount/unshare/ptrace/mknod, masked /proc
//! files; and that what an action reports cannot forge log or metrics lines.

use std::time::Duration;

use anyhow::{ensure, Context, Result};

use super::{probe_image, wait_for_file, DEFAULT_CAPS};
use crate::core::{expect_error, expect_success};
use crate::harness::private::task_processes;
use crate::harness::{Ctx, Env, ImageSpec, FIRST_PULL};

/// Inside: the status lines, the probes and the refusals, then "ready", then it waits for
/// the host's "go". From the host meanwhile: every process of the task has the same
/// CapEff, read from the host's /proc.
pub async fn capabilities_sockets_and_proc(t: Ctx) -> Result<()> {
    let gw = t.env.net.gateway();
    // Masked files that exist on this kernel (kcore needs CONFIG_PROC_KCORE); on the host
    // they have content, so reading none in the action is the mask.
    let masked: Vec<&str> = [
        "/proc/interrupts",
        "/proc/kcore",
        "/proc/keys",
        "/proc/timer_list",
    ]
    .into_iter()
    .filter(|f| std::path::Path::new(f).exists())
    .collect();
    let host_interrupts = std::fs::read_to_string("/proc/interrupts")?;
    ensure!(
        !host_interrupts.is_empty(),
        "the host's /proc/interrupts is empty"
    );
    let script = format!(
        r#"out=/direktiv-data/data.out
grep -E '^(CapPrm|CapEff|CapBnd|NoNewPrivs)' /proc/self/status > $out
probe raw >> $out
probe ping {gw} >> $out
sleep 60 & probe ptrace $! >> $out
if mount -t tmpfs none /mnt 2>/dev/null; then echo mount ok; else echo mount refused; fi >> $out
if unshare -n true 2>/dev/null; then echo unshare ok; else echo unshare refused; fi >> $out
if mknod /tmp/null c 1 3 2>/dev/null; then echo mknod ok; else echo mknod refused; fi >> $out
for f in {masked}; do echo "$f $(wc -c < $f)"; done >> $out
touch /direktiv-data/ready
i=0; while [ ! -e /direktiv-data/go ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
kill %1
"#,
        masked = masked.join(" ")
    );
    let image = t.push(&probe_image(t.env, &script)?).await?;
    let id = t.action_id("caps");
    t.run(t.request(&image.reference, &id)).await?;
    let data = t.env.actions_dir(&t.ns).join(&id).join("data");
    let host_view = host_caps(t.env, &t.ns, &id, &data).await;
    // Let it go whatever the host saw, so the report comes.
    let _ = std::fs::write(data.join("go"), b"");
    let report = t.env.flow.wait_report(&id, FIRST_PULL).await?;
    let output = String::from_utf8(expect_success(&report)?)?;
    let caps = host_view?;
    ensure!(
        !caps.is_empty() && caps.iter().all(|c| c == DEFAULT_CAPS),
        "CapEff of the task's processes, seen from the host: {caps:?}, expected {DEFAULT_CAPS}"
    );
    let mut expected = format!(
        "CapPrm:\t{DEFAULT_CAPS}\nCapEff:\t{DEFAULT_CAPS}\nCapBnd:\t{DEFAULT_CAPS}\nNoNewPrivs:\t1\n\
         raw EPERM packet EPERM\n\
         ping {gw} reached\n\
         ptrace EPERM\n\
         mount refused\nunshare refused\nmknod refused\n"
    );
    for f in &masked {
        expected.push_str(&format!("{f} 0\n"));
    }
    ensure!(
        output == expected,
        "the action saw:\n{output}\nexpected:\n{expected}"
    );
    Ok(())
}

/// Waits for the action's "ready", then reads CapEff of each of its processes.
async fn host_caps(env: &Env, ns: &str, id: &str, data: &std::path::Path) -> Result<Vec<String>> {
    wait_for_file(&data.join("ready"), FIRST_PULL).await?;
    let cns = Env::containerd_namespace(ns);
    let procs = task_processes(&env.containerd, &cns, id).await?;
    let mut caps = Vec::new();
    for p in procs {
        let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid))
            .with_context(|| format!("read the status of pid {}", p.pid))?;
        let eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default();
        caps.push(eff);
    }
    Ok(caps)
}

/// An errorCode and message holding newlines and a forged metrics sample: the metric
/// counts it under `action`, /metrics gains no line of its making, and the daemon's log
/// line of the failure stays one line with the newline escaped.
pub async fn error_codes_forge_no_lines(t: Ctx) -> Result<()> {
    let forged = "isolated_actions_total{code=\"forged\"} 12345";
    let script = r##"cat > /direktiv-data/error.json <<'EOF'
{"errorCode":"evil\nisolated_actions_total{code=\"forged\"} 12345","errorMessage":"line one\nforged: line two"}
EOF
exit 1
"##;
    let image = t.push(&ImageSpec::with_script(script)).await?;
    let addr = crate::operator::metrics::metrics_addr(&t)?;
    let id = t.action_id("forge");
    let report = t
        .run_and_wait(t.request(&image.reference, &id), FIRST_PULL)
        .await?;
    let code = report.error_code.clone().unwrap_or_default();
    ensure!(
        code == format!("evil\n{forged}"),
        "the report carries the action's code as written: {code:?}"
    );
    let message = expect_error(&report, &code)?;
    ensure!(message.contains("line two"), "message {message:?}");
    let text = crate::operator::metrics::scrape(addr).await?;
    ensure!(
        !text.contains("forged") && !text.contains("evil"),
        "/metrics holds the action's text:\n{text}"
    );
    ensure!(
        crate::operator::metrics::sample(&text, "isolated_actions_total{code=\"action\"}") >= 1.0,
        "no action-defined code counted under code=\"action\":\n{text}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = t.env.isolated.log_text();
        if let Some(l) = log
            .lines()
            .find(|l| l.contains("action failed") && l.contains("evil"))
        {
            ensure!(
                l.contains("evil\\n") && l.contains("line one\\nforged: line two"),
                "the failure's log line does not escape the newlines: {l}"
            );
            ensure!(
                !log.lines()
                    .any(|l| l.starts_with("forged: line two") || l.starts_with(forged)),
                "the log has a line the action wrote"
            );
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no \"action failed\" line for {id} in the daemon's log"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
