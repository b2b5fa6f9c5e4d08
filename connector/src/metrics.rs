//! The connector's Prometheus metrics, served as text on `/metrics` at
//! `--metrics-address` (off unless given).
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `sallyport_connector_tunnels_up` | gauge | `replica` |
//! | `sallyport_connector_dial_failures` | gauge | |
//! | `sallyport_connector_requests_total` | counter | `app`, `code`, `class` |
//! | `sallyport_connector_backend_duration_seconds` | histogram | `app` |
//! | `sallyport_connector_config_bridged_total` | counter | `how` |
//! | `sallyport_connector_certificate_expiry_timestamp_seconds` | gauge | |
//! | `sallyport_connector_certificate_renewal_timestamp_seconds` | gauge | |
//! | `sallyport_connector_version_info` | gauge (1) | `version`, `desired_version` |
//!
//! The same listener answers `/livez` (the process is up) and `/readyz`: 200 once the
//! connector serves tunnels to every proxy replica the fleet announced, 503 before that
//! and from the moment it starts draining — what a rollout waits for before it stops the
//! next old connector.
//! `app` is the PublishedApp's id (`namespace/name`) when the group's slice serves it,
//! else [`UNKNOWN_APP`] (a request served by the previous slice, or after waiting for the
//! announced one, counts under the app that served it). `how` is `previous_slice` or
//! `catch_up` ([`crate::backend::Bridge`]): requests the current slice refused during a
//! configuration change and served anyway. The backend duration runs until the
//! backend's response headers (or the connector's own refusal).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use sallyport_service::metrics::register;
use sallyport_tunnel::dial::{DialStatus, Handler};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backend::{Backends, Bridged};
use crate::slice::AppBackend;

/// The `app` label of tunneled requests for an app the slice does not serve.
pub const UNKNOWN_APP: &str = "unknown";

/// The content type of [`ConnectorMetrics::encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Upper bounds of the backend duration buckets, in seconds.
const DURATION_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The metrics could not be set up, encoded or served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A metric could not be registered, or the metrics not encoded.
    #[error(transparent)]
    Metrics(#[from] sallyport_service::metrics::MetricsError),
    /// The `--metrics-address` could not be bound.
    #[error("cannot serve metrics on --metrics-address {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// The connector's metrics, in a registry of their own. Cheap to clone: every clone
/// updates the same metrics.
#[derive(Debug, Clone)]
pub struct ConnectorMetrics {
    registry: Registry,
    tunnels: IntGaugeVec,
    dial_failures: IntGauge,
    requests: IntCounterVec,
    duration: HistogramVec,
    bridged: IntCounterVec,
    certificate_expiry: IntGauge,
    certificate_renewal: IntGauge,
    version_info: IntGaugeVec,
    readiness: Arc<Mutex<Readiness>>,
}

/// What `/readyz` answers from.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Readiness {
    /// Tunnels serving, to any replica.
    serving: usize,
    /// Announced replicas this connector holds no serving tunnel to.
    missing: Vec<String>,
    /// Whether the connector is draining (SIGTERM received).
    draining: bool,
}

impl Readiness {
    /// `None` when ready, else why not.
    fn not_ready(&self) -> Option<String> {
        if self.draining {
            Some("draining: the connector is stopping".to_owned())
        } else if self.serving == 0 {
            Some("no tunnel to the fleet is serving yet".to_owned())
        } else if !self.missing.is_empty() {
            Some(format!(
                "no serving tunnel yet to proxy replica(s) {}",
                self.missing.join(", ")
            ))
        } else {
            None
        }
    }
}

