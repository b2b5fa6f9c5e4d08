//! S5's users: small GETs through the proxy on keep-alive connections (a closed loop,
//! every request timed), and what a connector's kill or drain did to them
//! ([`FailureWindow`], pure logic over the samples).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpSocket;

use crate::dataplane::DataplaneError;
use crate::dataplane::backend::SMALL_BODY;
use crate::dataplane::client::Target;
use crate::dataplane::fleet::{APP_HOST, Fleet};
use crate::stats;

/// How long one request of the load may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How users reach the app through the proxy: TLS trusting the app's certificate, SNI
/// and `Host` the app's; HTTP/1.1 or HTTP/2 by ALPN.
#[derive(Clone)]
pub struct Link {
    proxy: SocketAddr,
    http1: tokio_rustls::TlsConnector,
    http2: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    host: HeaderValue,
    authority: String,
}

impl Link {
    /// The link to `fleet`'s passthrough app.
    pub fn to(fleet: &Fleet) -> Result<Self, DataplaneError> {
        let Target::Proxy { tls, port, .. } = fleet.via_proxy.clone() else {
            return Err(DataplaneError::Client {
                what: "S5's users".to_owned(),
                message: "need the proxy target".to_owned(),
            });
        };
        let mut h2 = (*tls).clone();
        h2.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            proxy: fleet.proxy_address,
            http1: tokio_rustls::TlsConnector::from(tls),
            http2: tokio_rustls::TlsConnector::from(Arc::new(h2)),
            name: ServerName::try_from(APP_HOST.to_owned())
                .map_err(DataplaneError::client("the app's host name"))?,
            host: HeaderValue::try_from(format!("{APP_HOST}:{port}"))
                .map_err(DataplaneError::client("the app's Host header"))?,
            authority: format!("{APP_HOST}:{port}"),
        })
    }

    async fn tls(
        &self,
        from: Option<IpAddr>,
        connector: &tokio_rustls::TlsConnector,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let socket = TcpSocket::new_v4()?;
        if let Some(from) = from {
            socket.bind(SocketAddr::new(from, 0))?;
        }
        let tcp = socket.connect(self.proxy).await?;
        let _ = tcp.set_nodelay(true);
        connector.connect(self.name.clone(), tcp).await
    }

    /// One HTTP/1.1 connection (TCP, TLS, handshake).
    pub async fn open(&self) -> std::io::Result<http1::SendRequest<Empty<Bytes>>> {
        let stream = self.tls(None, &self.http1).await?;
        let (sender, connection) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// One HTTP/2 connection from `from`; dropping every handle of the returned sender
    /// and the returned task closes it.
    pub async fn open_h2(
        &self,
        from: IpAddr,
    ) -> std::io::Result<(
        http2::SendRequest<Empty<Bytes>>,
        tokio::task::JoinHandle<()>,
    )> {
        let stream = self.tls(Some(from), &self.http2).await?;
        let (sender, connection) =
            http2::handshake::<_, _, Empty<Bytes>>(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok((sender, task))
    }

    /// `GET path` for HTTP/1.1 (with `Host`).
    pub fn request(&self, path: &str) -> Request<Empty<Bytes>> {
        let mut request = Request::new(Empty::new());
        if let Ok(uri) = path.parse() {
            *request.uri_mut() = uri;
        }
        request
            .headers_mut()
            .insert(http::header::HOST, self.host.clone());
        request
    }

    /// `GET path` for HTTP/2 (the authority in the URI).
    pub fn request_h2(&self, path: &str) -> Request<Empty<Bytes>> {
        let mut request = Request::new(Empty::new());
        if let Ok(uri) = format!("https://{}{path}", self.authority).parse() {
            *request.uri_mut() = uri;
        }
        request
    }

    /// `GET /` on `sender`: whether the backend's answer came back (200, its body).
    pub async fn get_ok(
        &self,
        sender: &mut http1::SendRequest<Empty<Bytes>>,
    ) -> Result<bool, hyper::Error> {
        sender.ready().await?;
        let response = sender.send_request(self.request("/")).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(status == StatusCode::OK && body.as_ref() == SMALL_BODY)
    }
}

/// One request of the load.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// When it was sent (or its connection attempted), from the load's start.
    pub sent: Duration,
    /// When it ended, from the load's start.
    pub done: Duration,
    /// Whether the backend's answer came back.
    pub ok: bool,
}

/// A closed-loop load running in the background until [`Load::stop`].
pub struct Load {
    /// When it started; samples count from here.
    pub started: Instant,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<Vec<Sample>>>,
}

impl Load {
    /// Starts `connections` users, each sending `GET /` back to back on its keep-alive
    /// connection (reopened when it fails).
    pub fn start(link: &Link, connections: u32) -> Self {
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..connections)
            .map(|_| tokio::spawn(user(link.clone(), started, stop.clone())))
            .collect();
        Self {
            started,
            stop,
            workers,
        }
    }

    /// Stops the users (each finishes its request) and returns every sample, by end time.
    pub async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let mut samples = Vec::new();
        for worker in self.workers {
            if let Ok(part) = worker.await {
                samples.extend(part);
            }
        }
        samples.sort_by_key(|sample| sample.done);
        samples
    }
}

async fn user(link: Link, started: Instant, stop: Arc<AtomicBool>) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut connection = None;
    while !stop.load(Ordering::Relaxed) {
        let sent = started.elapsed();
        let sender = match connection.as_mut() {
            Some(sender) => sender,
            None => match tokio::time::timeout(REQUEST_TIMEOUT, link.open()).await {
                Ok(Ok(sender)) => connection.insert(sender),
                Ok(Err(_)) | Err(_) => {
                    samples.push(Sample {
                        sent,
                        done: started.elapsed(),
                        ok: false,
                    });
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            },
        };
        let ok = match tokio::time::timeout(REQUEST_TIMEOUT, link.get_ok(sender)).await {
            Ok(Ok(ok)) => ok,
            Ok(Err(_)) | Err(_) => {
                connection = None;
                false
            }
        };
        samples.push(Sample {
            sent,
            done: started.elapsed(),
            ok,
        });
    }
    samples
}

