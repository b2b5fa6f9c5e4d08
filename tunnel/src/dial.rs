//! The connector side of the tunnel: dialling the fleet, serving HTTP/2 on the
//! connections it made, reconnecting, draining.
//!
//! A [`Dialer`] keeps tunnels open to the proxy fleet. Each tunnel is a TCP connection
//! the connector opened, TLS with its client certificate and ALPN
//! [`TUNNEL_ALPN`], on which the connector then *serves* HTTP/2: the proxy sends
//! requests, the connector's [`Handler`] answers them. The dialer answers the fleet's
//! [`FleetNotice`] itself and publishes the latest one ([`Dialer::notices`]).
//!
//! **How many tunnels, to which replica.** The connector cannot choose the replica a
//! dial reaches (behind a load balancer each dial lands somewhere); the notice on each
//! tunnel says where it landed and which replicas exist. The dialer keeps
//! [`DialSettings::tunnels_per_replica`] (`n`) tunnels to every replica of the latest
//! notice (`R`), and `n` in all before any notice:
//!
//! 1. It dials while some replica of `R` has fewer than `n` tunnels, counting tunnels
//!    whose notice has not arrived yet as possibly landing on a missing replica, and
//!    never beyond `2 · n · |R|` tunnels (`2 · n` before any notice).
//! 2. A dial that lands on a replica already served while another is missing is a
//!    miss: misses back off like failures, so a sticky load balancer cannot make the
//!    dialer spin.
//! 3. At the cap with a replica still missing, it retires (drains with GOAWAY) the
//!    newest tunnel of the replica with the most tunnels beyond its target (a replica no
//!    longer in `R` has a target of zero), and dials again.
//!
//! **Failures.** A dial, TLS handshake, ALPN or tunnel that fails before the fleet's
//! notice arrived counts as a failure: the next dial waits a random time between zero
//! and `min(backoff_max, backoff_min · 2^(failures-1))` (full jitter), and only one dial
//! is in flight until one succeeds. A tunnel that had been healthy (its notice arrived)
//! and then drops is redialled at once.
//!
//! **Credentials.** Every dial reads the current [`Credentials`] from the shared
//! [`ArcSwap`]: a rotation applies to new tunnels only; existing tunnels and their
//! streams are untouched.
//!
//! **Drain.** When the shutdown token fires the dialer stops dialling and sends GOAWAY
//! on every tunnel; streams in flight get up to [`DialSettings::drain_timeout`] to
//! finish, then the remaining tunnels are closed and [`Dialer::run`] returns.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::pin::pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rand::Rng;
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::body::{self, TunnelBody};
use crate::pool::TunnelExecutor;
use crate::tls::{self, Credentials, TlsError};
use crate::wire::{APP_HEADER, FLEET_NOTICE_PATH, FleetNotice, NoticeReply, TUNNEL_ALPN};

/// The connector's answer to every tunneled request but the fleet's notices.
pub type Handler =
    Arc<dyn Fn(Request<Incoming>) -> BoxFuture<'static, Response<TunnelBody>> + Send + Sync>;

/// HTTP/2 initial window of each stream: large windows carry bulk transfers at full
/// speed (see the performance notes).
const INITIAL_STREAM_WINDOW: u32 = 8 << 20;
/// HTTP/2 initial window of each tunnel connection.
const INITIAL_CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame the connector accepts (see [`crate::wire::MAX_FRAME_SIZE`]).
const MAX_FRAME_SIZE: u32 = crate::wire::MAX_FRAME_SIZE;
/// Streams the proxy may reset before the connector accepted them without the connector
/// tearing the tunnel down: h2's default of 20 lets one user who cancels many requests
/// cut an app off for everyone.
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 4096;
/// Streams the proxy may open at once on one tunnel.
const MAX_CONCURRENT_STREAMS: u32 = 1000;
/// Interval of the connector's keep-alive pings: a replica that vanished without closing
/// the connection is noticed and redialled.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// A tunnel whose ping is not answered within this time is closed.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The largest fleet notice the connector reads.
const NOTICE_LIMIT: usize = 64 * 1024;

/// Where and how the connector dials the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialSettings {
    /// `host:port` of the fleet's tunnel endpoint, tried in turn.
    pub fleet_addresses: Vec<String>,
    /// The TLS server name (SNI, and the name the fleet's certificate must carry).
    pub server_name: String,
    /// Tunnels to keep to every proxy replica.
    pub tunnels_per_replica: usize,
    /// The first backoff after a failure.
    pub backoff_min: Duration,
    /// The longest backoff.
    pub backoff_max: Duration,
    /// How long streams in flight may run once a tunnel drains.
    pub drain_timeout: Duration,
    /// How long a dial (TCP connect and TLS handshake) may take.
    pub connect_timeout: Duration,
}

