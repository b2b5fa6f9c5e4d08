//! One shutdown signal for every task: the controllers, the probe server, the leader
//! election.

use tokio_util::sync::CancellationToken;
use tracing::info;

/// The signal handlers could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the {signal} handler: {source}")]
pub struct ShutdownError {
    /// The signal.
    pub signal: &'static str,
    /// The operating system's error.
    #[source]
    pub source: std::io::Error,
}

/// A token cancelled at the first SIGTERM or SIGINT. Clone it into every task; each
/// awaits `token.cancelled()` (or passes `token.clone().cancelled_owned()` to
/// `Controller::graceful_shutdown_on`).
///
/// Must be called inside a Tokio runtime. The handlers stay installed, so a second signal
/// does not kill the process; the Pod's termination grace period bounds the shutdown.
pub fn shutdown_on_signals() -> Result<CancellationToken, ShutdownError> {
    let token = CancellationToken::new();
    let cancel = token.clone();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).map_err(|source| ShutdownError {
            signal: "SIGTERM",
            source,
        })?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(|source| ShutdownError {
            signal: "SIGINT",
            source,
        })?;
        tokio::spawn(async move {
            let signal = tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
            };
            info!(signal, "shutting down");
            cancel.cancel();
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            info!(signal = "Ctrl-C", "shutting down");
            cancel.cancel();
        }
    });
    Ok(token)
}
