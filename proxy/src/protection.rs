//! Abuse limits: the "protect" phase of the request path, in front of routing, sign-in
//! and the tunnel.
//!
//! Per connection, before anything is parsed:
//! - **Connections per client** ([`ConnectionLimiter`]): a peer address holding
//!   `--max-connections-per-client` open connections has its next one closed right
//!   after `accept`, before the TLS handshake. Trusted proxies (load balancers) are
//!   exempt, and a connection that turns out to be a connector's tunnel stops counting.
//! - **Timeouts**: the TLS handshake (`--handshake-timeout`), HTTP/1.1 request headers
//!   (`--header-read-timeout`, hyper's timer, which also runs while an HTTP/1.1
//!   connection waits for its next request), and connections with no request in flight
//!   (`--idle-timeout`, [`Activity`]), closed gracefully (GOAWAY on HTTP/2).
//! - **Sizes**: request headers (`--max-request-header-size`: hyper's HTTP/1.1 read
//!   buffer, answered 431, and HTTP/2's `SETTINGS_MAX_HEADER_LIST_SIZE`), and HTTP/2
//!   streams and resets (`--http2-max-concurrent-streams`, rapid-reset limits).
//!
//! Per user request (tunnels and the fleet API are never counted):
//! - **Rate per client** ([`ClientRateLimiter`]): `--client-requests-per-second` with
//!   bursts of `--client-burst`, per client address across every app, on this replica;
//!   over it, 429 with `Retry-After`.
//! - **Requests in flight** ([`Protection::admit`]): at most `--max-requests-in-flight`
//!   user requests (until their response body ends) on this replica; over it, 503 with
//!   `Retry-After` at once rather than a queue without bound.
//! - **Per app** (after routing): `spec.rateLimit` and `spec.rateLimit.perClientIp`,
//!   fleet-wide with a limits store (`--limits-store`, by default the risk store's
//!   Redis), else per replica ([`crate::rate_limit`]), and the request body size (`spec.limits.maxRequestBodyBytes`, else
//!   `--max-request-body-size`): a larger `Content-Length` is answered 413 before
//!   anything is sent; a body without one is cut at the limit ([`LimitedBody`]) and the
//!   request answered 413.
//!
//! A client is its address as [`crate::forward::TrustedProxies`] works it out (the peer,
//! or the `X-Forwarded-For` entry a trusted proxy vouches for); IPv6 clients are counted
//! by their /64 network ([`client_key`]), since one host commonly holds a whole /64.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http_body::{Body, Frame, SizeHint};
use sallyport_api::published_app::ClientRateLimit;
use sallyport_tunnel::body::{BoxError, TunnelBody};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

use crate::rate_limit::Limited;
use crate::rate_limit::shared::SharedLimits;

/// How often (in checks) a keyed limiter forgets the clients whose bucket is full again,
/// so that its memory follows the clients of the last moments, not every client ever.
pub const SWEEP_EVERY: u64 = 4096;

/// `Retry-After` of a 503 for a replica at its cap of requests in flight, in seconds.
pub const OVERLOADED_RETRY_AFTER_SECS: u32 = 1;

/// The smallest `--max-request-header-size` (hyper's smallest HTTP/1.1 read buffer).
pub const MIN_HEADER_SIZE: u64 = 8 * 1024;

/// The largest `--max-request-header-size`.
pub const MAX_HEADER_SIZE: u64 = 16 * 1024 * 1024;

