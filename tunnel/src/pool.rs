//! The proxy side of the tunnel: the live tunnels of every connector group.
//!
//! A connector dials the fleet; once the caller (the proxy's tunnel listener) has
//! verified its TLS session and read its [`ConnectorIdentity`], it hands the stream to
//! [`TunnelPool::attach`]. The pool speaks HTTP/2 as the *client* on it, tells the
//! connector who this replica is ([`FleetNotice`]), and from then on routes requests of
//! the connector's group onto it with [`TunnelPool::send`].
//!
//! - **Balancing.** A request goes to the live tunnel of its group with the least load
//!   (ties rotate): its outstanding streams, where a bulk transfer weighs
//!   [`BULK_STREAM_WEIGHT`] streams. A stream stays outstanding until its response body
//!   has ended or been dropped. It becomes a bulk transfer once its response body has
//!   carried [`BULK_STREAM_BYTES`], or from the start when its request declares a body
//!   that long. A tunnel is one TCP connection, so a small answer queued behind megabytes
//!   of a download waits for them; steering new requests to the group's other tunnels
//!   keeps small requests fast while a transfer runs.
//! - **Isolation.** Tunnels are keyed by the group id of the verified identity and
//!   nothing else: a connector of group A never sees a request for group B.
//! - **Brief hold.** With no tunnel of the group up, a request waits up to
//!   [`PoolSettings::wait_for_tunnel`] for one (a connector redialling after a drop)
//!   and then fails with [`PoolError::NoTunnel`]; it never hangs.
//! - **Retry.** A request that hyper hands back unsent (its tunnel closed or received a
//!   GOAWAY just before) is retried on another tunnel of the group, and so is a request
//!   without a body whose stream crossed the connector's GOAWAY and was refused
//!   unprocessed: a connector's drain loses no such request. (hyper's dispatcher notices
//!   a GOAWAY only when the next request reaches it, and a stream it opened just before
//!   can reach the connector after the connector's final GOAWAY.)
//! - **Revocation.** [`TunnelPool::close_connector`] and [`TunnelPool::retain`] cut
//!   tunnels at once, in-flight streams included; [`TunnelPool::close_all`] stops
//!   routing and lets in-flight streams finish first.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::body::{self, TunnelBody};
use crate::identity::ConnectorIdentity;
use crate::wire::{FLEET_NOTICE_PATH, FleetNotice, NoticeReply};

/// The URI of the fleet notice request. The authority is a reserved `.invalid` name: the
/// connector answers the notice itself and never forwards it.
const NOTICE_URI: &str = "https://fleet.sallyport.invalid/.sallyport/v1/fleet-notice";

/// The largest [`NoticeReply`] the pool reads.
const NOTICE_REPLY_LIMIT: usize = 64 * 1024;

/// A stream whose response body has carried this many bytes (or whose request declares a
/// body this long) is a bulk transfer for [`TunnelPool::send`]'s balancing.
pub const BULK_STREAM_BYTES: u64 = 512 * 1024;

/// How many ordinary outstanding streams one bulk transfer weighs when a tunnel is
/// picked: a tunnel carrying a download gets new requests only when the group's other
/// tunnels are much busier.
pub const BULK_STREAM_WEIGHT: usize = 256;

/// How the pool waits for tunnels and speaks HTTP/2 on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    /// How long [`TunnelPool::send`] holds a request while its group has no tunnel up.
    pub wait_for_tunnel: Duration,
    /// How long a connector has to answer a [`FleetNotice`].
    pub notice_timeout: Duration,
    /// How long [`TunnelPool::close_all`] lets in-flight streams finish.
    pub drain_timeout: Duration,
    /// HTTP/2 initial window of each stream, in bytes.
    pub initial_stream_window: u32,
    /// HTTP/2 initial window of each tunnel connection, in bytes.
    pub initial_connection_window: u32,
    /// Largest HTTP/2 frame the pool accepts, in bytes.
    pub max_frame_size: u32,
    /// Interval of the HTTP/2 keep-alive pings, sent even on idle tunnels.
    pub keep_alive_interval: Duration,
    /// A tunnel whose ping is not answered within this time is closed.
    pub keep_alive_timeout: Duration,
    /// How many streams the pool itself reset (cancelled requests) each tunnel remembers.
    /// Frames that arrive for a forgotten stream are a protocol error, so this is raised
    /// well above h2's default for the mass cancellations users can cause.
    pub max_concurrent_reset_streams: usize,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            wait_for_tunnel: Duration::from_secs(2),
            notice_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            initial_stream_window: 8 << 20,
            initial_connection_window: 16 << 20,
            max_frame_size: crate::wire::MAX_FRAME_SIZE,
            keep_alive_interval: Duration::from_secs(20),
            keep_alive_timeout: Duration::from_secs(20),
            max_concurrent_reset_streams: 4096,
        }
    }
}

