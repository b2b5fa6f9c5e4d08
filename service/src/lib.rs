//! What every Sallyport binary shares as a long-running service: logging set up the same
//! way, shutdown on SIGTERM or SIGINT, and duration arguments written like Kubernetes
//! durations (`30s`, `1h30m`).

pub mod metrics;

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Sets up logging to stderr: `text` for people (coloured on a terminal), `json` for log
/// pipelines; the level from `RUST_LOG` (default `info`).
pub fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Cancels `shutdown` on the first SIGTERM (Kubernetes stopping the pod) or SIGINT
/// (Ctrl-C), logging which; call from inside a Tokio runtime.
pub fn cancel_on_signals(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(error) => {
                    warn!(%error, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            () = terminate => info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
    });
}

/// Parses a positive duration argument written like a Kubernetes duration (`500ms`,
/// `30s`, `1h30m`): a clap `value_parser`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    sallyport_api::Duration::parse(text)
        .and_then(|d| d.to_std())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubernetes_durations() {
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("soon").is_err());
    }
}
