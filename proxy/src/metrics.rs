//! The proxy's Prometheus metrics, served as text on `/metrics` by the probe server
//! (`--probe-address`, see [`crate::run`]).
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `sallyport_proxy_requests_total` | counter | `app`, `code`, `class` |
//! | `sallyport_proxy_request_duration_seconds` | histogram | `app` |
//! | `sallyport_proxy_tunnels_open` | gauge | `group` |
//! | `sallyport_proxy_sign_ins_total` | counter | `result` |
//! | `sallyport_proxy_policy_decisions_total` | counter | `app`, `stage`, `decision` |
//! | `sallyport_proxy_requests_limited_total` | counter | `kind`, `app` |
//! | `sallyport_proxy_requests_shed_total` | counter | |
//! | `sallyport_proxy_risk_detections_total` | counter | `kind` |
//! | `sallyport_proxy_certificate_expiry_timestamp_seconds` | gauge | `certificate` |
//! | `sallyport_proxy_app_certificate_expiry_timestamp_seconds` | gauge | `app`, `secret` |
//! | `sallyport_proxy_rate_limit_store_up` | gauge | |
//! | `sallyport_proxy_rate_limit_store_fallbacks_total` | counter | |
//!
//! `app` is the PublishedApp's id, `namespace/name`, or [`NO_APP`] for requests that
//! matched none; labels never carry a user, a session or an address. The request
//! duration runs until the response's headers are ready (a long download or a WebSocket
//! is not timed to its end).
//!
//! The process has one set of metrics ([`global`]); the free functions of this module
//! ([`limited`], [`shed`], [`sign_in`], ...) record into it, so that any part of the
//! request pipeline records with one line. A [`ProxyMetrics`] of its own (tests) is made
//! with [`ProxyMetrics::new`].

use std::cell::RefCell;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::{Response, StatusCode};
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use sallyport_policy::{Outcome, SignInStage};
use sallyport_service::metrics::register;
use sallyport_tunnel::pool::TunnelPool;
use tracing::warn;

/// The `app` label of requests that matched no app (unknown host, `robots.txt`, sign-in
/// callbacks before their app is known).
pub const NO_APP: &str = "none";

/// The `result` label values of `sallyport_proxy_sign_ins_total`: the conditional access
/// outcomes, and `failed`.
pub const SIGN_IN_RESULTS: [&str; 6] = [
    "allowed",
    "notAssigned",
    "blocked",
    "denied",
    "stepUp",
    "failed",
];

/// The content type of [`ProxyMetrics::encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Upper bounds of the request duration buckets, in seconds.
const DURATION_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

pub use sallyport_service::metrics::MetricsError;

/// The proxy's metrics, in a registry of their own. Cheap to clone: every clone updates
/// the same metrics.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    tunnels: IntGaugeVec,
    sign_ins: IntCounterVec,
    decisions: IntCounterVec,
    limited: IntCounterVec,
    shed: IntCounter,
    risk: IntCounterVec,
    certificate_expiry: IntGaugeVec,
    app_certificate_expiry: IntGaugeVec,
    limits_store_up: IntGauge,
    limits_store_fallbacks: IntCounter,
    /// Delivery of sign-in and audit events to SIEM sinks.
    events: sallyport_events::EventMetrics,
    /// The replica's tunnel pool, once there is one: [`ProxyMetrics::encode`] counts its
    /// tunnels.
    pool: Arc<OnceLock<TunnelPool>>,
}

