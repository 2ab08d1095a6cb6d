//! Memory limits by size (ISOLATE.md §5): 256 MiB for size 0, 512 MiB for 1, 1 GiB for 2.

use anyhow::{ensure, Result};

use super::{expect_error, expect_success, CODE_OOM};
use crate::harness::{Ctx, ImageSpec, ACTION, FIRST_PULL};

/// dd with one 400 MiB block writes every page of its buffer, so the whole block counts
/// against the cgroup ("1+0 records in" says the single read filled it; a short read would
/// be "0+1"): it fits in sizes 1 and 2 and is OOM-killed in size 0. The shell
/// stays alive, as in a typical action script, so the report must come from the OOM
/// event, not from how the init process died.
pub async fn memory_limit_by_size(t: Ctx) -> Result<()> {
    let image = t
        .push(&ImageSpec::with_script(
            "dd if=/dev/zero of=/dev/null bs=400M count=1 2> /direktiv-data/data.out",
        ))
        .await?;
    let mut first = true;
    for size in [2, 1] {
        let mut req = t.request(&image.reference, &t.action_id(&format!("mem{size}")));
        req.size = Some(size);
        let timeout = if first { FIRST_PULL } else { ACTION };
        first = false;
        let report = t.run_and_wait(req, timeout).await?;
        let output = String::from_utf8_lossy(&expect_success(&report)?).into_owned();
        ensure!(
            output.contains("1+0 records in"),
            "size {size}: dd did not move one full 400 MiB block: {output:?}"
        );
    }
    let mut req = t.request(&image.reference, &t.action_id("mem0"));
    req.size = Some(0);
    let report = t.run_and_wait(req, ACTION).await?;
    let message = expect_error(&report, CODE_OOM)?;
    ensure!(
        message.contains("256") || message.contains("268435456"),
        "errorMessage {message:?} does not name the 256 MiB limit"
    );
    Ok(())
}