/// Flags of the abuse limits (part of `sallyport-proxy run`).
#[derive(Debug, Clone, Args)]
pub struct ProtectionArgs {
    /// Requests per second one client address may send on this replica, across every
    /// app (IPv6: per /64). Over it: 429 with Retry-After. 0 turns the limit off.
    #[arg(
        long,
        env = "SALLYPORT_CLIENT_REQUESTS_PER_SECOND",
        default_value_t = 100
    )]
    pub client_requests_per_second: u32,

    /// Requests one client address may send in a burst above --client-requests-per-second
    /// (at least that rate).
    #[arg(long, env = "SALLYPORT_CLIENT_BURST", default_value_t = 200)]
    pub client_burst: u32,

    /// User requests in flight on this replica (until their response body ends); one
    /// more is answered 503 with Retry-After at once. Tunnels and the fleet API do not
    /// count. 0 turns the cap off.
    #[arg(
        long,
        env = "SALLYPORT_MAX_REQUESTS_IN_FLIGHT",
        default_value_t = 10_000
    )]
    pub max_requests_in_flight: usize,

    /// Open connections per peer address (IPv6: per /64) on this replica; more are
    /// closed before the TLS handshake. Trusted proxies are exempt. 0 turns the cap off.
    #[arg(
        long,
        env = "SALLYPORT_MAX_CONNECTIONS_PER_CLIENT",
        default_value_t = 256
    )]
    pub max_connections_per_client: usize,

    /// How long a client has to complete the TLS handshake.
    #[arg(long, env = "SALLYPORT_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = sallyport_service::parse_duration)]
    pub handshake_timeout: Duration,

    /// How long an HTTP/1.1 client has to send a request's headers, counted from when
    /// the connection waits for a request (so it also closes HTTP/1.1 connections idle
    /// that long).
    #[arg(long, env = "SALLYPORT_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = sallyport_service::parse_duration)]
    pub header_read_timeout: Duration,

    /// How long a user or fleet API connection may stay open with no request in flight
    /// before the proxy closes it (HTTP/2: GOAWAY).
    #[arg(long, env = "SALLYPORT_IDLE_TIMEOUT", default_value = "90s", value_parser = sallyport_service::parse_duration)]
    pub idle_timeout: Duration,

    /// The largest request head: HTTP/1.1 request line and headers (over it: 431), or
    /// an HTTP/2 header list. Bytes, or with a suffix K, Ki, M, Mi (8Ki to 16Mi).
    #[arg(long, env = "SALLYPORT_MAX_REQUEST_HEADER_SIZE", default_value = "64Ki", value_parser = parse_header_size)]
    pub max_request_header_size: u64,

    /// The largest request body of apps without `spec.limits.maxRequestBodyBytes`; a
    /// larger one is answered 413. Bytes, or with a suffix K, Ki, M, Mi, G, Gi, T, Ti;
    /// 0 for no limit.
    #[arg(long, env = "SALLYPORT_MAX_REQUEST_BODY_SIZE", default_value = "1Gi", value_parser = parse_size)]
    pub max_request_body_size: u64,

    /// Where apps' rate limits (`spec.rateLimit`, with `perClientIp`) are counted for the
    /// whole fleet: a Redis URL (`redis://[:password@]host:port[/db]`, `rediss://` for
    /// TLS). Unset: the risk store's (--risk-store), if any. `none`, or neither set:
    /// each replica enforces its share of each app's limit. While the store is
    /// unreachable, replicas fall back to their share.
    #[arg(long, env = "SALLYPORT_LIMITS_STORE", value_name = "URL")]
    pub limits_store: Option<String>,

    /// The prefix of the limits store's Redis keys (fleets sharing a Redis need
    /// different ones).
    #[arg(
        long,
        env = "SALLYPORT_LIMITS_STORE_PREFIX",
        default_value = "sallyport:limits"
    )]
    pub limits_store_prefix: String,

    /// HTTP/2: streams a user connection may have open at once.
    #[arg(
        long,
        env = "SALLYPORT_HTTP2_MAX_CONCURRENT_STREAMS",
        default_value_t = 250,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub http2_max_concurrent_streams: u32,

    /// HTTP/2 rapid reset (CVE-2023-44487): streams a client opened and reset before
    /// they were served that a connection tolerates; beyond it, GOAWAY.
    #[arg(
        long,
        env = "SALLYPORT_HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS",
        default_value_t = 256
    )]
    pub http2_max_pending_accept_reset_streams: usize,

    /// HTTP/2: streams the proxy may reset because of the client's errors on one
    /// connection before it sends GOAWAY (CVE-2024-27316, "MadeYouReset").
    #[arg(
        long,
        env = "SALLYPORT_HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS",
        default_value_t = 1024
    )]
    pub http2_max_local_error_reset_streams: usize,
}

/// Where apps' rate limits are counted fleet-wide ([`crate::rate_limit::shared`]).
#[derive(Clone, PartialEq, Eq)]
pub struct LimitsStore {
    /// The Redis URL.
    pub url: String,
    /// The prefix of the keys.
    pub prefix: String,
}

