//! The operator's Prometheus metrics, served as text on `/metrics` by the probe server
//! ([`crate::probes`]).
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `sallyport_operator_reconciles_total` | counter | `controller` |
//! | `sallyport_operator_reconcile_failures_total` | counter | `controller`, `error` ([`Error::metric_label`](crate::error::Error::metric_label)) |
//! | `sallyport_operator_reconcile_duration_seconds` | histogram | `controller` |
//! | `sallyport_operator_leader` | gauge | 1 while this replica holds the leader Lease |
//! | `sallyport_operator_connector_group_connected_connectors` | gauge | `namespace`, `group` |
//! | `sallyport_operator_connector_group_desired_connectors` | gauge | `namespace`, `group` |
//! | `sallyport_operator_published_app_ready` | gauge | `namespace`, `app` |
//! | `sallyport_operator_certificate_expiry_timestamp_seconds` | gauge | `secret` |
//!
//! `controller` is the kind a controller reconciles (`PublishedApp`, `ConnectorGroup`, ...).
//!
//! The ConnectorGroup and PublishedApp gauges are read at each scrape from the
//! controllers' caches ([`Metrics::follow_objects`]), so they are those of the leader
//! (other replicas have no caches and no such series), follow each status as the
//! controllers write it, and a deleted object's series goes with it. The certificate
//! expiry gauges are set by the PKI loop ([`Metrics::record_pki_expiry`]).

use std::sync::{Arc, OnceLock};

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::Store;
use prometheus::{
    HistogramOpts, HistogramTimer, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use sallyport_api::{ConnectorGroup, PublishedApp};
use sallyport_service::metrics::register;
use tracing::debug;

/// Upper bounds of the reconcile duration buckets, in seconds.
const DURATION_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 15.0];

pub use sallyport_service::metrics::MetricsError;

/// The operator's metrics, in a registry of their own. Cheap to clone: every clone updates
/// the same metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    reconciles: IntCounterVec,
    failures: IntCounterVec,
    duration: HistogramVec,
    leader: IntGauge,
    connected: IntGaugeVec,
    desired: IntGaugeVec,
    app_ready: IntGaugeVec,
    certificate_expiry: IntGaugeVec,
    /// Delivery of audit events to SIEM sinks.
    events: sallyport_events::EventMetrics,
    objects: Arc<OnceLock<ObjectCaches>>,
}

