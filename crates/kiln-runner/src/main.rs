//! `kiln-runner`: runs one build step in an OCI container and reports how it ended.
//!
//! Single-threaded by design until the container has started (libcontainer forks with raw
//! `clone3` and changes the process's working directory while it creates a container); see
//! the library docs for the protocol with the worker.

mod cgroup;
mod container;
mod devices;
mod seccomp;

use std::io::Read as _;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use kiln_runner_spec::{RUNNER_FAILED, RunSpec};

fn main() {
    if let Err(error) = dispatch(std::env::args().skip(1).collect()) {
        eprintln!("kiln-runner: {error:#}");
        std::process::exit(RUNNER_FAILED);
    }
}

fn dispatch(args: Vec<String>) -> anyhow::Result<()> {
    let (command, options) = args.split_first().context("usage: kiln-runner run|cleanup [OPTIONS]")?;
    let option =
        |name: &str| -> Option<&String> { options.iter().position(|a| a == name).and_then(|i| options.get(i + 1)) };
    match command.as_str() {
        "run" => {
            let spec_path = option("--spec").context("run needs --spec FILE (or - for standard input)")?;
            let result_path = option("--result").context("run needs --result FILE")?;
            // Done while a runner started ahead of its step waits for the spec.
            let prepared =
                container::Prepared { sandbox: seccomp::sandbox()?, hierarchies: cgroup::Hierarchies::discover()? };
            let text = if spec_path == "-" {
                let mut text = Vec::new();
                std::io::stdin().read_to_end(&mut text).context("reading the spec from standard input")?;
                if text.is_empty() {
                    // A runner started ahead of a step that never came (its worker stopped).
                    return Ok(());
                }
                text
            } else {
                std::fs::read(spec_path).with_context(|| format!("reading {spec_path}"))?
            };
            let spec: RunSpec = serde_json::from_slice(&text).with_context(|| format!("parsing {spec_path}"))?;
            let result = container::run(&spec, prepared)?;
            std::fs::write(result_path, serde_json::to_vec(&result)?)
                .with_context(|| format!("writing {result_path}"))?;
            // The worker reads the result once the output pipes close: close them now rather
            // than when this process has finished exiting.
            let null = std::fs::File::options().write(true).open("/dev/null").context("opening /dev/null")?;
            for output in [1, 2] {
                nix::unistd::dup2(null.as_raw_fd(), output).context("closing the output pipes")?;
            }
            Ok(())
        }
        "cleanup" => {
            let state_root = PathBuf::from(option("--state-root").context("cleanup needs --state-root DIR")?);
            container::cleanup(&state_root, option("--id").map(String::as_str))
        }
        other => bail!("unknown command {other:?}; expected run or cleanup"),
    }
}
