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
//!
//! On shutdown the proxy drains ([`Proxy::serve_with_drain`]): it closes HTTP/1.1
//! connections after their current response and sends GOAWAY on HTTP/2 ones while it
//! still accepts for [`DrainSettings::delay`], then stops accepting, lets requests in
//! flight finish within [`DrainSettings::timeout`], and closes its tunnels last.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::header::{ACCEPT, CONNECTION};
use http::{HeaderValue, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::ServerConfig;
use rustls::server::{Acceptor, ResolvesServerCert};
use rustls_pki_types::CertificateDer;
use sallyport_api::fleet_config::{FleetConfig, Route};
use sallyport_api::published_app::PreAuthenticationType;
use sallyport_policy::MfaSettings;
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
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::{debug, info, warn};

use crate::access::{GuardedBody, STREAM_RECHECK, StreamGuard};
use crate::auth::{self, Authenticator};
use crate::certs::CertificateStore;
use crate::fleet_api::{ClientAddress, FleetApi};
use crate::forward::{self, ClientInfo, TrustedProxies};
use crate::pages;
use crate::protection::{
    Activity, ConnectionSlot, HeldBody, LimitedBody, Protection, ProtectionSettings, Refusal,
};
use crate::rate_limit::Limited;
use crate::router::Router;
use crate::session_controls::SessionControl;
use crate::{body_translation, websocket};

/// How long a client has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to send its request headers (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Added to an app's backend timeout before the proxy gives up on the tunnel itself
/// (the connector answers 504 at the backend timeout).
pub const TUNNEL_GRACE: Duration = Duration::from_secs(5);
/// How long in-flight user requests get to finish once the proxy stopped accepting.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a draining proxy goes on accepting and serving, unready, before it stops
/// accepting: the time load balancers take to stop sending it new connections (what a
/// `preStop` sleep gives a pod elsewhere).
pub const DRAIN_DELAY: Duration = Duration::from_secs(5);
/// How long streams still open on the tunnels when the user connections are done (open
/// WebSockets) get before the tunnels are cut.
pub const TUNNEL_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How a proxy stops serving ([`Proxy::serve_with_drain`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainSettings {
    /// How long the proxy goes on accepting and serving once it drains, so that load
    /// balancers that still send it connections are answered ([`DRAIN_DELAY`]).
    pub delay: Duration,
    /// How long requests in flight get to finish once it stopped accepting
    /// ([`DRAIN_TIMEOUT`]); connections still open then are cut.
    pub timeout: Duration,
}

impl Default for DrainSettings {
    fn default() -> Self {
        Self {
            delay: DRAIN_DELAY,
            timeout: DRAIN_TIMEOUT,
        }
    }
}

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
    /// Proxies in front of the fleet whose `X-Forwarded-For` tells the client's address.
    pub trusted_proxies: TrustedProxies,
    /// The abuse limits ([`crate::protection`]).
    pub protection: ProtectionSettings,
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
    /// Announces every new router to the open streams that conditional access guards.
    routers: watch::Sender<Arc<Router>>,
    pool: TunnelPool,
    replicas: watch::Receiver<Vec<String>>,
    trusted_proxies: TrustedProxies,
    /// Cancelled when the proxy starts to drain.
    draining: CancellationToken,
    /// Sign-in for OIDC apps; without it they are refused with a clear page.
    auth: ArcSwapOption<Authenticator>,
    /// The abuse limits.
    protection: Protection,
}

/// The connections of a serving proxy, and the signals of its drain.
struct Connections {
    /// Every connection's task, tunnels included.
    all: TaskTracker,
    /// One token per connection that is not a tunnel (users, fleet API, handshakes).
    http: TaskTracker,
    /// Cancelled when the proxy stops accepting: idle connections close, busy ones close
    /// after their requests.
    stop: CancellationToken,
    /// Cancelled at the end of the drain timeout: connections still open are cut.
    cut: CancellationToken,
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
        let replicas = parts.replicas.borrow().len().max(1);
        let router = Arc::new(Router::build(
            parts.config.load_full(),
            MfaSettings::default(),
            replicas,
            None,
        ));
        let (routers, _) = watch::channel(Arc::clone(&router));
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
            router: ArcSwap::new(router),
            routers,
            pool: parts.pool,
            replicas: parts.replicas,
            trusted_proxies: parts.trusted_proxies,
            draining: CancellationToken::new(),
            auth: ArcSwapOption::empty(),
            protection: Protection::new(parts.protection),
        }))
    }

    /// Enables OpenID Connect pre-authentication: OIDC apps are served through `auth`.
    pub fn set_authenticator(&self, auth: Arc<Authenticator>) {
        self.auth.store(Some(auth));
        // Policies are compiled with the authenticator's MFA settings.
        self.store_router(self.config.load_full());
    }

    /// Routes `config` from now on, with its policies compiled for the authenticator.
    fn store_router(&self, config: Arc<FleetConfig>) {
        let mfa = self
            .auth
            .load()
            .as_ref()
            .map(|auth| auth.access().settings().mfa.clone())
            .unwrap_or_default();
        let replicas = self.replicas.borrow().len().max(1);
        let previous = self.router.load_full();
        let router = Arc::new(Router::build(config, mfa, replicas, Some(&previous)));
        self.router.store(Arc::clone(&router));
        self.routers.send_replace(router);
    }

    /// The live tunnels.
    pub fn pool(&self) -> &TunnelPool {
        &self.pool
    }

    /// The configuration now served.
    pub fn config(&self) -> Arc<FleetConfig> {
        self.config.load_full()
    }

    /// The connector groups that some route sends requests to and that have no tunnel to
    /// this replica (sorted): a replica that just started is not ready for users while
    /// this is not empty, unless connectors take too long to come.
    pub fn groups_without_tunnel(&self) -> Vec<String> {
        let live = self.pool.live_groups();
        let mut missing: Vec<String> = self
            .config
            .load()
            .routes
            .iter()
            .map(|route| route.connector_group.as_str())
            .filter(|group| !live.contains_key(*group))
            .map(str::to_owned)
            .collect();
        missing.sort();
        missing.dedup();
        missing
    }

    /// Whether the proxy drains ([`Proxy::start_draining`]).
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Starts the drain: from now on HTTP/1.1 responses carry `Connection: close` and
    /// HTTP/2 connections are sent GOAWAY. Serving goes on, tunnels included;
    /// [`Proxy::serve_with_drain`] stops accepting later and closes the tunnels last.
    ///
    /// Connectors are not told that the replica leaves: they learn it when its tunnels
    /// close, and from the other replicas once its Lease is gone. A notice of their own
    /// could contradict what the other replicas announce (a replacement of the same name
    /// may already be up) and leave connectors away from it.
    pub fn start_draining(&self) {
        if self.draining.is_cancelled() {
            return;
        }
        self.draining.cancel();
        info!(replica = %self.replica, "draining: connections are closed after their requests");
    }

    /// Serves `config` from now on: new routes, revoked connectors' tunnels closed,
    /// tunnels of removed groups closed, and every connector told the new version.
    pub async fn apply_config(&self, config: Arc<FleetConfig>) {
        self.store_router(config.clone());
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

    /// Accepts connections on `listener` until `shutdown`, then drains at once (no
    /// [`DrainSettings::delay`]): see [`Proxy::serve_with_drain`].
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let drain = DrainSettings {
            delay: Duration::ZERO,
            timeout: DRAIN_TIMEOUT,
        };
        self.serve_with_drain(listener, shutdown, drain).await;
    }

    /// Accepts connections on `listener` until `shutdown`, then drains and returns:
    ///
    /// 1. [`Proxy::start_draining`]: HTTP/1.1 connections close after their next
    ///    response, HTTP/2 ones get GOAWAY and finish their streams. New connections are
    ///    still accepted and served (the same way) for `drain.delay`, while load
    ///    balancers stop sending them.
    /// 2. The listener closes; idle HTTP/1.1 connections close, requests in flight get
    ///    `drain.timeout` to finish, then whatever is left is cut.
    /// 3. The tunnels, which carried those requests to the end, stop taking requests and
    ///    close (GOAWAY) once their streams are done, within [`TunnelPool::close_all`]'s
    ///    drain timeout; their connectors keep their tunnels to the other replicas and
    ///    redial this one's replacement.
    pub async fn serve_with_drain(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
        drain: DrainSettings,
    ) {
        let connections = Arc::new(Connections {
            all: TaskTracker::new(),
            http: TaskTracker::new(),
            stop: CancellationToken::new(),
            cut: CancellationToken::new(),
        });
        // Open streams are decided again on every new router and, through this one
        // timer for all of them, every STREAM_RECHECK (time windows, sign-in frequency).
        // A change of the replica set changes each replica's share of the apps' rate
        // limits: the router is rebuilt for it.
        let rechecks = {
            let proxy = Arc::clone(&self);
            let mut replicas = self.replicas.clone();
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(STREAM_RECHECK);
                ticks.tick().await;
                loop {
                    tokio::select! {
                        _ = ticks.tick() => proxy.routers.send_modify(|_| {}),
                        changed = replicas.changed() => {
                            if changed.is_err() {
                                std::future::pending::<()>().await;
                            }
                            proxy.store_router(proxy.config.load_full());
                        }
                    }
                }
            })
        };
        loop {
            tokio::select! {
                accepted = listener.accept() => self.admit(accepted, &connections).await,
                () = shutdown.cancelled() => break,
            }
        }
        rechecks.abort();

        info!(delay = ?drain.delay, "draining: still accepting while load balancers stop sending connections");
        self.start_draining();
        let delay = tokio::time::sleep(drain.delay);
        tokio::pin!(delay);
        loop {
            tokio::select! {
                accepted = listener.accept() => self.admit(accepted, &connections).await,
                () = &mut delay => break,
            }
        }

        drop(listener);
        connections.stop.cancel();
        connections.all.close();
        connections.http.close();
        info!(
            connections = connections.http.len(),
            timeout = ?drain.timeout,
            "stopped accepting; letting requests in flight finish"
        );
        if tokio::time::timeout(drain.timeout, connections.http.wait())
            .await
            .is_err()
        {
            warn!(
                connections = connections.http.len(),
                "connections still open after the drain timeout; cutting them"
            );
            connections.cut.cancel();
            connections.http.wait().await;
        }
        info!("user connections done; closing the tunnels");
        self.pool.close_all().await;
        connections.all.wait().await;
    }

    /// Spawns the task of an accepted connection.
    async fn admit(
        self: &Arc<Self>,
        accepted: std::io::Result<(TcpStream, SocketAddr)>,
        connections: &Arc<Connections>,
    ) {
        match accepted {
            Ok((stream, peer)) => {
                // Load balancers carry many clients' connections: never capped.
                let slot = if self.trusted_proxies.contains(peer.ip()) {
                    None
                } else {
                    match self.protection.connections().open(peer.ip()) {
                        Some(slot) => slot,
                        None => {
                            debug!(%peer, "connection refused: the peer holds its cap of open connections");
                            crate::metrics::limited("client-connections", crate::metrics::NO_APP);
                            drop(stream);
                            return;
                        }
                    }
                };
                let proxy = self.clone();
                // Counted as an HTTP connection until it turns out to be a tunnel.
                let http = connections.http.token();
                let signals = connections.clone();
                connections
                    .all
                    .spawn(proxy.connection(stream, peer, http, signals, slot));
            }
            Err(error) => {
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        http: TaskTrackerToken,
        connections: Arc<Connections>,
        slot: Option<ConnectionSlot>,
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
        let handshake_timeout = self.protection.settings().handshake_timeout;
        let (tls, to_fleet) = match tokio::time::timeout(handshake_timeout, handshake).await {
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
        let signals = DrainSignals {
            http2: alpn.as_deref() == Some(b"h2"),
            draining: self.draining.clone(),
            stop: connections.stop.clone(),
            cut: connections.cut.clone(),
        };
        if !to_fleet {
            self.serve_users(tls, peer, signals).await;
            drop(http);
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
            // Tunnels outlive the user connections: they carry their last requests. They
            // do not count among their peer's connections either.
            drop(http);
            drop(slot);
            self.tunnel(identity, tls, peer).await;
        } else {
            self.serve_fleet_api(tls, peer, identity, signals).await;
            drop(http);
        }
    }

    /// Runs a connector's tunnel until it ends; on shutdown the pool closes it
    /// ([`TunnelPool::close_all`]) once the user connections are done.
    async fn tunnel(
        self: Arc<Self>,
        identity: ConnectorIdentity,
        tls: tokio_rustls::server::TlsStream<TcpStream>,
        peer: SocketAddr,
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
        let (routed_tx, routed) = tokio::sync::oneshot::channel();
        let attach = self
            .pool
            .attach_signalling(identity.clone(), tls, notice, Some(routed_tx));
        tokio::pin!(attach);
        let ended = tokio::select! {
            result = &mut attach => Some(result),
            () = self.renotify_if_stale(&identity, &sent_version, routed) => None,
        };
        let result = match ended {
            Some(result) => result,
            None => attach.await,
        };
        match result {
            Ok(()) => info!(%peer, %connector, "tunnel closed"),
            Err(error) => info!(%peer, %connector, %error, "tunnel ended"),
        }
    }

    /// A configuration that arrives while a tunnel is being set up is announced only to
    /// tunnels already in the pool; once this one is in, tell it again if its first
    /// notice went out with an older version (else it would wait for its next poll).
    ///
    /// `routed` fires when this tunnel is in the pool ([`TunnelPool::attach_signalling`]):
    /// one wake-up per tunnel, however many connectors reconnect at the same time.
    async fn renotify_if_stale(
        &self,
        identity: &ConnectorIdentity,
        sent_version: &str,
        routed: tokio::sync::oneshot::Receiver<()>,
    ) {
        if !matches!(
            tokio::time::timeout(HANDSHAKE_TIMEOUT, routed).await,
            Ok(Ok(()))
        ) {
            // Not routed in time, or the tunnel ended first: nothing to announce again.
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
        signals: DrainSignals,
    ) {
        let api = self.fleet_api.clone();
        let service = service_fn(move |mut request: Request<Incoming>| {
            let api = api.clone();
            let identity = identity.clone();
            request.extensions_mut().insert(ClientAddress(peer));
            async move { Ok::<_, std::convert::Infallible>(api.handle(request, identity).await) }
        });
        serve_http(tls, service, false, signals, self.protection.settings()).await;
    }

    async fn serve_users(
        self: Arc<Self>,
        tls: tokio_rustls::server::TlsStream<TcpStream>,
        peer: SocketAddr,
        signals: DrainSignals,
    ) {
        let proxy = self.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            // Behind a trusted proxy each request may name another client.
            let client = proxy
                .trusted_proxies
                .client_info(peer.ip(), request.headers());
            // Protection first: a flooding client or an overloaded replica is answered
            // before any other work.
            let admitted = proxy.protection.admit(client.client_ip);
            let proxy = proxy.clone();
            let answer = async move {
                match admitted {
                    Ok(admission) => {
                        // Boxed: answering a request is a large future (the state of
                        // every branch: sign-in, WebSocket, tunnel), and hyper's
                        // dispatcher and the wrappers around it move the future they
                        // hold several times per request; a box moves as a pointer.
                        let response = Box::pin(proxy.user_request(request, client)).await;
                        response.map(|body| HeldBody::wrap(body, admission))
                    }
                    Err(refusal) => refused(&request, refusal, client.client_ip),
                }
            };
            async move {
                Ok::<_, std::convert::Infallible>(crate::metrics::observe_request(answer).await)
            }
        });
        // Users' HTTP/2 connections carry WebSockets as extended CONNECT (RFC 8441).
        serve_http(tls, service, true, signals, self.protection.settings()).await;
    }

    /// Answers one user request; the session controls in force on it
    /// ([`crate::session_controls`]) see its answer last.
    pub async fn user_request(
        &self,
        request: Request<Incoming>,
        client: ClientInfo,
    ) -> Response<TunnelBody> {
        let mut control = None;
        let response = self.controlled_request(request, client, &mut control).await;
        match control {
            Some(control) => control.finish(response),
            None => response,
        }
    }

    /// Answers one user request, leaving in `control` the session controls the gate put
    /// on it.
    async fn controlled_request(
        &self,
        request: Request<Incoming>,
        client: ClientInfo,
        control: &mut Option<SessionControl>,
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
        let origin = auth::Origin {
            host: host.trim_end_matches('.').to_ascii_lowercase(),
            authority: forward::request_host(&request)
                .unwrap_or(host)
                .to_ascii_lowercase(),
        };
        let matched = router.lookup(host, port, request.uri().path());
        let authenticator = self.auth.load_full();
        // Sallyport's own paths, unless a passthrough app owns the path.
        if let Some(authenticator) = &authenticator
            && request.uri().path().starts_with(auth::RESERVED_PREFIX)
            && matched.as_ref().is_none_or(|m| {
                m.route.pre_authentication.kind != PreAuthenticationType::Passthrough
            })
            // Boxed, as the WebSocket branch below: a rare branch with a large future,
            // kept out of the state every request's future carries.
            && let Some(answer) = Box::pin(authenticator.reserved(
                &router,
                &request,
                &origin,
                port,
                client.client_ip,
                &request_id,
            ))
            .await
        {
            return answer;
        }
        let Some(matched) = matched else {
            return pages::not_found(accept, &request_id);
        };
        let route = matched.route;
        crate::metrics::note_app(&route.app);
        if matched.missing_slash {
            return pages::slash_redirect(request.uri().path(), request.uri().query());
        }
        if route.maintenance_mode {
            return pages::maintenance(accept, &route.app, &request_id);
        }
        // A body announced larger than the app takes is refused before sign-in.
        let body_limit = self.protection.body_limit(route.max_request_body_bytes);
        if let Some(limit) = body_limit
            && content_length(&request).is_some_and(|length| length > limit)
        {
            debug!(app = %route.app, %request_id, limit, "request body over the app's limit");
            crate::metrics::limited("body-size", &route.app);
            return pages::payload_too_large(accept, &route.app, limit, &request_id);
        }
        // The app's rate limits: its client's bucket, then its own (fleet-wide with a
        // limits store).
        match self
            .protection
            .check_app_rate(route, client.client_ip)
            .await
        {
            Ok(()) => {}
            Err(Limited::Client(wait)) => {
                debug!(app = %route.app, %request_id, client = %client.client_ip, "over the app's limit per client");
                crate::metrics::limited("app-client-ip", &route.app);
                return pages::client_too_many_requests(accept, wait, &request_id);
            }
            Err(Limited::App(wait)) => {
                debug!(app = %route.app, %request_id, client = %client.client_ip, "over the app's rate limit");
                crate::metrics::limited("app", &route.app);
                return pages::too_many_requests(accept, &route.app, wait, &request_id);
            }
        }
        let mut request = request;
        let mut guard = None;
        if route.pre_authentication.kind != PreAuthenticationType::Passthrough {
            let Some(authenticator) = &authenticator else {
                return sign_in_unavailable(accept, route, &request_id);
            };
            match authenticator.gate(
                route,
                matched.index,
                router.generation(),
                &mut request,
                &origin,
                client.client_ip,
                &request_id,
            ) {
                auth::Gate::Pass(subject, decision) => {
                    *control =
                        SessionControl::new(&decision, &route.app, &subject, &request, &request_id);
                    if let Some(refusal) = control.as_ref().and_then(|c| {
                        c.refuse_request(
                            &request,
                            websocket::is_websocket_request(&request),
                            accept,
                        )
                    }) {
                        return refusal;
                    }
                    authenticator.add_identity(
                        route,
                        &subject.session,
                        request.headers_mut(),
                        &request_id,
                    );
                    guard = Some(StreamGuard::new(
                        self.routers.subscribe(),
                        Arc::clone(authenticator.access()),
                        Arc::from(route.app.as_str()),
                        subject,
                    ));
                }
                auth::Gate::Answer(answer) => return answer,
            }
        }
        if websocket::is_websocket_request(&request) {
            return Box::pin(websocket::tunnel_upgrade(
                &self.pool,
                route,
                request,
                &client,
                &request_id,
                guard,
            ))
            .await;
        }
        // A body without a length is cut at the limit, and the request answered 413.
        let exceeded = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut request = request.map(|incoming| {
            let body = body::incoming(incoming);
            match body_limit {
                Some(limit) => LimitedBody::wrap(body, limit, Arc::clone(&exceeded)),
                None => body,
            }
        });
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
        if let Some(limit) = body_limit
            && exceeded.load(std::sync::atomic::Ordering::Relaxed)
        {
            debug!(app = %route.app, %request_id, limit, "request body over the app's limit; cut");
            crate::metrics::limited("body-size", &route.app);
            return pages::payload_too_large(accept, &route.app, limit, &request_id);
        }
        match sent {
            Ok(Ok(response)) => {
                let mut response =
                    forward::translate_response(route, response.map(|b| b.into_tunnel_body()));
                if let Some(control) = control.as_ref() {
                    // A download under blockDownloads: replaced, its body never read.
                    response = control.filter_download(response, accept);
                }
                response = body_translation::translate_body(route, response);
                if let Ok(value) = HeaderValue::from_str(&request_id) {
                    response
                        .headers_mut()
                        .entry(sallyport_tunnel::wire::REQUEST_ID_HEADER)
                        .or_insert(value);
                }
                match guard {
                    // A long download or event stream ends when access is withdrawn.
                    Some(guard) => response.map(|body| {
                        http_body_util::BodyExt::boxed_unsync(GuardedBody::new(body, guard))
                    }),
                    None => response,
                }
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

/// The request's `Content-Length`, when it has a valid one.
fn content_length<B>(request: &Request<B>) -> Option<u64> {
    request
        .headers()
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
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

/// What one HTTP connection watches to close in step with the drain.
#[derive(Clone)]
struct DrainSignals {
    /// The client negotiated HTTP/2.
    http2: bool,
    /// The proxy drains: HTTP/2 connections get GOAWAY at once, HTTP/1.1 ones close
    /// after their next response.
    draining: CancellationToken,
    /// The proxy stopped accepting: every connection closes once idle.
    stop: CancellationToken,
    /// The drain timeout passed: the connection is cut.
    cut: CancellationToken,
}

/// Marks an HTTP/1.x response as the connection's last, unless it switches protocols.
fn close_after<B>(response: &mut Response<B>) {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
}

/// The answer to a user request that protection refused before routing.
fn refused(
    request: &Request<Incoming>,
    refusal: Refusal,
    client: std::net::IpAddr,
) -> Response<TunnelBody> {
    let request_id = forward::new_request_id();
    let accept = request.headers().get(ACCEPT);
    match refusal {
        Refusal::ClientRate(wait) => {
            debug!(%client, %request_id, "over the limit of requests per client");
            crate::metrics::limited("client-ip", crate::metrics::NO_APP);
            pages::client_too_many_requests(accept, wait, &request_id)
        }
        Refusal::Overloaded => {
            debug!(%client, %request_id, "refused: the replica holds its cap of requests in flight");
            crate::metrics::shed();
            pages::overloaded(
                accept,
                crate::protection::OVERLOADED_RETRY_AFTER_SECS,
                &request_id,
            )
        }
    }
}

async fn serve_http<S>(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    service: S,
    connect_protocol: bool,
    signals: DrainSignals,
    limits: &ProtectionSettings,
) where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<TunnelBody>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    // HTTP/1.x responses carry `Connection: close` once the proxy drains, so that clients
    // take their next request elsewhere instead of racing the close of an idle connection.
    // A request is in flight until its response body ends; the connection is idle
    // otherwise, and closed after `--idle-timeout` of it.
    let draining = signals.draining.clone();
    let activity = Activity::new();
    let requests = Arc::clone(&activity);
    let service = service_fn(move |request: Request<Incoming>| {
        let http1 = request.version() < Version::HTTP_2;
        let active = requests.begin();
        let answer = hyper::service::Service::call(&service, request);
        let draining = draining.clone();
        async move {
            let mut response = answer.await?.map(|body| HeldBody::wrap(body, active));
            if http1 && draining.is_cancelled() {
                close_after(&mut response);
            }
            Ok::<_, Infallible>(response)
        }
    });
    let idle_timeout = limits.idle_timeout;
    let idle = async move { activity.idle(idle_timeout).await };
    let io = TokioIo::new(tls);
    if signals.http2 {
        // Negotiated by ALPN: served as HTTP/2 from the first byte. (The auto builder
        // reads the preface first, and a graceful shutdown before it has would drop the
        // connection and whatever request the client already sent on it.) GOAWAY as soon
        // as the proxy drains; streams the client opened before it saw the GOAWAY finish.
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.http2.max_concurrent_streams)
            .max_pending_accept_reset_streams(limits.http2.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(limits.http2.max_local_error_reset_streams)
            .max_header_list_size(limits.max_request_header_bytes);
        if connect_protocol {
            builder.enable_connect_protocol();
        }
        let connection = builder.serve_connection(io, service);
        tokio::pin!(connection);
        let go_away = signals.draining.clone();
        drive(
            connection,
            hyper::server::conn::http2::Connection::graceful_shutdown,
            go_away,
            idle,
            signals.cut,
        )
        .await;
    } else {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.http1_max_buf_size())
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.http2.max_concurrent_streams)
            .max_pending_accept_reset_streams(limits.http2.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(limits.http2.max_local_error_reset_streams)
            .max_header_list_size(limits.max_request_header_bytes);
        if connect_protocol {
            builder.http2().enable_connect_protocol();
        }
        // Each response says `Connection: close` while the proxy drains; once it stops
        // accepting, a connection still idle is closed and a busy one after its response.
        let connection = builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(connection);
        drive(
            connection,
            auto::UpgradeableConnection::graceful_shutdown,
            signals.stop,
            idle,
            signals.cut,
        )
        .await;
    }
}

/// Serves `connection` to its end: shut down gracefully with `graceful` once `go_away`
/// is cancelled or the connection was `idle` too long, cut once `cut` is.
async fn drive<C, E>(
    mut connection: Pin<&mut C>,
    graceful: fn(Pin<&mut C>),
    go_away: CancellationToken,
    idle: impl Future<Output = ()>,
    cut: CancellationToken,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let finished = tokio::select! {
        result = connection.as_mut() => Some(result),
        () = go_away.cancelled() => None,
        () = idle => {
            debug!("connection idle too long; closing it");
            None
        }
        () = cut.cancelled() => return,
    };
    let result = match finished {
        Some(result) => result,
        None => {
            graceful(connection.as_mut());
            tokio::select! {
                result = connection.as_mut() => result,
                () = cut.cancelled() => {
                    debug!("connection still busy at the end of the drain; cut");
                    return;
                }
            }
        }
    };
    if let Err(error) = result {
        debug!(%error, "connection ended with an error");
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
    fn draining_closes_http1_connections_after_the_response_but_not_upgrades() {
        let mut response = http::Response::new(());
        super::close_after(&mut response);
        assert_eq!(
            response.headers().get(http::header::CONNECTION),
            Some(&http::HeaderValue::from_static("close"))
        );
        let mut upgrade = http::Response::new(());
        *upgrade.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        upgrade.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        super::close_after(&mut upgrade);
        assert_eq!(
            upgrade.headers().get(http::header::CONNECTION),
            Some(&http::HeaderValue::from_static("upgrade"))
        );
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
