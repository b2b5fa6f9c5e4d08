//! Delivery of events to a real HTTP server on 127.0.0.1: batching, retries with
//! backoff through outages, the bounded queue, and the flush at shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sallyport_events::backoff::Backoff;
use sallyport_events::{
    Actor, AuditEvent, Encoding, Events, ObjectRef, Outcome, Record, Severity, SinkSettings,
};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What the receiver answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// 200, and the batch is recorded.
    Accept,
    /// 503 with `Retry-After: 0`; nothing recorded.
    Unavailable,
    /// 400; nothing recorded.
    Reject,
}

/// One POST the receiver got.
#[derive(Clone, Debug)]
struct Post {
    path: String,
    content_type: String,
    authorization: Option<String>,
    body: Bytes,
    answered: StatusCode,
}

#[derive(Debug)]
struct State {
    mode: Mode,
    posts: Vec<Post>,
}

/// A real HTTP server recording every POST.
struct Receiver {
    address: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap_or_else(|e| panic!("{e}"))).await
    }

    async fn start_on(address: SocketAddr) -> Self {
        let listener = TcpListener::bind(address)
            .await
            .unwrap_or_else(|e| panic!("bind {address}: {e}"));
        let address = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Accept,
            posts: Vec::new(),
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(answer(request, &state).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            address,
            state,
            task,
        }
    }

    fn url(&self, path: &str) -> http::Uri {
        format!("http://{}{path}", self.address)
            .parse()
            .unwrap_or_else(|e| panic!("url: {e}"))
    }

    fn set_mode(&self, mode: Mode) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .mode = mode;
    }

    fn posts(&self) -> Vec<Post> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .posts
            .clone()
    }

    /// The batches accepted, each the ids of its events in order.
    fn accepted(&self) -> Vec<Vec<String>> {
        self.posts()
            .iter()
            .filter(|post| post.answered == StatusCode::OK)
            .map(ids_of)
            .collect()
    }

    fn accepted_ids(&self) -> Vec<String> {
        self.accepted().concat()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(request: Request<Incoming>, state: &Mutex<State>) -> Response<Full<Bytes>> {
    let header = |name: http::header::HeaderName| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let path = request.uri().path().to_owned();
    let content_type = header(http::header::CONTENT_TYPE).unwrap_or_default();
    let authorization = header(http::header::AUTHORIZATION);
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    let status = match state.mode {
        Mode::Accept => StatusCode::OK,
        Mode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Mode::Reject => StatusCode::BAD_REQUEST,
    };
    state.posts.push(Post {
        path,
        content_type,
        authorization,
        body,
        answered: status,
    });
    let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
    *response.status_mut() = status;
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("0"),
        );
    }
    response
}

/// The ids of the events of a POST (JSON lines, or OTLP JSON).
fn ids_of(post: &Post) -> Vec<String> {
    if post.content_type == "application/json" {
        let value: Value =
            serde_json::from_slice(&post.body).unwrap_or_else(|e| panic!("OTLP JSON: {e}"));
        return value["resourceLogs"][0]["scopeLogs"][0]["logRecords"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|record| {
                let body: Value = serde_json::from_str(
                    record["body"]["stringValue"].as_str().unwrap_or_default(),
                )
                .unwrap_or_else(|e| panic!("OTLP body: {e}"));
                assert_eq!(record["attributes"][0]["value"]["stringValue"], body["id"]);
                body["id"].as_str().unwrap_or_default().to_owned()
            })
            .collect();
    }
    String::from_utf8_lossy(&post.body)
        .lines()
        .map(|line| {
            let event: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("line {line:?}: {e}"));
            event["id"].as_str().unwrap_or_default().to_owned()
        })
        .collect()
}

fn actor() -> Actor {
    Actor::new("sallyport-test", "replica-0")
}

/// A sink to `endpoint` with fast retries for tests.
fn sink(endpoint: http::Uri, batch_size: usize, max_wait: Duration) -> SinkSettings {
    let mut settings = SinkSettings::new("http", endpoint, Encoding::JsonLines);
    settings.batch_size = batch_size;
    settings.max_wait = max_wait;
    settings.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
    };
    settings.request_timeout = Duration::from_secs(5);
    settings
}

fn pipeline(sinks: Vec<SinkSettings>) -> Events {
    Events::with_sinks(actor(), false, sinks, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("pipeline: {e}"))
}

/// Emits `n` audit events; their ids in order.
fn emit(events: &Events, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let event = AuditEvent::new(
                "configuration.published",
                ObjectRef::namespaced("ConfigMap", "sallyport-system", "fleet"),
                Outcome::Success,
            )
            .detail("index", i);
            let id = event.id.clone();
            events.audit(event);
            id
        })
        .collect()
}