impl ConnectorMetrics {
    /// Creates and registers the metrics.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let tunnels = register(&registry, "sallyport_connector_tunnels_up", |name| {
            IntGaugeVec::new(
                Opts::new(
                    name,
                    "Tunnels serving, by proxy replica at their other end.",
                ),
                &["replica"],
            )
        })?;
        let dial_failures = register(&registry, "sallyport_connector_dial_failures", |name| {
            IntGauge::new(
                name,
                "Dials or tunnels that failed in a row since the last healthy tunnel.",
            )
        })?;
        let requests = register(&registry, "sallyport_connector_requests_total", |name| {
            IntCounterVec::new(
                Opts::new(
                    name,
                    "Requests carried from the fleet to backends, by app, status code and status class.",
                ),
                &["app", "code", "class"],
            )
        })?;
        let duration = register(
            &registry,
            "sallyport_connector_backend_duration_seconds",
            |name| {
                HistogramVec::new(
                    HistogramOpts::new(
                        name,
                        "How long backends took until their response headers, by app.",
                    )
                    .buckets(DURATION_BUCKETS.to_vec()),
                    &["app"],
                )
            },
        )?;
        let bridged = register(
            &registry,
            "sallyport_connector_config_bridged_total",
            |name| {
                IntCounterVec::new(
                    Opts::new(
                        name,
                        "Requests the current configuration slice refused during a configuration change and served anyway: by the previous slice within its grace, or by the announced slice after waiting for it.",
                    ),
                    &["how"],
                )
            },
        )?;
        let certificate_expiry = register(
            &registry,
            "sallyport_connector_certificate_expiry_timestamp_seconds",
            |name| {
                IntGauge::new(
                    name,
                    "When the connector's client certificate expires (notAfter), in Unix seconds.",
                )
            },
        )?;
        let certificate_renewal = register(
            &registry,
            "sallyport_connector_certificate_renewal_timestamp_seconds",
            |name| {
                IntGauge::new(
                    name,
                    "When the connector renews its client certificate, in Unix seconds; past it, renewal is failing.",
                )
            },
        )?;
        let version_info = register(&registry, "sallyport_connector_version_info", |name| {
            IntGaugeVec::new(
                Opts::new(
                    name,
                    "1, labelled with the connector's version and the version its group wants (empty until its configuration names one).",
                ),
                &["version", "desired_version"],
            )
        })?;
        version_info
            .with_label_values(&[crate::register::VERSION, ""])
            .set(1);
        Ok(Self {
            registry,
            tunnels,
            dial_failures,
            requests,
            duration,
            bridged,
            certificate_expiry,
            certificate_renewal,
            version_info,
            readiness: Arc::default(),
        })
    }

    /// Records a request to `app` answered with `status` after `elapsed`.
    pub fn request_carried(&self, app: &str, status: StatusCode, elapsed: Duration) {
        self.requests
            .with_label_values(&[
                app,
                status.as_str(),
                sallyport_service::metrics::status_class(status),
            ])
            .inc();
        self.duration
            .with_label_values(&[app])
            .observe(elapsed.as_secs_f64());
    }

    /// Sets the tunnel gauges and the readiness from the dialer's `status`.
    pub fn set_tunnels(&self, status: &DialStatus) {
        let per_replica = status.per_replica();
        self.set_tunnels_per_replica(&per_replica);
        self.dial_failures
            .set(i64::from(status.consecutive_failures));
        let mut readiness = self.lock_readiness();
        readiness.serving = status.serving();
        readiness.missing = status
            .replicas
            .iter()
            .filter(|replica| !per_replica.contains_key(*replica))
            .cloned()
            .collect();
    }

    /// From now on `/readyz` answers 503: the connector is draining.
    pub fn set_draining(&self) {
        self.lock_readiness().draining = true;
    }

    /// `None` when the connector is ready to carry traffic, else why not.
    pub fn not_ready(&self) -> Option<String> {
        self.lock_readiness().not_ready()
    }

    fn lock_readiness(&self) -> std::sync::MutexGuard<'_, Readiness> {
        self.readiness
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the version the group wants (from the configuration).
    pub fn set_desired_version(&self, desired: Option<&str>) {
        self.version_info.reset();
        self.version_info
            .with_label_values(&[crate::register::VERSION, desired.unwrap_or_default()])
            .set(1);
    }

    /// Sets the serving tunnels of each replica; replicas absent have none.
    pub fn set_tunnels_per_replica(&self, per_replica: &BTreeMap<String, usize>) {
        self.tunnels.reset();
        for (replica, count) in per_replica {
            self.tunnels
                .with_label_values(&[replica.as_str()])
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
    }

    /// Sets when the client certificate expires and when it is due for renewal, in Unix
    /// seconds.
    pub fn set_certificate(&self, not_after_unix: i64, renew_at_unix: i64) {
        self.certificate_expiry.set(not_after_unix);
        self.certificate_renewal.set(renew_at_unix);
    }

    /// `backends` as the tunnel's request handler, each request recorded here.
    pub fn handler(&self, backends: Arc<Backends>) -> Handler {
        let metrics = self.clone();
        Arc::new(move |request: Request<Incoming>| {
            // Looked up once: the label and the handling see the same app.
            let app = backends.app_of(&request);
            let (backends, metrics) = (Arc::clone(&backends), metrics.clone());
            Box::pin(async move {
                let started = Instant::now();
                let response = backends.handle_app(request, app.clone()).await;
                let bridged = response.extensions().get::<Bridged>();
                let served = bridged.map(|b| &b.app).or(app.as_ref());
                let label = served.map_or(UNKNOWN_APP, |app| AppBackend::app(app));
                metrics.request_carried(label, response.status(), started.elapsed());
                if let Some(bridged) = bridged {
                    metrics
                        .bridged
                        .with_label_values(&[bridged.by.label()])
                        .inc();
                }
                response
            })
        })
    }

    /// Every metric in the Prometheus text exposition format.
    pub fn encode(&self) -> Result<String, MetricsError> {
        Ok(sallyport_service::metrics::encode(
            &self.registry,
            &[
                &self.tunnels,
                &self.dial_failures,
                &self.requests,
                &self.duration,
                &self.bridged,
                &self.certificate_expiry,
                &self.certificate_renewal,
                &self.version_info,
            ],
        )?)
    }
}

