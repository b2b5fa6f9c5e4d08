//! Abuse limits end to end in one process: a plain HTTP backend, a connector, and a
//! proxy on 127.0.0.1 whose users connect from other loopback addresses (127.0.0.2,
//! 127.0.0.3) so that each is its own client.
//!
//! - A client over its rate gets 429 with `Retry-After` while another is still served.
//! - A body larger than the app accepts gets 413, announced (`Content-Length`, nothing
//!   reaches the backend) or streamed (cut at the limit).
//! - A request head over the limit is refused (431 or a closed connection).
//! - Requests beyond the cap of requests in flight get 503 with `Retry-After` at once,
//!   and the requests in flight are not disturbed.
//! - A peer at its cap of connections has the next one closed before the handshake.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Fleet, FleetSettings, Pki, WEB_HOST, http_backend, ok, until, web_route, within};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use sallyport_api::published_app::ClientRateLimit;
use sallyport_proxy::protection::ProtectionSettings;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

type ClientBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

/// A TCP connection to the proxy from the loopback address `from` (127.0.0.x).
async fn connect_from(fleet: &Fleet, from: &str) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    let local: IpAddr = from
        .parse()
        .unwrap_or_else(|e| panic!("{from} is an address: {e}"));
    socket.bind(SocketAddr::new(local, 0))?;
    within("connecting to the proxy", socket.connect(fleet.address)).await
}