/// Polls `done` every 20 ms for at most 30 s.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn batches_fill_up_to_the_batch_size_then_leave_after_the_max_wait() {
    let receiver = Receiver::start().await;
    let events = pipeline(vec![sink(
        receiver.url("/ingest"),
        5,
        Duration::from_secs(2),
    )]);
    // Emitted before the delivery task runs (one-threaded runtime): two full batches
    // leave at once, the rest after the max wait.
    let ids = emit(&events, 12);
    eventually("12 events delivered", || {
        receiver.accepted_ids().len() >= 12
    })
    .await;
    let sizes: Vec<usize> = receiver.accepted().iter().map(Vec::len).collect();
    assert_eq!(sizes, [5, 5, 2]);
    assert_eq!(receiver.accepted_ids(), ids, "in order, each once");
    let post = receiver.posts().remove(0);
    assert_eq!(post.path, "/ingest");
    assert_eq!(post.content_type, "application/x-ndjson");
    assert_eq!(post.authorization, None);
    let line: Value = serde_json::from_str(
        String::from_utf8_lossy(&post.body)
            .lines()
            .next()
            .unwrap_or_default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(line["schema"], "sallyport.dev/audit/v1");
    assert_eq!(line["actor"]["component"], "sallyport-test");
    assert_eq!(line["actor"]["replica"], "replica-0");

    // A lone event does not wait for a full batch.
    let more = emit(&events, 1);
    eventually("a lone event delivered", || {
        receiver.accepted_ids().len() == 13
    })
    .await;
    assert_eq!(receiver.accepted().last(), Some(&more));
    // The sink counts a batch once it has read the answer, just after the receiver
    // recorded it.
    eventually("the sink counting 13 delivered", || {
        events.stats().first().map(|s| s.delivered) == Some(13)
    })
    .await;
}