/// Keeps the tunnel gauges of `metrics` up to date with the dialer's status until
/// `shutdown` (or until the dialer is gone).
pub async fn follow_tunnels(
    metrics: ConnectorMetrics,
    mut status: watch::Receiver<DialStatus>,
    shutdown: CancellationToken,
) {
    loop {
        metrics.set_tunnels(&status.borrow_and_update());
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return },
            () = shutdown.cancelled() => return,
        }
    }
}

/// Binds `address` for [`serve`].
pub async fn bind(address: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| MetricsError::Bind { address, source })
}

/// Serves `GET /metrics` (and `/livez`) on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, metrics: ConnectorMetrics, shutdown: CancellationToken) {
    if let Ok(address) = listener.local_addr() {
        info!(%address, "serving /metrics");
    }
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                debug!(%error, "cannot accept a metrics connection");
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = respond(request.uri().path(), &metrics);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let _closed = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(path: &str, metrics: &ConnectorMetrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => match metrics.encode() {
            Ok(text) => (StatusCode::OK, CONTENT_TYPE, text),
            Err(error) => {
                warn!(%error, "cannot encode the metrics");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain; charset=utf-8",
                    "cannot encode the metrics\n".to_owned(),
                )
            }
        },
        "/livez" => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "ok\n".to_owned(),
        ),
        "/readyz" => match metrics.not_ready() {
            None => (
                StatusCode::OK,
                "text/plain; charset=utf-8",
                "ready\n".to_owned(),
            ),
            Some(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                format!("not ready: {why}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found; try /metrics, /livez or /readyz\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use sallyport_tunnel::dial::{TunnelPhase, TunnelStatus};

    use super::*;

    fn metrics() -> ConnectorMetrics {
        ConnectorMetrics::new().unwrap_or_else(|e| panic!("metrics: {e}"))
    }

    fn text(metrics: &ConnectorMetrics) -> String {
        metrics.encode().unwrap_or_else(|e| panic!("encode: {e}"))
    }

    #[test]
    fn recorded_values_are_exposed() {
        let metrics = metrics();
        metrics.request_carried("infra/wiki", StatusCode::OK, Duration::from_millis(3));
        metrics.request_carried(UNKNOWN_APP, StatusCode::NOT_FOUND, Duration::from_millis(1));
        metrics.set_certificate(1_900_000_000, 1_800_000_000);
        metrics.set_tunnels_per_replica(&BTreeMap::from([
            ("proxy-a".to_owned(), 2),
            ("proxy-b".to_owned(), 1),
        ]));
        let text = text(&metrics);
        for line in [
            "sallyport_connector_requests_total{app=\"infra/wiki\",class=\"2xx\",code=\"200\"} 1",
            "sallyport_connector_requests_total{app=\"unknown\",class=\"4xx\",code=\"404\"} 1",
            "sallyport_connector_backend_duration_seconds_count{app=\"infra/wiki\"} 1",
            "sallyport_connector_backend_duration_seconds_bucket{app=\"infra/wiki\",le=\"0.005\"} 1",
            "sallyport_connector_certificate_expiry_timestamp_seconds 1900000000",
            "sallyport_connector_certificate_renewal_timestamp_seconds 1800000000",
            "sallyport_connector_tunnels_up{replica=\"proxy-a\"} 2",
            "sallyport_connector_tunnels_up{replica=\"proxy-b\"} 1",
            "sallyport_connector_dial_failures 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }

    #[test]
    fn metrics_without_samples_are_declared() {
        let text = text(&metrics());
        for line in [
            "# TYPE sallyport_connector_tunnels_up gauge",
            "# TYPE sallyport_connector_requests_total counter",
            "# TYPE sallyport_connector_backend_duration_seconds histogram",
            "sallyport_connector_certificate_expiry_timestamp_seconds 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert_eq!(
            text.matches("# TYPE sallyport_connector_dial_failures ")
                .count(),
            1
        );
    }

    #[test]
    fn a_replica_without_tunnels_drops_out() {
        let metrics = metrics();
        metrics.set_tunnels_per_replica(&BTreeMap::from([("proxy-a".to_owned(), 2)]));
        metrics.set_tunnels_per_replica(&BTreeMap::from([("proxy-b".to_owned(), 1)]));
        let text = text(&metrics);
        assert!(!text.contains("replica=\"proxy-a\""), "{text}");
        assert!(text.contains("sallyport_connector_tunnels_up{replica=\"proxy-b\"} 1"));
    }

    fn status(replicas: &[&str], serving: &[&str]) -> DialStatus {
        DialStatus {
            tunnels: serving
                .iter()
                .zip(0..)
                .map(|(replica, id)| TunnelStatus {
                    id,
                    address: "fleet:8443".to_owned(),
                    phase: TunnelPhase::Serving,
                    replica: Some((*replica).to_owned()),
                    since: std::time::SystemTime::UNIX_EPOCH,
                })
                .collect(),
            replicas: replicas.iter().map(|r| (*r).to_owned()).collect(),
            ..DialStatus::default()
        }
    }

    #[test]
    fn ready_once_every_announced_replica_serves_and_not_while_draining() {
        let metrics = metrics();
        let ready = |m: &ConnectorMetrics| respond("/readyz", m).status();
        assert_eq!(ready(&metrics), StatusCode::SERVICE_UNAVAILABLE);
        metrics.set_tunnels(&status(&["a", "b"], &["a"]));
        assert_eq!(
            metrics.not_ready().as_deref(),
            Some("no serving tunnel yet to proxy replica(s) b")
        );
        metrics.set_tunnels(&status(&["a", "b"], &["a", "b", "b"]));
        assert_eq!(ready(&metrics), StatusCode::OK);
        metrics.set_draining();
        assert_eq!(ready(&metrics), StatusCode::SERVICE_UNAVAILABLE);
        metrics.set_tunnels(&status(&["a", "b"], &["a", "b"]));
        assert_eq!(ready(&metrics), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn the_version_info_names_both_versions() {
        let metrics = metrics();
        metrics.set_desired_version(Some("9.9.9"));
        let text = text(&metrics);
        assert!(
            text.contains(&format!(
                "sallyport_connector_version_info{{desired_version=\"9.9.9\",version=\"{}\"}} 1",
                crate::register::VERSION
            )),
            "{text}"
        );
    }

    #[test]
    fn only_metrics_and_livez_are_served() {
        let metrics = metrics();
        let scraped = respond("/metrics", &metrics);
        assert_eq!(scraped.status(), StatusCode::OK);
        assert_eq!(
            scraped.headers().get(http::header::CONTENT_TYPE),
            Some(&http::HeaderValue::from_static(CONTENT_TYPE))
        );
        assert_eq!(respond("/livez", &metrics).status(), StatusCode::OK);
        assert_eq!(
            respond("/readyz", &metrics).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(respond("/", &metrics).status(), StatusCode::NOT_FOUND);
    }
}
