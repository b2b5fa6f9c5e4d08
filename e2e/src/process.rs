//! Sallyport's own binaries run as real processes in tests.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A workspace binary could not be found or started.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The binary has not been built.
    #[error(
        "{0} does not exist: build the workspace binaries first (`cargo build --workspace --bins`, which `make e2e` runs)"
    )]
    NotBuilt(PathBuf),
    /// The test binary's own path is unknown.
    #[error("cannot find the test executable: {0}")]
    CurrentExe(std::io::Error),
    /// Spawning failed.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The binary.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The path of the workspace binary `name` (e.g. `sallyport-operator`) in the cargo
/// target directory this test runs from: a test executable lives in
/// `target/<profile>/deps/`, the binaries one level up.
pub fn workspace_binary(name: &str) -> Result<PathBuf, ProcessError> {
    let exe = std::env::current_exe().map_err(ProcessError::CurrentExe)?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    let path = profile_dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ProcessError::NotBuilt(path))
    }
}

/// A child process that is killed when dropped, so a failing test leaves nothing running.
/// It also dies with the test process (SIGKILL via `setpriv --pdeathsig`, when available).
pub struct OwnedProcess {
    child: Child,
    /// What the process wrote (stdout and stderr), when started with
    /// [`OwnedProcess::start_capturing`].
    output: Option<Arc<Mutex<Vec<u8>>>>,
}

impl OwnedProcess {
    /// Starts the workspace binary `name` with `args` and extra environment `envs`; its
    /// output goes to the test's stderr so a failure shows its logs.
    pub fn start(name: &str, args: &[&str], envs: &[(&str, &str)]) -> Result<Self, ProcessError> {
        Self::start_program(&workspace_binary(name)?, args, envs, false)
    }

    /// Like [`OwnedProcess::start`], and also keeps what the process writes to stdout and
    /// stderr for [`OwnedProcess::output`] (it still reaches the test's stderr too).
    pub fn start_capturing(
        name: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Self, ProcessError> {
        Self::start_program(&workspace_binary(name)?, args, envs, true)
    }

    /// Starts any `program` (e.g. a system server used as a test backend) as
    /// [`OwnedProcess::start`] does, capturing its output when `capture` is set.
    pub fn start_program(
        program: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        capture: bool,
    ) -> Result<Self, ProcessError> {
        let setpriv = PathBuf::from("/usr/bin/setpriv");
        let mut command = if setpriv.is_file() {
            let mut command = Command::new(setpriv);
            command.args(["--pdeathsig", "KILL", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        command
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null());
        if capture {
            command.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let mut child = command.spawn().map_err(|source| ProcessError::Spawn {
            program: program.to_owned(),
            source,
        })?;
        let output = capture.then(|| {
            let output = Arc::new(Mutex::new(Vec::new()));
            if let Some(stdout) = child.stdout.take() {
                copy_output(stdout, output.clone());
            }
            if let Some(stderr) = child.stderr.take() {
                copy_output(stderr, output.clone());
            }
            output
        });
        Ok(Self { child, output })
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process id: the program's own (`setpriv` execs it), e.g. to read
    /// `/proc/<pid>/status`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the process; fails with `ESRCH` once it has exited (and been
    /// reaped), so a recycled pid is never signalled.
    pub fn signal(&mut self, signal: Signal) -> Result<(), nix::Error> {
        if !self.is_running() {
            return Err(nix::Error::ESRCH);
        }
        let pid = i32::try_from(self.child.id()).map_err(|_| nix::Error::EINVAL)?;
        kill(Pid::from_raw(pid), signal)
    }

    /// Asks the process to stop (SIGTERM), as Kubernetes does before a pod goes; see
    /// [`OwnedProcess::wait_for_exit`].
    pub fn terminate(&mut self) -> Result<(), nix::Error> {
        self.signal(Signal::SIGTERM)
    }

    /// Waits up to `within` for the process to exit, polling; its exit status, or `None`
    /// when it still runs.
    pub async fn wait_for_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the process has written so far (stdout and stderr, interleaved as read;
    /// lossy UTF-8); empty unless started with [`OwnedProcess::start_capturing`].
    pub fn output(&self) -> String {
        self.output.as_ref().map_or_else(String::new, |output| {
            String::from_utf8_lossy(&output.lock().unwrap_or_else(PoisonError::into_inner))
                .into_owned()
        })
    }

    /// Stops the process (SIGKILL) and waits for it.
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies a child's output pipe into `output` and to the test's stderr, on a thread of
/// its own that ends with the pipe.
fn copy_output(mut pipe: impl Read + Send + 'static, output: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut buffer = [0u8; 8192];
        while let Ok(read) = pipe.read(&mut buffer) {
            let Some(chunk) = buffer.get(..read).filter(|c| !c.is_empty()) else {
                break;
            };
            let _ = std::io::stderr().write_all(chunk);
            output
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(chunk);
        }
    });
}

impl Drop for OwnedProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `sallyport-operator run` against the control plane of `kubeconfig`, with
/// `operator_namespace` as its namespace, its probes on a free loopback port (tests run
/// side by side), a fixed identity (so a restarted operator takes its Lease back at
/// once), and `extra_args`.
pub fn start_operator(
    kubeconfig: &std::path::Path,
    operator_namespace: &str,
    extra_args: &[&str],
) -> Result<OwnedProcess, ProcessError> {
    let identity = format!("e2e-operator-{operator_namespace}");
    start_operator_as(&identity, kubeconfig, operator_namespace, extra_args)
}

/// Like [`start_operator`], with the replica identity (`POD_NAME`) `identity`, for tests
/// that run several replicas.
pub fn start_operator_as(
    identity: &str,
    kubeconfig: &std::path::Path,
    operator_namespace: &str,
    extra_args: &[&str],
) -> Result<OwnedProcess, ProcessError> {
    let kubeconfig = kubeconfig.display().to_string();
    let mut args = vec![
        "run",
        "--namespace",
        operator_namespace,
        "--probe-address",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra_args);
    OwnedProcess::start(
        "sallyport-operator",
        &args,
        &[
            ("KUBECONFIG", &kubeconfig),
            ("POD_NAME", identity),
            ("RUST_LOG", "info,kube=warn"),
        ],
    )
}
