//! What can stop the data-plane benchmark: every failure names what was being done.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use crate::error::BenchError;

/// The data-plane benchmark could not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// A binary the benchmark starts has not been built or installed.
    #[error("{name} not found at {}: {hint}", path.display())]
    BinaryNotFound {
        /// The binary's name.
        name: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// How to get it.
        hint: &'static str,
    },
    /// A process could not be started.
    #[error("cannot start {}: {source}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A process the benchmark needs exited.
    #[error("{name} exited early ({status}); its log: {}", log.display())]
    Exited {
        /// Which process.
        name: &'static str,
        /// How it exited.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
    },
    /// Something did not happen within its bound.
    #[error("{what} did not happen within {waited:?}{}", last.as_ref().map(|l| format!(" (last: {l})")).unwrap_or_default())]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long the benchmark waited.
        waited: Duration,
        /// The last failure seen while waiting, if any.
        last: Option<String>,
    },
    /// The PKI or an app certificate could not be generated.
    #[error("generating the {what}: {message}")]
    Pki {
        /// Which certificate or key.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// The benchmark's PublishedApp and ConnectorGroup did not compile.
    #[error("compiling the fleet configuration: {0}")]
    Compile(#[from] sallyport_operator::compile::command::CommandError),
    /// oha ran but its output was not what the benchmark reads.
    #[error("oha: {0}")]
    Oha(String),
    /// A request or transfer of the benchmark's own client failed.
    #[error("{what}: {message}")]
    Client {
        /// What was being done.
        what: String,
        /// Why.
        message: String,
    },
    /// A step against the Kubernetes control plane failed (S6: its objects, the
    /// identities, the fleet's PKI, a PublishedApp change).
    #[error("{what}: {message}")]
    Cluster {
        /// What was being done.
        what: String,
        /// Why.
        message: String,
    },
    /// A limit of the machine is too low for the run's size (S7: open files, ports).
    #[error("not enough {what}: {needed} needed, {available} available; {hint}")]
    Limit {
        /// Which limit.
        what: String,
        /// What the run needs.
        needed: u64,
        /// What the machine allows.
        available: u64,
        /// How to raise it.
        hint: String,
    },
    /// A measurement from `/proc` failed.
    #[error(transparent)]
    Bench(#[from] BenchError),
    /// Another I/O failure: files, sockets, the async runtime, writing the report.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

impl DataplaneError {
    /// A [`DataplaneError::Io`] for `what`.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| DataplaneError::Io { what, source }
    }

    /// A [`DataplaneError::Client`] for `what`.
    pub(crate) fn client<E: std::fmt::Display>(what: impl Into<String>) -> impl FnOnce(E) -> Self {
        let what = what.into();
        move |error| DataplaneError::Client {
            what,
            message: error.to_string(),
        }
    }
}