impl DialSettings {
    /// The default settings for dialling `fleet_addresses` as `server_name`.
    pub fn new(fleet_addresses: Vec<String>, server_name: impl Into<String>) -> Self {
        Self {
            fleet_addresses,
            server_name: server_name.into(),
            ..Self::default()
        }
    }
}

impl Default for DialSettings {
    /// No fleet address yet: set [`DialSettings::fleet_addresses`] and
    /// [`DialSettings::server_name`].
    fn default() -> Self {
        Self {
            fleet_addresses: Vec::new(),
            server_name: String::new(),
            tunnels_per_replica: 2,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Why the dialer cannot run, or why one dial or tunnel failed (logged, and shown in
/// [`DialStatus::last_error`]).
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The settings name no fleet address.
    #[error("connector {connector}: no fleet address to dial")]
    NoFleetAddress {
        /// The connector, `namespace/name`.
        connector: String,
    },
    /// The server name is not a valid TLS server name.
    #[error("connector {connector}: {name:?} is not a valid TLS server name")]
    ServerName {
        /// The connector, `namespace/name`.
        connector: String,
        /// The name given.
        name: String,
    },
    /// `tunnels_per_replica` is zero.
    #[error("connector {connector}: tunnels_per_replica must be at least 1")]
    NoTunnels {
        /// The connector, `namespace/name`.
        connector: String,
    },
    /// The TLS client configuration could not be built from the current credentials.
    #[error("dialling the fleet at {address}: {source}")]
    TlsConfig {
        /// The address dialled.
        address: String,
        /// Why.
        source: TlsError,
    },
    /// The TCP connection failed.
    #[error("dialling the fleet at {address}: {source}")]
    Connect {
        /// The address dialled.
        address: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake with the fleet at {address}: {source}")]
    Tls {
        /// The address dialled.
        address: String,
        /// The IO error rustls reported.
        source: std::io::Error,
    },
    /// TCP connect and TLS handshake took too long.
    #[error("dialling the fleet at {address}: no TLS session within {timeout:?}")]
    Timeout {
        /// The address dialled.
        address: String,
        /// The limit.
        timeout: Duration,
    },
    /// The fleet did not agree to the tunnel protocol.
    #[error("the fleet at {address} negotiated ALPN {negotiated:?}, not the tunnel's")]
    Alpn {
        /// The address dialled.
        address: String,
        /// What the fleet chose, if anything.
        negotiated: Option<String>,
    },
    /// HTTP/2 on the tunnel failed.
    #[error("tunnel to the fleet at {address}: {source}")]
    Serve {
        /// The address dialled.
        address: String,
        /// hyper's error.
        source: hyper::Error,
    },
    /// The tunnel's task panicked.
    #[error("tunnel to the fleet at {address}: task failed: {reason}")]
    Task {
        /// The address dialled.
        address: String,
        /// The join error.
        reason: String,
    },
}

/// Where a tunnel is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelPhase {
    /// TCP connect and TLS handshake under way.
    Dialing,
    /// Serving HTTP/2 to the fleet.
    Serving,
    /// Draining because the replica has more tunnels than needed.
    Retiring,
    /// Draining because the connector shuts down.
    Draining,
}

/// One tunnel, as [`DialStatus`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelStatus {
    /// The dialer's id of the tunnel.
    pub id: u64,
    /// The fleet address dialled.
    pub address: String,
    /// Where the tunnel is in its life.
    pub phase: TunnelPhase,
    /// The replica at the other end, once its notice arrived.
    pub replica: Option<String>,
    /// When the dial started.
    pub since: SystemTime,
}

/// The dialer's tunnels, for logs, metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DialStatus {
    /// Every tunnel, dialling, serving or draining, by id.
    pub tunnels: Vec<TunnelStatus>,
    /// The replicas of the latest fleet notice.
    pub replicas: Vec<String>,
    /// Dials or tunnels that failed in a row since the last healthy tunnel.
    pub consecutive_failures: u32,
    /// The last failure, until a tunnel is healthy again.
    pub last_error: Option<String>,
}

impl DialStatus {
    /// Serving tunnels per replica (tunnels whose notice has not arrived are left out).
    pub fn per_replica(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for tunnel in &self.tunnels {
            if let (TunnelPhase::Serving, Some(replica)) = (tunnel.phase, &tunnel.replica) {
                *counts.entry(replica.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// How many tunnels are serving (not dialling, not draining).
    pub fn serving(&self) -> usize {
        self.tunnels
            .iter()
            .filter(|tunnel| tunnel.phase == TunnelPhase::Serving)
            .count()
    }
}

/// Keeps the connector's tunnels to the fleet open; see the [module](self) notes.
pub struct Dialer {
    settings: DialSettings,
    credentials: Arc<ArcSwap<Credentials>>,
    fleet_ca: Vec<CertificateDer<'static>>,
    handler: Handler,
    connector_id: String,
    config_version: watch::Receiver<String>,
    notices: watch::Sender<Option<FleetNotice>>,
    status: watch::Sender<DialStatus>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("connector", &self.connector_id)
            .field("settings", &self.settings)
            .finish()
    }
}

impl Dialer {
    /// A dialer for the connector `connector_id` (`namespace/name`): `credentials` is its
    /// current client certificate (swap it to rotate), `fleet_ca` the only roots it
    /// trusts, `handler` answers tunneled requests, and `config_version` is the version of
    /// the configuration it serves, reported to the fleet.
    pub fn new(
        settings: DialSettings,
        credentials: Arc<ArcSwap<Credentials>>,
        fleet_ca: Vec<CertificateDer<'static>>,
        handler: Handler,
        connector_id: String,
        config_version: watch::Receiver<String>,
    ) -> Self {
        Self {
            settings,
            credentials,
            fleet_ca,
            handler,
            connector_id,
            config_version,
            notices: watch::Sender::new(None),
            status: watch::Sender::new(DialStatus::default()),
        }
    }

    /// The latest fleet notice, from any tunnel: the connector pulls its configuration
    /// when the notice's version differs from its own.
    pub fn notices(&self) -> watch::Receiver<Option<FleetNotice>> {
        self.notices.subscribe()
    }

    /// The tunnels now.
    pub fn status(&self) -> DialStatus {
        self.status.borrow().clone()
    }

    /// The tunnels, updated whenever they change; it stays valid after [`Dialer::run`]
    /// took the dialer.
    pub fn status_updates(&self) -> watch::Receiver<DialStatus> {
        self.status.subscribe()
    }

    /// Keeps the tunnels open until `shutdown` fires, then drains them and returns.
    /// Fails only on settings it cannot work with; dial failures are retried.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DialError> {
        let server_name = self.validate()?;
        let span = tracing::info_span!("dialer", connector = %self.connector_id);
        let (events, mut event_rx) = mpsc::unbounded_channel();
        let context = Arc::new(TunnelContext {
            settings: self.settings,
            server_name,
            credentials: self.credentials,
            fleet_ca: self.fleet_ca,
            tls: Mutex::new(None),
            handler: self.handler,
            connector_id: self.connector_id,
            config_version: self.config_version,
            notices: self.notices,
            events,
        });
        let mut supervisor = Supervisor::new(context, self.status, span.clone());
        async move {
            tracing::info!(fleet = ?supervisor.context.settings.fleet_addresses, "dialling the fleet");
            loop {
                let wake_at = supervisor.reconcile();
                supervisor.publish();
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    Some(event) = event_rx.recv() => supervisor.on_event(event),
                    Some(joined) = supervisor.tasks.join_next_with_id() => supervisor.on_end(joined),
                    () = tokio::time::sleep_until(wake_at.unwrap_or_else(Instant::now)), if wake_at.is_some() => {}
                }
            }
            supervisor.drain().await;
            Ok(())
        }
        .instrument(span)
        .await
    }

    fn validate(&self) -> Result<ServerName<'static>, DialError> {
        let connector = || self.connector_id.clone();
        if self.settings.fleet_addresses.is_empty() {
            return Err(DialError::NoFleetAddress {
                connector: connector(),
            });
        }
        if self.settings.tunnels_per_replica == 0 {
            return Err(DialError::NoTunnels {
                connector: connector(),
            });
        }
        ServerName::try_from(self.settings.server_name.clone()).map_err(|_| DialError::ServerName {
            connector: connector(),
            name: self.settings.server_name.clone(),
        })
    }
}

/// What a tunnel tells the supervisor while it runs.
enum TunnelEvent {
    /// The TLS session is up and HTTP/2 served on it.
    Serving { id: u64 },
    /// The fleet's notice arrived on the tunnel.
    Notice { id: u64, notice: FleetNotice },
}

/// How a tunnel's task ended.
enum TunnelEnd {
    /// Cancelled while dialling.
    Cancelled,
    /// The HTTP/2 connection ended without error.
    Closed,
    /// The dial or the tunnel failed.
    Failed(DialError),
}

/// What every tunnel task shares.
struct TunnelContext {
    settings: DialSettings,
    server_name: ServerName<'static>,
    credentials: Arc<ArcSwap<Credentials>>,
    fleet_ca: Vec<CertificateDer<'static>>,
    /// The TLS configuration built for the credentials it names, reused until they are
    /// swapped (building one parses the roots and the key).
    tls: Mutex<Option<(Arc<Credentials>, Arc<ClientConfig>)>>,
    handler: Handler,
    connector_id: String,
    config_version: watch::Receiver<String>,
    notices: watch::Sender<Option<FleetNotice>>,
    events: mpsc::UnboundedSender<TunnelEvent>,
}

impl TunnelContext {
    /// One tunnel, from dial to end. `control` asks it to drain (GOAWAY).
    async fn run_tunnel(
        self: Arc<Self>,
        id: u64,
        address: String,
        control: CancellationToken,
    ) -> TunnelEnd {
        let dialled = tokio::select! {
            dialled = self.dial(&address) => dialled,
            () = control.cancelled() => return TunnelEnd::Cancelled,
        };
        let stream = match dialled {
            Ok(stream) => stream,
            Err(error) => return TunnelEnd::Failed(error),
        };
        // The supervisor may be gone only while the dialer is dropped mid-run.
        let _ = self.events.send(TunnelEvent::Serving { id });
        tracing::debug!("TLS session up; serving HTTP/2");
        match self.serve(id, stream, &control).await {
            Ok(()) => TunnelEnd::Closed,
            Err(source) => TunnelEnd::Failed(DialError::Serve { address, source }),
        }
    }

