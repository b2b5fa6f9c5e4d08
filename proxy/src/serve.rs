//! The proxy's listener and request path: one TLS port for users, connector tunnels and
//! the fleet API, told apart by the ClientHello before any certificate is chosen.
//!
//! - SNI equal to one of the fleet's tunnel host names: the tunnel serving certificate,
//!   a client certificate asked for (not required). ALPN `sallyport-tunnel/1` with a
//!   verified, unrevoked connector certificate becomes a tunnel in the
//!   [`TunnelPool`]; ALPN `h2`/`http/1.1` is the fleet API (registration, renewal,
//!   configuration).
//! - Any other SNI: the app's certificate from the [`CertificateStore`], then the user
//!   request path: robots.txt, route lookup, maintenance, pre-authentication (not yet:
//!   only passthrough apps are served), the request shaped for the tunnel and sent on
//!   the least loaded tunnel of the app's connector group, the answer translated back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::ACCEPT;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::ServerConfig;
use rustls::server::{Acceptor, ResolvesServerCert};
use rustls_pki_types::CertificateDer;
use sallyport_api::fleet_config::{FleetConfig, Route};
use sallyport_api::published_app::PreAuthenticationType;
use sallyport_tunnel::ConnectorIdentity;
use sallyport_tunnel::body::{self, TunnelBody};
use sallyport_tunnel::pool::{PoolError, TunnelPool};
use sallyport_tunnel::tls::{self as tunnel_tls, API_ALPN, Credentials, TlsError};
use sallyport_tunnel::wire::{FleetNotice, TUNNEL_ALPN};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::certs::CertificateStore;
use crate::fleet_api::{ClientAddress, FleetApi};
use crate::forward::{self, ClientInfo};
use crate::pages;
use crate::router::Router;
use crate::{body_translation, websocket};

/// How long a client has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to send its request headers (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Added to an app's backend timeout before the proxy gives up on the tunnel itself
/// (the connector answers 504 at the backend timeout).
pub const TUNNEL_GRACE: Duration = Duration::from_secs(5);
/// How long in-flight user requests get to finish on shutdown.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The proxy could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The user-facing TLS configuration could not be built.
    #[error("user TLS listener: {0}")]
    UserTls(#[source] rustls::Error),
}

/// What the proxy serves with.
pub struct ProxyParts {
    /// This replica's name, as connectors see it.
    pub replica: String,
    /// Host names connectors and the fleet API are reached at (lower case).
    pub tunnel_hostnames: Vec<String>,
    /// The tunnel serving certificate and key.
    pub tunnel_tls: Credentials,
    /// Roots connector client certificates must chain to (the fleet's root CA).
    pub connector_roots: Vec<CertificateDer<'static>>,
    /// The apps' certificates, by host.
    pub certificates: Arc<CertificateStore>,
    /// The fleet API (registration, renewal, configuration); shares `config`.
    pub fleet_api: FleetApi,
    /// The live fleet configuration, shared with the fleet API.
    pub config: Arc<ArcSwap<FleetConfig>>,
    /// The live tunnels.
    pub pool: TunnelPool,
    /// The fleet's replicas, for the notices sent to connectors.
    pub replicas: watch::Receiver<Vec<String>>,
}

/// The proxy's shared state.
pub struct Proxy {
    replica: String,
    tunnel_hostnames: Vec<String>,
    fleet_tls: Arc<ServerConfig>,
    user_tls: Arc<ServerConfig>,
    fleet_api: FleetApi,
    config: Arc<ArcSwap<FleetConfig>>,
    router: ArcSwap<Router>,
    pool: TunnelPool,
    replicas: watch::Receiver<Vec<String>>,
}

#[derive(Debug)]
struct StoreResolver(Arc<CertificateStore>);

impl ResolvesServerCert for StoreResolver {
    fn resolve(
        &self,
        client_hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.certificate_for(client_hello.server_name())
    }
}

