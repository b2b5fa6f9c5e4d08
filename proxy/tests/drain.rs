//! A proxy's drain in one process: a plain HTTP backend with a slow path, a connector
//! (its `Backends` behind a `Dialer`), a proxy (`serve::Proxy::serve_with_drain` with a
//! drain delay, on a real TLS listener) and HTTP/1.1 and HTTP/2 clients over TLS. Once
//! the drain starts, HTTP/1.1 answers carry `Connection: close`, HTTP/2 connections get
//! GOAWAY while their streams in flight finish, connections opened during the delay are
//! served without losing a request, and then the proxy stops accepting, closes its
//! tunnel and returns.
//!
//! Every wait is bounded by [`common::WAIT`].

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{
    Fleet, FleetSettings, Pki, WAIT, WEB_HOST, http_backend, ok, until, web_route, within,
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sallyport_proxy::serve::DrainSettings;
use tokio::net::TcpStream;

/// The proxy's drain delay: long enough for the steps the test takes during it.
const DELAY: Duration = Duration::from_secs(5);
/// How long the backend takes to answer `/slow`.
const SLOW: Duration = Duration::from_millis(700);

type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

// ---------------------------------------------------------------------------------------
// The backend

/// A plain HTTP/1.1 app answering with the request's path; `/slow` after [`SLOW`].
/// `slow` counts the `/slow` requests that arrived.
async fn backend(slow: Arc<AtomicUsize>) -> SocketAddr {
    http_backend(move |request| {
        let slow = slow.clone();
        async move {
            let path = request.uri().path().to_owned();
            if path == "/slow" {
                slow.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(SLOW).await;
            }
            format!("path={path}")
        }
    })
    .await
}

/// A GET of `path` on the app at `port` (in `Host` and in the URI, for either protocol).
fn get(port: u16, path: &str) -> Request<Body> {
    ok(Request::get(format!("https://{WEB_HOST}:{port}{path}"))
        .header("host", format!("{WEB_HOST}:{port}"))
        .body(Empty::new().boxed()))
}

/// An HTTP/1.1 connection to the proxy for the app.
async fn http1(fleet: &Fleet) -> hyper::client::conn::http1::SendRequest<Body> {
    let stream = fleet.tls(WEB_HOST, &[b"http/1.1"]).await;
    let (sender, connection) =
        ok(hyper::client::conn::http1::handshake(TokioIo::new(stream)).await);
    tokio::spawn(connection);
    sender
}

/// An HTTP/2 connection to the proxy for the app.
async fn http2(fleet: &Fleet) -> hyper::client::conn::http2::SendRequest<Body> {
    let stream = fleet.tls(WEB_HOST, &[b"h2"]).await;
    let (sender, connection) =
        ok(hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await);
    tokio::spawn(connection);
    sender
}

/// Status, `Connection` header and body of an answer.
async fn read(response: Response<Incoming>) -> (StatusCode, Option<String>, String) {
    let status = response.status();
    let connection = response
        .headers()
        .get(http::header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = ok(within("the body", response.into_body().collect()).await).to_bytes();
    (
        status,
        connection,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// Whether `error` is HTTP/2's word that the stream was never processed (beyond the
/// server's GOAWAY, or refused: RFC 9113, 8.7), read from the h2 error's debug form.
fn never_processed(error: &hyper::Error) -> bool {
    let Some(source) = std::error::Error::source(error) else {
        return false;
    };
    let text = format!("{source:?}");
    text.contains("Remote") && (text.contains("GoAway(") || text.contains("REFUSED_STREAM"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_proxy_serves_out_its_delay_and_finishes_what_it_started() {
    let slow = Arc::new(AtomicUsize::new(0));
    let backend = backend(slow.clone()).await;
    let settings = FleetSettings {
        drain: Some(DrainSettings {
            delay: DELAY,
            timeout: WAIT,
        }),
        ..FleetSettings::default()
    };
    let mut fleet = Fleet::start(Pki::new(), settings, |port| vec![web_route(port, backend)]).await;
    let (address, port) = (fleet.address, fleet.address.port());
    let proxy = fleet.proxy.clone();

    // Before the drain: keep-alive as usual.
    let mut h1 = http1(&fleet).await;
    let mut h2 = http2(&fleet).await;
    let (status, connection, body) =
        read(ok(
            within("a GET", h1.send_request(get(port, "/before"))).await
        ))
        .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "path=/before"));
    assert_eq!(connection, None, "a keep-alive answer before the drain");
    assert!(!proxy.is_draining());

    // A slow request is in flight on HTTP/2 when the drain starts.
    let in_flight = tokio::spawn(h2.send_request(get(port, "/slow")));
    until("the slow request at the backend", || {
        slow.load(Ordering::SeqCst) > 0
    })
    .await;
    fleet.shutdown.cancel();
    until("the drain starts", || proxy.is_draining()).await;

    // HTTP/1.1: still answered, as the connection's last answer.
    ok(within("the HTTP/1.1 connection ready", h1.ready()).await);
    let (status, connection, body) = read(ok(within(
        "a GET while draining",
        h1.send_request(get(port, "/during")),
    )
    .await))
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "path=/during"));
    assert_eq!(connection.as_deref(), Some("close"));
    assert!(
        within("the HTTP/1.1 connection closed", h1.ready())
            .await
            .is_err(),
        "the HTTP/1.1 connection stays open after its last answer"
    );

    // HTTP/2: GOAWAY, and the stream in flight still ends well.
    until("GOAWAY on the HTTP/2 connection", || h2.is_closed()).await;
    let (status, _, body) = read(ok(ok(within("the slow answer", in_flight).await))).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "path=/slow"));

    // Connections opened during the delay are served (a load balancer may still send
    // them); a request sent at once on a new HTTP/2 connection is answered or handed back
    // unsent by the GOAWAY, never lost.
    let mut late = http1(&fleet).await;
    let (status, connection, body) = read(ok(within(
        "a GET on a new connection",
        late.send_request(get(port, "/late")),
    )
    .await))
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "path=/late"));
    assert_eq!(connection.as_deref(), Some("close"));
    for _ in 0..5 {
        let mut late = http2(&fleet).await;
        match within(
            "a GET on a new HTTP/2 connection",
            late.try_send_request(get(port, "/late2")),
        )
        .await
        {
            Ok(response) => {
                let (status, _, body) = read(response).await;
                assert_eq!((status, body.as_str()), (StatusCode::OK, "path=/late2"));
            }
            Err(mut error) => assert!(
                error.take_message().is_some() || never_processed(error.error()),
                "a request sent on a new HTTP/2 connection during the drain was lost: {}",
                error.into_error()
            ),
        }
    }
    assert!(
        !fleet.served.is_finished(),
        "the proxy stopped before its drain delay was over"
    );

    // Then it stops accepting, closes the tunnel and returns.
    ok(within("the proxy's return", &mut fleet.served).await);
    assert!(proxy.pool().snapshot().is_empty(), "the tunnel is closed");
    assert!(
        TcpStream::connect(address).await.is_err(),
        "the proxy still accepts after its drain"
    );
}
