//! WebSockets end to end in one process: real WebSocket echo backends (tokio-tungstenite,
//! plain and TLS), a connector (its `Backends` behind a `Dialer`), a proxy
//! (`serve::Proxy` with a fleet configuration made here, on a real TLS listener) and
//! tokio-tungstenite clients over TLS to the proxy, on HTTP/1.1 and on HTTP/2.
//!
//! Every wait is bounded by [`WAIT`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName};
use sallyport_api::FleetConfig;
use sallyport_api::connector_group::{CertificatePolicy, Registration};
use sallyport_api::fleet_config::{ConnectorGroupConfig, Route};
use sallyport_connector::backend::Backends;
use sallyport_connector::slice::CurrentSlice;
use sallyport_proxy::certs::{CertificateStore, certified_key_from_pem};
use sallyport_proxy::fleet_api::FleetApi;
use sallyport_proxy::issuer::Issuer;
use sallyport_proxy::registry::MemoryRegistry;
use sallyport_proxy::serve::{Proxy, ProxyParts};
use sallyport_tunnel::ConnectorIdentity;
use sallyport_tunnel::dial::{DialSettings, Dialer};
use sallyport_tunnel::pool::{PoolSettings, TunnelPool};
use sallyport_tunnel::tls::{self, Credentials};
use sallyport_tunnel::wire::REQUEST_ID_HEADER;
use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request as WsRequest};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{WebSocketStream, accept_hdr_async, client_async};
use tokio_util::sync::CancellationToken;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The bound of every wait: generous for a slow, shared machine.
const WAIT: Duration = Duration::from_secs(30);

/// The fleet's tunnel host name (SNI of tunnels, name of the serving certificate).
const TUNNEL_HOST: &str = "tunnel.sallyport.test";
/// An app with WebSockets, behind the plain echo backend.
const CHAT_HOST: &str = "chat.apps.example.com";
/// An app whose `backend.websockets` is off, behind the same backend.
const CLOSED_HOST: &str = "closed.apps.example.com";
/// An app with WebSockets, behind the TLS echo backend.
const SECURE_HOST: &str = "secure.apps.example.com";
/// A plain HTTP app of the same group.
const WEB_HOST: &str = "web.apps.example.com";
/// The name in the TLS echo backend's certificate (`backend.tls.serverName`).
const BACKEND_TLS_NAME: &str = "app.corp.test";
/// The connector group of every app.
const GROUP: &str = "infra/east";
/// The subprotocol the echo backends agree to.
const SUBPROTOCOL: &str = "chat.v1";

fn ok<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// Awaits `future` for at most [`WAIT`], naming `what` when it does not finish.
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {WAIT:?}"))
}

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
// PKI

/// A root CA signing everything: the tunnel serving certificate, the connector's client
/// certificate, the apps' certificate, the TLS backend's, and the connector issuer.
struct Pki {
    root_pem: String,
    root_der: CertificateDer<'static>,
    root: rcgen::Issuer<'static, KeyPair>,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = OffsetDateTime::now_utc() + time::Duration::days(30);
    params
}