/// What an event (a connector killed or drained) did to the load, times in milliseconds
/// from the event.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FailureWindow {
    /// Requests that ended during the load.
    pub requests: u64,
    /// Of those, failed (an error status, a broken connection, no answer in time).
    pub failed: u64,
    /// When the first failed request ended.
    pub first_failure_ms: Option<f64>,
    /// When the last failed request ended.
    pub last_failure_ms: Option<f64>,
    /// From the first failure's end to the last's (0 for one failure).
    pub failing_for_ms: Option<f64>,
    /// When the first request sent after the event, and after the last request that
    /// failed, was answered: from then on new requests succeed. `None` when none was.
    pub new_requests_succeed_ms: Option<f64>,
    /// The slowest answered request among those in flight at the event or sent within a
    /// second after it (held while tunnels changed).
    pub slowest_around_ms: Option<f64>,
    /// Answered requests per second before the event.
    pub ok_per_s_before: f64,
}

impl FailureWindow {
    /// The window of `samples` (times from the load's start) around `event`.
    pub fn of(samples: &[Sample], event: Duration) -> Self {
        let relative = |at: Duration| {
            if at >= event {
                stats::millis(at - event)
            } else {
                -stats::millis(event - at)
            }
        };
        let failed: Vec<&Sample> = samples.iter().filter(|s| !s.ok).collect();
        let first_failure = failed.iter().map(|s| s.done).min();
        let last_failure = failed.iter().map(|s| s.done).max();
        // Requests sent from the event on that failed: new requests succeed from the
        // first answered request sent after the last of them.
        let last_failed_sent = failed
            .iter()
            .filter(|s| s.sent >= event)
            .map(|s| s.sent)
            .max();
        let new_requests_succeed = samples
            .iter()
            .filter(|s| s.ok && s.sent >= event && last_failed_sent.is_none_or(|at| s.sent > at))
            .map(|s| s.done)
            .min();
        let around = event + Duration::from_secs(1);
        let slowest_around = samples
            .iter()
            .filter(|s| s.ok && s.done >= event && s.sent <= around)
            .map(|s| s.done - s.sent)
            .max();
        let ok_before = samples.iter().filter(|s| s.ok && s.done < event).count();
        let first_sent = samples.iter().map(|s| s.sent).min().unwrap_or_default();
        let before = event.saturating_sub(first_sent).as_secs_f64();
        Self {
            requests: samples.len() as u64,
            failed: failed.len() as u64,
            first_failure_ms: first_failure.map(relative),
            last_failure_ms: last_failure.map(relative),
            failing_for_ms: first_failure
                .zip(last_failure)
                .map(|(first, last)| stats::millis(last - first)),
            new_requests_succeed_ms: new_requests_succeed.map(relative),
            slowest_around_ms: slowest_around.map(stats::millis),
            ok_per_s_before: if before > 0.0 {
                ok_before as f64 / before
            } else {
                0.0
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(sent_ms: u64, done_ms: u64, ok: bool) -> Sample {
        Sample {
            sent: Duration::from_millis(sent_ms),
            done: Duration::from_millis(done_ms),
            ok,
        }
    }

    #[test]
    fn no_failure_means_the_next_request_succeeds() {
        let samples = [
            sample(900, 901, true),
            sample(999, 1_003, true),
            sample(1_001, 1_002, true),
            sample(1_002, 1_010, true),
        ];
        let window = FailureWindow::of(&samples, Duration::from_millis(1_000));
        assert_eq!(window.failed, 0);
        assert_eq!(window.first_failure_ms, None);
        assert_eq!(window.failing_for_ms, None);
        assert_eq!(window.new_requests_succeed_ms, Some(2.0));
        // In flight at the event: 999 -> 1003 (4 ms); sent after: 1 and 8 ms.
        assert_eq!(window.slowest_around_ms, Some(8.0));
        // One answer before the event, over the 100 ms since the first request.
        assert_eq!(window.ok_per_s_before, 10.0);
    }

    #[test]
    fn failures_span_from_the_first_to_the_last_and_recovery_follows_the_last() {
        let samples = [
            sample(0, 10, true),
            // In flight at the kill (1,000 ms): fails at 1,005.
            sample(990, 1_005, false),
            // Sent after the kill, fails at 1,020; then one succeeds, one fails again.
            sample(1_010, 1_020, false),
            sample(1_021, 1_030, true),
            sample(1_031, 1_200, false),
            // Sent after the last failure was sent: new requests succeed from 1,250.
            sample(1_201, 1_250, true),
            sample(1_251, 1_260, true),
        ];
        let window = FailureWindow::of(&samples, Duration::from_millis(1_000));
        assert_eq!(window.requests, 7);
        assert_eq!(window.failed, 3);
        assert_eq!(window.first_failure_ms, Some(5.0));
        assert_eq!(window.last_failure_ms, Some(200.0));
        assert_eq!(window.failing_for_ms, Some(195.0));
        assert_eq!(window.new_requests_succeed_ms, Some(250.0));
    }

    #[test]
    fn no_success_after_the_event_is_none() {
        let samples = [sample(0, 5, true), sample(1_000, 1_500, false)];
        let window = FailureWindow::of(&samples, Duration::from_millis(1_000));
        assert_eq!(window.new_requests_succeed_ms, None);
        assert_eq!(window.failed, 1);
    }
}
