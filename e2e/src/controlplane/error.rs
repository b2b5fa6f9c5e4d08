use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

/// What went wrong while building, starting, supervising or stopping a control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A component was asked to restart before the control plane started it.
    #[error("{component} has not been started")]
    NotStarted {
        /// The component.
        component: &'static str,
    },
    /// A component's executable (or kwok's stages file) is not in the binaries directory.
    #[error(
        "{name} not found in {}; put it there, or unset KUBEBUILDER_ASSETS to build the binaries",
        dir.display()
    )]
    MissingBinary {
        /// The file name.
        name: &'static str,
        /// The directory searched.
        dir: PathBuf,
    },

    /// `build-binaries.sh` failed; its output went to stderr.
    #[error("building the control-plane binaries failed ({status}); see its output above")]
    BuildFailed {
        /// How the script exited.
        status: ExitStatus,
    },

    /// `build-binaries.sh` succeeded but did not print the binaries directory.
    #[error("build-binaries.sh printed no binaries directory on stdout")]
    BuildPrintedNoDir,

    /// A program could not be started.
    #[error("could not start {program}: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        source: io::Error,
    },

    /// Waiting for a child process failed.
    #[error("waiting for {process}: {source}")]
    Wait {
        /// The process waited for.
        process: String,
        /// Why.
        source: io::Error,
    },

    /// Reading, writing or removing a file or directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },

    /// Generating a certificate or key failed.
    #[error("generating the {what}: {source}")]
    Pki {
        /// Which certificate or key.
        what: &'static str,
        /// Why.
        source: rcgen::Error,
    },

    /// No free loopback port could be reserved.
    #[error("reserving a free port on 127.0.0.1: {0}")]
    NoFreePort(#[source] io::Error),

    /// The kubeconfig could not be serialized.
    #[error("serializing the kubeconfig: {0}")]
    KubeconfigYaml(#[source] serde_yaml::Error),

    /// The kubeconfig could not be read or turned into a client configuration.
    #[error("kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        /// The kubeconfig file.
        path: PathBuf,
        /// Why.
        source: kube::config::KubeconfigError,
    },

    /// A client for a component's health endpoint could not be built.
    #[error("health endpoint {url}: {reason}")]
    HealthEndpoint {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },

    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    /// A component exited while it should be running.
    #[error("{component} exited ({status}); last lines of {}:\n{tail}", log.display())]
    Exited {
        /// The component.
        component: &'static str,
        /// How it exited.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
        /// The end of its log file.
        tail: String,
    },

    /// A component did not become ready in time.
    #[error(
        "{component} not ready after {}s (waiting until {condition}); last lines of {}:\n{tail}",
        timeout.as_secs(),
        log.display()
    )]
    NotReady {
        /// The component.
        component: &'static str,
        /// What was awaited.
        condition: &'static str,
        /// How long it was awaited.
        timeout: Duration,
        /// Its log file.
        log: PathBuf,
        /// The end of its log file.
        tail: String,
    },

    /// `run --state-dir` was given a directory that holds files already.
    #[error(
        "state directory {} is not empty; give a new or empty one (it is deleted on exit)",
        path.display()
    )]
    StateDirNotEmpty {
        /// The directory.
        path: PathBuf,
    },

    /// Installing a signal handler failed.
    #[error("installing a signal handler: {0}")]
    Signal(#[source] io::Error),

    /// A `sallyport-cluster run` process ended before its control plane was ready.
    #[error("sallyport-cluster run exited ({status}) before the control plane was ready{details}")]
    SupervisorExited {
        /// How it exited.
        status: ExitStatus,
        /// Where to look, or the end of its log.
        details: String,
    },

    /// A `sallyport-cluster` process did not reach the expected state in time.
    #[error("sallyport-cluster (pid {pid}) did not {what} within {}s", timeout.as_secs())]
    SupervisorTimeout {
        /// Its process id.
        pid: u32,
        /// What it did not do.
        what: &'static str,
        /// How long it was given.
        timeout: Duration,
    },

    /// `env` found no control plane started by `up`.
    #[error("no control plane is up in {}; start one with `sallyport-cluster up`", state_dir.display())]
    NotUp {
        /// The state directory of `up`.
        state_dir: PathBuf,
    },

    /// The control plane shared by this process failed to start earlier.
    #[error("the shared control plane failed to start: {0}")]
    SharedFailed(Arc<Error>),

    /// None of `SALLYPORT_CACHE`, `XDG_CACHE_HOME`, `HOME` is set.
    #[error("no cache directory: set SALLYPORT_CACHE (or HOME)")]
    NoCacheDir,
}

impl Error {
    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}
