//! The real `kiln` binary end to end: `plan` offline, `build` against a real embedded daemon.

use std::process::Command;

#[path = "cli/bake.rs"]
mod bake;
#[path = "cli/build.rs"]
mod build;
#[path = "cli/cache.rs"]
mod cache;
#[path = "cli/gc.rs"]
mod gc;
#[path = "cli/plan.rs"]
mod plan;
#[path = "cli/sandbox.rs"]
mod sandbox;

/// Runs `kiln` with `args`; returns success, stdout and stderr.
fn kiln(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("run kiln");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
