//! Trusted proxies end to end in one process: a plain HTTP backend that answers with the
//! forwarding headers it received, a connector (its `Backends` behind a `Dialer`), a
//! proxy (`serve::Proxy` trusting `127.0.0.1/32`, on a real TLS listener on 127.0.0.1)
//! and HTTP/1.1 clients over TLS bound to two loopback addresses: 127.0.0.2, an
//! untrusted user, and 127.0.0.1, a trusted load balancer.
//!
//! Every wait is bounded by [`common::WAIT`].

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use bytes::Bytes;
use common::{Fleet, FleetSettings, Pki, WEB_HOST, http_backend, ok, web_route, within};
use http::{Request, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use sallyport_proxy::forward::TrustedProxies;
use tokio::net::TcpSocket;

/// The load balancer in front of the proxy: trusted.
const BALANCER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
/// A user connecting straight to the proxy: not trusted.
const USER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

// ---------------------------------------------------------------------------------------
// The backend

/// A plain HTTP/1.1 app answering with the forwarding headers it received, one per line
/// as `name: value` (all values of a name joined by ` | `, `-` when absent).
async fn echo_backend() -> SocketAddr {
    http_backend(|request| {
        let text: String = [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-real-ip",
        ]
        .iter()
        .map(|name| {
            let values: Vec<&str> = request
                .headers()
                .get_all(*name)
                .iter()
                .map(|v| v.to_str().unwrap_or("<binary>"))
                .collect();
            let joined = if values.is_empty() {
                "-".to_owned()
            } else {
                values.join(" | ")
            };
            format!("{name}: {joined}\n")
        })
        .collect();
        async move { text }
    })
    .await
}

// ---------------------------------------------------------------------------------------
// The fleet: a proxy on 127.0.0.1 (the load balancer's address) and a connector

/// A proxy trusting `trusted`, with one connector tunnelled to it, serving the app.
async fn start(trusted: TrustedProxies) -> Fleet {
    let backend = echo_backend().await;
    let settings = FleetSettings {
        trusted_proxies: trusted,
        ..FleetSettings::default()
    };
    Fleet::start(Pki::new(), settings, |port| vec![web_route(port, backend)]).await
}

/// A GET to the app over TLS from a socket bound to `from`, with `headers`: the status
/// and what the backend saw.
async fn get_from(fleet: &Fleet, from: Ipv4Addr, headers: &[(&str, &str)]) -> (StatusCode, String) {
    let socket = ok(TcpSocket::new_v4());
    ok(socket.bind(SocketAddr::new(IpAddr::V4(from), 0)));
    let tcp = within("connecting to the proxy", socket.connect(fleet.address))
        .await
        .unwrap_or_else(|e| panic!("connecting from {from} to {}: {e}", fleet.address));
    let stream = fleet.tls_over(tcp, WEB_HOST, &[b"http/1.1"]).await;
    let (mut sender, connection) =
        ok(hyper::client::conn::http1::handshake(TokioIo::new(stream)).await);
    tokio::spawn(connection);
    let mut request =
        Request::get("/").header("host", format!("{WEB_HOST}:{}", fleet.address.port()));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = ok(request.body(Empty::<Bytes>::new()));
    let response = ok(within("a GET through the proxy", sender.send_request(request)).await);
    let status = response.status();
    let body = ok(within("its body", response.into_body().collect()).await).to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn seen(body: &str, name: &str) -> String {
    body.lines()
        .find_map(|line| line.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("{name} missing from the backend's answer: {body}"))
        .to_owned()
}

const FORGED: [(&str, &str); 4] = [
    ("x-forwarded-for", "198.51.100.7, 203.0.113.9"),
    ("x-forwarded-proto", "http"),
    ("x-forwarded-host", "www.example.org"),
    ("x-real-ip", "198.51.100.7"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_count_only_from_trusted_proxies() {
    let trusted = ok(TrustedProxies::parse(&["127.0.0.1/32"]));
    let fleet = start(trusted).await;
    let external_host = format!("{WEB_HOST}:{}", fleet.address.port());

    // A user's forged chain is dropped: the backend sees the user's socket address.
    let (status, body) = get_from(&fleet, USER, &FORGED).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(seen(&body, "x-forwarded-for"), USER.to_string(), "{body}");
    assert_eq!(seen(&body, "x-forwarded-proto"), "https", "{body}");
    assert_eq!(seen(&body, "x-forwarded-host"), external_host, "{body}");
    assert_eq!(seen(&body, "x-real-ip"), "-", "{body}");

    // The load balancer's chain is kept and extended, its proto and host kept.
    let (status, body) = get_from(&fleet, BALANCER, &FORGED).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        seen(&body, "x-forwarded-for"),
        format!("198.51.100.7, 203.0.113.9, {BALANCER}"),
        "{body}"
    );
    assert_eq!(seen(&body, "x-forwarded-proto"), "http", "{body}");
    assert_eq!(seen(&body, "x-forwarded-host"), "www.example.org", "{body}");
    assert_eq!(seen(&body, "x-real-ip"), "198.51.100.7", "{body}");

    // The load balancer without forwarding headers: the proxy's own.
    let (status, body) = get_from(&fleet, BALANCER, &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        seen(&body, "x-forwarded-for"),
        BALANCER.to_string(),
        "{body}"
    );
    assert_eq!(seen(&body, "x-forwarded-proto"), "https", "{body}");
    assert_eq!(seen(&body, "x-forwarded-host"), external_host, "{body}");

    // An unreadable chain from the load balancer: the peer alone, and no error.
    let (status, body) = get_from(
        &fleet,
        BALANCER,
        &[("x-forwarded-for", "203.0.113.9, not-an-address")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        seen(&body, "x-forwarded-for"),
        BALANCER.to_string(),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_trusted_proxies_nobody_is_believed() {
    let fleet = start(TrustedProxies::default()).await;
    for from in [BALANCER, USER] {
        let (status, body) = get_from(&fleet, from, &FORGED).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(seen(&body, "x-forwarded-for"), from.to_string(), "{body}");
        assert_eq!(seen(&body, "x-forwarded-proto"), "https", "{body}");
        assert_eq!(seen(&body, "x-real-ip"), "-", "{body}");
    }
}