impl std::fmt::Debug for LimitsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitsStore")
            .field("url", &crate::rate_limit::shared::redacted(&self.url))
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// The flags of the abuse limits do not fit together.
#[derive(Debug, thiserror::Error)]
pub enum ProtectionError {
    /// `--client-burst` is smaller than `--client-requests-per-second`.
    #[error(
        "--client-burst {burst} is smaller than --client-requests-per-second {rate}: a burst must hold at least a second's requests"
    )]
    BurstBelowRate {
        /// The rate.
        rate: u32,
        /// The burst.
        burst: u32,
    },
    /// `--limits-store` is not a Redis URL.
    #[error(transparent)]
    LimitsStore(#[from] crate::rate_limit::shared::SharedLimitsError),
}

impl ProtectionArgs {
    /// The settings these flags ask for, without a limits store unless
    /// `--limits-store` names one.
    pub fn settings(&self) -> Result<ProtectionSettings, ProtectionError> {
        self.settings_with_store(None)
    }

    /// The settings these flags ask for; the limits store is `--limits-store`, else
    /// `risk_store` (the risk store's URL), unless `--limits-store none`.
    pub fn settings_with_store(
        &self,
        risk_store: Option<&str>,
    ) -> Result<ProtectionSettings, ProtectionError> {
        let limits_store = match self.limits_store.as_deref().or(risk_store) {
            None | Some("none" | "") => None,
            Some(url) => {
                crate::rate_limit::shared::SharedLimits::new(url, &self.limits_store_prefix)?;
                Some(LimitsStore {
                    url: url.to_owned(),
                    prefix: self.limits_store_prefix.clone(),
                })
            }
        };
        let client_rate = match self.client_requests_per_second {
            0 => None,
            rate if self.client_burst < rate => {
                return Err(ProtectionError::BurstBelowRate {
                    rate,
                    burst: self.client_burst,
                });
            }
            rate => Some(ClientRateLimit {
                requests_per_second: rate,
                burst: self.client_burst,
            }),
        };
        Ok(ProtectionSettings {
            limits_store,
            client_rate,
            max_requests_in_flight: self.max_requests_in_flight,
            max_connections_per_client: self.max_connections_per_client,
            handshake_timeout: self.handshake_timeout,
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            max_request_header_bytes: u32::try_from(self.max_request_header_size)
                .unwrap_or(u32::MAX),
            max_request_body_bytes: self.max_request_body_size,
            http2: Http2Limits {
                max_concurrent_streams: self.http2_max_concurrent_streams,
                max_pending_accept_reset_streams: self.http2_max_pending_accept_reset_streams,
                max_local_error_reset_streams: self.http2_max_local_error_reset_streams,
            },
        })
    }
}

/// The abuse limits of a proxy replica ([`ProtectionArgs`]); the default is the flags'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectionSettings {
    /// Where apps' rate limits are counted fleet-wide; `None`: each replica its share.
    pub limits_store: Option<LimitsStore>,
    /// Requests per client address across every app; `None`: no limit.
    pub client_rate: Option<ClientRateLimit>,
    /// User requests in flight; 0: no cap.
    pub max_requests_in_flight: usize,
    /// Open connections per peer address; 0: no cap.
    pub max_connections_per_client: usize,
    /// Time to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time to send HTTP/1.1 request headers.
    pub header_read_timeout: Duration,
    /// Time a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// The largest request head in bytes (at least [`MIN_HEADER_SIZE`]).
    pub max_request_header_bytes: u32,
    /// The largest request body of apps without their own limit; 0: no limit.
    pub max_request_body_bytes: u64,
    /// HTTP/2 limits of user and fleet API connections.
    pub http2: Http2Limits,
}

impl Default for ProtectionSettings {
    fn default() -> Self {
        Self {
            limits_store: None,
            client_rate: Some(ClientRateLimit {
                requests_per_second: 100,
                burst: 200,
            }),
            max_requests_in_flight: 10_000,
            max_connections_per_client: 256,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            max_request_header_bytes: 64 * 1024,
            max_request_body_bytes: 1 << 30,
            http2: Http2Limits::default(),
        }
    }
}

impl ProtectionSettings {
    /// No limit on requests: no rate per client, no cap on requests in flight or
    /// connections per client (sizes and timeouts stay), for tests and benchmarks that
    /// load a proxy from one address.
    pub fn without_request_limits() -> Self {
        Self {
            client_rate: None,
            max_requests_in_flight: 0,
            max_connections_per_client: 0,
            ..Self::default()
        }
    }

