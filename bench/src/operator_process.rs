//! `sallyport-operator run` as a real process whose memory and CPU time the benchmark
//! reads from `/proc`. It is killed when dropped, and dies with the benchmark.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::error::BenchError;
use crate::procfs::{self, Memory};

/// util-linux's `setpriv`, which makes the kernel kill the operator when the benchmark dies.
const SETPRIV: &str = "/usr/bin/setpriv";

/// How the operator is started.
#[derive(Clone, Debug)]
pub struct OperatorOptions {
    /// The `sallyport-operator` executable.
    pub program: PathBuf,
    /// The admin kubeconfig of the control plane.
    pub kubeconfig: PathBuf,
    /// The operator's namespace (`--namespace`).
    pub namespace: String,
    /// Further arguments after `run`.
    pub extra_args: Vec<String>,
    /// `RUST_LOG` for the operator.
    pub log_filter: String,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

/// A running operator; killed (SIGKILL) when dropped.
pub struct OperatorProcess {
    child: Child,
    log: PathBuf,
}

impl OperatorProcess {
    /// Starts `program run --namespace NS --probe-address 127.0.0.1:0 EXTRA_ARGS` with
    /// `KUBECONFIG` set. Call it from a thread that outlives the process (the kernel
    /// kills the operator when the thread that started it exits).
    pub fn start(options: &OperatorOptions) -> Result<Self, BenchError> {
        let log = File::create(&options.log).map_err(BenchError::io(format!(
            "creating {}",
            options.log.display()
        )))?;
        let log_err = log
            .try_clone()
            .map_err(BenchError::io(format!("opening {}", options.log.display())))?;
        let mut command = if Path::new(SETPRIV).is_file() {
            let mut command = Command::new(SETPRIV);
            command
                .args(["--pdeathsig", "KILL", "--"])
                .arg(&options.program);
            command
        } else {
            Command::new(&options.program)
        };
        command
            .args([
                "run",
                "--namespace",
                &options.namespace,
                "--probe-address",
                "127.0.0.1:0",
            ])
            .args(&options.extra_args)
            .env("KUBECONFIG", &options.kubeconfig)
            .env("POD_NAME", "sallyport-bench-operator")
            .env("RUST_LOG", &options.log_filter)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = command.spawn().map_err(|source| BenchError::Spawn {
            program: options.program.clone(),
            source,
        })?;
        Ok(Self {
            child,
            log: options.log.clone(),
        })
    }

    /// The operator's process id (`setpriv` execs it, so the id is the operator's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Fails when the operator has exited.
    pub fn check_running(&mut self) -> Result<(), BenchError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(BenchError::OperatorExited {
                status,
                log: self.log.clone(),
            }),
            Err(source) => Err(BenchError::Io {
                what: "checking on the operator".into(),
                source,
            }),
        }
    }

    /// Its peak and current resident memory.
    pub fn memory(&self) -> Result<Memory, BenchError> {
        procfs::memory(self.pid())
    }

    /// CPU time (user and system, all threads) it has used so far.
    pub fn cpu_time(&self) -> Result<Duration, BenchError> {
        procfs::cpu_time(self.pid())
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