#[tokio::test]
async fn an_outage_is_retried_with_backoff_and_nothing_is_lost_or_repeated() {
    let receiver = Receiver::start().await;
    receiver.set_mode(Mode::Unavailable);
    let events = pipeline(vec![sink(receiver.url("/"), 4, Duration::from_millis(50))]);
    let mut ids = emit(&events, 10);
    eventually("several refused attempts", || receiver.posts().len() >= 5).await;
    // Still only the first batch is being tried: batches leave in order.
    let tried: Vec<Vec<String>> = receiver.posts().iter().map(ids_of).collect();
    assert!(tried.iter().all(|batch| batch == &ids[..4]), "{tried:?}");
    ids.extend(emit(&events, 3));
    assert_eq!(events.stats().first().map(|s| s.pending), Some(13));
    receiver.set_mode(Mode::Accept);
    eventually("13 events delivered", || {
        receiver.accepted_ids().len() >= 13
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.accepted_ids(), ids, "every event once, in order");
    eventually("the sink counting 13 delivered, none pending", || {
        events
            .stats()
            .first()
            .is_some_and(|s| (s.delivered, s.pending, s.dropped) == (13, 0, 0))
    })
    .await;
}

#[tokio::test]
async fn an_endpoint_that_is_not_listening_yet_is_retried() {
    // A port nobody listens on: connections are refused until the receiver starts.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("{e}"));
    let url: http::Uri = format!("http://{port}/")
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let events = pipeline(vec![sink(url, 10, Duration::from_millis(10))]);
    let ids = emit(&events, 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(events.stats().first().map(|s| s.pending), Some(3));
    let receiver = Receiver::start_on(port).await;
    eventually("3 events delivered", || receiver.accepted_ids().len() >= 3).await;
    assert_eq!(receiver.accepted_ids(), ids);
}

#[tokio::test]
async fn a_full_queue_drops_new_events_without_blocking_and_counts_them() {
    let receiver = Receiver::start().await;
    receiver.set_mode(Mode::Unavailable);
    let mut settings = sink(receiver.url("/"), 2, Duration::from_millis(10));
    settings.queue_capacity = 5;
    let events = pipeline(vec![settings]);
    // The delivery task has not run yet (one-threaded runtime): 5 fit, 15 are dropped.
    let ids = emit(&events, 20);
    let stats = events.stats().remove(0);
    assert_eq!((stats.pending, stats.dropped), (5, 15));
    receiver.set_mode(Mode::Accept);
    eventually("the kept events delivered", || {
        receiver.accepted_ids().len() >= 5
    })
    .await;
    assert_eq!(receiver.accepted_ids(), ids[..5]);
    // Room again.
    let later = emit(&events, 1);
    eventually("a later event delivered", || {
        receiver.accepted_ids().len() >= 6
    })
    .await;
    assert_eq!(receiver.accepted_ids().last(), later.first());
    assert_eq!(events.stats().remove(0).dropped, 15);
}

#[tokio::test]
async fn closing_flushes_what_is_queued_without_waiting_for_a_full_batch() {
    let receiver = Receiver::start().await;
    let events = pipeline(vec![sink(
        receiver.url("/"),
        100,
        Duration::from_secs(3600),
    )]);
    let ids = emit(&events, 7);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(receiver.posts().is_empty(), "waiting for a fuller batch");
    let undelivered = events.close_within(Duration::from_secs(20)).await;
    assert_eq!(undelivered, 0);
    assert_eq!(receiver.accepted_ids(), ids);
}

#[tokio::test]
async fn closing_keeps_retrying_until_the_deadline_then_counts_what_is_lost() {
    let receiver = Receiver::start().await;
    receiver.set_mode(Mode::Unavailable);
    let events = pipeline(vec![sink(receiver.url("/"), 3, Duration::from_millis(10))]);
    let _ = emit(&events, 7);
    let started = std::time::Instant::now();
    let undelivered = events.close_within(Duration::from_secs(1)).await;
    assert_eq!(undelivered, 7);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "close took {:?}",
        started.elapsed()
    );
    assert!(!receiver.posts().is_empty(), "it kept trying while closing");

    // An endpoint back during the flush gets everything.
    let receiver = Receiver::start().await;
    receiver.set_mode(Mode::Unavailable);
    let events = pipeline(vec![sink(receiver.url("/"), 3, Duration::from_millis(10))]);
    let ids = emit(&events, 7);
    let closing = tokio::spawn({
        let events = events.clone();
        async move { events.close_within(Duration::from_secs(20)).await }
    });
    eventually("attempts while closing", || receiver.posts().len() >= 3).await;
    receiver.set_mode(Mode::Accept);
    let undelivered = closing.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(undelivered, 0);
    assert_eq!(receiver.accepted_ids(), ids);
}

#[tokio::test]
async fn a_rejected_batch_is_dropped_not_retried() {
    let receiver = Receiver::start().await;
    receiver.set_mode(Mode::Reject);
    let events = pipeline(vec![sink(receiver.url("/"), 10, Duration::from_millis(10))]);
    let _ = emit(&events, 2);
    eventually("the batch rejected", || {
        events.stats().first().map(|s| s.rejected) == Some(2)
    })
    .await;
    receiver.set_mode(Mode::Accept);
    let ids = emit(&events, 1);
    eventually("the next event delivered", || {
        !receiver.accepted_ids().is_empty()
    })
    .await;
    assert_eq!(receiver.accepted_ids(), ids);
    assert_eq!(receiver.posts().len(), 2, "one attempt each");
}

#[tokio::test]
async fn the_bearer_token_is_read_from_its_file_before_every_post() {
    let receiver = Receiver::start().await;
    let token = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(token.path(), "first-token\n").unwrap_or_else(|e| panic!("{e}"));
    let mut settings = sink(receiver.url("/"), 1, Duration::from_millis(10));
    settings.token_file = Some(token.path().to_owned());
    let events = pipeline(vec![settings]);
    let _ = emit(&events, 1);
    eventually("one POST", || receiver.posts().len() == 1).await;
    std::fs::write(token.path(), "rotated-token").unwrap_or_else(|e| panic!("{e}"));
    let _ = emit(&events, 1);
    eventually("two POSTs", || receiver.posts().len() == 2).await;
    let tokens: Vec<Option<String>> = receiver
        .posts()
        .into_iter()
        .map(|p| p.authorization)
        .collect();
    assert_eq!(
        tokens,
        [
            Some("Bearer first-token".to_owned()),
            Some("Bearer rotated-token".to_owned())
        ]
    );
}

#[tokio::test]
async fn otlp_and_http_sinks_each_get_every_event() {
    let http = Receiver::start().await;
    let otlp = Receiver::start().await;
    otlp.set_mode(Mode::Unavailable);
    let mut otlp_sink = SinkSettings::new("otlp", otlp.url("/v1/logs"), Encoding::OtlpJson);
    otlp_sink.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(100),
    };
    otlp_sink.max_wait = Duration::from_millis(10);
    let events = pipeline(vec![
        sink(http.url("/"), 10, Duration::from_millis(10)),
        otlp_sink,
    ]);
    let mut ids = emit(&events, 3);
    // A sign-in event, as the proxy hands it over.
    let sign_in = serde_json::json!({"schema": "sallyport.dev/sign-in/v1", "decision": "allowed", "id": "sign-in-1"});
    events.emit(
        Record::serialize(
            "sign-in-1",
            "sallyport.dev/sign-in/v1",
            "signIn",
            jiff::Timestamp::now(),
            Severity::Info,
            &sign_in,
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    ids.push("sign-in-1".to_owned());
    // The HTTP sink does not wait for the OTLP endpoint, which is down.
    eventually("HTTP delivered", || http.accepted_ids().len() >= 4).await;
    assert_eq!(http.accepted_ids(), ids);
    otlp.set_mode(Mode::Accept);
    eventually("OTLP delivered", || otlp.accepted_ids().len() >= 4).await;
    assert_eq!(otlp.accepted_ids(), ids);
    let post = otlp.posts().pop().unwrap_or_else(|| panic!("a post"));
    assert_eq!(post.path, "/v1/logs");
    assert_eq!(post.content_type, "application/json");
}