    /// The header size as hyper's HTTP/1.1 read buffer takes it (never under its
    /// minimum, which would panic).
    pub fn http1_max_buf_size(&self) -> usize {
        usize::try_from(self.max_request_header_bytes)
            .unwrap_or(usize::MAX)
            .max(MIN_HEADER_SIZE as usize)
    }
}

/// HTTP/2 limits of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Limits {
    /// Streams open at once.
    pub max_concurrent_streams: u32,
    /// Streams opened and reset by the client before being served (rapid reset).
    pub max_pending_accept_reset_streams: usize,
    /// Streams reset by the proxy for the client's errors before GOAWAY.
    pub max_local_error_reset_streams: usize,
}

impl Default for Http2Limits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 250,
            max_pending_accept_reset_streams: 256,
            max_local_error_reset_streams: 1024,
        }
    }
}

/// `text` as a byte size: digits, optionally followed by `K`, `M`, `G`, `T` (powers of
/// 1000) or `Ki`, `Mi`, `Gi`, `Ti` (powers of 1024), as Kubernetes quantities write them.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, suffix) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size: expected bytes such as 1048576 or 1Mi"))?;
    let unit: u64 = match suffix {
        "" => 1,
        "K" | "k" => 1000,
        "M" => 1000_u64.pow(2),
        "G" => 1000_u64.pow(3),
        "T" => 1000_u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        other => {
            return Err(format!(
                "{text:?}: unknown size suffix {other:?} (use K, M, G, T, Ki, Mi, Gi or Ti)"
            ));
        }
    };
    number
        .checked_mul(unit)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// A size within [`MIN_HEADER_SIZE`] and [`MAX_HEADER_SIZE`].
fn parse_header_size(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    if !(MIN_HEADER_SIZE..=MAX_HEADER_SIZE).contains(&size) {
        return Err(format!(
            "{text:?}: a request head limit must be between 8Ki and 16Mi"
        ));
    }
    Ok(size)
}

/// What a client is counted as: its IPv4 address (an IPv4-mapped IPv6 address counts as
/// the IPv4 one), or the /64 network of its IPv6 address.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let network = u128::from(v6) & !(u128::from(u64::MAX));
                IpAddr::V6(Ipv6Addr::from(network))
            }
        },
    }
}

/// A token bucket per client ([`client_key`]), forgetting clients whose bucket is full
/// again every [`SWEEP_EVERY`] checks so that memory stays bounded.
#[derive(Debug)]
pub struct ClientRateLimiter {
    limit: ClientRateLimit,
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    checks: AtomicU64,
}

impl ClientRateLimiter {
    /// Buckets of `limit` (a rate or burst of 0 counts as 1).
    pub fn new(limit: &ClientRateLimit) -> Self {
        let rate = NonZeroU32::new(limit.requests_per_second).unwrap_or(NonZeroU32::MIN);
        let burst =
            NonZeroU32::new(limit.burst.max(limit.requests_per_second)).unwrap_or(NonZeroU32::MIN);
        Self {
            limit: limit.clone(),
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            checks: AtomicU64::new(0),
        }
    }

    /// Whether these buckets enforce `limit`, so they can be kept across configurations.
    pub fn enforces(&self, limit: &ClientRateLimit) -> bool {
        &self.limit == limit
    }

    /// Takes one request from `client`'s bucket; when it is empty, how long until one
    /// fits.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep();
        }
        self.limiter
            .check_key(&client_key(client))
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Forgets the clients whose bucket is full again (they would get a fresh one).
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// How many clients the limiter remembers.
    pub fn clients(&self) -> usize {
        self.limiter.len()
    }
}

/// Open connections per peer ([`client_key`]), capped.
#[derive(Debug)]
pub struct ConnectionLimiter {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; dropping it (the connection closed or became a tunnel)
/// frees its place.
#[derive(Debug)]
pub struct ConnectionSlot {
    limiter: Arc<ConnectionLimiter>,
    key: IpAddr,
}

impl ConnectionLimiter {
    /// At most `max` connections per peer; 0: no cap (nothing is counted).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more connection from `peer`; `None` when it holds `max` already.
    /// Without a cap, an uncounted place.
    pub fn open(self: &Arc<Self>, peer: IpAddr) -> Option<Option<ConnectionSlot>> {
        if self.max == 0 {
            return Some(None);
        }
        let key = client_key(peer);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(key).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Some(ConnectionSlot {
            limiter: Arc::clone(self),
            key,
        }))
    }

