//! The HTTP listener for the kubelet's probes and Prometheus: `/livez`, `/readyz`,
//! `/metrics`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::readiness::Readiness;
use crate::metrics::{self, Metrics};

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections get to finish after the shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (e.g. out of file descriptors) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The probe server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The listen address is taken or not allowed.
    #[error("cannot listen for probes on {address}: {source}")]
    Bind {
        /// The address asked for.
        address: SocketAddr,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The bound socket has no local address.
    #[error("cannot read the probe listener's address: {0}")]
    LocalAddr(#[source] std::io::Error),
}

/// The probe and metrics listener, bound and not yet serving.
#[derive(Debug)]
pub struct ProbeServer {
    listener: TcpListener,
    readiness: Readiness,
    metrics: Metrics,
}

impl ProbeServer {
    /// Binds `address` (port 0 picks a free port; see [`local_addr`](Self::local_addr)).
    pub async fn bind(
        address: SocketAddr,
        readiness: Readiness,
        metrics: Metrics,
    ) -> Result<Self, ProbeError> {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| ProbeError::Bind { address, source })?;
        Ok(Self {
            listener,
            readiness,
            metrics,
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, ProbeError> {
        self.listener.local_addr().map_err(ProbeError::LocalAddr)
    }

    /// Serves until `shutdown` is cancelled, then stops accepting and gives open
    /// connections a few seconds to finish.
    pub async fn serve(self, shutdown: CancellationToken) {
        let Self {
            listener,
            readiness,
            metrics,
        } = self;
        if let Ok(address) = listener.local_addr() {
            info!(%address, "serving /livez, /readyz and /metrics");
        }
        let graceful = GracefulShutdown::new();
        loop {
            let (stream, peer) = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        warn!(%error, "cannot accept a probe connection");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let (readiness, metrics) = (readiness.clone(), metrics.clone());
            let service = service_fn(move |request: Request<Incoming>| {
                let response =
                    respond(request.method(), request.uri().path(), &readiness, &metrics);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    debug!(%peer, %error, "probe connection ended with an error");
                }
            });
        }
        drop(listener);
        tokio::select! {
            () = graceful.shutdown() => {}
            () = tokio::time::sleep(DRAIN_TIMEOUT) => {
                warn!(timeout = ?DRAIN_TIMEOUT, "probe connections still open at shutdown; dropping them");
            }
        }
        info!("probe server stopped");
    }
}

/// The response to `method path`.
pub(crate) fn respond(
    method: &Method,
    path: &str,
    readiness: &Readiness,
    metrics: &Metrics,
) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "only GET and HEAD are served"}),
        );
    }
    match path {
        "/livez" => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        "/readyz" => {
            let report = readiness.report();
            let status = if report.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(status, &report)
        }
        "/metrics" => match metrics.encode() {
            Ok(text) => with_content_type(StatusCode::OK, metrics::CONTENT_TYPE, text.into()),
            Err(error) => {
                warn!(%error, "cannot encode the metrics");
                json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": error.to_string()}),
                )
            }
        },
        _ => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not found", "paths": ["/livez", "/readyz", "/metrics"]}),
        ),
    }
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(body).unwrap_or_else(|error| {
        format!("{{\"error\":\"cannot serialize the response: {error}\"}}").into_bytes()
    });
    with_content_type(status, "application/json", body.into())
}

fn with_content_type(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::leader::LeaderStatus;
    use crate::metrics::MetricsError;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    async fn body(response: Response<Full<Bytes>>) -> Result<String, Infallible> {
        let bytes = response.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn parts() -> Result<(Readiness, Metrics), MetricsError> {
        Ok((Readiness::new(), Metrics::new()?))
    }

    #[tokio::test]
    async fn readyz_is_503_with_a_reason_then_200() -> TestResult {
        let (readiness, metrics) = parts()?;
        let response = respond(&Method::GET, "/readyz", &readiness, &metrics);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let report: serde_json::Value = serde_json::from_str(&body(response).await?)?;
        assert_eq!(report["ready"], false);
        assert!(report["reason"].as_str().is_some_and(|r| !r.is_empty()));

        readiness.set_crds_served();
        readiness.set_caches_synced();
        readiness.set_leadership(LeaderStatus::Leading);
        let response = respond(&Method::GET, "/readyz", &readiness, &metrics);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers().get(CONTENT_TYPE),
            Some(&HeaderValue::from_static("application/json"))
        );
        Ok(())
    }

    #[tokio::test]
    async fn livez_metrics_and_unknown_paths() -> TestResult {
        let (readiness, metrics) = parts()?;
        metrics.set_leader(true);
        let live = respond(&Method::GET, "/livez", &readiness, &metrics);
        assert_eq!(live.status(), StatusCode::OK);
        let scraped = respond(&Method::GET, "/metrics", &readiness, &metrics);
        assert_eq!(scraped.status(), StatusCode::OK);
        assert!(body(scraped).await?.contains("sallyport_operator_leader 1"));
        let missing = respond(&Method::GET, "/nope", &readiness, &metrics);
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        let posted = respond(&Method::POST, "/livez", &readiness, &metrics);
        assert_eq!(posted.status(), StatusCode::METHOD_NOT_ALLOWED);
        Ok(())
    }
}
