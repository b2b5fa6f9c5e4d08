//! What can stop a benchmark: every failure names what was being done and, for waits,
//! how far it got.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// A benchmark could not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A binary the benchmark starts has not been built.
    #[error(
        "{name} not found at {}: build the workspace binaries first (`cargo build --release --workspace --bins`, which `make bench` runs), or pass its path with {flag}",
        path.display()
    )]
    BinaryNotFound {
        /// The binary's name.
        name: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// The flag that overrides the path.
        flag: &'static str,
    },
    /// The benchmark's own executable path is unknown (to find its sibling binaries).
    #[error("cannot find the benchmark's own executable: {0}")]
    CurrentExe(std::io::Error),
    /// The local control plane did not start.
    #[error("control plane: {0}")]
    ControlPlane(#[from] sallyport_e2e::controlplane::Error),
    /// The CRDs could not be installed.
    #[error("installing the CRDs: {0}")]
    Crds(#[from] sallyport_e2e::manifests::ManifestError),
    /// A process could not be started.
    #[error("cannot start {}: {source}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The operator exited while the benchmark needed it.
    #[error("the operator exited early ({status}); its log: {}", log.display())]
    OperatorExited {
        /// How it exited.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
    },
    /// The apiserver refused a request.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// The apiserver's answer.
        source: kube::Error,
    },
    /// A watch ended although it should run until the benchmark is done.
    #[error("the watch of {what} ended before the benchmark was done")]
    WatchEnded {
        /// What was watched.
        what: &'static str,
    },
    /// Something did not happen within its bound.
    #[error("{what} did not happen within {waited:?}; progress: {progress}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long the benchmark waited.
        waited: Duration,
        /// How far it got.
        progress: String,
    },
    /// A fixture could not be built.
    #[error("building {what}: {message}")]
    Fixture {
        /// Which fixture.
        what: String,
        /// Why.
        message: String,
    },
    /// The generated fleet did not compile.
    #[error("compiling the generated fleet: {0}")]
    Compile(#[from] sallyport_operator::compile::CompileError),
    /// The generated fleet compiled, but not to what the generator intended.
    #[error(
        "the generated fleet of {apps} apps compiled to {routes} routes, {skipped} skipped (first: {first_skipped})"
    )]
    UnexpectedCompile {
        /// Apps generated.
        apps: usize,
        /// Routes compiled.
        routes: usize,
        /// Apps left out.
        skipped: usize,
        /// The first one left out, with its reason.
        first_skipped: String,
    },
    /// The fleet configuration could not be encoded.
    #[error("encoding the fleet configuration: {0}")]
    Encode(String),
    /// A file under /proc could not be read or understood.
    #[error("reading {}: {message}", path.display())]
    Proc {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A part run with the data-plane benchmark's pieces (processes, PKI, client) failed.
    #[error(transparent)]
    Dataplane(Box<crate::dataplane::DataplaneError>),
    /// Another I/O failure: the async runtime, the operator's log, writing the report.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

impl From<crate::dataplane::DataplaneError> for BenchError {
    fn from(error: crate::dataplane::DataplaneError) -> Self {
        Self::Dataplane(Box::new(error))
    }
}

impl BenchError {
    /// A [`BenchError::Kube`] for `what`.
    pub(crate) fn kube(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let what = what.into();
        move |source| BenchError::Kube { what, source }
    }

    /// A [`BenchError::Io`] for `what`.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }
}
