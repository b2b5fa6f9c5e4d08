//! The connector's request handler against real backends on loopback.
//!
//! Each test starts real backends (hyper, HTTP/1.1 and HTTP/2, plain or TLS with a CA made
//! here), puts [`Backends::handle`] behind a real hyper server standing in for the tunnel
//! (HTTP/2, as the proxy speaks it; HTTP/1.1 where a test needs headers HTTP/2 forbids)
//! and sends requests with a hyper client, as the proxy would.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::SinkExt as _;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sallyport_api::Duration as ApiDuration;
use sallyport_api::connector_group::{CertificatePolicy, Registration};
use sallyport_api::fleet_config::{
    Backend, BackendTls, ConnectorGroupConfig, GroupSlice, SCHEMA_VERSION, SliceApp,
};
use sallyport_connector::backend::{Backends, ERROR_HEADER};
use sallyport_connector::slice::{ChangeWindows, CurrentSlice};
use sallyport_tunnel::body::{BoxError, TunnelBody, empty, full};
use sallyport_tunnel::wire::{APP_HEADER, FleetNotice, REQUEST_ID_HEADER};
use tokio::net::{TcpListener, TcpStream};

type TestResult = Result<(), BoxError>;

/// Bytes per chunk of the streamed bodies.
const CHUNK: usize = 64 * 1024;

/// The byte at `offset` of every streamed body, so that loss and reordering show.
fn pattern_byte(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// 64 KiB of the pattern plus one period, so any chunk is a zero-copy slice of it.
fn pattern_source() -> Bytes {
    (0..(CHUNK + 251) as u64).map(pattern_byte).collect()
}

/// The pattern chunk starting at `offset`, `len` bytes long.
fn pattern_chunk(source: &Bytes, offset: u64, len: usize) -> Bytes {
    let start = (offset % 251) as usize;
    source.slice(start..start + len)
}

/// Reads a body frame by frame, checking the pattern at both ends of each chunk; the
/// byte count.
async fn drain_pattern(mut body: Incoming) -> Result<u64, BoxError> {
    let mut offset = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if let (Some(first), Some(last)) = (data.first(), data.last()) {
                assert_eq!(*first, pattern_byte(offset), "byte {offset}");
                let end = offset + data.len() as u64 - 1;
                assert_eq!(*last, pattern_byte(end), "byte {end}");
            }
            offset += data.len() as u64;
        }
    }
    Ok(offset)
}

// ---------------------------------------------------------------------------------------
// Backends

/// What a test backend saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    target: String,
    version: Version,
    headers: HeaderMap,
}

/// A backend on loopback that records every request.
struct TestBackend {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl TestBackend {
    /// A plain HTTP/1.1 backend.
    async fn plain(name: &'static str) -> Result<Self, BoxError> {
        Self::start(name, None).await
    }

    async fn start(name: &'static str, tls: Option<Arc<ServerConfig>>) -> Result<Self, BoxError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let recorded = recorded.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let recorded = recorded.clone();
                        async move { Ok::<_, Infallible>(backend_answer(name, request, recorded).await) }
                    });
                    let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = match acceptor {
                        Some(acceptor) => match acceptor.accept(tcp).await {
                            Ok(tls) => server.serve_connection(TokioIo::new(tls), service).await,
                            Err(_) => return,
                        },
                        None => server.serve_connection(TokioIo::new(tcp), service).await,
                    };
                });
            }
        });
        Ok(Self { addr, seen })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .map(|seen| seen.clone())
            .unwrap_or_default()
    }
}