    /// Connections open from `peer`.
    pub fn open_from(&self, peer: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(&client_key(peer)).copied().unwrap_or(0)
    }

    /// Peers with connections open (the map's size).
    pub fn peers(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self
            .limiter
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The replica-wide limits of user requests: rate per client and requests in flight.
#[derive(Debug)]
pub struct Protection {
    settings: ProtectionSettings,
    clients: Option<ClientRateLimiter>,
    in_flight: Option<Arc<Semaphore>>,
    connections: Arc<ConnectionLimiter>,
    shared: Option<SharedLimits>,
}

/// Why a user request is refused before routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The client is over its rate: 429; a request fits again after this wait.
    ClientRate(Duration),
    /// The replica holds its cap of requests in flight: 503.
    Overloaded,
}

/// What an admitted user request holds until its response body ends.
#[derive(Debug)]
pub struct Admission {
    _permit: Option<OwnedSemaphorePermit>,
}

impl Protection {
    /// The limits of `settings`.
    pub fn new(settings: ProtectionSettings) -> Self {
        let clients = settings.client_rate.as_ref().map(ClientRateLimiter::new);
        let in_flight = (settings.max_requests_in_flight > 0).then(|| {
            Arc::new(Semaphore::new(
                settings.max_requests_in_flight.min(Semaphore::MAX_PERMITS),
            ))
        });
        let connections = ConnectionLimiter::new(settings.max_connections_per_client);
        let shared = settings.limits_store.as_ref().and_then(|store| {
            match SharedLimits::new(&store.url, &store.prefix) {
                Ok(shared) => {
                    info!(store = %shared.describe(), prefix = %store.prefix, "apps' rate limits are counted fleet-wide");
                    crate::metrics::rate_limit_store_up(true);
                    Some(shared)
                }
                Err(error) => {
                    warn!(%error, "apps' rate limits are enforced per replica");
                    None
                }
            }
        });
        Self {
            settings,
            clients,
            in_flight,
            connections,
            shared,
        }
    }

    /// Takes one request of `client` from the rate limits of `route`'s app: fleet-wide
    /// with a limits store that answers, else this replica's share
    /// ([`crate::rate_limit`]).
    pub async fn check_app_rate(
        &self,
        route: &crate::router::AppRoute,
        client: IpAddr,
    ) -> Result<(), Limited> {
        route
            .rate_limiter()
            .check_request(&route.app, client, self.shared.as_ref())
            .await
    }

    /// The settings.
    pub fn settings(&self) -> &ProtectionSettings {
        &self.settings
    }

    /// The connections per peer.
    pub fn connections(&self) -> &Arc<ConnectionLimiter> {
        &self.connections
    }

    /// Admits one user request of `client`, or says why not. The rate comes first, so a
    /// flooding client is turned away before it takes a place among those in flight.
    pub fn admit(&self, client: IpAddr) -> Result<Admission, Refusal> {
        if let Some(clients) = &self.clients {
            clients.check(client).map_err(Refusal::ClientRate)?;
        }
        let permit = match &self.in_flight {
            Some(semaphore) => Some(
                Arc::clone(semaphore)
                    .try_acquire_owned()
                    .map_err(|_| Refusal::Overloaded)?,
            ),
            None => None,
        };
        Ok(Admission { _permit: permit })
    }

    /// User requests in flight now (0 without a cap).
    pub fn requests_in_flight(&self) -> usize {
        self.in_flight.as_ref().map_or(0, |semaphore| {
            self.settings
                .max_requests_in_flight
                .saturating_sub(semaphore.available_permits())
        })
    }

    /// The body limit of a route whose own limit is `own`: its own, else the fleet's
    /// (`None`: no limit).
    pub fn body_limit(&self, own: Option<u64>) -> Option<u64> {
        own.or((self.settings.max_request_body_bytes > 0)
            .then_some(self.settings.max_request_body_bytes))
    }
}

/// The requests in flight on one connection and when the last one ended, for
/// `--idle-timeout`.
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `started` to the end of the last request (or the start).
    last_ms: AtomicU64,
}

/// One request in flight on a connection ([`Activity::begin`]).
#[derive(Debug)]
pub struct ActiveRequest(Arc<Activity>);