    async fn dial(&self, address: &str) -> Result<TlsStream<TcpStream>, DialError> {
        let config = self.tls_config().map_err(|source| DialError::TlsConfig {
            address: address.to_owned(),
            source,
        })?;
        let timeout = self.settings.connect_timeout;
        let connect = async {
            let tcp = TcpStream::connect(address)
                .await
                .map_err(|source| DialError::Connect {
                    address: address.to_owned(),
                    source,
                })?;
            // Small frames (headers, window updates, pings) must not wait for Nagle.
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "TCP_NODELAY not set");
            }
            TlsConnector::from(config)
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|source| DialError::Tls {
                    address: address.to_owned(),
                    source,
                })
        };
        let stream =
            tokio::time::timeout(timeout, connect)
                .await
                .map_err(|_| DialError::Timeout {
                    address: address.to_owned(),
                    timeout,
                })??;
        let negotiated = stream.get_ref().1.alpn_protocol();
        if negotiated != Some(TUNNEL_ALPN) {
            return Err(DialError::Alpn {
                address: address.to_owned(),
                negotiated: negotiated.map(|p| String::from_utf8_lossy(p).into_owned()),
            });
        }
        Ok(stream)
    }

    /// The TLS configuration of the credentials current now.
    fn tls_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let credentials = self.credentials.load_full();
        let mut cache = self.tls.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((built_for, config)) = cache.as_ref()
            && Arc::ptr_eq(built_for, &credentials)
        {
            return Ok(config.clone());
        }
        let config =
            tls::connector_client_config(Some(&credentials), &self.fleet_ca, &[TUNNEL_ALPN])?;
        *cache = Some((credentials, config.clone()));
        Ok(config)
    }

    /// Serves HTTP/2 on `stream` until the fleet closes it or `control` asks for a drain.
    async fn serve(
        self: &Arc<Self>,
        id: u64,
        stream: TlsStream<TcpStream>,
        control: &CancellationToken,
    ) -> Result<(), hyper::Error> {
        // Whichever way this tunnel ends, the streams it spawned end with it.
        let closer = CancellationToken::new();
        let _cut_streams = closer.clone().drop_guard();
        let context = self.clone();
        let service = service_fn(move |request| {
            let context = context.clone();
            async move { Ok::<_, Infallible>(context.answer(id, request).await) }
        });
        let connection = server_builder(TunnelExecutor::new(closer))
            .serve_connection(TokioIo::new(stream), service);
        let mut connection = pin!(connection);
        tokio::select! {
            served = connection.as_mut() => return served,
            () = control.cancelled() => {}
        }
        tracing::info!("draining tunnel (GOAWAY)");
        connection.as_mut().graceful_shutdown();
        match tokio::time::timeout(self.settings.drain_timeout, connection).await {
            Ok(served) => served,
            Err(_) => {
                tracing::warn!(drain_timeout = ?self.settings.drain_timeout, "streams still open at the end of the drain; closing the tunnel");
                Ok(())
            }
        }
    }

    async fn answer(&self, id: u64, request: Request<Incoming>) -> Response<TunnelBody> {
        if is_fleet_notice(&request) {
            self.answer_notice(id, request).await
        } else {
            (self.handler)(request).await
        }
    }

    async fn answer_notice(&self, id: u64, request: Request<Incoming>) -> Response<TunnelBody> {
        let notice = match read_notice(request).await {
            Ok(notice) => notice,
            Err(reason) => {
                tracing::warn!(%reason, "refused a fleet notice");
                return plain(StatusCode::BAD_REQUEST, reason);
            }
        };
        tracing::debug!(
            replica = %notice.replica,
            replicas = ?notice.replicas,
            config_version = %notice.config_version,
            "fleet notice"
        );
        let _ = self.events.send(TunnelEvent::Notice {
            id,
            notice: notice.clone(),
        });
        self.notices.send_replace(Some(notice));
        let reply = NoticeReply {
            connector: self.connector_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            config_version: self.config_version.borrow().clone(),
        };
        match serde_json::to_vec(&reply) {
            Ok(json) => Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(body::full(json))
                .unwrap_or_else(|e| plain(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
            Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

/// The HTTP/2 server settings of a tunnel (see the constants).
fn server_builder(executor: TunnelExecutor) -> http2::Builder<TunnelExecutor> {
    let mut builder = http2::Builder::new(executor);
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(INITIAL_STREAM_WINDOW)
        .initial_connection_window_size(INITIAL_CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .adaptive_window(false)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        // WebSockets over HTTP/2 (RFC 8441).
        .enable_connect_protocol();
    builder
}

/// The fleet's notice is the one request without an app: every proxied request names
/// its app in [`APP_HEADER`], so an app path that happens to equal the notice path still
/// goes to the handler.
fn is_fleet_notice(request: &Request<Incoming>) -> bool {
    request.method() == Method::POST
        && request.uri().path() == FLEET_NOTICE_PATH
        && !request.headers().contains_key(APP_HEADER)
}

async fn read_notice(request: Request<Incoming>) -> Result<FleetNotice, String> {
    let bytes = Limited::new(request.into_body(), NOTICE_LIMIT)
        .collect()
        .await
        .map_err(|e| format!("reading the fleet notice: {e}"))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| format!("the body is not a fleet notice: {e}"))
}

fn plain(status: StatusCode, text: String) -> Response<TunnelBody> {
    let mut response = Response::new(body::full(text));
    *response.status_mut() = status;
    response
}

/// The supervisor's record of one tunnel.
struct TunnelSlot {
    address: String,
    phase: TunnelPhase,
    replica: Option<String>,
    /// The fleet's notice arrived: the tunnel was accepted, not merely connected.
    healthy: bool,
    since: SystemTime,
    control: CancellationToken,
}

/// How many dials to start now and which tunnel to retire.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    dials: usize,
    retire: Option<u64>,
}

/// Owns the tunnels' tasks and decides when to dial, retire and back off.
struct Supervisor {
    context: Arc<TunnelContext>,
    status: watch::Sender<DialStatus>,
    span: tracing::Span,
    tunnels: BTreeMap<u64, TunnelSlot>,
    tasks: JoinSet<TunnelEnd>,
    task_ids: HashMap<tokio::task::Id, u64>,
    next_id: u64,
    next_address: usize,
    replicas: Vec<String>,
    failures: u32,
    misses: u32,
    /// No dial starts before this instant (backoff).
    next_dial_at: Option<Instant>,
    last_error: Option<String>,
}

impl Supervisor {
    fn new(
        context: Arc<TunnelContext>,
        status: watch::Sender<DialStatus>,
        span: tracing::Span,
    ) -> Self {
        Self {
            context,
            status,
            span,
            tunnels: BTreeMap::new(),
            tasks: JoinSet::new(),
            task_ids: HashMap::new(),
            next_id: 1,
            next_address: 0,
            replicas: Vec::new(),
            failures: 0,
            misses: 0,
            next_dial_at: None,
            last_error: None,
        }
    }

    /// Starts the dials and retirement the plan asks for; returns when to look again if
    /// a backoff holds dials back.
    fn reconcile(&mut self) -> Option<Instant> {
        let plan = self.plan();
        if let Some(id) = plan.retire {
            self.retire(id);
        }
        let mut dials = plan.dials;
        if self.failures > 0 {
            // While failing, probe with one dial at a time.
            let in_flight = self.count(|slot| slot.phase == TunnelPhase::Dialing);
            dials = dials.min(1).saturating_sub(in_flight);
        }
        if dials == 0 {
            return None;
        }
        if let Some(at) = self.next_dial_at
            && at > Instant::now()
        {
            return Some(at);
        }
        for _ in 0..dials {
            self.spawn_dial();
        }
        None
    }

    /// The replica targeting rule of the module notes.
    fn plan(&self) -> Plan {
        let per_replica = self.context.settings.tunnels_per_replica;
        let active = || {
            self.tunnels.iter().filter(|(_, slot)| {
                matches!(slot.phase, TunnelPhase::Dialing | TunnelPhase::Serving)
            })
        };
        let total = active().count();
        let unknown = active().filter(|(_, slot)| slot.replica.is_none()).count();
        let mut known: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for (id, slot) in active() {
            if let Some(replica) = &slot.replica {
                known.entry(replica).or_default().push(*id);
            }
        }
        let (needed, cap) = if self.replicas.is_empty() {
            (per_replica.saturating_sub(total), 2 * per_replica)
        } else {
            let missing: usize = self
                .replicas
                .iter()
                .map(|replica| {
                    per_replica.saturating_sub(known.get(replica.as_str()).map_or(0, Vec::len))
                })
                .sum();
            (
                missing.saturating_sub(unknown),
                2 * per_replica * self.replicas.len(),
            )
        };
        let retire = if needed > 0 && total >= cap {
            self.most_surplus(&known)
        } else {
            None
        };
        Plan {
            dials: needed.min(cap.saturating_sub(total)),
            retire,
        }
    }

    /// The newest tunnel of the replica with the most tunnels beyond its target (a
    /// replica no longer in the notice has a target of zero).
    fn most_surplus(&self, known: &BTreeMap<&str, Vec<u64>>) -> Option<u64> {
        let per_replica = self.context.settings.tunnels_per_replica;
        known
            .iter()
            .map(|(replica, ids)| {
                let target = if self.replicas.iter().any(|r| r == replica) {
                    per_replica
                } else {
                    0
                };
                (ids.len().saturating_sub(target), ids)
            })
            .filter(|(surplus, _)| *surplus > 0)
            .max_by_key(|(surplus, _)| *surplus)
            .and_then(|(_, ids)| ids.iter().max().copied())
    }

    fn count(&self, filter: impl Fn(&TunnelSlot) -> bool) -> usize {
        self.tunnels.values().filter(|slot| filter(slot)).count()
    }

    fn spawn_dial(&mut self) {
        let settings = &self.context.settings;
        let address =
            settings.fleet_addresses[self.next_address % settings.fleet_addresses.len()].clone();
        self.next_address = self.next_address.wrapping_add(1);
        let id = self.next_id;
        self.next_id += 1;
        let control = CancellationToken::new();
        let span = tracing::info_span!(parent: &self.span, "tunnel", tunnel = id, %address);
        let task = self
            .context
            .clone()
            .run_tunnel(id, address.clone(), control.clone())
            .instrument(span);
        let handle = self.tasks.spawn(task);
        self.task_ids.insert(handle.id(), id);
        self.tunnels.insert(
            id,
            TunnelSlot {
                address,
                phase: TunnelPhase::Dialing,
                replica: None,
                healthy: false,
                since: SystemTime::now(),
                control,
            },
        );
    }

    fn retire(&mut self, id: u64) {
        if let Some(slot) = self.tunnels.get_mut(&id) {
            tracing::info!(
                tunnel = id,
                replica = slot.replica.as_deref().unwrap_or("?"),
                "retiring a surplus tunnel so that a missing replica can be reached"
            );
            slot.phase = TunnelPhase::Retiring;
            slot.control.cancel();
        }
    }

    fn on_event(&mut self, event: TunnelEvent) {
        match event {
            TunnelEvent::Serving { id } => {
                if let Some(slot) = self.tunnels.get_mut(&id)
                    && slot.phase == TunnelPhase::Dialing
                {
                    slot.phase = TunnelPhase::Serving;
                }
            }
            TunnelEvent::Notice { id, notice } => self.on_notice(id, notice),
        }
    }

    fn on_notice(&mut self, id: u64, notice: FleetNotice) {
        let per_replica = self.context.settings.tunnels_per_replica;
        self.replicas = notice.replicas;
        let Some(slot) = self.tunnels.get_mut(&id) else {
            return;
        };
        let first = slot.replica.is_none();
        slot.replica = Some(notice.replica.clone());
        slot.healthy = true;
        self.failures = 0;
        self.last_error = None;
        if !first {
            return;
        }
        tracing::info!(tunnel = id, replica = %notice.replica, address = %slot.address, "tunnel up");
        let served = |replica: &str| {
            self.tunnels
                .iter()
                .filter(|(other, slot)| {
                    **other != id
                        && slot.phase == TunnelPhase::Serving
                        && slot.replica.as_deref() == Some(replica)
                })
                .count()
        };
        let landed_needed =
            self.replicas.contains(&notice.replica) && served(&notice.replica) < per_replica;
        let some_missing = self
            .replicas
            .iter()
            .any(|replica| served(replica) < per_replica);
        if landed_needed || !some_missing {
            self.misses = 0;
        } else {
            self.misses += 1;
            let wait = self.backoff(self.misses);
            tracing::debug!(replica = %notice.replica, misses = self.misses, ?wait, "dial landed on a replica already served");
            self.delay_dials(wait);
        }
    }

    fn on_end(&mut self, joined: Result<(tokio::task::Id, TunnelEnd), tokio::task::JoinError>) {
        let task = match &joined {
            Ok((task, _)) => *task,
            Err(error) => error.id(),
        };
        let Some(slot) = self
            .task_ids
            .remove(&task)
            .and_then(|id| self.tunnels.remove(&id).map(|slot| (id, slot)))
        else {
            return;
        };
        let (id, slot) = slot;
        let end = joined.map_or_else(
            |error| {
                TunnelEnd::Failed(DialError::Task {
                    address: slot.address.clone(),
                    reason: error.to_string(),
                })
            },
            |(_, end)| end,
        );
        let replica = slot.replica.as_deref().unwrap_or("?");
        match (slot.phase, end) {
            (TunnelPhase::Retiring | TunnelPhase::Draining, _) | (_, TunnelEnd::Cancelled) => {
                tracing::info!(tunnel = id, replica, "tunnel drained");
            }
            (_, end) if slot.healthy => {
                // A tunnel that worked and dropped: the fleet restarted a replica or the
                // network blinked. Redial at once; a failing dial will back off.
                match end {
                    TunnelEnd::Failed(error) => {
                        tracing::warn!(tunnel = id, replica, %error, "tunnel lost; redialling")
                    }
                    _ => tracing::info!(
                        tunnel = id,
                        replica,
                        "tunnel closed by the fleet; redialling"
                    ),
                }
                self.next_dial_at = None;
            }
            (_, end) => {
                let error = match end {
                    TunnelEnd::Failed(error) => error.to_string(),
                    _ => format!(
                        "the fleet at {} closed the tunnel before its notice",
                        slot.address
                    ),
                };
                self.failures = self.failures.saturating_add(1);
                let wait = self.backoff(self.failures);
                tracing::warn!(tunnel = id, %error, failures = self.failures, ?wait, "dial failed");
                self.last_error = Some(error);
                self.delay_dials(wait);
            }
        }
    }

    /// Full jitter: a random wait up to `min(backoff_max, backoff_min · 2^(attempt-1))`.
    fn backoff(&self, attempt: u32) -> Duration {
        let settings = &self.context.settings;
        let doubling = 1u32 << attempt.saturating_sub(1).min(20);
        let ceiling = settings
            .backoff_min
            .saturating_mul(doubling)
            .min(settings.backoff_max);
        rand::rng().random_range(Duration::ZERO..=ceiling)
    }

    fn delay_dials(&mut self, wait: Duration) {
        let at = Instant::now() + wait;
        self.next_dial_at = Some(self.next_dial_at.map_or(at, |current| current.max(at)));
    }

    /// Publishes the status, waking watchers only when it changed.
    fn publish(&self) {
        let status = DialStatus {
            tunnels: self
                .tunnels
                .iter()
                .map(|(id, slot)| TunnelStatus {
                    id: *id,
                    address: slot.address.clone(),
                    phase: slot.phase,
                    replica: slot.replica.clone(),
                    since: slot.since,
                })
                .collect(),
            replicas: self.replicas.clone(),
            consecutive_failures: self.failures,
            last_error: self.last_error.clone(),
        };
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            if changed {
                *current = status;
            }
            changed
        });
    }

    /// GOAWAY on every tunnel, then waits for them to end, up to the drain timeout.
    async fn drain(mut self) {
        tracing::info!(
            tunnels = self.tunnels.len(),
            "shutting down: draining tunnels"
        );
        for slot in self.tunnels.values_mut() {
            slot.phase = TunnelPhase::Draining;
            slot.control.cancel();
        }
        self.publish();
        // Each tunnel enforces the drain timeout itself; the margin covers the close.
        let limit = self.context.settings.drain_timeout + Duration::from_secs(1);
        let drained = tokio::time::timeout(limit, async {
            while let Some(joined) = self.tasks.join_next_with_id().await {
                self.on_end(joined);
                self.publish();
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                tunnels = self.tasks.len(),
                "tunnels still open after the drain; closing them"
            );
            self.tasks.shutdown().await;
        }
        self.tunnels.clear();
        self.publish();
        tracing::info!("all tunnels closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supervisor(replicas: &[&str]) -> Supervisor {
        let (events, _) = mpsc::unbounded_channel();
        let credentials = Credentials {
            chain: Vec::new(),
            key: rustls_pki_types::PrivateKeyDer::Pkcs8(Vec::new().into()),
        };
        let handler: Handler = Arc::new(|_| Box::pin(async { Response::new(body::empty()) }));
        let context = TunnelContext {
            settings: DialSettings::new(vec!["fleet:443".to_owned()], "fleet"),
            server_name: ServerName::try_from("fleet").unwrap_or_else(|e| panic!("{e}")),
            credentials: Arc::new(ArcSwap::from_pointee(credentials)),
            fleet_ca: Vec::new(),
            tls: Mutex::new(None),
            handler,
            connector_id: "infra/vm-1".to_owned(),
            config_version: watch::channel(String::new()).1,
            notices: watch::Sender::new(None),
            events,
        };
        let mut supervisor = Supervisor::new(
            Arc::new(context),
            watch::Sender::new(DialStatus::default()),
            tracing::Span::none(),
        );
        supervisor.replicas = replicas.iter().map(|r| (*r).to_owned()).collect();
        supervisor
    }

    /// Adds tunnels in `phase`, landed on `replica` (`None`: not known yet).
    fn add(supervisor: &mut Supervisor, count: usize, phase: TunnelPhase, replica: Option<&str>) {
        for _ in 0..count {
            let id = supervisor.next_id;
            supervisor.next_id += 1;
            supervisor.tunnels.insert(
                id,
                TunnelSlot {
                    address: "fleet:443".to_owned(),
                    phase,
                    replica: replica.map(str::to_owned),
                    healthy: replica.is_some(),
                    since: SystemTime::now(),
                    control: CancellationToken::new(),
                },
            );
        }
    }

    #[test]
    fn before_any_notice_it_dials_tunnels_per_replica() {
        let mut supervisor = supervisor(&[]);
        assert_eq!(
            supervisor.plan(),
            Plan {
                dials: 2,
                retire: None
            }
        );
        add(&mut supervisor, 1, TunnelPhase::Dialing, None);
        assert_eq!(
            supervisor.plan(),
            Plan {
                dials: 1,
                retire: None
            }
        );
        add(&mut supervisor, 1, TunnelPhase::Serving, None);
        assert_eq!(
            supervisor.plan(),
            Plan {
                dials: 0,
                retire: None
            }
        );
    }

    #[test]
    fn it_dials_for_missing_replicas_counting_pending_tunnels() {
        let mut supervisor = supervisor(&["a", "b", "c"]);
        add(&mut supervisor, 2, TunnelPhase::Serving, Some("a"));
        // b and c miss two each.
        assert_eq!(
            supervisor.plan(),
            Plan {
                dials: 4,
                retire: None
            }
        );
        // Tunnels whose notice has not come may land on b or c.
        add(&mut supervisor, 3, TunnelPhase::Dialing, None);
        assert_eq!(
            supervisor.plan(),
            Plan {
                dials: 1,
                retire: None
            }
        );
        // Draining tunnels count for nothing.
        add(&mut supervisor, 2, TunnelPhase::Retiring, Some("b"));
        assert_eq!(
            supervisor.plan(),
            Plan {
                dials: 1,
                retire: None
            }
        );
    }

    #[test]
    fn at_the_cap_it_retires_the_newest_tunnel_of_the_most_served_replica() {
        let mut supervisor = supervisor(&["a", "b"]);
        add(&mut supervisor, 7, TunnelPhase::Serving, Some("a"));
        add(&mut supervisor, 1, TunnelPhase::Serving, Some("b"));
        // 8 = 2 * 2 * 2 tunnels: the cap. b still misses one.
        assert_eq!(
            supervisor.plan(),
            Plan {
                dials: 0,
                retire: Some(7)
            }
        );
        supervisor.retire(7);
        assert_eq!(
            supervisor.plan(),
            Plan {
                dials: 1,
                retire: None
            }
        );
    }

    #[test]
    fn tunnels_to_a_replica_gone_from_the_notice_are_all_surplus() {
        let mut supervisor = supervisor(&["a", "b"]);
        add(&mut supervisor, 3, TunnelPhase::Serving, Some("a"));
        add(&mut supervisor, 3, TunnelPhase::Serving, Some("old"));
        add(&mut supervisor, 1, TunnelPhase::Serving, Some("b"));
        assert_eq!(
            supervisor.plan(),
            Plan {
                dials: 1,
                retire: None
            }
        );
        add(&mut supervisor, 1, TunnelPhase::Serving, Some("a"));
        // At the cap with b missing: a has 2 beyond its target, "old" (target 0) has 3.
        assert_eq!(
            supervisor.plan(),
            Plan {
                dials: 0,
                retire: Some(6)
            }
        );
    }

    #[test]
    fn backoff_is_jittered_under_a_doubling_ceiling() {
        let supervisor = supervisor(&[]);
        for attempt in 1..40 {
            let ceiling = Duration::from_millis(100)
                .saturating_mul(1 << (attempt - 1).min(20))
                .min(Duration::from_secs(10));
            assert!(supervisor.backoff(attempt) <= ceiling);
        }
    }
}