/// The controllers' caches the object gauges are read from.
#[derive(Debug, Clone)]
struct ObjectCaches {
    groups: Store<ConnectorGroup>,
    apps: Store<PublishedApp>,
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
        let gauge = |name: &'static str, help: &str, labels: &[&str]| {
            register(&registry, name, |name| {
                IntGaugeVec::new(Opts::new(name, help), labels)
            })
        };
        let connected = gauge(
            "sallyport_operator_connector_group_connected_connectors",
            "Connectors of the group with a live tunnel to the fleet (status.connectedConnectors).",
            &["namespace", "group"],
        )?;
        let desired = gauge(
            "sallyport_operator_connector_group_desired_connectors",
            "Connectors the group should have (status.desiredConnectors).",
            &["namespace", "group"],
        )?;
        let app_ready = gauge(
            "sallyport_operator_published_app_ready",
            "1 while the PublishedApp's Ready condition is True, else 0.",
            &["namespace", "app"],
        )?;
        let certificate_expiry = gauge(
            "sallyport_operator_certificate_expiry_timestamp_seconds",
            "When a certificate of the fleet's PKI expires (notAfter), in Unix seconds, by Secret.",
            &["secret"],
        )?;
        let events = sallyport_events::EventMetrics::register(&registry)?;
        Ok(Self {
            events,
            registry,
            reconciles,
            failures,
            duration,
            leader,
            connected,
            desired,
            app_ready,
            certificate_expiry,
            objects: Arc::new(OnceLock::new()),
        })
    }

    /// Reads the ConnectorGroup and PublishedApp gauges from these controller caches at
    /// every scrape from now on (once; later calls are ignored).
    pub fn follow_objects(&self, groups: Store<ConnectorGroup>, apps: Store<PublishedApp>) {
        let _already_following = self.objects.set(ObjectCaches { groups, apps });
    }

    /// Sets the expiry gauge of the certificate Secret `secret` from its `tls.crt`; an
    /// unreadable certificate removes the series.
    pub fn set_certificate_expiry(&self, secret: &str, tls_crt: Option<&[u8]>) {
        match tls_crt.and_then(sallyport_service::metrics::not_after_of_pem) {
            Some(not_after) => self
                .certificate_expiry
                .with_label_values(&[secret])
                .set(not_after),
            None => {
                let _absent = self.certificate_expiry.remove_label_values(&[secret]);
            }
        }
    }

    /// Reads the PKI's certificate Secrets in `namespace` and sets their expiry gauges;
    /// a Secret that cannot be read now keeps its last value.
    pub async fn record_pki_expiry(&self, client: &kube::Client, namespace: &str) {
        let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
        for name in [
            crate::pki::build::ROOT_CA,
            crate::pki::build::CONNECTOR_ISSUER,
            crate::pki::build::TUNNEL_TLS,
        ] {
            match secrets.get_opt(name).await {
                Ok(secret) => {
                    let pem = secret
                        .and_then(|s| s.data)
                        .and_then(|mut data| data.remove("tls.crt"));
                    self.set_certificate_expiry(name, pem.as_ref().map(|p| p.0.as_slice()));
                }
                Err(error) => {
                    debug!(secret = name, %error, "cannot read a PKI Secret for its expiry")
                }
            }
        }
    }

    /// Sets the object gauges from the caches, when they are followed.
    fn refresh_objects(&self) {
        let Some(caches) = self.objects.get() else {
            return;
        };
        self.connected.reset();
        self.desired.reset();
        for group in caches.groups.state() {
            let labels = [group.namespace().unwrap_or_default(), group.name_any()];
            let labels = [labels[0].as_str(), labels[1].as_str()];
            let status = group.status.clone().unwrap_or_default();
            self.connected
                .with_label_values(&labels)
                .set(i64::from(status.connected_connectors));
            self.desired
                .with_label_values(&labels)
                .set(i64::from(status.desired_connectors));
        }
        self.app_ready.reset();
        for app in caches.apps.state() {
            let ready = app.status.as_ref().is_some_and(|status| {
                status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
            let (namespace, name) = (app.namespace().unwrap_or_default(), app.name_any());
            self.app_ready
                .with_label_values(&[namespace.as_str(), name.as_str()])
                .set(i64::from(ready));
        }
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
        self.refresh_objects();
        self.events.update(sallyport_events::global());
        let [delivered, dropped, rejected, pending] = self.events.collectors();
        sallyport_service::metrics::encode(
            &self.registry,
            &[
                delivered,
                dropped,
                rejected,
                pending,
                &self.reconciles,
                &self.failures,
                &self.duration,
                &self.leader,
                &self.connected,
                &self.desired,
                &self.app_ready,
                &self.certificate_expiry,
            ],
        )
    }
}

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

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
    fn groups_and_apps_are_read_from_the_caches_at_each_scrape() -> Result<(), MetricsError> {
        use kube::runtime::reflector::store;
        use kube::runtime::watcher::Event;
        use sallyport_api::ConnectorGroupStatus;
        let metrics = Metrics::new()?;
        let (groups, mut groups_writer) = store::<ConnectorGroup>();
        let (apps, mut apps_writer) = store::<PublishedApp>();
        metrics.follow_objects(groups, apps);
        let group: ConnectorGroup = serde_json::from_value(serde_json::json!({
            "apiVersion": "sallyport.dev/v1alpha1", "kind": "ConnectorGroup",
            "metadata": {"name": "east", "namespace": "infra"},
            "spec": {}
        }))
        .unwrap_or_else(|e| panic!("group: {e}"));
        let mut group_with_status = group.clone();
        group_with_status.status = Some(ConnectorGroupStatus {
            desired_connectors: 2,
            connected_connectors: 1,
            ..ConnectorGroupStatus::default()
        });
        let app = |ready: &str| -> PublishedApp {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "sallyport.dev/v1alpha1", "kind": "PublishedApp",
                "metadata": {"name": "wiki", "namespace": "infra"},
                "spec": {
                    "externalUrl": "https://wiki.example.com/",
                    "internalUrl": "http://wiki.infra.svc/",
                    "connectorGroup": {"name": "east"}
                },
                "status": {"conditions": [{
                    "type": "Ready", "status": ready, "reason": "Test", "message": "",
                    "lastTransitionTime": "2026-01-01T00:00:00Z"
                }]}
            }))
            .unwrap_or_else(|e| panic!("app: {e}"))
        };
        groups_writer.apply_watcher_event(&Event::Apply(group_with_status));
        apps_writer.apply_watcher_event(&Event::Apply(app("True")));
        let text = metrics.encode()?;
        for line in [
            "sallyport_operator_connector_group_connected_connectors{group=\"east\",namespace=\"infra\"} 1",
            "sallyport_operator_connector_group_desired_connectors{group=\"east\",namespace=\"infra\"} 2",
            "sallyport_operator_published_app_ready{app=\"wiki\",namespace=\"infra\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        // A status change is seen at the next scrape; a deleted group's series goes.
        apps_writer.apply_watcher_event(&Event::Apply(app("False")));
        groups_writer.apply_watcher_event(&Event::Delete(group));
        let text = metrics.encode()?;
        assert!(
            text.contains(
                "sallyport_operator_published_app_ready{app=\"wiki\",namespace=\"infra\"} 0"
            ),
            "{text}"
        );
        assert!(!text.contains("group=\"east\""), "{text}");
        Ok(())
    }

    #[test]
    fn certificate_expiry_is_read_from_the_pem() -> Result<(), MetricsError> {
        let metrics = Metrics::new()?;
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
        params.not_after = rcgen::date_time_ymd(2031, 1, 2);
        let pem = params
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("{e}"))
            .pem();
        metrics.set_certificate_expiry("sallyport-root-ca", Some(pem.as_bytes()));
        let line = "sallyport_operator_certificate_expiry_timestamp_seconds{secret=\"sallyport-root-ca\"} 1925078400";
        assert!(metrics.encode()?.contains(line));
        // An unreadable certificate has no expiry to show.
        metrics.set_certificate_expiry("sallyport-root-ca", Some(b"garbage"));
        assert!(!metrics.encode()?.contains("secret=\"sallyport-root-ca\""));
        Ok(())
    }

    #[test]
    fn metrics_without_samples_are_declared() -> Result<(), MetricsError> {
        let text = Metrics::new()?.encode()?;
        for line in [
            "# TYPE sallyport_operator_reconcile_failures_total counter",
            "# TYPE sallyport_operator_connector_group_connected_connectors gauge",
            "# TYPE sallyport_operator_published_app_ready gauge",
            "# TYPE sallyport_operator_certificate_expiry_timestamp_seconds gauge",
            "sallyport_operator_leader 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert_eq!(text.matches("# TYPE sallyport_operator_leader ").count(), 1);
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
