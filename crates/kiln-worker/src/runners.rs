//! Runner processes started before the steps that use them.
//!
//! Starting `kiln-runner` (fork, exec, dynamic linking, its runtime's start) is a millisecond
//! or more of a serial step's path. The pool keeps [`IDLE`] runners started and blocked
//! reading their spec on standard input (`kiln-runner run --spec -`); a step takes one,
//! writes its spec and closes the pipe, and the pool starts a replacement in the background
//! while the step runs. Each runner still runs exactly one step: nothing of one step's
//! process (its working directory, namespaces, memory) reaches the next.
//!
//! An idle runner whose worker goes away reads an empty spec and exits without doing
//! anything; one that died while idle is noticed when taken and replaced at once.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::process::{Child, Command};

/// How many runners wait for a step.
const IDLE: usize = 2;

/// A started runner waiting for its spec, and the file it will write its result to.
pub(crate) struct Runner {
    pub child: Child,
    pub result: PathBuf,
}

pub(crate) struct RunnerPool {
    program: PathBuf,
    /// Where runners write their results (`runner-N.json`).
    results: PathBuf,
    idle: Mutex<Vec<Runner>>,
    /// Set while a background task tops up the pool.
    refilling: AtomicBool,
    next: AtomicU64,
}

impl RunnerPool {
    pub fn new(program: PathBuf, results: PathBuf) -> Arc<RunnerPool> {
        Arc::new(RunnerPool {
            program,
            results,
            idle: Mutex::new(Vec::new()),
            refilling: AtomicBool::new(false),
            next: AtomicU64::new(0),
        })
    }

    /// A runner ready for a spec: an idle one that is still alive, or else one started now
    /// (on a blocking thread: forking is not free). Either way the pool is topped up in the
    /// background.
    pub async fn take(self: &Arc<Self>) -> std::io::Result<Runner> {
        let idle = loop {
            let Some(mut runner) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() else { break None };
            match runner.child.try_wait() {
                Ok(None) => break Some(runner),
                status => tracing::warn!("an idle {} ended before it had a step: {status:?}", self.program.display()),
            }
        };
        let runner = match idle {
            Some(runner) => runner,
            None => {
                let pool = Arc::clone(self);
                tokio::task::spawn_blocking(move || pool.start()).await.map_err(std::io::Error::other)??
            }
        };
        self.refill();
        Ok(runner)
    }

    /// The program runners are started from, for messages.
    pub fn program(&self) -> &std::path::Path {
        &self.program
    }

    fn start(&self) -> std::io::Result<Runner> {
        let result = self.results.join(format!("runner-{}.json", self.next.fetch_add(1, Ordering::Relaxed)));
        let child = Command::new(&self.program)
            .args(["run", "--spec", "-", "--result"])
            .arg(&result)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        Ok(Runner { child, result })
    }

    /// Starts runners until [`IDLE`] wait, on a blocking thread (forking is not free), one
    /// refill at a time.
    fn refill(self: &Arc<Self>) {
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let short = || pool.idle.lock().unwrap_or_else(|e| e.into_inner()).len() < IDLE;
            loop {
                while short() {
                    match pool.start() {
                        Ok(runner) => pool.idle.lock().unwrap_or_else(|e| e.into_inner()).push(runner),
                        Err(error) => {
                            tracing::warn!("starting an idle {}: {error}", pool.program.display());
                            pool.refilling.store(false, Ordering::Release);
                            return;
                        }
                    }
                }
                pool.refilling.store(false, Ordering::Release);
                // A runner taken after the last look but before the flag was down found a
                // refill still running: look again, unless another refill has started.
                if !short() || pool.refilling.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_runner_that_died_while_idle_is_replaced_when_taken() {
        let dir = tempfile::tempdir().unwrap();
        let pool = RunnerPool::new(kiln_testkit::runner_binary(), dir.path().to_path_buf());
        let mut dead = pool.start().unwrap();
        dead.child.start_kill().unwrap();
        dead.child.wait().await.unwrap();
        let dead_result = dead.result.clone();
        pool.idle.lock().unwrap().push(dead);

        let mut taken = pool.take().await.unwrap();
        assert_ne!(taken.result, dead_result, "the dead runner was handed out");
        assert!(taken.child.try_wait().unwrap().is_none(), "the runner taken is not running");
        // A runner whose spec never comes exits quietly once its standard input closes.
        drop(taken.child.stdin.take());
        assert!(taken.child.wait().await.unwrap().success());
        assert!(!taken.result.exists());
    }
}
