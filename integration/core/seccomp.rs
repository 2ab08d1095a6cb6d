//! The seccomp profile is 64-bit only (runtime-spec/README.md): a syscall through the
//! 32-bit entry (`int 0x80`) kills the process with SIGSYS, libseccomp's action for an
//! architecture the filter does not list, while the same program's 64-bit syscalls work.

use std::process::Command;

use anyhow::{ensure, Result};

use super::expect_success;
use crate::harness::{gcc, Ctx, ImageSpec, FIRST_PULL};

/// A static x86_64 program that writes one line with a 64-bit syscall, then asks for its
/// pid through the 32-bit entry and prints what came back.
const PROBE: &str = r#"
#include <stdio.h>
#include <unistd.h>
int main(void) {
    long ret;
    printf("64-bit ok\n");
    fflush(stdout);
    __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(20L) : "memory");
    printf("32-bit getpid returned %ld\n", ret);
    return 0;
}
"#;

pub async fn thirty_two_bit_syscalls_are_refused(t: Ctx) -> Result<()> {
    let probe = gcc::static_binary(t.env.dir(), "probe32", PROBE)?;
    let path = t
        .env
        .dir()
        .join(format!("probe32-{:08x}", rand::random::<u32>()));
    std::fs::write(&path, &probe)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    // Outside a container the probe's 32-bit call works, so the test can tell.
    let host = Command::new(&path).output()?;
    ensure!(
        String::from_utf8_lossy(&host.stdout).contains("32-bit getpid returned"),
        "the probe's 32-bit syscall does not work on this host (no IA32 emulation?): {:?}",
        String::from_utf8_lossy(&host.stdout)
    );
    let image = t
        .push(
            &ImageSpec::with_script(
                "/bin/probe32 > /direktiv-data/data.out; echo \"exit $?\" >> /direktiv-data/data.out",
            )
            .file("bin/probe32", probe, 0o755),
        )
        .await?;
    let report = t
        .run_and_wait(
            t.request(&image.reference, &t.action_id("probe32")),
            FIRST_PULL,
        )
        .await?;
    let output = String::from_utf8_lossy(&expect_success(&report)?).into_owned();
    ensure!(
        output == "64-bit ok\nexit 159\n",
        "expected the 64-bit write, then death by SIGSYS (exit 159); got {output:?}"
    );
    Ok(())
}
