//! Integration tests of `isolated` against a real containerd, real registries and a real
//! flow receiver. One environment is shared by all trials; see `harness`.

mod auth;
mod core;
mod durability;
mod engine;
mod escape;
mod harness;
mod harness_selftest;
mod network;
mod operator;
mod pool;
mod reaper;

use std::process::ExitCode;

use libtest_mimic::Arguments;

fn main() -> ExitCode {
    // Before any thread exists: it changes PATH for this process and every child.
    match harness::containerd::use_test_containerd() {
        Ok(Some(dir)) => eprintln!("integration: containerd build from {}", dir.display()),
        Ok(None) => {}
        Err(e) => {
            eprintln!("integration: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let args = Arguments::from_args();
    let mut trials = harness_selftest::trials();
    trials.extend(core::trials());
    trials.extend(auth::trials());
    trials.extend(network::trials());
    trials.extend(operator::trials());
    trials.extend(reaper::trials());
    trials.extend(durability::trials());
    trials.extend(engine::trials());
    trials.extend(escape::trials());
    trials.extend(pool::trials());

    let runs_something = !args.list
        && trials
            .iter()
            .any(|t| !args.is_filtered_out(t) && !args.is_ignored(t));
    if !runs_something {
        return libtest_mimic::run(&args, trials).exit_code();
    }

    let env = match harness::Env::init() {
        Ok(env) => env,
        Err(e) => {
            eprintln!("integration: the test environment did not start: {e:?}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "integration: environment in {} (containerd pid {}, {}, isolated on {}, flow on {})",
        env.dir().display(),
        env.containerd.pid(),
        env.containerd.version(),
        env.isolated.addr(),
        env.flow.addr()
    );
    let conclusion = libtest_mimic::run(&args, trials);
    let leaks = env.teardown();
    if !leaks.is_empty() {
        eprintln!(
            "integration: teardown cleaned up what the run left behind:\n  {}",
            leaks.join("\n  ")
        );
    }
    conclusion.exit_code()
}