/// What went wrong with a tunnel or a request on one.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No tunnel of the group came up within [`PoolSettings::wait_for_tunnel`].
    #[error("no tunnel of connector group {group} is up")]
    NoTunnel {
        /// The group, `namespace/name`.
        group: String,
    },
    /// The pool is closed ([`TunnelPool::close_all`]): it takes no tunnels nor requests.
    #[error("the tunnel pool is closed")]
    Closed,
    /// The HTTP/2 handshake on a new tunnel failed.
    #[error("tunnel of connector {connector}: HTTP/2 handshake failed: {source}")]
    Handshake {
        /// The connector, `namespace/name`.
        connector: String,
        /// hyper's error.
        source: hyper::Error,
    },
    /// The connector did not acknowledge the fleet notice.
    #[error("tunnel of connector {connector}: fleet notice not acknowledged: {reason}")]
    Notice {
        /// The connector, `namespace/name`.
        connector: String,
        /// Why.
        reason: String,
    },
    /// The tunnel connection failed.
    #[error("tunnel of connector {connector} failed: {source}")]
    Connection {
        /// The connector, `namespace/name`.
        connector: String,
        /// hyper's error.
        source: hyper::Error,
    },
    /// A request failed on the tunnel it was sent on.
    #[error(
        "request for connector group {group} failed on the tunnel of connector {connector}: {source}"
    )]
    Request {
        /// The group, `namespace/name`.
        group: String,
        /// The connector whose tunnel carried the request.
        connector: String,
        /// hyper's error.
        source: hyper::Error,
    },
}

/// One live tunnel, as [`TunnelPool::snapshot`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelInfo {
    /// The pool's id of the tunnel, unique for the pool's life.
    pub id: u64,
    /// The connector at the other end.
    pub identity: ConnectorIdentity,
    /// The replica name the pool announced on this tunnel.
    pub replica: String,
    /// When the tunnel began to carry requests.
    pub since: SystemTime,
    /// Streams sent and not yet finished (response body not ended nor dropped).
    pub outstanding: usize,
    /// Of those, the bulk transfers ([`BULK_STREAM_BYTES`]).
    pub bulk: usize,
    /// The connector's software version, from its last [`NoticeReply`].
    pub connector_version: String,
    /// The configuration version the connector serves, from its last [`NoticeReply`].
    pub config_version: String,
}

/// The proxy's tunnels, by connector group. Cheap to clone: clones share the tunnels.
#[derive(Clone)]
pub struct TunnelPool {
    inner: Arc<PoolInner>,
}

impl std::fmt::Debug for TunnelPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelPool")
            .field("tunnels", &self.snapshot().len())
            .finish()
    }
}

struct PoolInner {
    settings: PoolSettings,
    state: Mutex<PoolState>,
    /// Bumped whenever a tunnel starts or stops carrying requests, and when the pool
    /// closes: requests waiting for a tunnel and [`TunnelPool::wait_for`] watch it.
    changes: watch::Sender<u64>,
    next_id: AtomicU64,
    /// Rotates where the search for the least loaded tunnel starts, so ties rotate.
    rotation: AtomicUsize,
}

#[derive(Default)]
struct PoolState {
    closed: bool,
    /// Every tunnel between its handshake and its end, routable or not yet.
    attached: HashMap<u64, Attached>,
    /// The tunnels that carry requests, by group id.
    routes: HashMap<String, Vec<Route>>,
}

struct Attached {
    identity: ConnectorIdentity,
    /// Cancelled to cut the tunnel at once.
    closer: CancellationToken,
}

#[derive(Clone)]
struct Route {
    id: u64,
    /// Shared, so that picking a route for a request copies no string.
    identity: Arc<ConnectorIdentity>,
    replica: String,
    since: SystemTime,
    load: Arc<TunnelLoad>,
    sender: SendRequest<TunnelBody>,
    reply: NoticeReply,
}

