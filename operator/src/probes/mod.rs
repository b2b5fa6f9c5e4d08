//! Honest probes: one HTTP listener answering the kubelet and Prometheus.
//!
//! - `/livez`: 200 while the process serves requests.
//! - `/readyz`: 503 with a JSON reason until the Sallyport CustomResourceDefinitions are
//!   served and leadership is settled (leading with synced caches, or following a known
//!   leader); then 200 with the same JSON shape ([`ReadinessReport`]).
//! - `/metrics`: the [`Metrics`](crate::metrics::Metrics) in Prometheus text format.
//!
//! The listener stops on the same shutdown signal as the controllers
//! ([`shutdown_on_signals`]).

pub mod crds;
pub mod readiness;
pub mod server;
pub mod shutdown;

use tokio::sync::watch;

pub use crds::wait_until_crds_served;
pub use readiness::{CheckReport, Readiness, ReadinessReport};
pub use server::{ProbeError, ProbeServer};
pub use shutdown::{ShutdownError, shutdown_on_signals};

use crate::leader::LeaderStatus;
use crate::metrics::Metrics;

/// Mirrors a leader election's status into readiness and the leader gauge, until the
/// election and its leadership are gone. Spawn it next to
/// [`LeaderElection::acquire`](crate::leader::LeaderElection::acquire).
pub async fn follow_leadership(
    mut status: watch::Receiver<LeaderStatus>,
    readiness: Readiness,
    metrics: Metrics,
) {
    loop {
        let current = status.borrow_and_update().clone();
        metrics.set_leader(current == LeaderStatus::Leading);
        readiness.set_leadership(current);
        if status.changed().await.is_err() {
            return;
        }
    }
}
