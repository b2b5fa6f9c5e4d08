//! WebSockets end to end in one process: real WebSocket echo backends (tokio-tungstenite,
//! plain and TLS), a connector (its `Backends` behind a `Dialer`), a proxy
//! (`serve::Proxy` with a fleet configuration made here, on a real TLS listener) and
//! tokio-tungstenite clients over TLS to the proxy, on HTTP/1.1 and on HTTP/2.
//!
//! Every wait is bounded by [`common::WAIT`].

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use common::{
    Fleet as Proxied, FleetSettings, Pki, WEB_HOST, http_backend, ok, route, until, web_route,
    within,
};
use futures::{SinkExt as _, StreamExt as _};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use sallyport_tunnel::tls;
use sallyport_tunnel::wire::REQUEST_ID_HEADER;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request as WsRequest};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{WebSocketStream, accept_hdr_async, client_async};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// An app with WebSockets, behind the plain echo backend.
const CHAT_HOST: &str = "chat.apps.example.com";
/// An app whose `backend.websockets` is off, behind the same backend.
const CLOSED_HOST: &str = "closed.apps.example.com";
/// An app with WebSockets, behind the TLS echo backend.
const SECURE_HOST: &str = "secure.apps.example.com";
/// The name in the TLS echo backend's certificate (`backend.tls.serverName`).
const BACKEND_TLS_NAME: &str = "app.corp.test";
/// The subprotocol the echo backends agree to.
const SUBPROTOCOL: &str = "chat.v1";

/// Logs to the test's output, filtered by `RUST_LOG` (nothing when unset).
fn trace() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    });
}

// ---------------------------------------------------------------------------------------
// Backends

/// What an echo backend saw of one WebSocket handshake.
#[derive(Debug, Clone)]
struct Handshake {
    path: String,
    headers: HeaderMap,
}

/// A tokio-tungstenite echo server on loopback, plain or TLS: text and binary messages
/// come back as they are, a close is answered. `/refuse` is refused with 403 and a body.
struct EchoBackend {
    address: SocketAddr,
    seen: Arc<Mutex<Vec<Handshake>>>,
}

impl EchoBackend {
    async fn start(tls: Option<Arc<ServerConfig>>) -> Self {
        let listener = ok(TcpListener::bind("127.0.0.1:0").await);
        let address = ok(listener.local_addr());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        let acceptor = tls.map(TlsAcceptor::from);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let recorded = recorded.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                echo(tls, recorded).await;
                            }
                        }
                        None => echo(tcp, recorded).await,
                    }
                });
            }
        });
        Self { address, seen }
    }

    fn handshakes(&self) -> Vec<Handshake> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

// tungstenite's handshake callback answers a refusal as a whole `http::Response`.
#[allow(clippy::result_large_err)]
async fn echo<S>(stream: S, recorded: Arc<Mutex<Vec<Handshake>>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let callback = move |request: &WsRequest, mut response: Response<()>| {
        recorded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Handshake {
                path: request.uri().path().to_owned(),
                headers: request.headers().clone(),
            });
        if request.uri().path() == "/refuse" {
            let mut refusal = ErrorResponse::new(Some("no entry for you\n".to_owned()));
            *refusal.status_mut() = StatusCode::FORBIDDEN;
            return Err(refusal);
        }
        let offered = request
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|p| p.trim() == SUBPROTOCOL));
        if offered {
            response.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(SUBPROTOCOL),
            );
        }
        Ok(response)
    };
    let Ok(mut socket) = accept_hdr_async(stream, callback).await else {
        return;
    };
    while let Some(Ok(message)) = socket.next().await {
        if (message.is_text() || message.is_binary()) && socket.send(message).await.is_err() {
            return;
        }
    }
}

/// A plain HTTP/1.1 app answering `hello from web <path>`.
async fn web_backend() -> SocketAddr {
    http_backend(|request| {
        let text = format!("hello from web {}", request.uri().path());
        async move { text }
    })
    .await
}

// ---------------------------------------------------------------------------------------
// The fleet: a proxy and a connector

/// The proxy and connector of [`common::Fleet`] serving the apps of the host constants,
/// with their backends.
struct Fleet {
    fleet: Proxied,
    port: u16,
    echo: EchoBackend,
    secure_echo: EchoBackend,
}