/// What the test backends answer, by the end of the path:
/// `/echo` streams the request body back as it arrives, `/count` reads the body and
/// answers with its length, `/download?bytes=N` streams N pattern bytes, `/slow` answers
/// after 30 s, `/hop` answers with hop-by-hop and `sallyport-*` headers; anything else
/// answers `<name> <method> <target>`.
async fn backend_answer(
    name: &'static str,
    request: Request<Incoming>,
    recorded: Arc<Mutex<Vec<Seen>>>,
) -> Response<TunnelBody> {
    let target = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    if let Ok(mut seen) = recorded.lock() {
        seen.push(Seen {
            method: request.method().clone(),
            target: target.clone(),
            version: request.version(),
            headers: request.headers().clone(),
        });
    }
    let path = request.uri().path().to_owned();
    if path.ends_with("/echo") {
        return Response::new(sallyport_tunnel::body::incoming(request.into_body()));
    }
    if path.ends_with("/count") {
        let count = match drain_pattern(request.into_body()).await {
            Ok(count) => count.to_string(),
            Err(error) => format!("error: {error}"),
        };
        return Response::new(full(count));
    }
    if path.ends_with("/download") {
        let total: u64 = request
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("bytes="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let source = pattern_source();
        let chunks = futures::stream::unfold(0u64, move |offset| {
            let source = source.clone();
            async move {
                if offset >= total {
                    return None;
                }
                let len = CHUNK.min((total - offset) as usize);
                let chunk = pattern_chunk(&source, offset, len);
                Some((Ok::<_, BoxError>(Frame::data(chunk)), offset + len as u64))
            }
        });
        return Response::new(StreamBody::new(chunks).boxed_unsync());
    }
    if path.ends_with("/slow") {
        tokio::time::sleep(Duration::from_secs(30)).await;
        return Response::new(full("late"));
    }
    if path.ends_with("/hop") {
        let mut response = Response::new(full("hop"));
        let headers = response.headers_mut();
        for (name, value) in [
            ("connection", "x-backend-hop"),
            ("x-backend-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic"),
            ("sallyport-error", "spoofed"),
            ("x-kept", "1"),
        ] {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        return response;
    }
    Response::new(full(format!("{name} {} {target}", request.method())))
}

/// A CA, and a TLS server configuration for `app.corp.test` signed by it offering `h2`
/// and `http/1.1`.
fn backend_pki() -> Result<(String, Arc<ServerConfig>), BoxError> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Sallyport test backend CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let leaf_key = KeyPair::generate()?;
    let leaf =
        CertificateParams::new(vec!["app.corp.test".to_owned()])?.signed_by(&leaf_key, &ca)?;
    let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let mut config = ServerConfig::builder_with_provider(sallyport_tunnel::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((ca.pem(), Arc::new(config)))
}

// ---------------------------------------------------------------------------------------
// Slices

fn duration(text: &str) -> ApiDuration {
    ApiDuration::parse(text).unwrap_or_else(|e| panic!("{e}"))
}

fn app(id: &str, internal_url: &str) -> SliceApp {
    SliceApp {
        app: id.to_owned(),
        internal_url: internal_url.to_owned(),
        backend: Backend {
            timeout: duration("10s"),
            websockets: false,
            tls: None,
        },
    }
}

fn tls_app(id: &str, internal_url: &str, tls: BackendTls) -> SliceApp {
    SliceApp {
        backend: Backend {
            tls: Some(tls),
            ..app(id, internal_url).backend
        },
        ..app(id, internal_url)
    }
}

fn slice(version: &str, apps: Vec<SliceApp>) -> GroupSlice {
    GroupSlice {
        schema_version: SCHEMA_VERSION,
        version: version.to_owned(),
        group: ConnectorGroupConfig {
            id: "infra/east".to_owned(),
            certificate: CertificatePolicy::default(),
            registration: Registration::default(),
            inactive_connector_ttl: duration("240h"),
            connector_version: None,
        },
        apps,
    }
}

fn serving(current: &CurrentSlice, version: &str, apps: Vec<SliceApp>) -> TestResult {
    current.replace(slice(version, apps))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The connector's side of the tunnel, and the proxy's

/// Serves [`Backends::handler`] on loopback: HTTP/2 (as on a tunnel), or HTTP/1.1.
async fn start_connector(current: &CurrentSlice, http1: bool) -> Result<SocketAddr, BoxError> {
    let handler = Arc::new(Backends::new(current.clone())).handler();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let answer = handler(request);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let io = TokioIo::new(tcp);
                let _ = if http1 {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await
                } else {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .enable_connect_protocol()
                        .serve_connection(io, service)
                        .await
                };
            });
        }
    });
    Ok(addr)
}