impl Proxy {
    /// A proxy serving `parts`.
    pub fn new(parts: ProxyParts) -> Result<Arc<Self>, ServeError> {
        let fleet_tls = tunnel_tls::fleet_server_config(&parts.tunnel_tls, &parts.connector_roots)?;
        let mut user_tls = ServerConfig::builder_with_provider(tunnel_tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(ServeError::UserTls)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(StoreResolver(parts.certificates.clone())));
        user_tls.alpn_protocols = API_ALPN.iter().map(|p| p.to_vec()).collect();
        let router = Router::new(parts.config.load_full());
        Ok(Arc::new(Self {
            replica: parts.replica,
            tunnel_hostnames: parts
                .tunnel_hostnames
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            fleet_tls,
            user_tls: Arc::new(user_tls),
            fleet_api: parts.fleet_api,
            config: parts.config,
            router: ArcSwap::from_pointee(router),
            pool: parts.pool,
            replicas: parts.replicas,
        }))
    }

    /// The live tunnels.
    pub fn pool(&self) -> &TunnelPool {
        &self.pool
    }

    /// The configuration now served.
    pub fn config(&self) -> Arc<FleetConfig> {
        self.config.load_full()
    }

    /// Serves `config` from now on: new routes, revoked connectors' tunnels closed,
    /// tunnels of removed groups closed, and every connector told the new version.
    pub async fn apply_config(&self, config: Arc<FleetConfig>) {
        self.router.store(Arc::new(Router::new(config.clone())));
        self.config.store(config.clone());
        let closed = self.pool.retain(|identity| {
            let connector = identity.connector_id();
            let group = identity.group_id();
            !config.revoked_connectors.contains(&connector)
                && config.connector_groups.iter().any(|g| g.id == group)
        });
        if closed > 0 {
            info!(
                closed,
                "closed tunnels of revoked connectors or removed groups"
            );
        }
        self.notify_connectors().await;
    }

    /// Tells every connector the current replicas and its group's configuration version.
    pub async fn notify_connectors(&self) {
        let config = self.config.load_full();
        let replicas = self.replicas.borrow().clone();
        // Each group's slice is hashed once, not once per tunnel.
        let versions: std::collections::HashMap<&str, String> = config
            .connector_groups
            .iter()
            .map(|group| (group.id.as_str(), slice_version(&config, &group.id)))
            .collect();
        self.pool
            .notify_all(|identity| {
                let version = versions
                    .get(identity.group_id().as_str())
                    .cloned()
                    .unwrap_or_default();
                self.notice(&replicas, version)
            })
            .await;
    }

    fn notice(&self, replicas: &[String], config_version: String) -> FleetNotice {
        FleetNotice {
            replica: self.replica.clone(),
            replicas: if replicas.is_empty() {
                vec![self.replica.clone()]
            } else {
                replicas.to_vec()
            },
            config_version,
        }
    }