/// What a tunnel carries now, for balancing.
#[derive(Default)]
struct TunnelLoad {
    /// Streams sent and not yet finished.
    outstanding: AtomicUsize,
    /// Of those, bulk transfers.
    bulk: AtomicUsize,
}

impl TunnelLoad {
    /// The weight balancing compares.
    fn weight(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
            + self.bulk.load(Ordering::Relaxed) * BULK_STREAM_WEIGHT
    }
}

/// What sending one request needs of the route [`PoolInner::pick`] chose.
struct Picked {
    id: u64,
    identity: Arc<ConnectorIdentity>,
    sender: SendRequest<TunnelBody>,
}

impl Route {
    fn info(&self) -> TunnelInfo {
        TunnelInfo {
            id: self.id,
            identity: ConnectorIdentity::clone(&self.identity),
            replica: self.replica.clone(),
            since: self.since,
            outstanding: self.load.outstanding.load(Ordering::Relaxed),
            bulk: self.load.bulk.load(Ordering::Relaxed),
            connector_version: self.reply.version.clone(),
            config_version: self.reply.config_version.clone(),
        }
    }
}

impl TunnelPool {
    /// An empty pool.
    pub fn new(settings: PoolSettings) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                settings,
                state: Mutex::new(PoolState::default()),
                changes: watch::Sender::new(0),
                next_id: AtomicU64::new(1),
                rotation: AtomicUsize::new(0),
            }),
        }
    }

    /// The pool's settings.
    pub fn settings(&self) -> &PoolSettings {
        &self.inner.settings
    }

    /// Runs the tunnel of `identity` on `io`, a TLS stream the caller has verified, until
    /// the connection ends or the fleet closes it: HTTP/2 handshake (the pool is the
    /// client), `notice` sent and acknowledged, then requests of the connector's group.
    ///
    /// Returns `Ok` when the connector ended the tunnel gracefully or the pool closed it;
    /// dropping the future cuts the tunnel.
    pub async fn attach<IO>(
        &self,
        identity: ConnectorIdentity,
        io: IO,
        notice: FleetNotice,
    ) -> Result<(), PoolError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.attach_signalling(identity, io, notice, None).await
    }

    /// [`TunnelPool::attach`], sending on `routed` once the tunnel carries requests (its
    /// notice acknowledged). The channel is dropped unsent when the tunnel ends before.
    ///
    /// This is how a caller follows one tunnel: waiting on [`TunnelPool::wait_for`]
    /// instead would wake every opening tunnel at every change of the pool, which costs
    /// quadratic time when many connectors reconnect at once.
    pub async fn attach_signalling<IO>(
        &self,
        identity: ConnectorIdentity,
        io: IO,
        notice: FleetNotice,
        routed: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<(), PoolError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!(
            "tunnel",
            tunnel = id,
            connector = %identity.connector_id(),
            group = %identity.group_id(),
            replica = %notice.replica,
        );
        let attachment = self.inner.admit(id, &identity)?;
        self.run_tunnel(attachment, io, notice, routed)
            .instrument(span)
            .await
    }

    async fn run_tunnel<IO>(
        &self,
        attachment: Attachment,
        io: IO,
        notice: FleetNotice,
        routed: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<(), PoolError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let connector = attachment.identity.connector_id();
        let closer = attachment.closer.clone();
        let executor = TunnelExecutor::new(closer.clone());
        let handshake = self
            .client_builder(executor.clone())
            .handshake(TokioIo::new(io));
        let (sender, connection) = tokio::select! {
            handshake = handshake => handshake.map_err(|source| PoolError::Handshake {
                connector: connector.clone(),
                source,
            })?,
            () = closer.cancelled() => return Ok(()),
        };
        let ended = self
            .carry(&attachment, sender, connection, &notice, &connector, routed)
            .await?;
        let Some(ended) = ended else {
            tracing::info!("tunnel closed by the fleet");
            return Ok(());
        };
        // The connector sent GOAWAY or the pool let go of the tunnel: streams in flight
        // run to their end on hyper's connection task unless the fleet cuts the tunnel.
        tokio::select! {
            () = executor.idle() => {}
            () = closer.cancelled() => {}
        }
        match ended {
            Ok(()) => {
                tracing::info!("tunnel ended");
                Ok(())
            }
            Err(source) => {
                tracing::warn!(error = %source, "tunnel failed");
                Err(PoolError::Connection { connector, source })
            }
        }
    }

    /// Sends the notice, then routes requests onto the tunnel until its dispatcher ends
    /// (`Some`) or the fleet closes it (`None`).
    ///
    /// The dispatcher is dropped on return: requests queued on it after it stopped
    /// reading come back to [`TunnelPool::send`] unsent, which retries them elsewhere.
    async fn carry<C>(
        &self,
        attachment: &Attachment,
        sender: SendRequest<TunnelBody>,
        connection: C,
        notice: &FleetNotice,
        connector: &str,
        routed: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<Option<hyper::Result<()>>, PoolError>
    where
        C: Future<Output = hyper::Result<()>>,
    {
        // The dispatcher must be polled while the notice is on its way, and for as long
        // as the tunnel carries requests.
        let mut connection = pin!(connection);
        let timeout = self.inner.settings.notice_timeout;
        let notice_sent =
            tokio::time::timeout(timeout, deliver_notice(sender.clone(), notice, connector));
        let reply = tokio::select! {
            reply = notice_sent => reply.map_err(|_| PoolError::Notice {
                connector: connector.to_owned(),
                reason: format!("no answer within {timeout:?}"),
            })??,
            ended = &mut connection => {
                ended.map_err(|source| PoolError::Connection {
                    connector: connector.to_owned(),
                    source,
                })?;
                return Err(PoolError::Notice {
                    connector: connector.to_owned(),
                    reason: "the tunnel closed before the answer".to_owned(),
                });
            }
            () = attachment.closer.cancelled() => return Ok(None),
        };
        tracing::info!(
            connector_version = %reply.version,
            config_version = %reply.config_version,
            "tunnel up"
        );
        if !self.inner.route(attachment, sender, &notice.replica, reply) {
            return Ok(None);
        }
        if let Some(routed) = routed {
            // The receiver may be gone (its caller stopped waiting): nothing to tell.
            let _ = routed.send(());
        }
        let ended = tokio::select! {
            ended = &mut connection => Some(ended),
            () = attachment.closer.cancelled() => None,
        };
        // Whatever ended the tunnel, it takes no new requests from here on.
        self.inner.unroute(attachment.id);
        Ok(ended)
    }

    fn client_builder(&self, executor: TunnelExecutor) -> http2::Builder<TunnelExecutor> {
        let settings = &self.inner.settings;
        let mut builder = http2::Builder::new(executor);
        builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(settings.initial_stream_window)
            .initial_connection_window_size(settings.initial_connection_window)
            .max_frame_size(settings.max_frame_size)
            .adaptive_window(false)
            .keep_alive_interval(settings.keep_alive_interval)
            .keep_alive_timeout(settings.keep_alive_timeout)
            .keep_alive_while_idle(true)
            .max_concurrent_reset_streams(settings.max_concurrent_reset_streams);
        builder
    }

    /// Sends `request` on the least loaded tunnel of `group_id` and returns the response
    /// as soon as its head arrives; the body streams on.
    ///
    /// Waits up to [`PoolSettings::wait_for_tunnel`] while the group has no tunnel up,
    /// then fails with [`PoolError::NoTunnel`].
    pub async fn send(
        &self,
        group_id: &str,
        request: Request<TunnelBody>,
    ) -> Result<Response<ResponseBody>, PoolError> {
        let deadline = tokio::time::Instant::now() + self.inner.settings.wait_for_tunnel;
        // Subscribed before the first look, so a tunnel that comes up in between wakes us.
        let mut changes = self.inner.changes.subscribe();
        // A request without a body can be sent again when the connector refused its
        // stream unprocessed (it was opened as the connector's GOAWAY crossed it).
        let replay = request.body().is_end_stream().then(|| request.clone_head());
        let bulk_upload = request
            .body()
            .size_hint()
            .exact()
            .is_some_and(|length| length >= BULK_STREAM_BYTES);
        let mut request = request;
        loop {
            let Some((route, stream)) = self.inner.pick(group_id, bulk_upload)? else {
                if tokio::time::timeout_at(deadline, changes.changed())
                    .await
                    .is_err()
                {
                    return Err(PoolError::NoTunnel {
                        group: group_id.to_owned(),
                    });
                }
                continue;
            };
            let mut sender = route.sender;
            let upgrade = request.method() == Method::CONNECT;
            match sender.try_send_request(request).await {
                Ok(response) => {
                    return Ok(response.map(|body| ResponseBody::new(body, stream, upgrade)));
                }
                Err(mut error) => match error.take_message() {
                    Some(unsent) => {
                        tracing::debug!(
                            tunnel = route.id,
                            connector = %route.identity.connector_id(),
                            group = group_id,
                            "tunnel closed before the request was sent; trying another"
                        );
                        self.inner.unroute(route.id);
                        request = unsent;
                    }
                    None => {
                        let error = error.into_error();
                        if let Some(head) = replay.as_ref().filter(|_| never_processed(&error)) {
                            tracing::debug!(
                                tunnel = route.id,
                                connector = %route.identity.connector_id(),
                                group = group_id,
                                %error,
                                "the connector refused the stream unprocessed; trying another tunnel"
                            );
                            self.inner.unroute(route.id);
                            request = head.clone().map(|()| body::empty());
                            continue;
                        }
                        return Err(PoolError::Request {
                            group: group_id.to_owned(),
                            connector: route.identity.connector_id(),
                            source: error,
                        });
                    }
                },
            }
        }
    }

    /// Cuts every tunnel of the connector `connector_id` (`namespace/name`) now, in-flight
    /// streams included (revocation). Returns how many tunnels were cut.
    pub fn close_connector(&self, connector_id: &str) -> usize {
        self.retain(|identity| identity.connector_id() != connector_id)
    }

    /// Cuts the tunnel `id` (see [`TunnelInfo::id`]) now. Returns whether it existed.
    pub fn close_tunnel(&self, id: u64) -> bool {
        self.close_where(|tunnel, _| tunnel == id) == 1
    }

    /// Cuts every tunnel whose connector `keep` refuses, now. Returns how many.
    pub fn retain(&self, keep: impl Fn(&ConnectorIdentity) -> bool) -> usize {
        self.close_where(|_, identity| !keep(identity))
    }

    fn close_where(&self, doomed: impl Fn(u64, &ConnectorIdentity) -> bool) -> usize {
        let closed = {
            let mut state = self.inner.state();
            let doomed: Vec<u64> = state
                .attached
                .iter()
                .filter(|(id, attached)| doomed(**id, &attached.identity))
                .map(|(id, _)| *id)
                .collect();
            for id in &doomed {
                if let Some(attached) = state.attached.get(id) {
                    attached.closer.cancel();
                    tracing::info!(
                        tunnel = id,
                        connector = %attached.identity.connector_id(),
                        group = %attached.identity.group_id(),
                        "closing tunnel"
                    );
                }
                state.remove_route(*id);
            }
            doomed.len()
        };
        if closed > 0 {
            self.inner.bump();
        }
        closed
    }

    /// Sends the notice `notice_for` makes for each routable tunnel (e.g. after a
    /// configuration change), all at once. Failures are logged, not fatal. Returns how
    /// many connectors acknowledged.
    pub async fn notify_all(
        &self,
        notice_for: impl Fn(&ConnectorIdentity) -> FleetNotice,
    ) -> usize {
        let routes: Vec<Route> = self
            .inner
            .state()
            .routes
            .values()
            .flatten()
            .cloned()
            .collect();
        let timeout = self.inner.settings.notice_timeout;
        let deliveries = routes.into_iter().map(|route| {
            let notice = notice_for(&route.identity);
            async move {
                let connector = route.identity.connector_id();
                let delivered = tokio::time::timeout(
                    timeout,
                    deliver_notice(route.sender.clone(), &notice, &connector),
                )
                .await;
                match delivered {
                    Ok(Ok(reply)) => {
                        self.inner.record_reply(route.id, &notice.replica, reply);
                        true
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(tunnel = route.id, %connector, %error, "fleet notice failed");
                        false
                    }
                    Err(_) => {
                        tracing::warn!(tunnel = route.id, %connector, ?timeout, "fleet notice unanswered");
                        false
                    }
                }
            }
        });
        futures::future::join_all(deliveries)
            .await
            .into_iter()
            .filter(|delivered| *delivered)
            .count()
    }

    /// Every routable tunnel.
    pub fn snapshot(&self) -> Vec<TunnelInfo> {
        let mut tunnels: Vec<TunnelInfo> = self
            .inner
            .state()
            .routes
            .values()
            .flatten()
            .map(Route::info)
            .collect();
        tunnels.sort_by_key(|tunnel| tunnel.id);
        tunnels
    }

    /// How many routable tunnels each group has (groups with none are absent).
    pub fn live_groups(&self) -> BTreeMap<String, usize> {
        self.inner
            .state()
            .routes
            .iter()
            .map(|(group, routes)| (group.clone(), routes.len()))
            .collect()
    }

    /// How many routable tunnels the group `group_id` has.
    pub fn tunnel_count(&self, group_id: &str) -> usize {
        self.inner.state().routes.get(group_id).map_or(0, Vec::len)
    }

    /// Waits until `condition` holds for the routable tunnels; it is checked now and
    /// whenever a tunnel starts or stops carrying requests. Bound it with a timeout.
    pub async fn wait_for(&self, mut condition: impl FnMut(&[TunnelInfo]) -> bool) {
        let mut changes = self.inner.changes.subscribe();
        while !condition(&self.snapshot()) {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Closes the pool (proxy shutdown): no new tunnels nor requests, every tunnel stops
    /// taking requests, and streams in flight get up to [`PoolSettings::drain_timeout`] to
    /// finish before the remaining tunnels are cut. Returns once every tunnel has ended.
    pub async fn close_all(&self) {
        {
            let mut state = self.inner.state();
            state.closed = true;
            // Dropping the routes drops the pool's handles on each connection: hyper then
            // closes it once its streams are done.
            state.routes.clear();
        }
        self.inner.bump();
        let drained =
            tokio::time::timeout(self.inner.settings.drain_timeout, self.inner.detached()).await;
        if drained.is_err() {
            let cut = self.retain(|_| false);
            tracing::warn!(
                tunnels = cut,
                drain_timeout = ?self.inner.settings.drain_timeout,
                "tunnels still busy at the end of the drain; cut"
            );
            self.inner.detached().await;
        }
    }
}

impl PoolInner {
    fn state(&self) -> MutexGuard<'_, PoolState> {
        // The state stays consistent under every early exit: a panic elsewhere must not
        // take routing down with it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changes.send_modify(|generation| *generation += 1);
    }

    /// Records a new tunnel; the returned guard removes it when the tunnel ends.
    fn admit(
        self: &Arc<Self>,
        id: u64,
        identity: &ConnectorIdentity,
    ) -> Result<Attachment, PoolError> {
        let closer = CancellationToken::new();
        let mut state = self.state();
        if state.closed {
            return Err(PoolError::Closed);
        }
        state.attached.insert(
            id,
            Attached {
                identity: identity.clone(),
                closer: closer.clone(),
            },
        );
        Ok(Attachment {
            pool: self.clone(),
            id,
            identity: identity.clone(),
            closer,
        })
    }

    /// Makes an acknowledged tunnel carry requests of its group; `false` when the tunnel
    /// was cut or the pool closed while its notice was on the way.
    fn route(
        &self,
        attachment: &Attachment,
        sender: SendRequest<TunnelBody>,
        replica: &str,
        reply: NoticeReply,
    ) -> bool {
        {
            let mut state = self.state();
            // A tunnel cut while its notice was on the way must not come back.
            if state.closed || attachment.closer.is_cancelled() {
                return false;
            }
            state
                .routes
                .entry(attachment.identity.group_id())
                .or_default()
                .push(Route {
                    id: attachment.id,
                    identity: Arc::new(attachment.identity.clone()),
                    replica: replica.to_owned(),
                    since: SystemTime::now(),
                    load: Arc::default(),
                    sender,
                    reply,
                });
        }
        self.bump();
        true
    }

    fn unroute(&self, id: u64) {
        let removed = self.state().remove_route(id);
        if removed {
            self.bump();
        }
    }

    fn record_reply(&self, id: u64, replica: &str, reply: NoticeReply) {
        let mut state = self.state();
        if let Some(route) = state
            .routes
            .values_mut()
            .flatten()
            .find(|route| route.id == id)
        {
            route.replica = replica.to_owned();
            route.reply = reply;
        }
    }

    /// The open tunnel of `group_id` with the least load ([`TunnelLoad::weight`]), counted
    /// as one more outstanding stream (a bulk one when `bulk`) until the returned guard
    /// goes.
    fn pick(
        &self,
        group_id: &str,
        bulk: bool,
    ) -> Result<Option<(Picked, OutstandingStream)>, PoolError> {
        let state = self.state();
        if state.closed {
            return Err(PoolError::Closed);
        }
        let Some(routes) = state.routes.get(group_id) else {
            return Ok(None);
        };
        let start = self.rotation.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(&Route, usize)> = None;
        for offset in 0..routes.len() {
            let route = &routes[(start + offset) % routes.len()];
            if route.sender.is_closed() {
                continue;
            }
            let load = route.load.weight();
            if best.is_none_or(|(_, least)| load < least) {
                best = Some((route, load));
            }
        }
        // Counted under the lock, so that concurrent requests see each other.
        Ok(best.map(|(route, _)| {
            (
                Picked {
                    id: route.id,
                    identity: route.identity.clone(),
                    sender: route.sender.clone(),
                },
                OutstandingStream::new(route.load.clone(), bulk),
            )
        }))
    }

    /// Waits until no tunnel is attached.
    async fn detached(&self) {
        let mut changes = self.changes.subscribe();
        while !self.state().attached.is_empty() {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}

impl PoolState {
    fn remove_route(&mut self, id: u64) -> bool {
        let mut removed = false;
        self.routes.retain(|_, routes| {
            let before = routes.len();
            routes.retain(|route| route.id != id);
            removed |= routes.len() != before;
            !routes.is_empty()
        });
        removed
    }
}

/// A tunnel between its admission and its end: dropping it (the tunnel ended, or its
/// `attach` future was dropped) forgets the tunnel and cuts whatever is left of it.
struct Attachment {
    pool: Arc<PoolInner>,
    id: u64,
    identity: ConnectorIdentity,
    closer: CancellationToken,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.closer.cancel();
        {
            let mut state = self.pool.state();
            state.attached.remove(&self.id);
            state.remove_route(self.id);
        }
        self.pool.bump();
    }
}

/// Whether `error` says the connector never processed the stream, so that sending the
/// request again cannot repeat its effect: the stream lay beyond the last one the
/// connector's GOAWAY accepted, or the connector refused it (RFC 9113, 8.7).
fn never_processed(error: &hyper::Error) -> bool {
    let Some(h2) = std::error::Error::source(error).and_then(|s| s.downcast_ref::<h2::Error>())
    else {
        return false;
    };
    h2.is_remote() && (h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM))
}

/// The head of a request without its body, to send it again.
trait CloneHead {
    fn clone_head(&self) -> Request<()>;
}

impl<B> CloneHead for Request<B> {
    fn clone_head(&self) -> Request<()> {
        let mut head = Request::new(());
        *head.method_mut() = self.method().clone();
        *head.uri_mut() = self.uri().clone();
        *head.version_mut() = self.version();
        *head.headers_mut() = self.headers().clone();
        *head.extensions_mut() = self.extensions().clone();
        head
    }
}

/// Sends `notice` on a tunnel and reads the connector's acknowledgement.
async fn deliver_notice(
    mut sender: SendRequest<TunnelBody>,
    notice: &FleetNotice,
    connector: &str,
) -> Result<NoticeReply, PoolError> {
    let refused = |reason: String| PoolError::Notice {
        connector: connector.to_owned(),
        reason,
    };
    debug_assert!(NOTICE_URI.ends_with(FLEET_NOTICE_PATH));
    let json = serde_json::to_vec(notice).map_err(|e| refused(e.to_string()))?;
    let request = Request::post(NOTICE_URI)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body::full(json))
        .map_err(|e| refused(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| refused(e.to_string()))?;
    if response.status() != StatusCode::OK {
        return Err(refused(format!("answered {}", response.status())));
    }
    let bytes = Limited::new(response.into_body(), NOTICE_REPLY_LIMIT)
        .collect()
        .await
        .map_err(|e| refused(format!("reading the answer: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| refused(format!("the answer is not a NoticeReply: {e}")))
}

/// One stream counted as outstanding on its tunnel until finished or dropped, and as a
/// bulk transfer once it is one.
struct OutstandingStream {
    load: Option<Arc<TunnelLoad>>,
    bulk: bool,
}

impl OutstandingStream {
    fn new(load: Arc<TunnelLoad>, bulk: bool) -> Self {
        load.outstanding.fetch_add(1, Ordering::Relaxed);
        if bulk {
            load.bulk.fetch_add(1, Ordering::Relaxed);
        }
        Self {
            load: Some(load),
            bulk,
        }
    }

    /// Counts the stream as a bulk transfer from now on (once).
    fn mark_bulk(&mut self) {
        if let Some(load) = &self.load
            && !self.bulk
        {
            load.bulk.fetch_add(1, Ordering::Relaxed);
            self.bulk = true;
        }
    }

    fn finish(&mut self) {
        if let Some(load) = self.load.take() {
            load.outstanding.fetch_sub(1, Ordering::Relaxed);
            if self.bulk {
                load.bulk.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for OutstandingStream {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The body of a tunneled response: hyper's body, counting as an outstanding stream of
/// its tunnel until it has ended, failed, or been dropped, and as a bulk transfer once it
/// has carried [`BULK_STREAM_BYTES`].
///
/// For a CONNECT (WebSocket) the stream counts until the body is dropped, even though it
/// carries nothing: keep it next to the upgraded connection while that runs.
pub struct ResponseBody {
    inner: Incoming,
    stream: OutstandingStream,
    /// Data bytes received so far, counted until the stream becomes a bulk transfer.
    received: u64,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("finished", &self.stream.load.is_none())
            .field("bulk", &self.stream.bulk)
            .finish()
    }
}

impl ResponseBody {
    /// `upgrade`: the answer to an (extended) CONNECT, whose bytes flow through
    /// `hyper::upgrade::on` rather than the body: the stream stays counted for as long
    /// as the body is kept, so the caller keeps it while the upgraded stream runs.
    fn new(inner: Incoming, stream: OutstandingStream, upgrade: bool) -> Self {
        let mut body = Self {
            inner,
            stream,
            received: 0,
        };
        // A body that is over before it starts (HEAD, 204, 304) may never be polled.
        if !upgrade && body.inner.is_end_stream() {
            body.stream.finish();
        }
        body
    }

    /// This body as a [`TunnelBody`], e.g. to hand on to the user's connection.
    pub fn into_tunnel_body(self) -> TunnelBody {
        self.map_err(body::BoxError::from).boxed_unsync()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if !this.stream.bulk
            && let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.received += data.len() as u64;
            if this.received >= BULK_STREAM_BYTES {
                this.stream.mark_bulk();
            }
        }
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) || this.inner.is_end_stream() {
            this.stream.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The executor of one tunnel's HTTP/2 tasks (hyper's connection task, request bodies,
/// streams): tokio's, except that cancelling the tunnel's token drops them all, which
/// closes the socket at once, and that [`TunnelExecutor::idle`] tells when none is left.
#[derive(Clone)]
pub(crate) struct TunnelExecutor {
    closer: CancellationToken,
    tasks: Arc<TaskCount>,
}

/// How many tasks of a [`TunnelExecutor`] run, and a wake-up when none is left. An
/// atomic count rather than a `watch` channel: tasks start and end with every stream,
/// and only the fall to zero interests anyone, so the count alone is paid per task.
#[derive(Default)]
struct TaskCount {
    running: AtomicUsize,
    none_left: tokio::sync::Notify,
}

impl TunnelExecutor {
    /// An executor whose tasks end when `closer` is cancelled.
    pub(crate) fn new(closer: CancellationToken) -> Self {
        Self {
            closer,
            tasks: Arc::new(TaskCount::default()),
        }
    }

    /// Waits until none of the tasks spawned here is running.
    pub(crate) async fn idle(&self) {
        loop {
            // Registered before the look, so that a fall to zero in between wakes us.
            let mut none_left = pin!(self.tasks.none_left.notified());
            none_left.as_mut().enable();
            if self.tasks.running.load(Ordering::Acquire) == 0 {
                return;
            }
            none_left.await;
        }
    }
}

impl<F> hyper::rt::Executor<F> for TunnelExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        let closer = self.closer.clone();
        self.tasks.running.fetch_add(1, Ordering::AcqRel);
        let running = RunningTask(Arc::clone(&self.tasks));
        let task = async move {
            let _running = running;
            tokio::select! {
                () = future => {}
                () = closer.cancelled() => {}
            }
        };
        tokio::spawn(task);
    }
}

/// Counts one task of a [`TunnelExecutor`] as running until dropped.
struct RunningTask(Arc<TaskCount>);

impl Drop for RunningTask {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none_left.notify_waiters();
        }
    }
}