/// The proxy's end: an HTTP/2 client on one connection to the connector.
struct Proxy {
    sender: hyper::client::conn::http2::SendRequest<TunnelBody>,
}

impl Proxy {
    async fn connect(addr: SocketAddr) -> Result<Self, BoxError> {
        let tcp = TcpStream::connect(addr).await?;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
        tokio::spawn(connection);
        Ok(Self { sender })
    }

    async fn send(&mut self, request: Request<TunnelBody>) -> Result<Response<Incoming>, BoxError> {
        self.sender.ready().await?;
        Ok(self.sender.send_request(request).await?)
    }
}

/// A tunneled request: `uri` is the internal URL, [`APP_HEADER`] names `app`.
fn tunneled(method: Method, uri: &str, app: &str, body: TunnelBody) -> Request<TunnelBody> {
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri.parse().unwrap_or_else(|e| panic!("{uri}: {e}"));
    let headers = request.headers_mut();
    headers.insert(
        HeaderName::from_static(APP_HEADER),
        HeaderValue::from_str(app).unwrap_or_else(|e| panic!("{e}")),
    );
    headers.insert(
        HeaderName::from_static(REQUEST_ID_HEADER),
        HeaderValue::from_static("req-42"),
    );
    request
}

fn get(uri: &str, app: &str) -> Request<TunnelBody> {
    tunneled(Method::GET, uri, app, empty())
}