    /// Accepts connections on `listener` until `shutdown`, then lets in-flight requests
    /// finish (up to [`DRAIN_TIMEOUT`]) and closes the tunnels.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let connections = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = shutdown.cancelled() => break,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let proxy = self.clone();
                    let shutdown = shutdown.clone();
                    connections.spawn(async move {
                        proxy.connection(stream, peer, shutdown).await;
                    });
                }
                Err(error) => {
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        drop(listener);
        connections.close();
        info!(
            in_flight = connections.len(),
            "stopped accepting; draining connections"
        );
        if tokio::time::timeout(DRAIN_TIMEOUT, connections.wait())
            .await
            .is_err()
        {
            warn!("connections still open after the drain timeout; closing them");
        }
        self.pool.close_all().await;
    }

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) {
        let _ = stream.set_nodelay(true);
        let handshake = async {
            let start = LazyConfigAcceptor::new(Acceptor::default(), stream).await?;
            let hello = start.client_hello();
            let to_fleet = hello.server_name().is_some_and(|name| {
                self.tunnel_hostnames
                    .iter()
                    .any(|h| h.eq_ignore_ascii_case(name))
            });
            let config = if to_fleet {
                self.fleet_tls.clone()
            } else {
                self.user_tls.clone()
            };
            start.into_stream(config).await.map(|tls| (tls, to_fleet))
        };
        let (tls, to_fleet) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(done)) => done,
            Ok(Err(error)) => {
                debug!(%peer, %error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        let (_, session) = tls.get_ref();
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let identity = tunnel_tls::peer_identity(session);
        if !to_fleet {
            self.serve_users(tls, peer, shutdown).await;
            return;
        }
        let identity = match identity {
            None => None,
            Some(Ok(identity)) => Some(identity),
            Some(Err(error)) => {
                warn!(%peer, %error, "a client certificate of the fleet's CA carries no valid connector identity");
                return;
            }
        };
        if alpn.as_deref() == Some(TUNNEL_ALPN) {
            let Some(identity) = identity else {
                warn!(%peer, "tunnel refused: no client certificate");
                return;
            };
            self.tunnel(identity, tls, peer, shutdown).await;
        } else {
            self.serve_fleet_api(tls, peer, identity, shutdown).await;
        }
    }

    async fn tunnel(
        self: Arc<Self>,
        identity: ConnectorIdentity,
        tls: tokio_rustls::server::TlsStream<TcpStream>,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) {
        let config = self.config.load_full();
        let connector = identity.connector_id();
        if config.revoked_connectors.contains(&connector) {
            warn!(%peer, %connector, "tunnel refused: the connector is revoked");
            return;
        }
        if !config
            .connector_groups
            .iter()
            .any(|g| g.id == identity.group_id())
        {
            warn!(%peer, %connector, group = %identity.group_id(), "tunnel refused: the connector's group does not exist");
            return;
        }
        let replicas = self.replicas.borrow().clone();
        let notice = self.notice(&replicas, slice_version(&config, &identity.group_id()));
        let sent_version = notice.config_version.clone();
        info!(%peer, %connector, group = %identity.group_id(), "tunnel opened");
        let attach = self.pool.attach(identity.clone(), tls, notice);
        tokio::pin!(attach);
        let ended = tokio::select! {
            result = &mut attach => Some(result),
            () = self.renotify_if_stale(&identity, &sent_version) => None,
            () = shutdown.cancelled() => return,
        };
        let result = match ended {
            Some(result) => result,
            None => tokio::select! {
                result = &mut attach => result,
                // The pool's close_all drains tunnels on shutdown; nothing to do here.
                () = shutdown.cancelled() => return,
            },
        };
        match result {
            Ok(()) => info!(%peer, %connector, "tunnel closed"),
            Err(error) => info!(%peer, %connector, %error, "tunnel ended"),
        }
    }

    /// A configuration that arrives while a tunnel is being set up is announced only to
    /// tunnels already in the pool; once this one is in, tell it again if its first
    /// notice went out with an older version (else it would wait for its next poll).
    async fn renotify_if_stale(&self, identity: &ConnectorIdentity, sent_version: &str) {
        // The connector's other tunnels are there already: wait for one more.
        let siblings = |tunnels: &[sallyport_tunnel::pool::TunnelInfo]| {
            tunnels.iter().filter(|t| t.identity == *identity).count()
        };
        let before = siblings(&self.pool.snapshot());
        let routed = self.pool.wait_for(|tunnels| siblings(tunnels) > before);
        if tokio::time::timeout(HANDSHAKE_TIMEOUT, routed)
            .await
            .is_err()
        {
            return;
        }
        let current = slice_version(&self.config.load_full(), &identity.group_id());
        if current != sent_version {
            debug!(connector = %identity.connector_id(), "configuration changed while the tunnel opened; notifying again");
            self.notify_connectors().await;
        }
    }

    async fn serve_fleet_api(
        self: Arc<Self>,
        tls: tokio_rustls::server::TlsStream<TcpStream>,
        peer: SocketAddr,
        identity: Option<ConnectorIdentity>,
        shutdown: CancellationToken,
    ) {
        let api = self.fleet_api.clone();
        let service = service_fn(move |mut request: Request<Incoming>| {
            let api = api.clone();
            let identity = identity.clone();
            request.extensions_mut().insert(ClientAddress(peer));
            async move { Ok::<_, std::convert::Infallible>(api.handle(request, identity).await) }
        });
        serve_http(tls, service, false, shutdown).await;
    }

    async fn serve_users(
        self: Arc<Self>,
        tls: tokio_rustls::server::TlsStream<TcpStream>,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) {
        let client = ClientInfo {
            peer_ip: peer.ip(),
            via_trusted_proxy: false,
        };
        let proxy = self.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let proxy = proxy.clone();
            async move { Ok::<_, std::convert::Infallible>(proxy.user_request(request, client).await) }
        });
        // Users' HTTP/2 connections carry WebSockets as extended CONNECT (RFC 8441).
        serve_http(tls, service, true, shutdown).await;
    }

    /// Answers one user request.
    pub async fn user_request(
        &self,
        request: Request<Incoming>,
        client: ClientInfo,
    ) -> Response<TunnelBody> {
        let request_id = forward::new_request_id();
        let accept = request.headers().get(ACCEPT).cloned();
        let accept = accept.as_ref();
        if request.uri().path() == "/robots.txt" {
            return pages::robots_txt();
        }
        let Some((host, port)) = forward::request_host(&request).map(split_host_port) else {
            return pages::bad_request(accept, &request_id);
        };
        let router = self.router.load_full();
        let Some(matched) = router.lookup(host, port, request.uri().path()) else {
            return pages::not_found(accept, &request_id);
        };
        let route = matched.route;
        if matched.missing_slash {
            return pages::slash_redirect(request.uri().path(), request.uri().query());
        }
        if route.maintenance_mode {
            return pages::maintenance(accept, &route.app, &request_id);
        }
        if route.pre_authentication.kind != PreAuthenticationType::Passthrough {
            return sign_in_unavailable(accept, route, &request_id);
        }
        if websocket::is_websocket_request(&request) {
            return websocket::tunnel_upgrade(&self.pool, route, request, &client, &request_id)
                .await;
        }
        let mut request = request.map(body::incoming);
        if route.translation.body {
            prepare_for_body_translation(request.headers_mut());
        }
        let tunneled = match forward::to_tunnel_request(route, request, &client, &request_id) {
            Ok(tunneled) => tunneled,
            Err(error) => {
                debug!(app = %route.app, %request_id, %error, "request not forwarded");
                return pages::error_response(
                    accept,
                    error.status(),
                    "Bad request",
                    &error.to_string(),
                    &request_id,
                );
            }
        };
        let limit = route
            .backend
            .timeout
            .to_std()
            .unwrap_or(Duration::from_secs(85))
            + TUNNEL_GRACE;
        let sent =
            tokio::time::timeout(limit, self.pool.send(&route.connector_group, tunneled)).await;
        match sent {
            Ok(Ok(response)) => {
                let mut response =
                    forward::translate_response(route, response.map(|b| b.into_tunnel_body()));
                response = body_translation::translate_body(route, response);
                if let Ok(value) = HeaderValue::from_str(&request_id) {
                    response
                        .headers_mut()
                        .entry(sallyport_tunnel::wire::REQUEST_ID_HEADER)
                        .or_insert(value);
                }
                response
            }
            Ok(Err(PoolError::NoTunnel { group })) => {
                warn!(app = %route.app, %group, %request_id, "no tunnel for the app's group");
                pages::no_tunnel(accept, &group, &request_id)
            }
            Ok(Err(error)) => {
                warn!(app = %route.app, %request_id, %error, "tunneled request failed");
                pages::bad_gateway(accept, &request_id)
            }
            Err(_) => {
                warn!(app = %route.app, %request_id, "no answer through the tunnel in time");
                pages::gateway_timeout(accept, &request_id)
            }
        }
    }
}

