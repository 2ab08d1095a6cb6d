//! Compiles the wire protocols in `proto/` (the Direktiv isolate service, the
//! flow callback) into Rust with tonic, and builds `launch/isolate-launch.rs`
//! (issue 16: the process pre-created tasks are created with) as a static
//! binary that `runner::pool` embeds: it runs inside containers of any
//! image, so it may depend on nothing of theirs. One `rustc` call, std only;
//! the host's glibc `libc.a` (libc6-dev) links it statically.

use std::path::PathBuf;
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/isolate/isolate.proto",
        "proto/flow/flow.proto",
        "proto/isolated/control.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&protos, &["proto"])?;
    build_launcher()
}

fn build_launcher() -> Result<(), Box<dyn std::error::Error>> {
    let source = "launch/isolate-launch.rs";
    println!("cargo:rerun-if-changed={source}");
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("isolate-launch");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let target = std::env::var("TARGET")?;
    let status = Command::new(rustc)
        .args(["--edition", "2021", "--crate-name", "isolate_launch"])
        .args(["--target", &target])
        .args([
            "-C",
            "opt-level=s",
            "-C",
            "panic=abort",
            "-C",
            "strip=symbols",
        ])
        .args(["-C", "target-feature=+crt-static", "-D", "warnings"])
        .arg("-o")
        .arg(&out)
        .arg(source)
        .status()?;
    if !status.success() {
        return Err(
            format!("cannot build {source} statically for {target}: rustc {status}").into(),
        );
    }
    Ok(())
}
