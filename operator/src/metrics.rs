//! The operator's Prometheus metrics, served as text on `/metrics` by the probe server
//! ([`crate::probes`]).
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `sallyport_operator_reconciles_total` | counter | `controller` |
//! | `sallyport_operator_reconcile_failures_total` | counter | `controller`, `error` ([`Error::metric_label`](crate::error::Error::metric_label)) |
//! | `sallyport_operator_reconcile_duration_seconds` | histogram | `controller` |
//! | `sallyport_operator_leader` | gauge | 1 while this replica holds the leader Lease |
//!
//! `controller` is the kind a controller reconciles (`PublishedApp`, `ConnectorGroup`, ...).

use prometheus::{
    Encoder, HistogramOpts, HistogramTimer, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Upper bounds of the reconcile duration buckets, in seconds.
const DURATION_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 15.0];

/// The metrics could not be set up or encoded.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A metric could not be created or registered (a bad name or a duplicate).
    #[error("cannot register metric {metric}: {source}")]
    Register {
        /// The metric's name.
        metric: &'static str,
        /// The Prometheus client's error.
        source: prometheus::Error,
    },
    /// Encoding the metrics as Prometheus text failed.
    #[error("cannot encode the metrics as Prometheus text: {0}")]
    Encode(#[source] prometheus::Error),
}

/// The operator's metrics, in a registry of their own. Cheap to clone: every clone updates
/// the same metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    reconciles: IntCounterVec,
    failures: IntCounterVec,
    duration: HistogramVec,
    leader: IntGauge,
}

/// Times one reconcile: the duration is recorded when it is dropped.
#[derive(Debug)]
#[must_use = "the duration is recorded when the timer is dropped; bind it to a variable"]
pub struct ReconcileTimer {
    _timer: HistogramTimer,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let reconciles = register(&registry, "sallyport_operator_reconciles_total", |name| {
            IntCounterVec::new(
                Opts::new(name, "Reconciles started, by controller."),
                &["controller"],
            )
        })?;
        let failures = register(
            &registry,
            "sallyport_operator_reconcile_failures_total",
            |name| {
                IntCounterVec::new(
                    Opts::new(name, "Reconciles that failed, by controller and error."),
                    &["controller", "error"],
                )
            },
        )?;
        let duration = register(
            &registry,
            "sallyport_operator_reconcile_duration_seconds",
            |name| {
                HistogramVec::new(
                    HistogramOpts::new(name, "How long reconciles took, by controller.")
                        .buckets(DURATION_BUCKETS.to_vec()),
                    &["controller"],
                )
            },
        )?;
        let leader = register(&registry, "sallyport_operator_leader", |name| {
            IntGauge::new(
                name,
                "1 while this replica holds the leader Lease and runs the controllers, else 0.",
            )
        })?;
        Ok(Self {
            registry,
            reconciles,
            failures,
            duration,
            leader,
        })
    }

    /// Counts a reconcile of `controller` and times it until the returned timer is
    /// dropped (at the end of the reconcile function).
    pub fn reconcile_started(&self, controller: &str) -> ReconcileTimer {
        self.reconciles.with_label_values(&[controller]).inc();
        ReconcileTimer {
            _timer: self.duration.with_label_values(&[controller]).start_timer(),
        }
    }

    /// Counts a failed reconcile of `controller`; `error` is the error's stable
    /// [`metric_label`](crate::error::Error::metric_label).
    pub fn reconcile_failed(&self, controller: &str, error: &str) {
        self.failures.with_label_values(&[controller, error]).inc();
    }

    /// Sets the leader gauge: whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// The registry, to add metrics of other parts of the operator.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Every metric in the Prometheus text exposition format.
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .map_err(MetricsError::Encode)?;
        Ok(String::from_utf8_lossy(&buffer).into_owned())
    }
}

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

fn register<M>(
    registry: &Registry,
    metric: &'static str,
    make: impl FnOnce(&'static str) -> Result<M, prometheus::Error>,
) -> Result<M, MetricsError>
where
    M: prometheus::core::Collector + Clone + 'static,
{
    let error = |source| MetricsError::Register { metric, source };
    let collector = make(metric).map_err(error)?;
    registry
        .register(Box::new(collector.clone()))
        .map_err(error)?;
    Ok(collector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_failures_durations_and_leadership_are_exposed() -> Result<(), MetricsError> {
        let metrics = Metrics::new()?;
        {
            let _timer = metrics.reconcile_started("PublishedApp");
        }
        let _still_running = metrics.reconcile_started("ConnectorGroup");
        metrics.reconcile_failed("PublishedApp", "api_error");
        metrics.set_leader(true);
        let text = metrics.encode()?;
        for line in [
            "sallyport_operator_reconciles_total{controller=\"PublishedApp\"} 1",
            "sallyport_operator_reconciles_total{controller=\"ConnectorGroup\"} 1",
            "sallyport_operator_reconcile_failures_total{controller=\"PublishedApp\",error=\"api_error\"} 1",
            "sallyport_operator_reconcile_duration_seconds_count{controller=\"PublishedApp\"} 1",
            "sallyport_operator_reconcile_duration_seconds_count{controller=\"ConnectorGroup\"} 0",
            "sallyport_operator_leader 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        Ok(())
    }

    #[test]
    fn clones_share_their_metrics() -> Result<(), MetricsError> {
        let metrics = Metrics::new()?;
        metrics.clone().set_leader(true);
        metrics.set_leader(false);
        assert!(metrics.encode()?.contains("sallyport_operator_leader 0"));
        Ok(())
    }
}