impl ProxyMetrics {
    /// Creates and registers the metrics.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let counter = |name: &'static str, help: &str, labels: &[&str]| {
            register(&registry, name, |name| {
                IntCounterVec::new(Opts::new(name, help), labels)
            })
        };
        let requests = counter(
            "sallyport_proxy_requests_total",
            "User requests answered, by app, status code and status class (2xx, 4xx, ...).",
            &["app", "code", "class"],
        )?;
        let sign_ins = counter(
            "sallyport_proxy_sign_ins_total",
            "Sign-ins finished at the callback, by result: allowed, notAssigned, blocked, denied, stepUp (conditional access) or failed (the sign-in itself failed).",
            &["result"],
        )?;
        let decisions = counter(
            "sallyport_proxy_policy_decisions_total",
            "Conditional access evaluations, by app, stage (signIn, request, stream) and decision (allowed, notAssigned, blocked, denied, stepUp).",
            &["app", "stage", "decision"],
        )?;
        let limited = counter(
            "sallyport_proxy_requests_limited_total",
            "Requests and connections refused by an abuse limit (429, 413, or a connection closed at accept), by limit kind (app, app-client-ip, client-ip, client-connections, body-size) and app.",
            &["kind", "app"],
        )?;
        let risk = counter(
            "sallyport_proxy_risk_detections_total",
            "Risk detections raised, by kind.",
            &["kind"],
        )?;
        let duration = register(
            &registry,
            "sallyport_proxy_request_duration_seconds",
            |name| {
                HistogramVec::new(
                    HistogramOpts::new(
                        name,
                        "How long user requests took until their response headers, by app.",
                    )
                    .buckets(DURATION_BUCKETS.to_vec()),
                    &["app"],
                )
            },
        )?;
        let tunnels = register(&registry, "sallyport_proxy_tunnels_open", |name| {
            IntGaugeVec::new(
                Opts::new(
                    name,
                    "Connector tunnels open to this replica and routable, by connector group.",
                ),
                &["group"],
            )
        })?;
        let shed = register(&registry, "sallyport_proxy_requests_shed_total", |name| {
            IntCounter::new(
                name,
                "Requests refused with 503 because the replica is overloaded (load shedding).",
            )
        })?;
        let certificate_expiry = register(
            &registry,
            "sallyport_proxy_certificate_expiry_timestamp_seconds",
            |name| {
                IntGaugeVec::new(
                    Opts::new(
                        name,
                        "When a certificate this replica serves with or issues from expires (notAfter), in Unix seconds, by certificate (tunnel-serving, connector-issuer).",
                    ),
                    &["certificate"],
                )
            },
        )?;
        let app_certificate_expiry = register(
            &registry,
            "sallyport_proxy_app_certificate_expiry_timestamp_seconds",
            |name| {
                IntGaugeVec::new(
                    Opts::new(
                        name,
                        "When the TLS certificate this replica serves an app's host with expires (notAfter), in Unix seconds, by app and TLS Secret (namespace/name).",
                    ),
                    &["app", "secret"],
                )
            },
        )?;
        let limits_store_up = register(&registry, "sallyport_proxy_rate_limit_store_up", |name| {
            IntGauge::new(
                name,
                "1 while the limits store (--limits-store) answers, 0 while this replica limits apps with its own share instead (no store configured, or unreachable).",
            )
        })?;
        let limits_store_fallbacks = register(
            &registry,
            "sallyport_proxy_rate_limit_store_fallbacks_total",
            |name| {
                IntCounter::new(
                    name,
                    "Requests whose app rate limits this replica decided alone because the limits store was unreachable.",
                )
            },
        )?;
        let events = sallyport_events::EventMetrics::register(&registry)?;
        // Every result from the start, at 0: rates and alerts over them need a series.
        for result in SIGN_IN_RESULTS {
            sign_ins.with_label_values(&[result]);
        }
        Ok(Self {
            registry,
            requests,
            duration,
            tunnels,
            sign_ins,
            decisions,
            limited,
            shed,
            risk,
            certificate_expiry,
            app_certificate_expiry,
            limits_store_up,
            limits_store_fallbacks,
            events,
            pool: Arc::new(OnceLock::new()),
        })
    }

    /// Records a user request to `app` ([`NO_APP`] when it matched none) answered with
    /// `status` after `elapsed`.
    pub fn request_served(&self, app: &str, status: StatusCode, elapsed: Duration) {
        let code = status.as_str();
        self.requests
            .with_label_values(&[app, code, sallyport_service::metrics::status_class(status)])
            .inc();
        self.duration
            .with_label_values(&[app])
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a request refused by the abuse limit `kind` (`app`, `client-ip`, ...) for
    /// `app` ([`NO_APP`] when the limit is not an app's).
    pub fn limited(&self, kind: &str, app: &str) {
        self.limited.with_label_values(&[kind, app]).inc();
    }

    /// Counts a request shed because the replica is overloaded.
    pub fn shed(&self) {
        self.shed.inc();
    }

    /// Counts a sign-in finished with `result`: a decision's name (`allowed`,
    /// `notAssigned`, `blocked`, `denied`, `stepUp`) or `failed`.
    pub fn sign_in(&self, result: &str) {
        self.sign_ins.with_label_values(&[result]).inc();
    }

    /// Counts a conditional access evaluation for `app` at `stage` (`signIn`, `request`,
    /// `stream`) that decided `decision`.
    pub fn policy_decision(&self, app: &str, stage: &str, decision: &str) {
        self.decisions
            .with_label_values(&[app, stage, decision])
            .inc();
    }

    /// Counts a risk detection of `kind`.
    pub fn risk_detection(&self, kind: &str) {
        self.risk.with_label_values(&[kind]).inc();
    }

    /// Sets when `certificate` (`tunnel-serving`, `connector-issuer`) expires, in Unix
    /// seconds.
    pub fn set_certificate_expiry(&self, certificate: &str, not_after_unix: i64) {
        self.certificate_expiry
            .with_label_values(&[certificate])
            .set(not_after_unix);
    }

    /// Replaces the expiry times of the apps' certificates: `(app, secret, not_after)`
    /// for every app served, in Unix seconds (apps no longer served drop out).
    pub fn set_app_certificate_expiry(&self, certificates: &[(String, String, i64)]) {
        self.app_certificate_expiry.reset();
        for (app, secret, not_after) in certificates {
            self.app_certificate_expiry
                .with_label_values(&[app.as_str(), secret.as_str()])
                .set(*not_after);
        }
    }

    /// Sets whether the limits store answers.
    pub fn set_rate_limit_store_up(&self, up: bool) {
        self.limits_store_up.set(i64::from(up));
    }

    /// Counts a request limited locally because the limits store was unreachable.
    pub fn rate_limit_store_fallback(&self) {
        self.limits_store_fallbacks.inc();
    }

    /// Counts the tunnels of `pool` at every scrape from now on.
    pub fn count_tunnels_of(&self, pool: TunnelPool) {
        if self.pool.set(pool).is_err() {
            warn!("the tunnel pool of the metrics is already set; keeping the first");
        }
    }

    /// Every metric in the Prometheus text exposition format.
    pub fn encode(&self) -> Result<String, MetricsError> {
        if let Some(pool) = self.pool.get() {
            self.tunnels.reset();
            for (group, count) in pool.live_groups() {
                self.tunnels
                    .with_label_values(&[group.as_str()])
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
        }
        self.events.update(sallyport_events::global());
        let [delivered, dropped, rejected, pending] = self.events.collectors();
        sallyport_service::metrics::encode(
            &self.registry,
            &[
                delivered,
                dropped,
                rejected,
                pending,
                &self.requests,
                &self.duration,
                &self.tunnels,
                &self.sign_ins,
                &self.decisions,
                &self.limited,
                &self.shed,
                &self.risk,
                &self.certificate_expiry,
                &self.app_certificate_expiry,
                &self.limits_store_up,
                &self.limits_store_fallbacks,
            ],
        )
    }
}

static GLOBAL: OnceLock<Option<ProxyMetrics>> = OnceLock::new();

/// The process's metrics, made on first use; `None` only if they could not be
/// registered (logged once), in which case nothing is recorded.
pub fn global() -> Option<&'static ProxyMetrics> {
    GLOBAL
        .get_or_init(|| match ProxyMetrics::new() {
            Ok(metrics) => Some(metrics),
            Err(error) => {
                warn!(%error, "cannot set up the proxy's metrics; none are recorded");
                None
            }
        })
        .as_ref()
}