impl Pki {
    fn new() -> Self {
        let key = ok(KeyPair::generate());
        let params = ca_params("Sallyport WebSocket test root");
        let root = ok(params.self_signed(&key));
        Self {
            root_pem: root.pem(),
            root_der: root.der().clone(),
            root: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate signed by the root: PEM chain, PEM key.
    fn sign(&self, mut params: CertificateParams) -> (String, String) {
        params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = OffsetDateTime::now_utc() + time::Duration::days(30);
        let key = ok(KeyPair::generate());
        let certificate = ok(params.signed_by(&key, &self.root));
        (certificate.pem(), key.serialize_pem())
    }

    fn server(&self, names: &[&str]) -> (String, String) {
        let mut params = ok(CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        ));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    fn credentials(what: &str, (chain, key): (String, String)) -> Credentials {
        ok(Credentials::from_pem(
            what,
            chain.as_bytes(),
            key.as_bytes(),
        ))
    }

    fn connector(&self, identity: &ConnectorIdentity) -> Credentials {
        let mut params = CertificateParams::default();
        let uri = ok(rcgen::string::Ia5String::try_from(identity.uri()));
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Self::credentials("connector certificate", self.sign(params))
    }

    fn issuer(&self) -> Issuer {
        let mut params = ca_params("Sallyport connector issuer");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (chain, key) = self.sign(params);
        ok(Issuer::from_pem(&chain, &key, &self.root_pem))
    }

    /// A client configuration trusting the root, offering `alpn`.
    fn client(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        ok(roots.add(self.root_der.clone()));
        let mut config = ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("{e}"))
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
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
    let listener = ok(TcpListener::bind("127.0.0.1:0").await);
    let address = ok(listener.local_addr());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    let text = format!("hello from web {}", request.uri().path());
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    address
}

// ---------------------------------------------------------------------------------------
// The fleet: a proxy and a connector

fn route(
    app: &str,
    host: &str,
    port: u16,
    internal_url: &str,
    websockets: bool,
    tls: Option<serde_json::Value>,
) -> Route {
    let mut backend = serde_json::json!({ "timeout": "10s", "websockets": websockets });
    if let Some(tls) = tls {
        backend["tls"] = tls;
    }
    ok(serde_json::from_value(serde_json::json!({
        "app": app,
        "host": host,
        "port": port,
        "pathPrefix": "/",
        "url": format!("https://{host}:{port}/"),
        "internalUrl": internal_url,
        "connectorGroup": GROUP,
        "preAuthentication": { "type": "Passthrough" },
        "tls": { "secretRef": { "namespace": "sallyport-system", "name": "default-tls" } },
        "backend": backend,
        "rateLimit": { "requestsPerSecond": 500, "burst": 1000 },
    })))
}

fn group() -> ConnectorGroupConfig {
    ConnectorGroupConfig {
        id: GROUP.to_owned(),
        certificate: CertificatePolicy::default(),
        registration: Registration::default(),
        inactive_connector_ttl: ok(sallyport_api::Duration::parse("240h")),
    }
}

/// A proxy on loopback with one connector of [`GROUP`] tunnelled to it, serving the
/// apps of the host constants.
struct Fleet {
    pki: Pki,
    port: u16,
    proxy: Arc<Proxy>,
    echo: EchoBackend,
    secure_echo: EchoBackend,
    shutdown: CancellationToken,
    _replicas: watch::Sender<Vec<String>>,
    _config_version: watch::Sender<String>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
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

        let listener = ok(TcpListener::bind("127.0.0.1:0").await);
        let address = ok(listener.local_addr());
        let port = address.port();
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
            route(
                "team-a/web",
                WEB_HOST,
                port,
                &format!("http://{web}/"),
                false,
                None,
            ),
        ];
        routes.sort_by(|a, b| a.host.cmp(&b.host));
        let config = ok(FleetConfig::new(routes, vec![], vec![group()], vec![]));
        let slice = ok(config.group_slice(GROUP)).unwrap_or_else(|| panic!("{GROUP} has a slice"));
        let config = Arc::new(ArcSwap::from_pointee(config));

        let (app_chain, app_key) = pki.server(&["*.apps.example.com"]);
        let app_certificate = ok(certified_key_from_pem(
            app_chain.as_bytes(),
            app_key.as_bytes(),
        ));
        let fleet_api = FleetApi::new(
            Arc::new(ArcSwap::from_pointee(pki.issuer())),
            Arc::new(MemoryRegistry::new(vec![])),
            config.clone(),
        );
        let (replicas_tx, replicas) = watch::channel(vec!["proxy-0".to_owned()]);
        let proxy = ok(Proxy::new(ProxyParts {
            replica: "proxy-0".to_owned(),
            tunnel_hostnames: vec![TUNNEL_HOST.to_owned()],
            tunnel_tls: Pki::credentials("tunnel serving certificate", pki.server(&[TUNNEL_HOST])),
            connector_roots: vec![pki.root_der.clone()],
            certificates: Arc::new(CertificateStore::new(Some(app_certificate))),
            fleet_api,
            config,
            pool: TunnelPool::new(PoolSettings::default()),
            replicas,
        }));
        let shutdown = CancellationToken::new();
        tokio::spawn(proxy.clone().serve(listener, shutdown.clone()));

        // The connector: the group's slice, trusting the test root for TLS backends.
        let current = ok(CurrentSlice::with_backend_ca(Some(&pki.root_pem)));
        let version = slice.version.clone();
        ok(current.replace(slice));
        let identity = ok(ConnectorIdentity::new("infra", "east", "connector-1"));
        let (config_version, config_version_rx) = watch::channel(version);
        let dialer = Dialer::new(
            DialSettings {
                tunnels_per_replica: 1,
                ..DialSettings::new(vec![address.to_string()], TUNNEL_HOST)
            },
            Arc::new(ArcSwap::from_pointee(pki.connector(&identity))),
            vec![pki.root_der.clone()],
            Arc::new(Backends::new(current)).handler(),
            identity.connector_id(),
            config_version_rx,
        );
        tokio::spawn(dialer.run(shutdown.clone()));
        within(
            "the connector's tunnel is up",
            proxy.pool().wait_for(|tunnels| !tunnels.is_empty()),
        )
        .await;
        Self {
            pki,
            port,
            proxy,
            echo,
            secure_echo,
            shutdown,
            _replicas: replicas_tx,
            _config_version: config_version,
        }
    }

    /// A TLS connection to the proxy for `host`, offering `alpn`.
    async fn tls(&self, host: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        let tcp = ok(TcpStream::connect(("127.0.0.1", self.port)).await);
        let name = ok(ServerName::try_from(host.to_owned()));
        within(
            "TLS handshake with the proxy",
            TlsConnector::from(self.pki.client(alpn)).connect(name, tcp),
        )
        .await
        .unwrap_or_else(|e| panic!("TLS with the proxy for {host}: {e}"))
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
        self.proxy
            .pool()
            .snapshot()
            .iter()
            .map(|tunnel| tunnel.outstanding)
            .sum()
    }

    /// Waits until the tunnels have `count` outstanding streams.
    async fn wait_outstanding(&self, count: usize) {
        within(&format!("{count} outstanding tunnel streams"), async {
            while self.outstanding() != count {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
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
