//! Static C programs that trials build with gcc (a Makefile dependency) and put into
//! images: probes of what an action can do that busybox has no applet for. Owns the
//! build only; what a probe checks is its trial's.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};

/// Compiles `source` statically (x86_64 or the host's arch) under `run_dir` and returns the
/// binary's bytes. Each call builds in a directory of its own, so trials may build the same
/// probe at once.
pub fn static_binary(run_dir: &Path, name: &str, source: &str) -> Result<Vec<u8>> {
    let dir = run_dir.join(format!("gcc-{name}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    let src = dir.join(format!("{name}.c"));
    let bin = dir.join(name);
    std::fs::write(&src, source)?;
    let out = Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .context("run gcc (Makefile deps installs it)")?;
    ensure!(
        out.status.success(),
        "gcc failed on {name}.c: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&bin).with_context(|| format!("read {}", bin.display()))
}