async fn text(response: Response<Incoming>) -> Result<String, BoxError> {
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn error_reason(response: &Response<Incoming>) -> Option<&str> {
    response
        .headers()
        .get(ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
}

/// A streamed request body: the sender and the body.
fn streamed_body() -> (
    futures::channel::mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
    TunnelBody,
) {
    let (sender, receiver) = futures::channel::mpsc::channel(4);
    (sender, StreamBody::new(receiver).boxed_unsync())
}

/// Bounds a step that must finish (never a timing assertion: the bound is generous).
async fn bounded<T>(what: &str, step: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), step)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within 60 s"))
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn get_reaches_the_backend_with_its_path_query_and_request_id() -> TestResult {
    let backend = TestBackend::plain("wiki").await?;
    let current = CurrentSlice::new();
    serving(
        &current,
        "v1",
        vec![app("team-a/wiki", &backend.url("/wiki/"))],
    )?;
    let mut proxy = Proxy::connect(start_connector(&current, false).await?).await?;

    let uri = backend.url("/wiki/pages/Home?q=a%20b&x=1&x=2");
    let response = proxy.send(get(&uri, "team-a/wiki")).await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(error_reason(&response), None);
    assert_eq!(
        text(response).await?,
        "wiki GET /wiki/pages/Home?q=a%20b&x=1&x=2"
    );

    let seen = backend.requests();
    assert_eq!(seen.len(), 1);
    let seen = &seen[0];
    assert_eq!(seen.method, Method::GET);
    assert_eq!(seen.target, "/wiki/pages/Home?q=a%20b&x=1&x=2");
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(
        seen.headers.get(http::header::HOST),
        Some(&HeaderValue::from_str(&backend.addr.to_string())?)
    );
    assert_eq!(
        seen.headers.get(REQUEST_ID_HEADER),
        Some(&HeaderValue::from_static("req-42"))
    );
    assert!(
        seen.headers
            .keys()
            .all(|name| !name.as_str().starts_with("sallyport-")),
        "{:?}",
        seen.headers
    );
    Ok(())
}

#[tokio::test]
async fn sixty_four_mebibytes_stream_up_and_down() -> TestResult {
    const TOTAL: u64 = 64 * 1024 * 1024;
    let backend = TestBackend::plain("bulk").await?;
    let current = CurrentSlice::new();
    serving(&current, "v1", vec![app("team-a/bulk", &backend.url("/"))])?;
    let mut proxy = Proxy::connect(start_connector(&current, false).await?).await?;

    // Upload: the body is produced chunk by chunk while it is sent.
    let (mut sender, body) = streamed_body();
    let producer = tokio::spawn(async move {
        let source = pattern_source();
        let mut offset = 0u64;
        while offset < TOTAL {
            let chunk = pattern_chunk(&source, offset, CHUNK);
            offset += CHUNK as u64;
            if sender.send(Ok(Frame::data(chunk))).await.is_err() {
                return offset;
            }
        }
        offset
    });
    let response = bounded(
        "upload",
        proxy.send(tunneled(
            Method::POST,
            &backend.url("/upload/count"),
            "team-a/bulk",
            body,
        )),
    )
    .await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(text(response).await?, TOTAL.to_string());
    assert_eq!(producer.await?, TOTAL);

    // Download: counted frame by frame as it arrives.
    let response = proxy
        .send(get(
            &backend.url(&format!("/files/download?bytes={TOTAL}")),
            "team-a/bulk",
        ))
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let received = bounded("download", drain_pattern(response.into_body())).await?;
    assert_eq!(received, TOTAL);
    Ok(())
}

/// Each chunk comes back through the connector before the next one is sent: a connector
/// that buffered whole bodies in either direction would never answer.
async fn ping_pong(proxy: &mut Proxy, uri: &str, app: &str) -> TestResult {
    let (mut sender, body) = streamed_body();
    let source = pattern_source();
    sender
        .send(Ok(Frame::data(pattern_chunk(&source, 0, 1024))))
        .await?;
    let response = bounded(
        "echo headers",
        proxy.send(tunneled(Method::POST, uri, app, body)),
    )
    .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut sent = 1024u64;
    let mut received = 0u64;
    for round in 0..32u64 {
        while received < sent {
            let frame = bounded("an echoed chunk", body.frame())
                .await
                .unwrap_or_else(|| panic!("the echo ended early in round {round}"))?;
            if let Ok(data) = frame.into_data() {
                assert_eq!(data.first().copied(), Some(pattern_byte(received)));
                received += data.len() as u64;
            }
        }
        sender
            .send(Ok(Frame::data(pattern_chunk(&source, sent, 1024))))
            .await?;
        sent += 1024;
    }
    drop(sender);
    while let Some(frame) = bounded("the echo's end", body.frame()).await {
        if let Ok(data) = frame?.into_data() {
            received += data.len() as u64;
        }
    }
    assert_eq!(received, sent);
    Ok(())
}

#[tokio::test]
async fn bodies_stream_both_ways_as_they_arrive() -> TestResult {
    let backend = TestBackend::plain("echo").await?;
    let current = CurrentSlice::new();
    serving(&current, "v1", vec![app("team-a/echo", &backend.url("/"))])?;
    let mut proxy = Proxy::connect(start_connector(&current, false).await?).await?;
    ping_pong(&mut proxy, &backend.url("/chat/echo"), "team-a/echo").await
}

#[tokio::test]
async fn an_app_not_in_the_slice_is_refused_and_nothing_is_sent() -> TestResult {
    let backend = TestBackend::plain("wiki").await?;
    let current = CurrentSlice::new();
    let addr = start_connector(&current, false).await?;
    let mut proxy = Proxy::connect(addr).await?;

    // Before any slice, and for an app of another group.
    for step in ["before", "after"] {
        let response = proxy.send(get(&backend.url("/"), "team-b/crm")).await?;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{step}");
        assert_eq!(error_reason(&response), Some("AppNotServed"));
        let body = text(response).await?;
        assert!(
            body.starts_with("app not served by this connector group"),
            "{body}"
        );
        assert!(body.contains("req-42"), "{body}");
        serving(&current, "v1", vec![app("team-a/wiki", &backend.url("/"))])?;
    }

    // No app header at all.
    let mut request = get(&backend.url("/"), "team-a/wiki");
    request.headers_mut().remove(APP_HEADER);
    let response = proxy.send(request).await?;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_reason(&response), Some("AppNotServed"));

    assert_eq!(backend.requests().len(), 0, "the backend saw nothing");
    Ok(())
}