impl Fleet {
    async fn start() -> Self {
        trace();
        let pki = Pki::new();
        let echo = EchoBackend::start(None).await;
        let (backend_chain, backend_key) = pki.server(&[BACKEND_TLS_NAME]);
        let backend_tls = {
            let credentials =
                Pki::credentials("TLS backend certificate", (backend_chain, backend_key));
            let config = ServerConfig::builder_with_provider(tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap_or_else(|e| panic!("{e}"))
                .with_no_client_auth()
                .with_single_cert(credentials.chain.clone(), credentials.key.clone_key());
            Arc::new(ok(config))
        };
        let secure_echo = EchoBackend::start(Some(backend_tls)).await;
        let web = web_backend().await;

        let settings = FleetSettings {
            backends_trust_root: true,
            ..FleetSettings::default()
        };
        let fleet = Proxied::start(pki, settings, |port| {
            let mut routes = vec![
                route(
                    "team-a/chat",
                    CHAT_HOST,
                    port,
                    &format!("http://{}/", echo.address),
                    true,
                    None,
                ),
                route(
                    "team-a/closed",
                    CLOSED_HOST,
                    port,
                    &format!("http://{}/", echo.address),
                    false,
                    None,
                ),
                route(
                    "team-a/secure",
                    SECURE_HOST,
                    port,
                    &format!("https://{}/", secure_echo.address),
                    true,
                    Some(serde_json::json!({ "serverName": BACKEND_TLS_NAME })),
                ),
                web_route(port, web),
            ];
            routes.sort_by(|a, b| a.host.cmp(&b.host));
            routes
        })
        .await;
        Self {
            port: fleet.address.port(),
            fleet,
            echo,
            secure_echo,
        }
    }

    /// A TLS connection to the proxy for `host`, offering `alpn`.
    async fn tls(&self, host: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        self.fleet.tls(host, alpn).await
    }

    /// A WebSocket handshake over HTTP/1.1 to `host` at `path`, offering [`SUBPROTOCOL`].
    async fn websocket(
        &self,
        host: &str,
        path: &str,
    ) -> Result<
        (
            WebSocketStream<TlsStream<TcpStream>>,
            Response<Option<Vec<u8>>>,
        ),
        WsError,
    > {
        let stream = self.tls(host, &[b"http/1.1"]).await;
        let mut request = ok(format!("wss://{host}:{}{path}", self.port).into_client_request());
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
        within("the WebSocket handshake", client_async(request, stream)).await
    }

    /// A WebSocket handshake of WebSocket `version` sent by a plain HTTP/1.1 client, for
    /// answers other than 101: status, headers and the whole body.
    async fn raw_handshake(
        &self,
        host: &str,
        path: &str,
        version: &str,
    ) -> (StatusCode, HeaderMap, String) {
        let stream = self.tls(host, &[b"http/1.1"]).await;
        let (mut sender, connection) =
            ok(hyper::client::conn::http1::handshake(TokioIo::new(stream)).await);
        tokio::spawn(connection.with_upgrades());
        let request = ok(Request::get(path)
            .header("host", format!("{host}:{}", self.port))
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", version)
            .body(Empty::<Bytes>::new()));
        let response = ok(within("a WebSocket handshake", sender.send_request(request)).await);
        let (parts, body) = response.into_parts();
        let body = ok(within("its body", body.collect()).await).to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    /// A plain `GET` over HTTP/1.1 to `host` at `path`: status and body.
    async fn get(&self, host: &str, path: &str) -> (StatusCode, String) {
        let stream = self.tls(host, &[b"http/1.1"]).await;
        let (mut sender, connection) =
            ok(hyper::client::conn::http1::handshake(TokioIo::new(stream)).await);
        tokio::spawn(connection);
        let request = ok(Request::get(path)
            .header("host", format!("{host}:{}", self.port))
            .body(Empty::<Bytes>::new()));
        let response = ok(within("a GET through the proxy", sender.send_request(request)).await);
        let status = response.status();
        let body = ok(within("its body", response.into_body().collect()).await).to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Streams outstanding on the proxy's tunnels.
    fn outstanding(&self) -> usize {
        self.fleet
            .proxy
            .pool()
            .snapshot()
            .iter()
            .map(|tunnel| tunnel.outstanding)
            .sum()
    }

    /// Waits until the tunnels have `count` outstanding streams.
    async fn wait_outstanding(&self, count: usize) {
        until(&format!("{count} outstanding tunnel streams"), || {
            self.outstanding() == count
        })
        .await;
    }
}

/// The next data message of `socket`, skipping pings and pongs.
async fn next_message<S>(socket: &mut WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let message = within("a message from the backend", socket.next())
            .await
            .unwrap_or_else(|| panic!("the WebSocket ended"))
            .unwrap_or_else(|e| panic!("the WebSocket failed: {e}"));
        if !message.is_ping() && !message.is_pong() {
            return message;
        }
    }
}

/// Closes `socket` and checks the backend's close answer and the end of the stream.
async fn close<S>(socket: &mut WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ok(within("sending the close", socket.close(None)).await);
    loop {
        match within("the close handshake", socket.next()).await {
            None => break,
            Some(Ok(message)) if message.is_close() || message.is_ping() || message.is_pong() => {}
            Some(Ok(message)) => panic!("a {} byte message after the close", message.len()),
            Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => break,
            Some(Err(error)) => panic!("the close handshake failed: {error}"),
        }
    }
}

/// `len` bytes of a pattern in which loss and reordering show.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_echo_through_the_tunnel_and_the_close_handshake_completes() -> TestResult {
    let fleet = Fleet::start().await;
    let (mut socket, response) = ok(fleet.websocket(CHAT_HOST, "/socket?room=1").await);
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(HeaderValue::as_bytes),
        Some(SUBPROTOCOL.as_bytes())
    );
    let request_id = response
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("the 101 names the request id"));
    assert_eq!(
        fleet.outstanding(),
        1,
        "the open WebSocket is an outstanding stream"
    );

    socket.send(Message::text("hello, backend")).await?;
    assert_eq!(
        next_message(&mut socket).await,
        Message::text("hello, backend")
    );
    let binary = Bytes::from_static(&[0, 1, 2, 0xfe, 0xff]);
    socket.send(Message::binary(binary.clone())).await?;
    assert_eq!(next_message(&mut socket).await, Message::binary(binary));

    let large = Bytes::from(pattern(10 << 20));
    within(
        "sending 10 MiB",
        socket.send(Message::binary(large.clone())),
    )
    .await?;
    match next_message(&mut socket).await {
        Message::Binary(echoed) => {
            assert_eq!(echoed.len(), large.len());
            assert!(echoed == large, "the 10 MiB message came back changed");
        }
        other => panic!("a {} byte non-binary answer", other.len()),
    }

    // The backend saw an HTTP/1.1 handshake for its own host, with the proxy's headers
    // and none of the tunnel's.
    let handshakes = fleet.echo.handshakes();
    assert_eq!(handshakes.len(), 1);
    let seen = &handshakes[0];
    assert_eq!(seen.path, "/socket");
    let header = |name: &str| {
        seen.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("host"), Some(fleet.echo.address.to_string()));
    assert_eq!(
        header("x-forwarded-host"),
        Some(format!("{CHAT_HOST}:{}", fleet.port))
    );
    assert_eq!(header("x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
    assert_eq!(header(REQUEST_ID_HEADER), Some(request_id));
    assert_eq!(
        header("sec-websocket-protocol").as_deref(),
        Some(SUBPROTOCOL)
    );
    assert!(
        seen.headers
            .keys()
            .all(|name| !name.as_str().starts_with("sallyport-"))
    );

    close(&mut socket).await;
    drop(socket);
    fleet.wait_outstanding(0).await;

    // The tunnel carries ordinary requests as before.
    assert_eq!(
        fleet.get(WEB_HOST, "/after").await,
        (StatusCode::OK, "hello from web /after".to_owned())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_without_websockets_is_refused_and_the_tunnel_serves_on() -> TestResult {
    let fleet = Fleet::start().await;
    match fleet.websocket(CLOSED_HOST, "/socket").await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), StatusCode::FORBIDDEN);
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                .into_owned();
            assert!(body.contains("team-a/closed"), "{body}");
        }
        Err(error) => panic!("expected a 403, got {error}"),
        Ok(_) => panic!("a WebSocket was opened for an app without WebSockets"),
    }
    assert!(
        fleet.echo.handshakes().is_empty(),
        "the backend was reached"
    );
    assert_eq!(fleet.outstanding(), 0);

    // The open app next to it still works, WebSocket and plain request alike.
    let (mut socket, _) = ok(fleet.websocket(CHAT_HOST, "/").await);
    socket.send(Message::text("still here")).await?;
    assert_eq!(next_message(&mut socket).await, Message::text("still here"));
    close(&mut socket).await;
    drop(socket);
    assert_eq!(
        fleet.get(WEB_HOST, "/").await,
        (StatusCode::OK, "hello from web /".to_owned())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_refusal_reaches_the_user_with_its_status_and_body() -> TestResult {
    let fleet = Fleet::start().await;
    // tokio-tungstenite keeps only the body bytes that came with the headers: a plain
    // HTTP/1.1 client reads the whole refusal.
    let (status, _, body) = fleet.raw_handshake(CHAT_HOST, "/refuse", "13").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body, "no entry for you\n");
    assert_eq!(fleet.echo.handshakes().len(), 1);
    fleet.wait_outstanding(0).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_backend_is_reached_with_the_apps_tls_settings() -> TestResult {
    let fleet = Fleet::start().await;
    let (mut socket, response) = ok(fleet.websocket(SECURE_HOST, "/secure").await);
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    socket.send(Message::text("over TLS")).await?;
    assert_eq!(next_message(&mut socket).await, Message::text("over TLS"));
    let payload = Bytes::from(pattern(1 << 20));
    socket.send(Message::binary(payload.clone())).await?;
    assert_eq!(next_message(&mut socket).await, Message::binary(payload));
    close(&mut socket).await;
    drop(socket);
    let handshakes = fleet.secure_echo.handshakes();
    assert_eq!(handshakes.len(), 1);
    assert_eq!(handshakes[0].path, "/secure");
    fleet.wait_outstanding(0).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_users_open_websockets_with_extended_connect() -> TestResult {
    let fleet = Fleet::start().await;
    let stream = fleet.tls(CHAT_HOST, &[b"h2"]).await;
    let (mut sender, connection) =
        ok(hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await);
    tokio::spawn(connection);
    // A first exchange, so that the proxy's SETTINGS (extended CONNECT) are known.
    let authority = format!("{WEB_HOST}:{}", fleet.port);
    let request =
        ok(Request::get(format!("https://{authority}/first")).body(Empty::<Bytes>::new()));
    let response = ok(within("a GET over HTTP/2", sender.send_request(request)).await);
    assert_eq!(response.status(), StatusCode::OK);

    let mut request = ok(Request::builder()
        .method(Method::CONNECT)
        .uri(format!("https://{CHAT_HOST}:{}/h2socket", fleet.port))
        .header("sec-websocket-version", "13")
        .header("sec-websocket-protocol", SUBPROTOCOL)
        .body(Empty::<Bytes>::new()));
    request
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let mut response = ok(within("an extended CONNECT", sender.send_request(request)).await);
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("sec-websocket-accept").is_none());
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(HeaderValue::as_bytes),
        Some(SUBPROTOCOL.as_bytes())
    );
    let upgraded = ok(within("the stream upgrade", hyper::upgrade::on(&mut response)).await);
    let mut socket =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    socket.send(Message::text("over h2")).await?;
    assert_eq!(next_message(&mut socket).await, Message::text("over h2"));
    close(&mut socket).await;
    drop(socket);

    // The backend made its handshake with a key the connector made up.
    let handshakes = fleet.echo.handshakes();
    assert_eq!(handshakes.len(), 1);
    assert_eq!(handshakes[0].path, "/h2socket");
    assert!(handshakes[0].headers.contains_key("sec-websocket-key"));
    fleet.wait_outstanding(0).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_handshake_is_refused_at_the_proxy() -> TestResult {
    let fleet = Fleet::start().await;
    let (status, headers, _) = fleet.raw_handshake(CHAT_HOST, "/socket", "8").await;
    assert_eq!(status, StatusCode::UPGRADE_REQUIRED);
    assert_eq!(
        headers
            .get("sec-websocket-version")
            .map(HeaderValue::as_bytes),
        Some(&b"13"[..])
    );
    assert!(fleet.echo.handshakes().is_empty());
    Ok(())
}