fn sign_in_unavailable(
    accept: Option<&HeaderValue>,
    route: &Route,
    request_id: &str,
) -> Response<TunnelBody> {
    warn!(app = %route.app, %request_id, "the app requires OpenID Connect pre-authentication, which this build does not provide yet; refusing");
    pages::error_response(
        accept,
        StatusCode::SERVICE_UNAVAILABLE,
        "Sign-in unavailable",
        "This application requires sign-in, which this proxy cannot offer yet. Nothing was sent to the application.",
        request_id,
    )
}

/// The version of `group_id`'s configuration slice; empty when the group is unknown.
fn slice_version(config: &FleetConfig, group_id: &str) -> String {
    config
        .group_slice(group_id)
        .ok()
        .flatten()
        .map(|slice| slice.version)
        .unwrap_or_default()
}

/// For apps whose bodies are translated: no range requests (a partial body cannot be
/// translated and would not match the translated whole), and only codings the
/// translation decodes (gzip, deflate, br).
fn prepare_for_body_translation(headers: &mut http::HeaderMap) {
    headers.remove(http::header::RANGE);
    headers.remove(http::header::IF_RANGE);
    if headers.contains_key(http::header::ACCEPT_ENCODING) {
        headers.insert(
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip, deflate, br"),
        );
    }
}