tokio::task_local! {
    /// The app of the request [`observe_request`] is timing, once [`note_app`] named it.
    static REQUEST_APP: RefCell<Option<String>>;
}

/// Runs `answer` (the answering of one user request) and records its status and duration
/// in [`global`] under the app [`note_app`] named while it ran ([`NO_APP`] if none).
pub async fn observe_request<B>(answer: impl Future<Output = Response<B>>) -> Response<B> {
    let started = Instant::now();
    let (app, response) = REQUEST_APP
        .scope(RefCell::new(None), async {
            let response = answer.await;
            let app = REQUEST_APP.with(|app| app.borrow_mut().take());
            (app, response)
        })
        .await;
    if let Some(metrics) = global() {
        metrics.request_served(
            app.as_deref().unwrap_or(NO_APP),
            response.status(),
            started.elapsed(),
        );
    }
    response
}

/// Names the app of the request being answered, for [`observe_request`]; nothing outside
/// of one.
pub fn note_app(app: &str) {
    let _outside_of_a_request =
        REQUEST_APP.try_with(|slot| *slot.borrow_mut() = Some(app.to_owned()));
}

/// [`ProxyMetrics::limited`] on [`global`].
pub fn limited(kind: &str, app: &str) {
    if let Some(metrics) = global() {
        metrics.limited(kind, app);
    }
}