#[tokio::test]
async fn a_uri_outside_the_apps_internal_url_is_refused_and_nothing_is_sent() -> TestResult {
    let backend = TestBackend::plain("wiki").await?;
    let elsewhere = TestBackend::plain("elsewhere").await?;
    let current = CurrentSlice::new();
    serving(
        &current,
        "v1",
        vec![app("team-a/wiki", &backend.url("/wiki/"))],
    )?;
    let mut proxy = Proxy::connect(start_connector(&current, false).await?).await?;

    let port = backend.addr.port();
    for uri in [
        elsewhere.url("/wiki/"),
        format!("http://localhost:{port}/wiki/"),
        format!("https://127.0.0.1:{port}/wiki/"),
        backend.url("/admin"),
        backend.url("/wikipedia"),
        backend.url("/wiki/../admin"),
        backend.url("/wiki/%2e%2e/admin"),
        backend.url("/wiki/..%2Fadmin"),
    ] {
        let response = proxy.send(get(&uri, "team-a/wiki")).await?;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{uri}");
        assert_eq!(error_reason(&response), Some("OutsideInternalUrl"), "{uri}");
        assert!(text(response).await?.contains("req-42"));
    }
    assert_eq!(backend.requests().len(), 0);
    assert_eq!(elsewhere.requests().len(), 0);

    // The prefix itself, with or without its slash, and what lies under it.
    for path in ["/wiki", "/wiki/", "/wiki/a/b"] {
        let response = proxy.send(get(&backend.url(path), "team-a/wiki")).await?;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    assert_eq!(backend.requests().len(), 3);
    Ok(())
}

#[tokio::test]
async fn an_unreachable_backend_is_502_with_the_request_id() -> TestResult {
    let closed = TcpListener::bind("127.0.0.1:0").await?;
    let addr = closed.local_addr()?;
    drop(closed);
    let current = CurrentSlice::new();
    serving(
        &current,
        "v1",
        vec![app("team-a/gone", &format!("http://{addr}/"))],
    )?;
    let mut proxy = Proxy::connect(start_connector(&current, false).await?).await?;

    let response = bounded(
        "the request",
        proxy.send(get(&format!("http://{addr}/x"), "team-a/gone")),
    )
    .await?;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(error_reason(&response), Some("BackendUnreachable"));
    assert!(text(response).await?.contains("req-42"));
    Ok(())
}

#[tokio::test]
async fn a_backend_slower_than_its_timeout_is_504_with_the_request_id() -> TestResult {
    let backend = TestBackend::plain("slow").await?;
    let current = CurrentSlice::new();
    let mut slow = app("team-a/slow", &backend.url("/"));
    slow.backend.timeout = duration("300ms");
    serving(&current, "v1", vec![slow])?;
    let mut proxy = Proxy::connect(start_connector(&current, false).await?).await?;

    let response = bounded(
        "the request",
        proxy.send(get(&backend.url("/report/slow"), "team-a/slow")),
    )
    .await?;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(error_reason(&response), Some("BackendTimeout"));
    assert!(text(response).await?.contains("req-42"));
    assert_eq!(
        backend.requests().len(),
        1,
        "the request did reach the backend"
    );

    // The connector keeps serving on the same tunnel.
    let response = proxy
        .send(get(&backend.url("/fast"), "team-a/slow"))
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() -> TestResult {
    let backend = TestBackend::plain("hop").await?;
    let current = CurrentSlice::new();
    serving(&current, "v1", vec![app("team-a/hop", &backend.url("/"))])?;

    // HTTP/1.1 to the connector: HTTP/2 forbids connection-specific headers, so only
    // HTTP/1.1 can carry them in.
    let tcp = TcpStream::connect(start_connector(&current, true).await?).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, TunnelBody>(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let mut request = get(&backend.url("/hop"), "team-a/hop");
    for (name, value) in [
        ("connection", "x-client-hop"),
        ("x-client-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("proxy-authorization", "Basic eDp5"),
        ("te", "gzip"),
        ("sallyport-something", "internal"),
        ("x-end-to-end", "1"),
    ] {
        request.headers_mut().insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    let response = sender.send_request(request).await?;
    assert_eq!(response.status(), StatusCode::OK);
    for name in [
        "x-backend-hop",
        "keep-alive",
        "proxy-authenticate",
        "sallyport-error",
    ] {
        assert!(
            !response.headers().contains_key(name),
            "{name} reached the proxy: {:?}",
            response.headers()
        );
    }
    assert!(response.headers().contains_key("x-kept"));

    let seen = backend.requests();
    assert_eq!(seen.len(), 1);
    let headers = &seen[0].headers;
    for name in [
        "connection",
        "x-client-hop",
        "keep-alive",
        "proxy-authorization",
        "te",
        "sallyport-something",
        APP_HEADER,
    ] {
        assert!(
            !headers.contains_key(name),
            "{name} reached the backend: {headers:?}"
        );
    }
    assert!(headers.contains_key("x-end-to-end"));

    // And over HTTP/2, as on a tunnel.
    let mut proxy = Proxy::connect(start_connector(&current, false).await?).await?;
    let response = proxy.send(get(&backend.url("/hop"), "team-a/hop")).await?;
    assert!(!response.headers().contains_key("x-backend-hop"));
    assert!(!response.headers().contains_key("sallyport-error"));
    assert!(response.headers().contains_key("x-kept"));
    Ok(())
}

#[tokio::test]
async fn a_slice_replace_switches_the_target_and_keeps_serving() -> TestResult {
    let old = TestBackend::plain("old").await?;
    let new = TestBackend::plain("new").await?;
    let current = CurrentSlice::new();
    serving(&current, "v1", vec![app("team-a/wiki", &old.url("/wiki/"))])?;
    let mut proxy = Proxy::connect(start_connector(&current, false).await?).await?;

    // A download in flight when the slice changes.
    const TOTAL: u64 = 8 * 1024 * 1024;
    let in_flight = proxy
        .send(get(
            &old.url(&format!("/wiki/download?bytes={TOTAL}")),
            "team-a/wiki",
        ))
        .await?;
    assert_eq!(in_flight.status(), StatusCode::OK);

    serving(&current, "v2", vec![app("team-a/wiki", &new.url("/wiki/"))])?;
    assert_eq!(current.version().as_deref(), Some("v2"));

    let response = proxy.send(get(&new.url("/wiki/a"), "team-a/wiki")).await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(text(response).await?, "new GET /wiki/a");
    // A lagging proxy replica still shapes requests for v1: within the grace of the
    // replaced slice, v1's backend serves them.
    let response = proxy.send(get(&old.url("/wiki/a"), "team-a/wiki")).await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(error_reason(&response), None);
    assert_eq!(text(response).await?, "old GET /wiki/a");
    // Neither slice admits a path outside the internal URL.
    let response = proxy.send(get(&old.url("/admin"), "team-a/wiki")).await?;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_reason(&response), Some("OutsideInternalUrl"));

    let received = bounded(
        "the in-flight download",
        drain_pattern(in_flight.into_body()),
    )
    .await?;
    assert_eq!(received, TOTAL);
    assert_eq!(old.requests().len(), 2);
    assert_eq!(new.requests().len(), 1);

    // Past the grace the replaced slice admits nothing: the old URL is refused, and an
    // app dropped from the slice at once.
    current.set_change_windows(ChangeWindows {
        previous_grace: Duration::ZERO,
        ..ChangeWindows::default()
    });
    let response = proxy.send(get(&old.url("/wiki/a"), "team-a/wiki")).await?;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_reason(&response), Some("OutsideInternalUrl"));
    serving(&current, "v3", vec![])?;
    let response = proxy.send(get(&new.url("/wiki/a"), "team-a/wiki")).await?;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_reason(&response), Some("AppNotServed"));
    assert_eq!(old.requests().len(), 2);
    assert_eq!(new.requests().len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_request_for_an_announced_slice_waits_for_it() -> TestResult {
    let old = TestBackend::plain("old").await?;
    let new = TestBackend::plain("new").await?;
    let current = CurrentSlice::new();
    let (notices, receiver) = tokio::sync::watch::channel(None);
    current.follow_notices(receiver);
    // Generous for a slow machine (the bound itself is a unit test's matter), and longer
    // than `bounded`: a request that waits when it should not fails the test.
    current.set_change_windows(ChangeWindows {
        catch_up_wait: Duration::from_secs(600),
        ..ChangeWindows::default()
    });
    serving(&current, "v1", vec![app("team-a/wiki", &old.url("/wiki/"))])?;
    let connector = start_connector(&current, false).await?;
    let mut proxy = Proxy::connect(connector).await?;

    // A proxy replica loaded v2 (a blue/green cut-over): it announces it and at once
    // sends a request for v2's internal URL, before the connector has pulled v2.
    notices.send_replace(Some(FleetNotice {
        replica: "proxy-0".to_owned(),
        replicas: vec!["proxy-0".to_owned()],
        config_version: "v2".to_owned(),
    }));
    let request = tokio::spawn({
        let mut proxy = Proxy::connect(connector).await?;
        let uri = new.url("/wiki/a");
        async move { proxy.send(get(&uri, "team-a/wiki")).await }
    });
    // The pull lands a moment later (the request may or may not be waiting yet: either
    // way it is served by v2).
    tokio::time::sleep(Duration::from_millis(100)).await;
    serving(&current, "v2", vec![app("team-a/wiki", &new.url("/wiki/"))])?;
    let response = bounded("the waiting request", request).await??;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(text(response).await?, "new GET /wiki/a");

    // Without a newer announcement a request neither slice admits is refused at once.
    let response = bounded(
        "a refusal",
        proxy.send(get(&new.url("/admin"), "team-a/wiki")),
    )
    .await?;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_reason(&response), Some("OutsideInternalUrl"));
    assert_eq!(new.requests().len(), 1);
    assert_eq!(old.requests().len(), 0);
    Ok(())
}

#[tokio::test]
async fn https_backends_are_verified_by_server_name_and_speak_h2() -> TestResult {
    let (ca_pem, server_config) = backend_pki()?;
    let backend = TestBackend::start("secure", Some(server_config)).await?;
    let port = backend.addr.port();
    let internal = format!("https://127.0.0.1:{port}/");
    let verified = BackendTls {
        ca_secret_ref: None,
        ca_pem: None,
        server_name: Some("app.corp.test".to_owned()),
        insecure_skip_verify: false,
    };
    let current = CurrentSlice::with_backend_ca(Some(&ca_pem))?;
    serving(
        &current,
        "v1",
        vec![
            tls_app("team-a/secure", &internal, verified.clone()),
            // The certificate does not name 127.0.0.1.
            app("team-a/by-address", &internal),
            tls_app(
                "team-a/wrong-name",
                &internal,
                BackendTls {
                    server_name: Some("other.corp.test".to_owned()),
                    ..verified.clone()
                },
            ),
        ],
    )?;
    let mut proxy = Proxy::connect(start_connector(&current, false).await?).await?;

    let response = proxy
        .send(get(&format!("{internal}docs?x=1"), "team-a/secure"))
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(text(response).await?, "secure GET /docs?x=1");
    let seen = backend.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, Version::HTTP_2, "ALPN settles on h2");

    ping_pong(&mut proxy, &format!("{internal}echo"), "team-a/secure").await?;

    for refused in ["team-a/by-address", "team-a/wrong-name"] {
        let response = proxy.send(get(&format!("{internal}x"), refused)).await?;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY, "{refused}");
        assert_eq!(error_reason(&response), Some("BackendUnreachable"));
    }
    assert_eq!(
        backend.requests().len(),
        2,
        "only verified connections carried requests"
    );
    Ok(())
}

#[tokio::test]
async fn https_backends_unknown_to_the_trust_store_need_insecure_skip_verify() -> TestResult {
    let (_, server_config) = backend_pki()?;
    let backend = TestBackend::start("self-signed", Some(server_config)).await?;
    let internal = format!("https://127.0.0.1:{}/", backend.addr.port());
    let current = CurrentSlice::new();
    let tls = |insecure_skip_verify| BackendTls {
        ca_secret_ref: None,
        ca_pem: None,
        server_name: Some("app.corp.test".to_owned()),
        insecure_skip_verify,
    };
    serving(
        &current,
        "v1",
        vec![
            tls_app("team-a/verified", &internal, tls(false)),
            tls_app("team-a/insecure", &internal, tls(true)),
        ],
    )?;
    let mut proxy = Proxy::connect(start_connector(&current, false).await?).await?;

    let response = proxy.send(get(&internal, "team-a/verified")).await?;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let response = proxy.send(get(&internal, "team-a/insecure")).await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(backend.requests().len(), 1);
    Ok(())
}

/// A WebSocket extended CONNECT (`:protocol websocket`) for `uri`.
fn websocket_connect(uri: &str, app: &str) -> Request<TunnelBody> {
    let mut request = tunneled(Method::CONNECT, uri, app, empty());
    request
        .headers_mut()
        .insert("sec-websocket-version", HeaderValue::from_static("13"));
    request
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    request
}

#[tokio::test]
async fn websockets_are_refused_for_apps_without_them() -> TestResult {
    let backend = TestBackend::plain("ws").await?;
    let current = CurrentSlice::new();
    serving(&current, "v1", vec![app("team-a/ws", &backend.url("/"))])?;
    let mut proxy = Proxy::connect(start_connector(&current, false).await?).await?;
    // A first exchange so that the connector's SETTINGS (extended CONNECT) are known.
    let response = proxy.send(get(&backend.url("/"), "team-a/ws")).await?;
    assert_eq!(response.status(), StatusCode::OK);

    let response = proxy
        .send(websocket_connect(&backend.url("/socket"), "team-a/ws"))
        .await?;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_reason(&response), Some("WebSocketsDisabled"));
    assert_eq!(backend.requests().len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_backend_that_does_not_switch_protocols_is_a_bad_gateway() -> TestResult {
    let backend = TestBackend::plain("ws").await?;
    let current = CurrentSlice::new();
    let mut ws = app("team-a/ws", &backend.url("/"));
    ws.backend.websockets = true;
    let mut gone = app("team-a/gone", "http://127.0.0.1:1/");
    gone.backend.websockets = true;
    serving(&current, "v1", vec![ws, gone])?;
    let mut proxy = Proxy::connect(start_connector(&current, false).await?).await?;
    let response = proxy.send(get(&backend.url("/"), "team-a/ws")).await?;
    assert_eq!(response.status(), StatusCode::OK);

    // The test backend answers the upgrade with a plain 200: no WebSocket server.
    let response = proxy
        .send(websocket_connect(&backend.url("/socket?x=1"), "team-a/ws"))
        .await?;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(error_reason(&response), Some("UpgradeRefused"));
    let seen = backend.requests();
    let upgrade = seen
        .last()
        .unwrap_or_else(|| panic!("the backend saw the upgrade"));
    assert_eq!(upgrade.method, Method::GET);
    assert_eq!(upgrade.target, "/socket?x=1");
    assert_eq!(upgrade.version, Version::HTTP_11);
    let header = |name: &str| upgrade.headers.get(name).and_then(|v| v.to_str().ok());
    assert_eq!(header("upgrade"), Some("websocket"));
    assert_eq!(header("connection"), Some("Upgrade"));
    assert_eq!(header("sec-websocket-version"), Some("13"));
    assert!(header("sec-websocket-key").is_some_and(|key| key.len() == 24));
    assert_eq!(header("host"), Some(backend.addr.to_string().as_str()));
    assert_eq!(header(REQUEST_ID_HEADER), Some("req-42"));
    assert_eq!(header(APP_HEADER), None);

    let response = proxy
        .send(websocket_connect(
            "http://127.0.0.1:1/socket",
            "team-a/gone",
        ))
        .await?;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(error_reason(&response), Some("BackendUnreachable"));
    Ok(())
}
