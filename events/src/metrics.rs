//! Prometheus metrics of event delivery, the same in every component that sends events:
//! how many each sink delivered, dropped (queue full) and had refused, and how many wait.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `sallyport_events_delivered_total` | counter | `sink` (`http`, `otlp`) |
//! | `sallyport_events_dropped_total` | counter | `sink` |
//! | `sallyport_events_rejected_total` | counter | `sink` |
//! | `sallyport_events_pending` | gauge | `sink` |
//!
//! The values are read from [`Events::stats`] at each scrape ([`EventMetrics::update`]).

use prometheus::core::Collector;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use sallyport_service::metrics::{MetricsError, register};

use crate::pipeline::{Events, SinkStats};

/// The delivery metrics of a pipeline's sinks, registered in a component's registry.
#[derive(Debug, Clone)]
pub struct EventMetrics {
    delivered: IntCounterVec,
    dropped: IntCounterVec,
    rejected: IntCounterVec,
    pending: IntGaugeVec,
}

impl EventMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, MetricsError> {
        let counter = |name: &'static str, help: &str| {
            register(registry, name, |name| {
                IntCounterVec::new(Opts::new(name, help), &["sink"])
            })
        };
        Ok(Self {
            delivered: counter(
                "sallyport_events_delivered_total",
                "Sign-in and audit events a sink's endpoint accepted, by sink (http, otlp).",
            )?,
            dropped: counter(
                "sallyport_events_dropped_total",
                "Events a sink dropped because its queue was full (the endpoint was down or slow for too long), by sink.",
            )?,
            rejected: counter(
                "sallyport_events_rejected_total",
                "Events a sink's endpoint refused for good (a 4xx other than 408 and 429), by sink.",
            )?,
            pending: register(registry, "sallyport_events_pending", |name| {
                IntGaugeVec::new(
                    Opts::new(
                        name,
                        "Events waiting in a sink's queue or being sent, by sink.",
                    ),
                    &["sink"],
                )
            })?,
        })
    }

    /// Brings the metrics up to `events`' sink counts (call before encoding a scrape).
    pub fn update(&self, events: &Events) {
        self.update_from(&events.stats());
    }

    /// Brings the metrics up to `stats`. Counters only move forward: a count below the
    /// metric's (a new pipeline) leaves it unchanged.
    pub fn update_from(&self, stats: &[SinkStats]) {
        for sink in stats {
            let label = [sink.sink.as_str()];
            for (counter, value) in [
                (&self.delivered, sink.delivered),
                (&self.dropped, sink.dropped),
                (&self.rejected, sink.rejected),
            ] {
                let counter = counter.with_label_values(&label);
                counter.inc_by(value.saturating_sub(counter.get()));
            }
            self.pending
                .with_label_values(&label)
                .set(i64::try_from(sink.pending).unwrap_or(i64::MAX));
        }
    }

    /// The collectors, for declaring the metrics in a scrape before their first sample.
    pub fn collectors(&self) -> [&dyn Collector; 4] {
        [
            &self.delivered,
            &self.dropped,
            &self.rejected,
            &self.pending,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(delivered: u64, dropped: u64, pending: u64) -> SinkStats {
        SinkStats {
            sink: "http".to_owned(),
            delivered,
            dropped,
            rejected: 0,
            pending,
        }
    }

    #[test]
    fn sink_counts_become_metrics_and_only_grow() -> Result<(), MetricsError> {
        let registry = Registry::new();
        let metrics = EventMetrics::register(&registry)?;
        let text = sallyport_service::metrics::encode(&registry, &metrics.collectors())?;
        assert!(
            text.contains("# TYPE sallyport_events_dropped_total counter"),
            "{text}"
        );

        metrics.update_from(&[stats(10, 2, 5)]);
        metrics.update_from(&[stats(12, 2, 0)]);
        let text = sallyport_service::metrics::encode(&registry, &metrics.collectors())?;
        assert!(
            text.contains("sallyport_events_delivered_total{sink=\"http\"} 12"),
            "{text}"
        );
        assert!(
            text.contains("sallyport_events_dropped_total{sink=\"http\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("sallyport_events_pending{sink=\"http\"} 0"),
            "{text}"
        );

        metrics.update_from(&[stats(3, 0, 0)]);
        let text = sallyport_service::metrics::encode(&registry, &metrics.collectors())?;
        assert!(
            text.contains("sallyport_events_delivered_total{sink=\"http\"} 12"),
            "{text}"
        );
        Ok(())
    }
}