/// [`ProxyMetrics::shed`] on [`global`].
pub fn shed() {
    if let Some(metrics) = global() {
        metrics.shed();
    }
}

/// [`ProxyMetrics::sign_in`] on [`global`].
pub fn sign_in(result: &str) {
    if let Some(metrics) = global() {
        metrics.sign_in(result);
    }
}

/// [`ProxyMetrics::policy_decision`] on [`global`]: `outcome` of an evaluation for `app`
/// at `stage`.
pub fn policy_decision(app: &str, stage: SignInStage, outcome: &Outcome) {
    if let Some(metrics) = global() {
        metrics.policy_decision(app, stage_name(stage), outcome.name());
    }
}

/// The `stage` label of `stage`: its name in the sign-in log.
fn stage_name(stage: SignInStage) -> &'static str {
    match stage {
        SignInStage::SignIn => "signIn",
        SignInStage::Request => "request",
        SignInStage::Stream => "stream",
        SignInStage::WhatIf => "whatIf",
    }
}

/// [`ProxyMetrics::set_rate_limit_store_up`] on [`global`].
pub fn rate_limit_store_up(up: bool) {
    if let Some(metrics) = global() {
        metrics.set_rate_limit_store_up(up);
    }
}

/// [`ProxyMetrics::rate_limit_store_fallback`] on [`global`].
pub fn rate_limit_store_fallback() {
    if let Some(metrics) = global() {
        metrics.rate_limit_store_fallback();
    }
}

/// [`ProxyMetrics::set_app_certificate_expiry`] on [`global`].
pub fn app_certificate_expiry(certificates: &[(String, String, i64)]) {
    if let Some(metrics) = global() {
        metrics.set_app_certificate_expiry(certificates);
    }
}