/// `host[:port]` split; the port defaults to 443, as users reach apps over HTTPS.
fn split_host_port(authority: &str) -> (&str, u16) {
    if let Some(rest) = authority.strip_prefix('[') {
        // [v6]:port
        let (host, after) = rest.split_once(']').unwrap_or((rest, ""));
        let port = after
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or(443);
        return (host, port);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => match port.parse() {
            Ok(port) => (host, port),
            Err(_) => (authority, 443),
        },
        None => (authority, 443),
    }
}

async fn serve_http<S>(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    service: S,
    connect_protocol: bool,
    shutdown: CancellationToken,
) where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<TunnelBody>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(250)
        .max_pending_accept_reset_streams(256);
    if connect_protocol {
        builder.http2().enable_connect_protocol();
    }
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                debug!(%error, "connection ended with an error");
            }
        }
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, connection).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_host_port;

    #[test]
    fn body_translated_requests_ask_for_whole_decodable_bodies() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::RANGE,
            http::HeaderValue::from_static("bytes=0-9"),
        );
        headers.insert(
            http::header::IF_RANGE,
            http::HeaderValue::from_static("\"x\""),
        );
        headers.insert(
            http::header::ACCEPT_ENCODING,
            http::HeaderValue::from_static("zstd, gzip"),
        );
        super::prepare_for_body_translation(&mut headers);
        assert!(!headers.contains_key(http::header::RANGE));
        assert!(!headers.contains_key(http::header::IF_RANGE));
        assert_eq!(
            headers
                .get(http::header::ACCEPT_ENCODING)
                .and_then(|v| v.to_str().ok()),
            Some("gzip, deflate, br")
        );
        let mut none = http::HeaderMap::new();
        super::prepare_for_body_translation(&mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn hosts_and_ports_are_split_with_https_as_the_default() {
        assert_eq!(
            split_host_port("wiki.example.com"),
            ("wiki.example.com", 443)
        );
        assert_eq!(
            split_host_port("wiki.example.com:8443"),
            ("wiki.example.com", 8443)
        );
        assert_eq!(split_host_port("[::1]:8443"), ("::1", 8443));
        assert_eq!(split_host_port("[::1]"), ("::1", 443));
    }
}
