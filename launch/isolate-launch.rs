//! `isolate-launch`: the process a pre-created task (issue 16) is created
//! with. runc and crun leave a created container's init waiting on its exec
//! fifo and exec the spec's process only at Start, so this program runs only
//! once the action it was taken for is started: it reads the action's argv
//! and environment from the file the daemon wrote into the data directory
//! at take time (its one argument), removes that file, and execs the
//! action's program in its own place, so that PID 1 is the action's process
//! with exactly the argv and environment it would have had without the pool.
//!
//! Owns nothing else: the user, working directory, limits, mounts and
//! capabilities are the container's, fixed at create. Built by `build.rs`
//! with the standard library only, statically linked, and embedded into
//! `isolated`, which writes it under its state dir
//! (`runner::pool`); it is bind-mounted read-only into pooled containers.
//!
//! Failing: a missing or malformed file, or one it cannot remove, is a bug
//! of the daemon, said on stderr (the action's log) with exit code 125. A
//! program that cannot be executed is the action's own mistake and must
//! look exactly like it does without the pool, where runc refuses the
//! create: the daemon reads runc's words for it (`exec: "<path>": <why>`)
//! from `<file>-failed`, written here, and reports what it reports for
//! runc's; nothing goes to stderr then, as nothing does without the pool.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

/// The first bytes of a launch file; the format is the daemon's
/// (`runner::pool::launch_file`): this magic, argc in decimal, then argc
/// arguments and the environment's `KEY=value` entries, each NUL-terminated.
const MAGIC: &[u8] = b"isolate-launch 1\0";

/// A broken hand-over from the daemon (docker's code for "the runtime
/// failed", not one a shell gives).
const BROKEN: i32 = 125;

fn main() {
    let Some(file) = std::env::args_os().nth(1).map(PathBuf::from) else {
        fail("no launch file given");
    };
    let bytes = match std::fs::read(&file) {
        Ok(b) => b,
        Err(e) => fail(&format!(
            "cannot read the launch file {}: {e}",
            file.display()
        )),
    };
    let (argv, env) = match parse(&bytes) {
        Some(p) => p,
        None => fail(&format!("the launch file {} is malformed", file.display())),
    };
    if let Err(e) = std::fs::remove_file(&file) {
        fail(&format!(
            "cannot remove the launch file {}: {e}",
            file.display()
        ));
    }
    let path_var = env
        .iter()
        .find_map(|kv| kv.as_bytes().strip_prefix(b"PATH=").map(|v| v.to_vec()))
        .unwrap_or_default();
    let program = match look_path(&argv[0], &path_var) {
        Ok(p) => p,
        Err(why) => exec_failed(&file, &argv[0], &why),
    };
    // The environment in its order, as runc would have set it: std's `Command::env`
    // would sort it, so the process's own is rewritten instead (single-threaded) and
    // inherited as it is. runc adds HOME from the user's passwd entry when the spec has
    // none, and did so for this process, whose user is the action's: kept the same way.
    let home = std::env::var_os("HOME");
    for (k, _) in std::env::vars_os() {
        std::env::remove_var(k);
    }
    let mut has_home = false;
    for kv in &env {
        let (k, v) = match kv.as_bytes().iter().position(|b| *b == b'=') {
            Some(i) => (&kv.as_bytes()[..i], &kv.as_bytes()[i + 1..]),
            None => (kv.as_bytes(), &b""[..]),
        };
        if k.is_empty() {
            continue;
        }
        has_home |= k == b"HOME";
        std::env::set_var(
            std::ffi::OsStr::from_bytes(k),
            std::ffi::OsStr::from_bytes(v),
        );
    }
    if let (false, Some(home)) = (has_home, home) {
        std::env::set_var("HOME", home);
    }
    let mut cmd = Command::new(&program);
    cmd.arg0(&argv[0]).args(&argv[1..]);
    let e = cmd.exec();
    let why = match e.raw_os_error() {
        Some(13) => "permission denied".to_string(),
        Some(8) => "exec format error".to_string(),
        Some(2) => format!("stat {}: no such file or directory", program.display()),
        _ => e.to_string(),
    };
    exec_failed(&file, &argv[0], &why)
}

fn fail(message: &str) -> ! {
    eprintln!("isolate-launch: {message}");
    exit(BROKEN)
}

/// Writes runc's words for a program it cannot execute where the daemon
/// reads them, and exits as a shell would (127 not found, 126 not
/// executable).
fn exec_failed(file: &Path, arg0: &OsString, why: &str) -> ! {
    let message = format!("exec: {:?}: {why}", arg0.to_string_lossy());
    let mut failed = file.as_os_str().to_owned();
    failed.push("-failed");
    if let Err(e) = std::fs::write(&failed, message.as_bytes()) {
        fail(&format!(
            "{message} (and cannot say so in {}: {e})",
            Path::new(&failed).display()
        ));
    }
    let code = if why.contains("no such file") || why.contains("not found") {
        127
    } else {
        126
    };
    exit(code)
}

fn parse(bytes: &[u8]) -> Option<(Vec<OsString>, Vec<OsString>)> {
    let rest = bytes.strip_prefix(MAGIC)?;
    let mut fields: Vec<&[u8]> = rest.split(|b| *b == 0).collect();
    // Every field is NUL-terminated, so the split ends with an empty one.
    if fields.pop() != Some(&[][..]) {
        return None;
    }
    let mut fields = fields.into_iter();
    let argc: usize = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    let argv: Vec<OsString> = fields
        .by_ref()
        .take(argc)
        .map(|f| OsString::from_vec(f.to_vec()))
        .collect();
    if argc == 0 || argv.len() != argc {
        return None;
    }
    let env = fields.map(|f| OsString::from_vec(f.to_vec())).collect();
    Some((argv, env))
}

/// Go's `exec.LookPath`, as runc uses it before it execs a process: a name
/// with a slash is taken as it is, another is searched in `PATH` (an empty
/// entry is the working directory); what is found must be a regular file
/// with an execute bit. The error is Go's.
fn look_path(name: &OsString, path_var: &[u8]) -> Result<PathBuf, String> {
    let executable = |p: &Path| -> Result<(), String> {
        let m = std::fs::metadata(p).map_err(|e| match e.raw_os_error() {
            Some(2) => format!("stat {}: no such file or directory", p.display()),
            _ => format!("stat {}: {e}", p.display()),
        })?;
        if !m.is_dir() && m.permissions().mode() & 0o111 != 0 {
            Ok(())
        } else {
            Err("permission denied".to_string())
        }
    };
    if name.as_bytes().contains(&b'/') {
        let p = PathBuf::from(name);
        return executable(&p).map(|()| p);
    }
    for dir in path_var.split(|b| *b == b':') {
        let dir = if dir.is_empty() { &b"."[..] } else { dir };
        let p = Path::new(std::ffi::OsStr::from_bytes(dir)).join(name);
        if executable(&p).is_ok() {
            return Ok(p);
        }
    }
    Err("executable file not found in $PATH".to_string())
}
