//! A sink: an HTTP endpoint that events are delivered to in batches.
//!
//! Each sink has a bounded [`EventQueue`] filled by [`Events::emit`](crate::Events::emit)
//! and one task ([`deliver`]) that takes a batch once [`SinkSettings::batch_size`] events
//! wait or the oldest has waited [`SinkSettings::max_wait`], POSTs it, and on a
//! connection error, a timeout, 408, 429 or 5xx sends the same batch again after a
//! [`Backoff`] wait (at least the `Retry-After` the endpoint asked for) until it is
//! accepted: batches leave in order, one at a time. Any other answer rejects the batch
//! for good (logged and counted). On shutdown the task sends what is queued without
//! waiting for fuller batches, with waits of at most [`CLOSING_MAX_WAIT`], until the
//! pipeline's deadline.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::SharedRecord;
use crate::audit::Actor;
use crate::backoff::Backoff;
use crate::otlp;
use crate::pipeline::{PipelineError, SinkStats};
use crate::queue::EventQueue;

/// The longest wait between attempts once the pipeline is closing.
pub const CLOSING_MAX_WAIT: Duration = Duration::from_millis(500);

/// The most of an error answer's body kept for the log.
const MAX_ERROR_BODY: usize = 4096;

/// How a batch is written in a POST.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// JSON lines (`application/x-ndjson`): each event one JSON object on its own line,
    /// exactly as on standard output.
    JsonLines,
    /// An OTLP/HTTP `ExportLogsServiceRequest` in JSON (`application/json`), see
    /// [`otlp`](crate::otlp).
    OtlpJson,
}

impl Encoding {
    fn content_type(self) -> &'static str {
        match self {
            Self::JsonLines => "application/x-ndjson",
            Self::OtlpJson => "application/json",
        }
    }
}

/// Where and how one sink delivers.
#[derive(Clone, Debug)]
pub struct SinkSettings {
    /// The sink's name in logs and stats (`http`, `otlp`).
    pub name: String,
    /// The URL POSTed to.
    pub endpoint: Uri,
    /// How batches are written.
    pub encoding: Encoding,
    /// The most events per POST.
    pub batch_size: usize,
    /// The longest an event waits for a fuller batch.
    pub max_wait: Duration,
    /// The most events waiting; more are dropped (and counted).
    pub queue_capacity: usize,
    /// A file holding a bearer token, read before every attempt (so a rotated token is
    /// picked up).
    pub token_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) to trust for the endpoint, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// The flag naming the CA file, for errors.
    pub ca_flag: String,
    /// Waits between attempts.
    pub backoff: Backoff,
    /// How long one POST may take, connection included.
    pub request_timeout: Duration,
}

