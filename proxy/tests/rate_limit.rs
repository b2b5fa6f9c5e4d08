//! Per-app rate limits end to end in one process: a plain HTTP backend counting what
//! reaches it, a connector, and a proxy serving two apps through it: `team-a/web` limited
//! to 1 request per second with bursts of 2, and `team-a/other` with the default limit.
//!
//! A burst of concurrent requests to the limited app gets 429 with `Retry-After` for what
//! is over the limit, and only the admitted requests reach the backend; the other app is
//! not affected; after `Retry-After` the limited app answers again.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Fleet, FleetSettings, Pki, WEB_HOST, http_backend, ok, route, web_route, within};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use sallyport_api::published_app::RateLimit;

/// The second app, with the default limit.
const OTHER_HOST: &str = "other.apps.example.com";

/// Concurrent requests in the burst: well over the limited app's burst of 2.
const BURST: usize = 8;

/// A GET of `host` over a new HTTP/1.1 connection: the status, headers and body.
async fn get(fleet: &Fleet, host: &str) -> (StatusCode, HeaderMap, String) {
    let stream = fleet.tls(host, &[b"http/1.1"]).await;
    let (mut sender, connection) =
        ok(hyper::client::conn::http1::handshake(TokioIo::new(stream)).await);
    tokio::spawn(connection);
    let request = ok(Request::get("/")
        .header("host", format!("{host}:{}", fleet.address.port()))
        .body(Empty::<Bytes>::new()));
    let response = ok(within("a GET through the proxy", sender.send_request(request)).await);
    let (parts, body) = response.into_parts();
    let body = ok(within("its body", body.collect()).await).to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_over_its_rate_limit_gets_429_with_retry_after_and_recovers() {
    let reached = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&reached);
    let backend = http_backend(move |_request| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { "hello".to_owned() }
    })
    .await;
    let fleet = Fleet::start(Pki::new(), FleetSettings::default(), |port| {
        let mut limited = web_route(port, backend);
        limited.rate_limit = RateLimit {
            requests_per_second: 1,
            burst: 2,
            per_client_ip: None,
        };
        let other = route(
            "team-a/other",
            OTHER_HOST,
            port,
            &format!("http://{backend}/"),
            false,
            None,
        );
        vec![limited, other]
    })
    .await;

    // A burst, all at once: what is over the limit is refused before the backend.
    let answers = futures::future::join_all((0..BURST).map(|_| get(&fleet, WEB_HOST))).await;
    let admitted = answers
        .iter()
        .filter(|(status, ..)| *status == StatusCode::OK)
        .count();
    let refused: Vec<_> = answers
        .iter()
        .filter(|(status, ..)| *status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert_eq!(
        admitted + refused.len(),
        BURST,
        "every answer is 200 or 429: {:?}",
        answers.iter().map(|(s, ..)| *s).collect::<Vec<_>>()
    );
    assert!(
        !refused.is_empty(),
        "{BURST} concurrent requests against a burst of 2 at 1/s: some must be refused"
    );
    assert!(admitted >= 1, "the burst admits requests");
    assert_eq!(
        reached.load(Ordering::SeqCst),
        admitted,
        "only admitted requests reach the backend"
    );
    for (_, headers, body) in &refused {
        let retry_after: u64 = headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("429 without a numeric Retry-After: {headers:?}"));
        assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
        assert!(body.contains("Too many requests"), "{body}");
    }

    // Another app on the same proxy has its own bucket.
    let (status, _, body) = get(&fleet, OTHER_HOST).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // After Retry-After, the limited app answers again.
    within("the limited app recovering", async {
        loop {
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let (status, _, _) = get(&fleet, WEB_HOST).await;
            if status == StatusCode::OK {
                break;
            }
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        }
    })
    .await;
}