/// `request` to the app over a new HTTP/1.1 connection from `from`: the status, the
/// headers and the body, or the error that ended the exchange.
async fn send_from(
    fleet: &Fleet,
    from: &str,
    request: Request<ClientBody>,
) -> Result<(StatusCode, HeaderMap, String), String> {
    let tcp = ok(connect_from(fleet, from).await);
    let tls = fleet.tls_over(tcp, WEB_HOST, &[b"http/1.1"]).await;
    let (mut sender, connection) =
        ok(hyper::client::conn::http1::handshake(TokioIo::new(tls)).await);
    tokio::spawn(connection);
    let response = within("an answer from the proxy", sender.send_request(request))
        .await
        .map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let body = within("its body", body.collect())
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// A request to the app on the fleet's port.
fn request(fleet: &Fleet, method: &str, body: ClientBody) -> Request<ClientBody> {
    ok(Request::builder()
        .method(method)
        .uri("/")
        .header("host", format!("{WEB_HOST}:{}", fleet.address.port()))
        .body(body))
}

fn empty() -> ClientBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A GET of the app from `from` that must be answered.
async fn get_from(fleet: &Fleet, from: &str) -> (StatusCode, HeaderMap, String) {
    send_from(fleet, from, request(fleet, "GET", empty()))
        .await
        .unwrap_or_else(|e| panic!("GET from {from}: {e}"))
}

fn retry_after(headers: &HeaderMap) -> u64 {
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric Retry-After: {headers:?}"))
}

/// A backend answering with the size of the request body it read whole.
async fn counting_backend(reached: Arc<AtomicUsize>) -> SocketAddr {
    http_backend(move |request| {
        reached.fetch_add(1, Ordering::SeqCst);
        async move {
            match request.into_body().collect().await {
                Ok(body) => format!("read {}", body.to_bytes().len()),
                Err(error) => format!("body failed: {error}"),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_gets_429_while_another_is_served() {
    let backend = counting_backend(Arc::new(AtomicUsize::new(0))).await;
    let settings = FleetSettings {
        protection: ProtectionSettings {
            client_rate: Some(ClientRateLimit {
                requests_per_second: 1,
                burst: 2,
            }),
            ..ProtectionSettings::default()
        },
        ..FleetSettings::default()
    };
    let fleet = Fleet::start(Pki::new(), settings, |port| vec![web_route(port, backend)]).await;

    let mut statuses = Vec::new();
    let mut refused = None;
    for _ in 0..6 {
        let (status, headers, body) = get_from(&fleet, "127.0.0.2").await;
        statuses.push(status);
        if status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some((headers, body));
        }
    }
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    let (headers, body) =
        refused.unwrap_or_else(|| panic!("6 requests at 1/s with bursts of 2: {statuses:?}"));
    assert!((1..=2).contains(&retry_after(&headers)));
    assert!(body.contains("sends more requests"), "{body}");

    // Another address has its own bucket.
    let (status, _, body) = get_from(&fleet, "127.0.0.3").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_apps_limit_gets_413() {
    let reached = Arc::new(AtomicUsize::new(0));
    let backend = counting_backend(reached.clone()).await;
    let fleet = Fleet::start(
        Pki::new(),
        FleetSettings {
            protection: ProtectionSettings::without_request_limits(),
            ..FleetSettings::default()
        },
        |port| {
            let mut route = web_route(port, backend);
            route.max_request_body_bytes = Some(1024);
            vec![route]
        },
    )
    .await;
    let full = |size: usize| {
        Full::new(Bytes::from(vec![b'x'; size]))
            .map_err(|never| match never {})
            .boxed_unsync()
    };

    // Within the limit.
    let (status, _, body) =
        ok(send_from(&fleet, "127.0.0.2", request(&fleet, "POST", full(1000))).await);
    assert_eq!((status, body.as_str()), (StatusCode::OK, "read 1000"));
    assert_eq!(reached.load(Ordering::SeqCst), 1);

    // Announced too large: refused before anything reaches the backend.
    let (status, _, body) =
        ok(send_from(&fleet, "127.0.0.2", request(&fleet, "POST", full(2048))).await);
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body.contains("at most 1024 bytes"), "{body}");
    assert_eq!(
        reached.load(Ordering::SeqCst),
        1,
        "nothing reached the backend"
    );

    // Streamed without a length (chunked): cut at the limit, answered 413.
    let chunks =
        (0..16).map(|_| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'y'; 512]))));
    let streamed = StreamBody::new(futures::stream::iter(chunks)).boxed_unsync();
    let answer = send_from(&fleet, "127.0.0.2", request(&fleet, "POST", streamed)).await;
    match answer {
        Ok((status, _, body)) => assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}"),
        // The proxy may answer and close before the client finished sending.
        Err(error) => panic!("a streamed body over the limit: {error}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_the_limit_is_refused() {
    let reached = Arc::new(AtomicUsize::new(0));
    let backend = counting_backend(reached.clone()).await;
    let fleet = Fleet::start(
        Pki::new(),
        FleetSettings {
            protection: ProtectionSettings {
                max_request_header_bytes: 8 * 1024,
                ..ProtectionSettings::without_request_limits()
            },
            ..FleetSettings::default()
        },
        |port| vec![web_route(port, backend)],
    )
    .await;

    // A head within the limit passes.
    let mut small = request(&fleet, "GET", empty());
    small
        .headers_mut()
        .insert("x-padding", ok("a".repeat(2048).parse()));
    let (status, _, _) = ok(send_from(&fleet, "127.0.0.2", small).await);
    assert_eq!(status, StatusCode::OK);

    // 32 KiB of headers: 431, or the connection closed.
    let mut large = request(&fleet, "GET", empty());
    for n in 0..4 {
        large.headers_mut().insert(
            format!("x-padding-{n}")
                .as_str()
                .parse::<http::HeaderName>()
                .unwrap_or_else(|e| panic!("{e}")),
            ok("b".repeat(8 * 1024).parse()),
        );
    }
    match send_from(&fleet, "127.0.0.2", large).await {
        Ok((status, _, body)) => {
            assert_eq!(
                status,
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "{body}"
            );
        }
        Err(error) => eprintln!("a head over the limit: connection ended ({error})"),
    }
    assert_eq!(
        reached.load(Ordering::SeqCst),
        1,
        "only the small request reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_cap_in_flight_get_503_at_once() {
    const CAP: usize = 3;
    let reached = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Semaphore::new(0));
    let backend = {
        let reached = reached.clone();
        let release = release.clone();
        http_backend(move |_request| {
            reached.fetch_add(1, Ordering::SeqCst);
            let release = release.clone();
            async move {
                let _ = release.acquire().await.map(|permit| permit.forget());
                "slow".to_owned()
            }
        })
        .await
    };
    let fleet = Arc::new(
        Fleet::start(
            Pki::new(),
            FleetSettings {
                protection: ProtectionSettings {
                    max_requests_in_flight: CAP,
                    ..ProtectionSettings::without_request_limits()
                },
                ..FleetSettings::default()
            },
            |port| vec![web_route(port, backend)],
        )
        .await,
    );

    // CAP slow requests hold every place.
    let slow: Vec<_> = (0..CAP)
        .map(|_| {
            let fleet = fleet.clone();
            tokio::spawn(async move { get_from(&fleet, "127.0.0.2").await })
        })
        .collect();
    until("the slow requests reach the backend", || {
        reached.load(Ordering::SeqCst) == CAP
    })
    .await;

    // Beyond the cap, from any address: 503 with Retry-After, without waiting.
    for from in ["127.0.0.2", "127.0.0.3"] {
        let (status, headers, body) = get_from(&fleet, from).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(retry_after(&headers), 1);
        assert!(body.contains("Service busy"), "{body}");
    }
    assert_eq!(
        reached.load(Ordering::SeqCst),
        CAP,
        "refused requests never reach the backend"
    );

    // The slow ones finish; their places are free again.
    release.add_permits(CAP);
    for request in slow {
        let (status, _, body) = ok(within("a slow request", request).await);
        assert_eq!((status, body.as_str()), (StatusCode::OK, "slow"));
    }
    release.add_permits(1);
    let (status, _, body) = get_from(&fleet, "127.0.0.3").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "slow"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_at_its_cap_of_connections_is_closed_before_the_handshake() {
    let backend = counting_backend(Arc::new(AtomicUsize::new(0))).await;
    let fleet = Fleet::start(
        Pki::new(),
        FleetSettings {
            protection: ProtectionSettings {
                max_connections_per_client: 2,
                ..ProtectionSettings::without_request_limits()
            },
            ..FleetSettings::default()
        },
        |port| vec![web_route(port, backend)],
    )
    .await;
    let name = ok(rustls_pki_types::ServerName::try_from(WEB_HOST.to_owned()));
    let connector = tokio_rustls::TlsConnector::from(fleet.pki.client(&[b"http/1.1"]));

    let first = fleet
        .tls_over(
            ok(connect_from(&fleet, "127.0.0.2").await),
            WEB_HOST,
            &[b"http/1.1"],
        )
        .await;
    let second = fleet
        .tls_over(
            ok(connect_from(&fleet, "127.0.0.2").await),
            WEB_HOST,
            &[b"http/1.1"],
        )
        .await;
    let third = ok(connect_from(&fleet, "127.0.0.2").await);
    let refused = within(
        "the third handshake",
        connector.connect(name.clone(), third),
    )
    .await;
    assert!(
        refused.is_err(),
        "a third connection from 127.0.0.2 is closed"
    );

    // Another address is not affected; a closed connection frees its place.
    let other = fleet
        .tls_over(
            ok(connect_from(&fleet, "127.0.0.3").await),
            WEB_HOST,
            &[b"http/1.1"],
        )
        .await;
    drop(first);
    within("a place freed", async {
        loop {
            let tcp = ok(connect_from(&fleet, "127.0.0.2").await);
            if connector.connect(name.clone(), tcp).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    drop((second, other));
}