impl Activity {
    /// A connection that just opened, with nothing in flight.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        })
    }

    /// A request starts; it ends when the returned value is dropped.
    pub fn begin(self: &Arc<Self>) -> ActiveRequest {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        ActiveRequest(Arc::clone(self))
    }

    /// How long the connection has had no request in flight (`None`: one is).
    pub fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::SeqCst));
        Some(self.started.elapsed().saturating_sub(last))
    }

    /// Resolves once the connection has had no request in flight for `timeout`.
    pub async fn idle(&self, timeout: Duration) {
        loop {
            let wait = match self.idle_for() {
                Some(idle) if idle >= timeout => return,
                Some(idle) => timeout - idle,
                None => timeout,
            };
            tokio::time::sleep(wait).await;
        }
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        let now = u64::try_from(self.0.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_ms.fetch_max(now, Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body holding `hold` (a place among the requests in flight, a request of
/// a connection's [`Activity`]) until it ends or is dropped.
pub struct HeldBody<T> {
    inner: TunnelBody,
    hold: Option<T>,
}

impl<T: Send + Unpin + 'static> HeldBody<T> {
    /// `inner`, holding `hold`.
    pub fn wrap(inner: TunnelBody, hold: T) -> TunnelBody {
        http_body_util::BodyExt::boxed_unsync(Self {
            inner,
            hold: Some(hold),
        })
    }
}

impl<T: Unpin> Body for HeldBody<T> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.hold = None;
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

/// A request body is larger than its app accepts.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than the {limit} bytes the app accepts")]
pub struct BodyTooLarge {
    /// The limit in bytes.
    pub limit: u64,
}

/// A request body cut at `limit` bytes: past it, an error ([`BodyTooLarge`]) instead
/// of more data, and the shared flag set so that the proxy answers 413.
pub struct LimitedBody {
    inner: TunnelBody,
    limit: u64,
    seen: u64,
    exceeded: Arc<AtomicBool>,
}

impl LimitedBody {
    /// `inner` limited to `limit` bytes; `exceeded` is set when it goes over.
    pub fn wrap(inner: TunnelBody, limit: u64, exceeded: Arc<AtomicBool>) -> TunnelBody {
        http_body_util::BodyExt::boxed_unsync(Self {
            inner,
            limit,
            seen: 0,
            exceeded,
        })
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.exceeded.load(Ordering::Relaxed) {
            return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit: self.limit }))));
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let seen = self
                .seen
                .saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
            self.seen = seen;
            if seen > self.limit {
                self.exceeded.store(true, Ordering::Relaxed);
                return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit: self.limit }))));
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use http_body_util::BodyExt as _;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        protection: ProtectionArgs,
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn limit(requests_per_second: u32, burst: u32) -> ClientRateLimit {
        ClientRateLimit {
            requests_per_second,
            burst,
        }
    }

    #[test]
    fn the_flags_default_to_the_default_settings() {
        let cli = Cli::try_parse_from(["proxy"]).unwrap_or_else(|e| panic!("{e}"));
        let settings = cli.protection.settings().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings, ProtectionSettings::default());
    }

    #[test]
    fn flags_are_read_and_checked() {
        let cli = Cli::try_parse_from([
            "proxy",
            "--client-requests-per-second",
            "0",
            "--max-request-header-size",
            "16Ki",
            "--max-request-body-size",
            "10M",
            "--idle-timeout",
            "5s",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let settings = cli.protection.settings().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.client_rate, None);
        assert_eq!(settings.max_request_header_bytes, 16 * 1024);
        assert_eq!(settings.max_request_body_bytes, 10_000_000);
        assert_eq!(settings.idle_timeout, Duration::from_secs(5));

        // hyper panics under 8 KiB: refused when parsing.
        assert!(Cli::try_parse_from(["proxy", "--max-request-header-size", "4Ki"]).is_err());
        assert!(Cli::try_parse_from(["proxy", "--http2-max-concurrent-streams", "0"]).is_err());
        let cli = Cli::try_parse_from([
            "proxy",
            "--client-requests-per-second",
            "50",
            "--client-burst",
            "10",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            cli.protection.settings(),
            Err(ProtectionError::BurstBelowRate {
                rate: 50,
                burst: 10
            })
        ));
    }

    #[test]
    fn the_limits_store_defaults_to_the_risk_store() {
        let parse = |args: &[&str]| {
            let mut all = vec!["proxy"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).unwrap_or_else(|e| panic!("{e}"))
        };
        let store = |cli: &Cli, risk: Option<&str>| {
            cli.protection
                .settings_with_store(risk)
                .unwrap_or_else(|e| panic!("{e}"))
                .limits_store
                .map(|store| (store.url, store.prefix))
        };
        let risk = Some("redis://risk:6379/0");
        assert_eq!(store(&parse(&[]), None), None);
        assert_eq!(
            store(&parse(&[]), risk),
            Some((
                "redis://risk:6379/0".to_owned(),
                "sallyport:limits".to_owned()
            ))
        );
        let own = parse(&[
            "--limits-store",
            "redis://limits:6379/1",
            "--limits-store-prefix",
            "blue",
        ]);
        assert_eq!(
            store(&own, risk),
            Some(("redis://limits:6379/1".to_owned(), "blue".to_owned()))
        );
        assert_eq!(store(&parse(&["--limits-store", "none"]), risk), None);
        assert!(matches!(
            parse(&["--limits-store", "http://cache"])
                .protection
                .settings(),
            Err(ProtectionError::LimitsStore(_))
        ));
    }

    #[test]
    fn sizes_take_quantity_suffixes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("64Ki"), Ok(64 * 1024));
        assert_eq!(parse_size("10M"), Ok(10_000_000));
        assert_eq!(parse_size("1Gi"), Ok(1 << 30));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("").is_err());
        assert!(parse_size("1.5Mi").is_err());
        assert!(parse_size("12 apples").is_err());
        assert!(parse_size("99999999999Ti").is_err());
    }

    #[test]
    fn clients_are_addresses_and_ipv6_networks() {
        assert_eq!(client_key(ip("198.51.100.7")), ip("198.51.100.7"));
        assert_eq!(client_key(ip("::ffff:198.51.100.7")), ip("198.51.100.7"));
        assert_eq!(client_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            client_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            client_key(ip("2001:db8:1:2::9"))
        );
        assert_ne!(
            client_key(ip("2001:db8:1:3::1")),
            client_key(ip("2001:db8:1:2::1"))
        );
    }

    #[test]
    fn a_client_over_its_rate_waits_while_others_are_served() {
        let limiter = ClientRateLimiter::new(&limit(1, 3));
        let flooder = ip("127.0.0.2");
        for request in 0..3 {
            assert!(
                limiter.check(flooder).is_ok(),
                "request {request} of the burst"
            );
        }
        let wait = limiter.check(flooder).err();
        assert!(
            wait.is_some_and(|w| w > Duration::ZERO && w <= Duration::from_secs(1)),
            "{wait:?}"
        );
        assert!(limiter.check(ip("127.0.0.3")).is_ok(), "another client");
        // The same IPv6 /64 is one client.
        let limiter = ClientRateLimiter::new(&limit(1, 1));
        assert!(limiter.check(ip("2001:db8::1")).is_ok());
        assert!(limiter.check(ip("2001:db8::2")).is_err());
        assert!(limiter.check(ip("2001:db8:0:1::1")).is_ok());
    }

    #[test]
    fn clients_with_a_full_bucket_again_are_forgotten() {
        let limiter = ClientRateLimiter::new(&limit(1000, 1000));
        for n in 0..=255u8 {
            assert!(limiter.check(IpAddr::from([10, 0, 0, n])).is_ok());
        }
        assert_eq!(limiter.clients(), 256);
        // A full bucket refills within a second at 1000/s.
        std::thread::sleep(Duration::from_millis(1100));
        limiter.sweep();
        assert_eq!(limiter.clients(), 0);
        // Sweeps also happen by themselves as checks go on.
        let limiter = ClientRateLimiter::new(&limit(1_000_000, 1_000_000));
        for n in 0..SWEEP_EVERY {
            let [.., a, b] = n.to_be_bytes();
            assert!(limiter.check(IpAddr::from([10, 1, a, b])).is_ok());
        }
        assert!(
            limiter.clients() < usize::try_from(SWEEP_EVERY).unwrap_or(usize::MAX),
            "the sweep at the {SWEEP_EVERY}th check forgot refilled clients: {}",
            limiter.clients()
        );
    }

    #[test]
    fn connections_per_peer_are_capped_and_freed() {
        let limiter = ConnectionLimiter::new(2);
        let peer = ip("127.0.0.2");
        let first = limiter.open(peer).flatten();
        let second = limiter.open(peer).flatten();
        assert!(first.is_some() && second.is_some());
        assert!(
            limiter.open(peer).is_none(),
            "a third connection is refused"
        );
        assert!(
            limiter.open(ip("127.0.0.3")).flatten().is_some(),
            "another peer is not"
        );
        drop(first);
        assert_eq!(limiter.open_from(peer), 1);
        let third = limiter.open(peer).flatten();
        assert!(third.is_some(), "a closed connection frees its place");
        drop((second, third));
        assert_eq!(limiter.open_from(peer), 0);
        assert_eq!(
            limiter.peers(),
            0,
            "peers without connections are forgotten"
        );
        // No cap: nothing counted.
        let unlimited = ConnectionLimiter::new(0);
        assert!(matches!(unlimited.open(peer), Some(None)));
        assert_eq!(unlimited.peers(), 0);
    }

    #[test]
    fn requests_in_flight_are_capped_until_their_bodies_end() {
        let protection = Protection::new(ProtectionSettings {
            max_requests_in_flight: 2,
            ..ProtectionSettings::without_request_limits()
        });
        let client = ip("127.0.0.2");
        let first = protection.admit(client).unwrap_or_else(|e| panic!("{e:?}"));
        let second = protection.admit(client).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(protection.requests_in_flight(), 2);
        assert_eq!(protection.admit(client).err(), Some(Refusal::Overloaded));
        drop(first);
        assert!(protection.admit(client).is_ok());
        drop(second);
        // The rate comes first.
        let protection = Protection::new(ProtectionSettings {
            client_rate: Some(limit(1, 1)),
            max_requests_in_flight: 1,
            ..ProtectionSettings::default()
        });
        let _held = protection.admit(client).unwrap_or_else(|e| panic!("{e:?}"));
        assert!(matches!(
            protection.admit(client),
            Err(Refusal::ClientRate(_))
        ));
        assert_eq!(
            protection.admit(ip("127.0.0.3")).err(),
            Some(Refusal::Overloaded)
        );
    }

    #[tokio::test]
    async fn a_held_body_releases_its_place_when_it_ends() {
        let protection = Protection::new(ProtectionSettings {
            max_requests_in_flight: 1,
            ..ProtectionSettings::without_request_limits()
        });
        let client = ip("127.0.0.2");
        let admission = protection.admit(client).unwrap_or_else(|e| panic!("{e:?}"));
        let body = HeldBody::wrap(sallyport_tunnel::body::full("hello"), admission);
        assert_eq!(protection.admit(client).err(), Some(Refusal::Overloaded));
        let collected = body.collect().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(collected.to_bytes(), "hello");
        assert!(protection.admit(client).is_ok(), "the place is free again");
    }

    #[tokio::test]
    async fn bodies_over_their_limit_fail_and_say_so() {
        let chunks = || {
            let frames = ["abcd", "efgh", "ijkl"]
                .map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from_static(c.as_bytes()))));
            http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
        };
        let exceeded = Arc::new(AtomicBool::new(false));
        let whole = LimitedBody::wrap(chunks(), 12, exceeded.clone())
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(whole.to_bytes(), "abcdefghijkl");
        assert!(!exceeded.load(Ordering::Relaxed));

        let cut = LimitedBody::wrap(chunks(), 10, exceeded.clone())
            .collect()
            .await;
        let error = cut.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("larger than the 10 bytes"), "{error}");
        assert!(exceeded.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_connection_is_idle_only_with_nothing_in_flight() {
        let activity = Activity::new();
        let request = activity.begin();
        assert_eq!(activity.idle_for(), None);
        // Busy: never idle, however long the request takes.
        let busy = tokio::time::timeout(
            Duration::from_millis(200),
            activity.idle(Duration::from_millis(50)),
        )
        .await;
        assert!(busy.is_err(), "idle while a request is in flight");
        drop(request);
        assert!(activity.idle_for().is_some());
        tokio::time::timeout(
            Duration::from_secs(10),
            activity.idle(Duration::from_millis(50)),
        )
        .await
        .unwrap_or_else(|_| panic!("not idle 10 s after the last request"));
    }
}