/// [`ProxyMetrics::risk_detection`] on [`global`].
pub fn risk_detection(kind: &str) {
    if let Some(metrics) = global() {
        metrics.risk_detection(kind);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> ProxyMetrics {
        ProxyMetrics::new().unwrap_or_else(|e| panic!("metrics: {e}"))
    }

    fn text(metrics: &ProxyMetrics) -> String {
        metrics.encode().unwrap_or_else(|e| panic!("encode: {e}"))
    }

    #[test]
    fn recorded_values_are_exposed() {
        let metrics = metrics();
        metrics.request_served("team-a/whoami", StatusCode::OK, Duration::from_millis(20));
        metrics.request_served("team-a/whoami", StatusCode::OK, Duration::from_millis(30));
        metrics.request_served(NO_APP, StatusCode::NOT_FOUND, Duration::from_millis(1));
        metrics.limited("app", "team-a/whoami");
        metrics.shed();
        metrics.sign_in("allowed");
        metrics.sign_in("failed");
        metrics.policy_decision("team-a/whoami", "signIn", "stepUp");
        metrics.risk_detection("impossibleTravel");
        metrics.set_certificate_expiry("tunnel-serving", 1_900_000_000);
        metrics.set_app_certificate_expiry(&[(
            "team-a/whoami".to_owned(),
            "team-a/whoami-tls".to_owned(),
            1_800_000_000,
        )]);
        metrics.set_rate_limit_store_up(true);
        metrics.rate_limit_store_fallback();
        let text = text(&metrics);
        for line in [
            "sallyport_proxy_requests_total{app=\"team-a/whoami\",class=\"2xx\",code=\"200\"} 2",
            "sallyport_proxy_requests_total{app=\"none\",class=\"4xx\",code=\"404\"} 1",
            "sallyport_proxy_request_duration_seconds_count{app=\"team-a/whoami\"} 2",
            "sallyport_proxy_request_duration_seconds_bucket{app=\"team-a/whoami\",le=\"0.025\"} 1",
            "sallyport_proxy_requests_limited_total{app=\"team-a/whoami\",kind=\"app\"} 1",
            "sallyport_proxy_requests_shed_total 1",
            "sallyport_proxy_sign_ins_total{result=\"allowed\"} 1",
            "sallyport_proxy_sign_ins_total{result=\"failed\"} 1",
            "sallyport_proxy_policy_decisions_total{app=\"team-a/whoami\",decision=\"stepUp\",stage=\"signIn\"} 1",
            "sallyport_proxy_risk_detections_total{kind=\"impossibleTravel\"} 1",
            "sallyport_proxy_certificate_expiry_timestamp_seconds{certificate=\"tunnel-serving\"} 1900000000",
            "sallyport_proxy_app_certificate_expiry_timestamp_seconds{app=\"team-a/whoami\",secret=\"team-a/whoami-tls\"} 1800000000",
            "sallyport_proxy_rate_limit_store_up 1",
            "sallyport_proxy_rate_limit_store_fallbacks_total 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }

    #[test]
    fn stages_are_named_as_in_the_sign_in_log() {
        for stage in [
            SignInStage::SignIn,
            SignInStage::Request,
            SignInStage::Stream,
            SignInStage::WhatIf,
        ] {
            let logged = serde_json::to_value(stage).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(logged.as_str(), Some(stage_name(stage)));
        }
    }

    #[test]
    fn metrics_without_samples_are_declared_and_sign_in_results_start_at_zero() {
        let text = text(&metrics());
        for line in [
            "# TYPE sallyport_proxy_requests_total counter",
            "# TYPE sallyport_proxy_request_duration_seconds histogram",
            "# TYPE sallyport_proxy_tunnels_open gauge",
            "# TYPE sallyport_proxy_policy_decisions_total counter",
            "# TYPE sallyport_proxy_requests_limited_total counter",
            "# TYPE sallyport_proxy_requests_shed_total counter",
            "# TYPE sallyport_proxy_risk_detections_total counter",
            "# TYPE sallyport_proxy_certificate_expiry_timestamp_seconds gauge",
            "sallyport_proxy_sign_ins_total{result=\"denied\"} 0",
            "sallyport_proxy_sign_ins_total{result=\"failed\"} 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        // Declared once each.
        assert_eq!(
            text.matches("# TYPE sallyport_proxy_sign_ins_total ")
                .count(),
            1
        );
        assert_eq!(
            text.matches("# TYPE sallyport_proxy_requests_shed_total ")
                .count(),
            1
        );
    }

    #[tokio::test]
    async fn tunnels_are_counted_from_the_pool_at_each_scrape() {
        let metrics = metrics();
        assert!(!text(&metrics).contains("sallyport_proxy_tunnels_open{"));
        metrics.count_tunnels_of(TunnelPool::new(Default::default()));
        // An empty pool: no group has a tunnel, so no series (groups come and go).
        assert!(!text(&metrics).contains("sallyport_proxy_tunnels_open{"));
    }

    #[tokio::test]
    async fn observed_requests_count_under_the_noted_app() {
        let before = |app: &str| {
            global()
                .map(text)
                .unwrap_or_default()
                .lines()
                .find(|l| {
                    l.starts_with(&format!(
                        "sallyport_proxy_requests_total{{app=\"{app}\",class=\"2xx\",code=\"204\"}}"
                    ))
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let app = "observe-test/app";
        let start = before(app);
        let response = observe_request(async {
            note_app(app);
            let mut response = Response::new(());
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        })
        .await;
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert_eq!(before(app), start + 1);
        // Outside of a request, naming the app does nothing (and does not panic).
        note_app("elsewhere/app");
    }
}