impl SinkSettings {
    /// A sink `name` POSTing `encoding` to `endpoint`, with the default batching,
    /// queue and retry settings.
    pub fn new(name: &str, endpoint: Uri, encoding: Encoding) -> Self {
        Self {
            name: name.to_owned(),
            endpoint,
            encoding,
            batch_size: 100,
            max_wait: Duration::from_secs(1),
            queue_capacity: 10_000,
            token_file: None,
            ca_file: None,
            ca_flag: format!("events-{name}-ca-file"),
            backoff: Backoff::default(),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// One sink: its settings, queue, client and counters.
pub(crate) struct Sink {
    settings: SinkSettings,
    queue: EventQueue<SharedRecord>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    actor: Actor,
    user_agent: HeaderValue,
    in_flight: AtomicU64,
    delivered: AtomicU64,
    rejected: AtomicU64,
}

/// Why an attempt failed.
enum AttemptError {
    /// Try the batch again (after at least `retry_after`, if the endpoint asked).
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The endpoint refused the batch for good.
    Permanent { status: StatusCode, body: String },
}

impl Sink {
    pub(crate) fn new(settings: SinkSettings, actor: &Actor) -> Result<Self, PipelineError> {
        let client = client(&settings)?;
        let user_agent = HeaderValue::from_str(&format!(
            "{}/{}",
            if actor.component.is_empty() {
                "sallyport"
            } else {
                &actor.component
            },
            env!("CARGO_PKG_VERSION")
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("sallyport"));
        Ok(Self {
            queue: EventQueue::new(settings.queue_capacity),
            settings,
            client,
            actor: actor.clone(),
            user_agent,
            in_flight: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        })
    }

    /// Queues `record`; when the queue is full, drops it, counts it and logs (at 1, 2,
    /// 4, 8 ... drops, so a long outage does not flood the log).
    pub(crate) fn enqueue(&self, record: SharedRecord) {
        if self.queue.push(record) {
            return;
        }
        let dropped = self.queue.dropped();
        if dropped.is_power_of_two() {
            warn!(
                sink = %self.settings.name,
                dropped,
                capacity = self.queue.capacity(),
                "event queue full: dropping events (the endpoint is down or too slow)"
            );
        }
    }

    pub(crate) fn stats(&self) -> SinkStats {
        SinkStats {
            sink: self.settings.name.clone(),
            delivered: self.delivered.load(Ordering::Relaxed),
            dropped: self.queue.dropped(),
            rejected: self.rejected.load(Ordering::Relaxed),
            pending: self.queue.len() as u64 + self.in_flight.load(Ordering::Relaxed),
        }
    }

    /// The request of one attempt to deliver `batch`.
    fn request(&self, batch: &[SharedRecord]) -> Result<Request<Full<Bytes>>, String> {
        let body = match self.settings.encoding {
            Encoding::JsonLines => {
                let mut body = String::with_capacity(batch.iter().map(|r| r.line.len() + 1).sum());
                for record in batch {
                    body.push_str(&record.line);
                    body.push('\n');
                }
                Bytes::from(body)
            }
            Encoding::OtlpJson => Bytes::from(otlp::encode(&self.actor, batch)),
        };
        let mut builder = Request::post(self.settings.endpoint.clone())
            .header(CONTENT_TYPE, self.settings.encoding.content_type())
            .header(USER_AGENT, self.user_agent.clone());
        if let Some(path) = &self.settings.token_file {
            let token = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
            let value =
                HeaderValue::from_str(&format!("Bearer {}", token.trim())).map_err(|_| {
                    format!(
                        "the token in {} is not a valid header value",
                        path.display()
                    )
                })?;
            builder = builder.header(AUTHORIZATION, value);
        }
        builder
            .body(Full::new(body))
            .map_err(|e| format!("cannot build the request: {e}"))
    }

    /// One attempt to deliver `batch`.
    async fn attempt(&self, batch: &[SharedRecord]) -> Result<(), AttemptError> {
        let request = self
            .request(batch)
            .map_err(|reason| AttemptError::Transient {
                reason,
                retry_after: None,
            })?;
        let exchange = async {
            let response =
                self.client
                    .request(request)
                    .await
                    .map_err(|e| AttemptError::Transient {
                        reason: error_chain(&e),
                        retry_after: None,
                    })?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            // Read the answer whole so the connection can be reused.
            let body = Limited::new(response.into_body(), MAX_ERROR_BODY)
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            if status.is_success() {
                Ok(())
            } else if status.is_server_error()
                || status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::REQUEST_TIMEOUT
            {
                Err(AttemptError::Transient {
                    reason: format!("the endpoint answered {status}: {}", body.trim()),
                    retry_after,
                })
            } else {
                Err(AttemptError::Permanent { status, body })
            }
        };
        match tokio::time::timeout(self.settings.request_timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(AttemptError::Transient {
                reason: format!("no answer within {:?}", self.settings.request_timeout),
                retry_after: None,
            }),
        }
    }

    /// Sends `batch` until the endpoint accepts or rejects it (or the task is aborted).
    async fn send(&self, batch: Vec<SharedRecord>, closing: &CancellationToken) {
        let count = batch.len() as u64;
        let mut failures = 0u32;
        loop {
            match self.attempt(&batch).await {
                Ok(()) => {
                    self.delivered.fetch_add(count, Ordering::Relaxed);
                    if failures > 0 {
                        warn!(sink = %self.settings.name, events = count, attempts = failures + 1, "events delivered after retries");
                    } else {
                        debug!(sink = %self.settings.name, events = count, "events delivered");
                    }
                    break;
                }
                Err(AttemptError::Permanent { status, body }) => {
                    self.rejected.fetch_add(count, Ordering::Relaxed);
                    error!(
                        sink = %self.settings.name,
                        endpoint = %self.settings.endpoint,
                        events = count,
                        %status,
                        body = %body.trim(),
                        first = %batch.first().map_or("", |r| r.id.as_str()),
                        "the endpoint rejected a batch of events; they are dropped"
                    );
                    break;
                }
                Err(AttemptError::Transient {
                    reason,
                    retry_after,
                }) => {
                    failures = failures.saturating_add(1);
                    let mut wait = self.settings.backoff.delay(failures);
                    if let Some(asked) = retry_after {
                        wait = wait.max(asked.min(self.settings.backoff.max));
                    }
                    if closing.is_cancelled() {
                        wait = wait.min(CLOSING_MAX_WAIT);
                    }
                    warn!(
                        sink = %self.settings.name,
                        endpoint = %self.settings.endpoint,
                        events = count,
                        queued = self.queue.len(),
                        attempt = failures,
                        retry_in = ?wait,
                        %reason,
                        "cannot deliver events; will retry"
                    );
                    let sleep = tokio::time::sleep(wait);
                    tokio::pin!(sleep);
                    tokio::select! {
                        () = &mut sleep => {}
                        // Closing: retry sooner.
                        () = closing.cancelled(), if !closing.is_cancelled() => {
                            tokio::time::sleep(wait.min(CLOSING_MAX_WAIT)).await;
                        }
                    }
                }
            }
        }
    }
}

/// The delivery task of `sink`: batches and sends until `closing` is cancelled and the
/// queue is empty.
pub(crate) async fn deliver(sink: Arc<Sink>, closing: CancellationToken) {
    let settings = &sink.settings;
    loop {
        // Wait for a first event.
        while sink.queue.is_empty() {
            if closing.is_cancelled() {
                return;
            }
            tokio::select! {
                () = sink.queue.pushed.notified() => {}
                () = closing.cancelled() => {}
            }
        }
        // Wait for a full batch, at most max_wait (not at all when closing).
        let deadline = tokio::time::Instant::now() + settings.max_wait;
        while sink.queue.len() < settings.batch_size && !closing.is_cancelled() {
            tokio::select! {
                () = sink.queue.pushed.notified() => {}
                () = tokio::time::sleep_until(deadline) => break,
                () = closing.cancelled() => break,
            }
        }
        let batch = sink.queue.take(settings.batch_size.max(1));
        sink.in_flight.store(batch.len() as u64, Ordering::Relaxed);
        sink.send(batch, &closing).await;
        sink.in_flight.store(0, Ordering::Relaxed);
    }
}

/// The HTTP(S) client of a sink: the system's roots and the sink's CA file.
fn client(
    settings: &SinkSettings,
) -> Result<Client<HttpsConnector<HttpConnector>, Full<Bytes>>, PipelineError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        warn!(%error, "cannot read part of the system trust store");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = &settings.ca_file {
        let pem = std::fs::read(path).map_err(|source| PipelineError::ReadCa {
            flag: settings.ca_flag.clone(),
            path: path.clone(),
            source,
        })?;
        let bad = |reason: String| PipelineError::BadCa {
            flag: settings.ca_flag.clone(),
            path: path.clone(),
            reason,
        };
        let certificates = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
        if certificates.is_empty() {
            return Err(bad("holds no PEM certificate".to_owned()));
        }
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|e| bad(format!("unusable certificate: {e}")))?;
        }
    }
    let tls =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|source| PipelineError::Tls {
                sink: settings.name.clone(),
                source,
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(settings.request_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector))
}

/// An error and its sources on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
