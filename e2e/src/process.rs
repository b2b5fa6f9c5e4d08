//! Sallyport's own binaries run as real processes in tests.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

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
}

impl OwnedProcess {
    /// Starts the workspace binary `name` with `args` and extra environment `envs`; its
    /// output goes to the test's stderr so a failure shows its logs.
    pub fn start(name: &str, args: &[&str], envs: &[(&str, &str)]) -> Result<Self, ProcessError> {
        let program = workspace_binary(name)?;
        let setpriv = PathBuf::from("/usr/bin/setpriv");
        let mut command = if setpriv.is_file() {
            let mut command = Command::new(setpriv);
            command.args(["--pdeathsig", "KILL", "--"]).arg(&program);
            command
        } else {
            Command::new(&program)
        };
        command
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null());
        let child = command
            .spawn()
            .map_err(|source| ProcessError::Spawn { program, source })?;
        Ok(Self { child })
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
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
