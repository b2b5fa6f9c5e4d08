//! The group's configuration slice as the connector serves it.
//!
//! [`CurrentSlice`] holds the latest [`GroupSlice`] compiled into an index: app id ->
//! [`AppBackend`] (the app's internal origin and path prefix, its backend settings and the
//! HTTP client to reach it). A request looks its app up without locking or allocating;
//! [`CurrentSlice::replace`] swaps a whole new index in atomically, and requests in flight
//! finish on the index they started with.
//!
//! **Configuration changes.** The proxy replicas and the connector load a new slice at
//! slightly different moments, so for a short while a request may be shaped for a slice
//! version the connector does not serve (yet, or any more). Two bounded windows bridge
//! that, and the connector still only serves what one of its own slices allowed:
//!
//! - the slice a replacement displaced stays known for [`ChangeWindows::previous_grace`]
//!   ([`PREVIOUS_SLICE_GRACE`]) after the replacement ([`CurrentSlice::previous_app`]):
//!   a lagging replica's request for the old internal URL is served by it;
//! - when the fleet announced a version other than the one served and its pull has not
//!   ended ([`CurrentSlice::newer_announced`]), a request the current slice refuses may
//!   wait up to [`ChangeWindows::catch_up_wait`] ([`CATCH_UP_WAIT`]) for the new slice
//!   ([`CurrentSlice::changes`]).
//!
//! **Clients.** Plain `http` backends share one HTTP/1.1 client. `https` backends get one
//! client per distinct TLS setting (trust, `serverName`, `insecureSkipVerify`), offering
//! HTTP/2 and HTTP/1.1 by ALPN. A client whose setting is unchanged is carried over to
//! the next slice version, so its connection pool survives a configuration change.
//! WebSocket upgrades leave the pool: they open a connection of their own, with the same
//! TLS settings but HTTP/1.1 only ([`AppBackend::http1_tls`]).
//!
//! **Trust.** An app whose slice entry carries its own CA certificates
//! (`backend.tls.caPem`, which the operator reads from the app's `caSecretRef` Secret) is
//! verified against those certificates only. Any other `https` backend is verified
//! against the system trust store (read once, with `rustls-native-certs`, which honours
//! `SSL_CERT_FILE` and `SSL_CERT_DIR`) plus the connector-wide extra CA bundle given to
//! [`CurrentSlice::with_backend_ca`]. A slice that names a `caSecretRef` without its
//! certificates (from a fleet compiled without reading Secrets, or an older operator)
//! falls back to that trust store, with a warning naming the Secret. A new CA in the
//! Secret arrives as a new slice version and gets a new client; apps with the same CA and
//! `serverName` share one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::uri::{Authority, Scheme};
use http::{Request, Uri};
use hyper::body::Incoming;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sallyport_api::fleet_config::{GroupSlice, SCHEMA_VERSION, SecretKeyRef, SliceApp};
use sallyport_tunnel::tls::{TlsError, certificates_from_pem, provider};
use sallyport_tunnel::wire::FleetNotice;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// How long a backend may take to send its response headers when the app's
/// `backend.timeout` is not a positive duration.
pub const DEFAULT_BACKEND_TIMEOUT: Duration = Duration::from_secs(85);

/// How long after a replacement the replaced slice still admits the requests the current
/// one refuses: the time the proxy replicas take to all load a configuration change.
pub const PREVIOUS_SLICE_GRACE: Duration = Duration::from_secs(5);

/// The longest a request the current slice refuses waits for a newer slice the fleet
/// announced (the connector pulls it on the notice).
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(2);

/// How long an idle backend connection stays in a client's pool.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// TCP keepalive of backend connections.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// HTTP/2 flow-control window per stream toward `h2` backends (the levers measured in
/// `performance.md`: 8/16 MiB windows for bulk transfers).
const H2_STREAM_WINDOW: u32 = 8 * 1024 * 1024;

/// HTTP/2 flow-control window per connection toward `h2` backends.
const H2_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// A slice could not be taken, or the connector's backend trust could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SliceError {
    /// The slice was written with a schema this connector does not read; the current
    /// slice keeps serving.
    #[error(
        "group slice {version}: schemaVersion {found} is newer than this connector reads \
         ({supported}); keeping the current slice"
    )]
    UnsupportedSchemaVersion {
        /// The slice's version.
        version: String,
        /// The slice's schema version.
        found: u32,
        /// The highest schema version this build reads.
        supported: u32,
    },
    /// The extra backend CA bundle is not PEM certificates rustls accepts as roots.
    #[error("backend CA bundle: {0}")]
    BackendCa(#[source] TlsError),
}

/// Why one app of a slice cannot be served; the app is skipped with a warning.
#[derive(Debug, thiserror::Error)]
enum AppError {
    /// `internalUrl` is not an absolute `http`/`https` URL without user info or query.
    #[error("app {app}: internalUrl {url:?} is not usable: {reason}")]
    InternalUrl {
        app: String,
        url: String,
        reason: String,
    },
    /// `backend.tls.serverName` is not a DNS name or IP address.
    #[error("app {app}: backend.tls.serverName {name:?} is not a DNS name or IP address")]
    ServerName { app: String, name: String },
    /// `backend.tls.caPem` is not PEM certificates rustls accepts as roots.
    #[error("app {app}: backend.tls.caPem (from {secret}): {reason}")]
    Ca {
        app: String,
        secret: String,
        reason: String,
    },
    /// The TLS client could not be configured.
    #[error("app {app}: backend TLS client: {source}")]
    Tls { app: String, source: rustls::Error },
}

/// Why a request URI is refused for an app: it does not lie under the app's internal URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UriRefused {
    /// The scheme differs from the internal URL's (or is missing).
    #[error("the request URI's scheme is not the app's internal URL's")]
    Scheme,
    /// Host or port differ from the internal URL's, the authority is missing, or it
    /// carries user info.
    #[error("the request URI's host and port are not the app's internal URL's")]
    Authority,
    /// The path is not under the internal URL's path, or it holds `.`/`..` segments
    /// (also percent-encoded) that could climb out of it.
    #[error("the request URI's path is not under the app's internal URL's path")]
    Path,
}

/// The HTTP client an app's requests are sent with. Cheap to clone (clients share their
/// connection pool).
#[derive(Clone, Debug)]
pub struct BackendClient(ClientKind);

#[derive(Clone, Debug)]
enum ClientKind {
    /// Plain `http`: HTTP/1.1.
    Plain(Client<HttpConnector, Incoming>),
    /// `https`: HTTP/2 or HTTP/1.1 as ALPN settles.
    Tls(Client<HttpsConnector<HttpConnector>, Incoming>),
}

impl BackendClient {
    /// Sends `request` (absolute URI, HTTP/1.1 version: the client moves to HTTP/2 by
    /// itself when the backend negotiates it) and resolves to the response headers.
    pub fn request(&self, request: Request<Incoming>) -> ResponseFuture {
        match &self.0 {
            ClientKind::Plain(client) => client.request(request),
            ClientKind::Tls(client) => client.request(request),
        }
    }

    /// Whether this client speaks TLS (for `https` backends).
    pub fn is_tls(&self) -> bool {
        matches!(self.0, ClientKind::Tls(_))
    }
}

/// An app of the current slice, ready to serve: where its backend is and how to reach it.
#[derive(Debug)]
pub struct AppBackend {
    app: String,
    internal_url: String,
    scheme: Scheme,
    host: String,
    port: u16,
    path_prefix: String,
    timeout: Duration,
    websockets: bool,
    client: Tagged,
}

impl AppBackend {
    /// The app's id, `namespace/name`.
    pub fn app(&self) -> &str {
        &self.app
    }

    /// The app's internal URL as the slice gives it.
    pub fn internal_url(&self) -> &str {
        &self.internal_url
    }

    /// The internal URL's path, which every request path must lie under (`/` for the
    /// whole origin).
    pub fn path_prefix(&self) -> &str {
        &self.path_prefix
    }

    /// How long the backend may take to send its response headers.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether WebSocket upgrades may pass.
    pub fn websockets(&self) -> bool {
        self.websockets
    }

    /// The client to send the app's requests with.
    pub fn client(&self) -> &BackendClient {
        &self.client.client
    }

    /// The internal URL's host as written (IPv6 literals in brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The internal URL's port, explicit or the scheme's default.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TLS settings for a connection of its own to an `https` backend that speaks
    /// HTTP/1.1 (WebSocket upgrades leave the client's pool); `None` for plain `http`.
    pub fn http1_tls(&self) -> Option<&Http1Tls> {
        self.client.http1_tls.as_deref()
    }

    /// The id of the client (equal ids share one connection pool; ids are never reused
    /// within a [`CurrentSlice`]).
    pub fn client_id(&self) -> u64 {
        self.client.id
    }

    /// Checks that `uri` lies under the app's internal URL: the same scheme, host and
    /// port (default ports spelled or not), no user info, and a path under the internal
    /// path prefix (`/app/` admits `/app`, `/app/` and `/app/...`; `/app` admits `/app`
    /// and `/app/...`, never `/application`). Under a prefix other than `/`, paths with
    /// `.` or `..` segments, literal or percent-encoded, are refused: a backend that
    /// normalises them could be made to serve outside the prefix.
    pub fn check_uri(&self, uri: &Uri) -> Result<(), UriRefused> {
        if uri.scheme() != Some(&self.scheme) {
            return Err(UriRefused::Scheme);
        }
        let Some(authority) = uri.authority() else {
            return Err(UriRefused::Authority);
        };
        if authority.as_str().contains('@')
            || !authority.host().eq_ignore_ascii_case(&self.host)
            || effective_port(authority, &self.scheme) != self.port
        {
            return Err(UriRefused::Authority);
        }
        if path_under(uri.path(), &self.path_prefix) {
            Ok(())
        } else {
            Err(UriRefused::Path)
        }
    }
}

/// The port of `authority`, or the scheme's default.
fn effective_port(authority: &Authority, scheme: &Scheme) -> u16 {
    authority
        .port_u16()
        .unwrap_or(if *scheme == Scheme::HTTPS { 443 } else { 80 })
}

/// Whether `path` lies under `prefix` (see [`AppBackend::check_uri`]).
fn path_under(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let under = match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        // `/app` for the prefix `/app/`.
        None => prefix.strip_suffix('/') == Some(path),
    };
    under && !has_dot_segment(path)
}

/// Whether `path` holds a `.` or `..` segment, with `.`, `/` and `\` also recognised
/// percent-encoded and `\` taken as a separator (as some backends do).
fn has_dot_segment(path: &str) -> bool {
    let bytes = path.as_bytes();
    let mut dots = 0usize;
    let mut other = false;
    let mut i = 0;
    loop {
        let (byte, width) = match bytes.get(i) {
            None => (b'/', 1),
            Some(b'%') => match (bytes.get(i + 1), bytes.get(i + 2)) {
                (Some(&h), Some(&l)) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => {
                    (hex(h) << 4 | hex(l), 3)
                }
                _ => (b'%', 1),
            },
            Some(&b) => (b, 1),
        };
        match byte {
            b'/' | b'\\' => {
                if !other && (dots == 1 || dots == 2) {
                    return true;
                }
                dots = 0;
                other = false;
            }
            b'.' => dots += 1,
            _ => other = true,
        }
        if i >= bytes.len() {
            return false;
        }
        i += width;
    }
}

/// The value of an ASCII hex digit (0 for any other byte; callers check first).
fn hex(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        b'A'..=b'F' => digit - b'A' + 10,
        _ => 0,
    }
}

/// A client with an id, so that reuse across slice versions can be observed.
#[derive(Clone, Debug)]
struct Tagged {
    id: u64,
    client: BackendClient,
    /// The client's TLS settings for connections of their own (`None` for plain `http`).
    http1_tls: Option<Arc<Http1Tls>>,
}

/// The TLS settings of an app's backend client for a connection opened apart from the
/// client's pool that must speak HTTP/1.1 (a WebSocket upgrade): the same trust and
/// verification, ALPN `http/1.1` only.
#[derive(Clone, Debug)]
pub struct Http1Tls {
    /// The rustls settings: the client's, offering only `http/1.1` by ALPN.
    pub config: Arc<ClientConfig>,
    /// `backend.tls.serverName`, when set: the name sent (SNI) and verified instead of
    /// the internal URL's host.
    pub server_name: Option<ServerName<'static>>,
}

/// What distinguishes one backend TLS client from another.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct TlsKey {
    /// The app's own CA certificates (PEM), the only roots trusted; `None`: the
    /// connector's trust store.
    ca_pem: Option<String>,
    /// SNI and the name verified, instead of the URL's host.
    server_name: Option<String>,
    /// Accept any certificate.
    insecure_skip_verify: bool,
}

/// One compiled slice version.
#[derive(Debug, Default)]
struct Compiled {
    version: Option<String>,
    apps: HashMap<String, Arc<AppBackend>>,
    tls_clients: HashMap<TlsKey, Tagged>,
}

/// The windows that bridge a slice change (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeWindows {
    /// How long after a replacement the replaced slice still admits requests the current
    /// one refuses.
    pub previous_grace: Duration,
    /// The longest a request the current slice refuses waits for an announced newer
    /// slice.
    pub catch_up_wait: Duration,
}

impl Default for ChangeWindows {
    fn default() -> Self {
        Self {
            previous_grace: PREVIOUS_SLICE_GRACE,
            catch_up_wait: CATCH_UP_WAIT,
        }
    }
}

/// The slice the last replacement displaced, and when.
#[derive(Debug)]
struct Previous {
    compiled: Arc<Compiled>,
    replaced_at: Instant,
}

/// An app as the previous slice serves it, within [`ChangeWindows::previous_grace`].
#[derive(Debug, Clone)]
pub struct PreviousApp {
    /// The app's backend in the previous slice.
    pub backend: Arc<AppBackend>,
    /// The previous slice's version.
    pub version: String,
    /// How long ago the current slice replaced it.
    pub replaced_ago: Duration,
}

/// What every slice version shares.
#[derive(Debug)]
struct Shared {
    current: ArcSwap<Compiled>,
    /// The slice the last replacement displaced, until its grace ends.
    previous: ArcSwapOption<Previous>,
    /// The windows of [`ChangeWindows`].
    windows: ArcSwap<ChangeWindows>,
    /// Bumped on every replacement and every ended pull of an announced version: wakes
    /// the requests catching up.
    changes: watch::Sender<u64>,
    /// The fleet's notices (the announced version), once the dialer runs.
    notices: OnceLock<watch::Receiver<Option<FleetNotice>>>,
    /// An announced version whose pull ended without bringing it (the fleet answered
    /// with another version, or the pull gave up): nothing to wait for.
    settled: Mutex<Option<String>>,
    /// Serialises [`CurrentSlice::replace`] so that client reuse sees the latest version.
    replace_lock: Mutex<()>,
    plain: Tagged,
    /// The connector-wide extra backend CA certificates.
    extra_roots: Vec<CertificateDer<'static>>,
    /// System roots plus `extra_roots`, read when the first `https` app appears.
    roots: OnceLock<Arc<RootCertStore>>,
    provider: Arc<CryptoProvider>,
    next_client_id: std::sync::atomic::AtomicU64,
}

/// The group slice the connector currently serves, compiled for lookups. Cheap to clone:
/// clones share one slice.
#[derive(Clone, Debug)]
pub struct CurrentSlice {
    shared: Arc<Shared>,
}

impl Default for CurrentSlice {
    fn default() -> Self {
        Self::new()
    }
}

impl CurrentSlice {
    /// An empty slice (no app is served) whose `https` backends are verified against the
    /// system trust store.
    pub fn new() -> Self {
        Self::build(Vec::new())
    }

    /// Like [`CurrentSlice::new`], with the certificates of `ca_pem` trusted for every
    /// `https` backend in addition to the system trust store: a connector-wide extra CA
    /// bundle (tests pass their own CA here). Per-app CAs arrive with the slice once the
    /// fleet inlines them.
    pub fn with_backend_ca(ca_pem: Option<&str>) -> Result<Self, SliceError> {
        let extra = match ca_pem {
            Some(pem) => certificates_from_pem("backend CA bundle", pem.as_bytes())
                .map_err(SliceError::BackendCa)?,
            None => Vec::new(),
        };
        let mut check = RootCertStore::empty();
        for certificate in &extra {
            check.add(certificate.clone()).map_err(|source| {
                SliceError::BackendCa(TlsError::Rustls {
                    what: "backend CA bundle".to_owned(),
                    source,
                })
            })?;
        }
        Ok(Self::build(extra))
    }

    fn build(extra_roots: Vec<CertificateDer<'static>>) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_keepalive(Some(TCP_KEEPALIVE));
        let plain = Tagged {
            id: 0,
            client: BackendClient(ClientKind::Plain(client_builder().build(http))),
            http1_tls: None,
        };
        Self {
            shared: Arc::new(Shared {
                current: ArcSwap::from_pointee(Compiled::default()),
                previous: ArcSwapOption::empty(),
                windows: ArcSwap::from_pointee(ChangeWindows::default()),
                changes: watch::Sender::new(0),
                notices: OnceLock::new(),
                settled: Mutex::new(None),
                replace_lock: Mutex::new(()),
                plain,
                extra_roots,
                roots: OnceLock::new(),
                provider: provider(),
                next_client_id: std::sync::atomic::AtomicU64::new(1),
            }),
        }
    }

    /// Serves `slice` from now on. Apps that cannot be served (an unusable internal URL
    /// or TLS setting) are skipped with a warning naming the app; the rest are served.
    /// Clients whose settings are unchanged are carried over with their connections.
    /// The slice replaced stays the previous slice for [`ChangeWindows::previous_grace`]
    /// (then it is dropped), and requests catching up ([`CurrentSlice::changes`]) are
    /// woken. Fails, keeping the current slice, only for a schema newer than this build
    /// reads.
    pub fn replace(&self, slice: GroupSlice) -> Result<(), SliceError> {
        if slice.schema_version > SCHEMA_VERSION {
            return Err(SliceError::UnsupportedSchemaVersion {
                version: slice.version,
                found: slice.schema_version,
                supported: SCHEMA_VERSION,
            });
        }
        let _serialised = self
            .shared
            .replace_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let previous = self.shared.current.load_full();
        let mut tls_clients = HashMap::new();
        let mut apps = HashMap::with_capacity(slice.apps.len());
        let mut skipped = 0usize;
        for app in slice.apps {
            match self.compile(app, &previous.tls_clients, &mut tls_clients) {
                Ok(backend) => {
                    if let Some(duplicate) = apps.insert(backend.app.clone(), Arc::new(backend)) {
                        warn!(
                            app = %duplicate.app,
                            version = %slice.version,
                            "the group slice lists the app twice; the later entry is served"
                        );
                    }
                }
                Err(error) => {
                    skipped += 1;
                    warn!(version = %slice.version, error = %error, "skipping an app of the group slice");
                }
            }
        }
        info!(
            version = %slice.version,
            group = %slice.group.id,
            apps = apps.len(),
            skipped,
            tls_clients = tls_clients.len(),
            "serving group slice"
        );
        let replaced = self.shared.current.swap(Arc::new(Compiled {
            version: Some(slice.version),
            apps,
            tls_clients,
        }));
        if replaced.version.is_some() {
            let previous = Arc::new(Previous {
                compiled: replaced,
                replaced_at: Instant::now(),
            });
            self.shared.previous.store(Some(Arc::clone(&previous)));
            self.drop_previous_after_grace(previous);
        }
        self.shared
            .changes
            .send_modify(|count| *count = count.wrapping_add(1));
        Ok(())
    }

    /// Drops `previous` when its grace ends, if a runtime runs (else the next lookup or
    /// replacement does).
    fn drop_previous_after_grace(&self, previous: Arc<Previous>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let grace = self.change_windows().previous_grace;
        let shared = Arc::downgrade(&self.shared);
        let previous = Arc::downgrade(&previous);
        runtime.spawn(async move {
            tokio::time::sleep(grace).await;
            if let (Some(shared), Some(previous)) = (shared.upgrade(), previous.upgrade()) {
                CurrentSlice { shared }.drop_previous(&previous);
            }
        });
    }

    /// Forgets `expired` if it is still the previous slice.
    fn drop_previous(&self, expired: &Arc<Previous>) {
        let dropped = self
            .shared
            .previous
            .compare_and_swap(&Some(Arc::clone(expired)), None);
        if dropped
            .as_ref()
            .is_some_and(|was| Arc::ptr_eq(was, expired))
        {
            debug!(
                version = expired.compiled.version.as_deref().unwrap_or_default(),
                "the previous group slice's grace ended; dropped"
            );
        }
    }

    /// The windows that bridge slice changes.
    pub fn change_windows(&self) -> ChangeWindows {
        **self.shared.windows.load()
    }

    /// Sets the windows that bridge slice changes, for this slice and its clones (the
    /// defaults are [`PREVIOUS_SLICE_GRACE`] and [`CATCH_UP_WAIT`]; tests shorten them).
    pub fn set_change_windows(&self, windows: ChangeWindows) {
        self.shared.windows.store(Arc::new(windows));
    }

    /// The app `app_id` of the slice the last replacement displaced, while that was less
    /// than [`ChangeWindows::previous_grace`] ago; `None` when it serves no such app, or
    /// there is no previous slice (any more: past its grace it is dropped).
    pub fn previous_app(&self, app_id: &str) -> Option<PreviousApp> {
        self.previous_app_at(app_id, Instant::now())
    }

    /// [`CurrentSlice::previous_app`] at `now`.
    fn previous_app_at(&self, app_id: &str, now: Instant) -> Option<PreviousApp> {
        let previous = self.shared.previous.load_full()?;
        let replaced_ago = now.saturating_duration_since(previous.replaced_at);
        if replaced_ago >= self.change_windows().previous_grace {
            self.drop_previous(&previous);
            return None;
        }
        let backend = previous.compiled.apps.get(app_id)?.clone();
        Some(PreviousApp {
            backend,
            version: previous.compiled.version.clone().unwrap_or_default(),
            replaced_ago,
        })
    }

    /// Reads the version the fleet announces from `notices` (the dialer's
    /// [`sallyport_tunnel::dial::Dialer::notices`]), for
    /// [`CurrentSlice::newer_announced`]. The first call wins; later ones are ignored.
    pub fn follow_notices(&self, notices: watch::Receiver<Option<FleetNotice>>) {
        if self.shared.notices.set(notices).is_err() {
            warn!("the group slice already follows the fleet's notices; ignoring another");
        }
    }

    /// The version the fleet announced when it is not the one served and its pull has
    /// not ended without bringing it: a request the current slice refuses may be meant
    /// for it, and can wait for it ([`CurrentSlice::changes`]). `None` when nothing newer
    /// is known.
    pub fn newer_announced(&self) -> Option<String> {
        let announced = self
            .shared
            .notices
            .get()?
            .borrow()
            .as_ref()
            .map(|notice| notice.config_version.clone())?;
        let current = self.shared.current.load();
        if current.version.as_deref() == Some(announced.as_str()) {
            return None;
        }
        let settled = self
            .shared
            .settled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (settled.as_deref() != Some(announced.as_str())).then_some(announced)
    }

    /// A pull for an announced version starts: requests the current slice refuses wait
    /// for it again, even if an earlier pull for the same version ended without it.
    pub fn announced_pull_started(&self) {
        *self
            .shared
            .settled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// The pull for the announced `version` ended (the slice replaced, or the fleet
    /// answered with another version, or the pull gave up): requests waiting for it stop
    /// waiting unless the slice now serves them.
    pub fn announced_pull_ended(&self, version: &str) {
        *self
            .shared
            .settled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(version.to_owned());
        self.shared
            .changes
            .send_modify(|count| *count = count.wrapping_add(1));
    }

    /// A receiver that sees every later replacement and every ended pull of an announced
    /// version (subscribe first, then check, then wait: nothing is missed).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// The version of the slice being served; `None` before the first one.
    pub fn version(&self) -> Option<String> {
        self.shared.current.load().version.clone()
    }

    /// The app `app_id` (`namespace/name`) of the current slice, if this group serves it.
    pub fn app(&self, app_id: &str) -> Option<Arc<AppBackend>> {
        self.shared.current.load().apps.get(app_id).cloned()
    }

    /// The ids of the apps of the current slice, sorted.
    pub fn app_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.shared.current.load().apps.keys().cloned().collect();
        ids.sort();
        ids
    }

    fn compile(
        &self,
        app: SliceApp,
        previous: &HashMap<TlsKey, Tagged>,
        clients: &mut HashMap<TlsKey, Tagged>,
    ) -> Result<AppBackend, AppError> {
        let SliceApp {
            app,
            internal_url,
            backend,
        } = app;
        let invalid = |reason: &str| AppError::InternalUrl {
            app: app.clone(),
            url: internal_url.clone(),
            reason: reason.to_owned(),
        };
        let uri: Uri = internal_url
            .parse()
            .map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
        let scheme = match uri.scheme() {
            Some(s) if *s == Scheme::HTTP || *s == Scheme::HTTPS => s.clone(),
            Some(_) => return Err(invalid("the scheme is neither http nor https")),
            None => return Err(invalid("it is not absolute (no scheme)")),
        };
        let Some(authority) = uri.authority() else {
            return Err(invalid("it has no host"));
        };
        if authority.as_str().contains('@') {
            return Err(invalid("it carries user info"));
        }
        if authority.host().is_empty() {
            return Err(invalid("it has no host"));
        }
        if uri.query().is_some() {
            return Err(invalid("it has a query"));
        }
        let path_prefix = match uri.path() {
            "" => "/".to_owned(),
            path => path.to_owned(),
        };
        if has_dot_segment(&path_prefix) {
            return Err(invalid("its path has . or .. segments"));
        }
        let timeout = backend.timeout.to_std().unwrap_or_else(|error| {
            warn!(
                app = %app,
                error = %error,
                default = ?DEFAULT_BACKEND_TIMEOUT,
                "backend.timeout is not a positive duration; using the default"
            );
            DEFAULT_BACKEND_TIMEOUT
        });
        let client = if scheme == Scheme::HTTPS {
            let (key, secret) = match backend.tls {
                Some(tls) => (
                    TlsKey {
                        ca_pem: tls.ca_pem,
                        server_name: tls.server_name,
                        insecure_skip_verify: tls.insecure_skip_verify,
                    },
                    tls.ca_secret_ref,
                ),
                None => (TlsKey::default(), None),
            };
            if let Some(secret) = &secret
                && key.ca_pem.is_none()
            {
                warn!(
                    app = %app,
                    secret = %secret_name(secret),
                    key = %secret.key,
                    "the slice names backend.tls.caSecretRef without its certificates \
                     (a fleet configuration compiled without reading Secrets); verifying \
                     the backend against the system trust store and the connector's extra CAs"
                );
            }
            if key.insecure_skip_verify {
                warn!(app = %app, "backend.tls.insecureSkipVerify: the backend's certificate is not verified");
            }
            match clients.get(&key) {
                Some(client) => client.clone(),
                None => {
                    let client = match previous.get(&key) {
                        Some(client) => client.clone(),
                        None => self.tls_client(&app, &key, secret.as_ref())?,
                    };
                    clients.insert(key, client.clone());
                    client
                }
            }
        } else {
            if backend.tls.is_some() {
                warn!(app = %app, "backend.tls is ignored: the internal URL is plain http");
            }
            self.shared.plain.clone()
        };
        Ok(AppBackend {
            host: authority.host().to_owned(),
            port: effective_port(authority, &scheme),
            scheme,
            path_prefix,
            timeout,
            websockets: backend.websockets,
            client,
            app,
            internal_url,
        })
    }

    /// The system roots plus the extra CAs, read once.
    fn roots(&self) -> Arc<RootCertStore> {
        self.shared
            .roots
            .get_or_init(|| {
                let mut store = RootCertStore::empty();
                let native = rustls_native_certs::load_native_certs();
                for error in &native.errors {
                    warn!(error = %error, "cannot read part of the system trust store");
                }
                let (added, ignored) = store.add_parsable_certificates(native.certs);
                for certificate in &self.shared.extra_roots {
                    if let Err(error) = store.add(certificate.clone()) {
                        warn!(error = %error, "cannot trust a certificate of the backend CA bundle");
                    }
                }
                info!(
                    system = added,
                    ignored,
                    extra = self.shared.extra_roots.len(),
                    "backend trust store loaded"
                );
                Arc::new(store)
            })
            .clone()
    }

    /// A root store of the app's own CA certificates only.
    fn app_roots(
        &self,
        app: &str,
        pem: &str,
        secret: Option<&SecretKeyRef>,
    ) -> Result<Arc<RootCertStore>, AppError> {
        let ca_error = |error: TlsError| AppError::Ca {
            app: app.to_owned(),
            secret: secret.map_or_else(|| "the slice".to_owned(), secret_name),
            reason: error.to_string(),
        };
        let certificates = certificates_from_pem("backend CA", pem.as_bytes()).map_err(ca_error)?;
        let mut store = RootCertStore::empty();
        for certificate in certificates {
            store.add(certificate).map_err(|source| {
                ca_error(TlsError::Rustls {
                    what: "backend CA".to_owned(),
                    source,
                })
            })?;
        }
        info!(app = %app, roots = store.len(), "backend verified against the app's own CA certificates");
        Ok(Arc::new(store))
    }

    fn tls_client(
        &self,
        app: &str,
        key: &TlsKey,
        secret: Option<&SecretKeyRef>,
    ) -> Result<Tagged, AppError> {
        let tls = |source| AppError::Tls {
            app: app.to_owned(),
            source,
        };
        let builder = ClientConfig::builder_with_provider(self.shared.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls)?;
        let config = if key.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate {
                    provider: self.shared.provider.clone(),
                }))
                .with_no_client_auth()
        } else {
            let roots = match &key.ca_pem {
                Some(pem) => self.app_roots(app, pem, secret)?,
                None => self.roots(),
            };
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        let mut http1_config = config.clone();
        http1_config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut http1_tls = Http1Tls {
            config: Arc::new(http1_config),
            server_name: None,
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_keepalive(Some(TCP_KEEPALIVE));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only();
        let connector = match &key.server_name {
            Some(name) => {
                let bare = name
                    .strip_prefix('[')
                    .and_then(|n| n.strip_suffix(']'))
                    .unwrap_or(name);
                let server_name =
                    ServerName::try_from(bare.to_owned()).map_err(|_| AppError::ServerName {
                        app: app.to_owned(),
                        name: name.clone(),
                    })?;
                http1_tls.server_name = Some(server_name.clone());
                connector.with_server_name_resolver(FixedServerNameResolver::new(server_name))
            }
            None => connector,
        };
        let connector = connector.enable_http1().enable_http2().wrap_connector(http);
        Ok(Tagged {
            id: self
                .shared
                .next_client_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            client: BackendClient(ClientKind::Tls(client_builder().build(connector))),
            http1_tls: Some(Arc::new(http1_tls)),
        })
    }
}

/// `namespace/name` of a Secret key reference.
fn secret_name(secret: &SecretKeyRef) -> String {
    format!("{}/{}", secret.namespace, secret.name)
}

/// The settings every backend client shares.
fn client_builder() -> hyper_util::client::legacy::Builder {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .http2_initial_stream_window_size(H2_STREAM_WINDOW)
        .http2_initial_connection_window_size(H2_CONNECTION_WINDOW);
    builder
}

/// `insecureSkipVerify`: accepts any certificate, but still checks the handshake
/// signatures, so the peer must at least hold the key of the certificate it shows.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use sallyport_api::Duration as ApiDuration;
    use sallyport_api::connector_group::{CertificatePolicy, Registration};
    use sallyport_api::fleet_config::{Backend, BackendTls, ConnectorGroupConfig};

    use super::*;

    fn duration(text: &str) -> ApiDuration {
        ApiDuration::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn app(id: &str, url: &str, tls: Option<BackendTls>) -> SliceApp {
        SliceApp {
            app: id.to_owned(),
            internal_url: url.to_owned(),
            backend: Backend {
                timeout: duration("85s"),
                websockets: false,
                tls,
            },
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

    fn uri(text: &str) -> Uri {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn paths_must_lie_under_the_prefix() {
        for (path, prefix, under) in [
            ("/anything/../x", "/", true),
            ("/app/", "/app/", true),
            ("/app", "/app/", true),
            ("/app/x/y", "/app/", true),
            ("/application", "/app/", false),
            ("/application", "/app", false),
            ("/app", "/app", true),
            ("/app/x", "/app", true),
            ("/other", "/app/", false),
            ("/", "/app/", false),
            ("/app/../admin", "/app/", false),
            ("/app/..", "/app/", false),
            ("/app/./x", "/app/", false),
            ("/app/%2e%2e/admin", "/app/", false),
            ("/app/%2E./admin", "/app/", false),
            ("/app/..%2fadmin", "/app/", false),
            ("/app/..%5cadmin", "/app/", false),
            ("/app/..\\admin", "/app/", false),
            ("/app/...", "/app/", true),
            ("/app/.well-known/x", "/app/", true),
            ("/app/a..b", "/app/", true),
            ("/app/100%", "/app/", true),
        ] {
            assert_eq!(path_under(path, prefix), under, "{path} under {prefix}");
        }
    }

    #[test]
    fn unusable_apps_are_skipped_and_the_rest_served() {
        let current = CurrentSlice::new();
        assert_eq!(current.version(), None);
        let bad_timeout = SliceApp {
            backend: Backend {
                // Zero is not a valid duration; the default applies.
                timeout: serde_json::from_str("\"0s\"").unwrap_or_else(|e| panic!("{e}")),
                websockets: false,
                tls: None,
            },
            ..app("team-a/zero", "http://zero.corp:8080", None)
        };
        let result = current.replace(slice(
            "v1",
            vec![
                app("team-a/wiki", "http://wiki.corp.internal/wiki/", None),
                app("team-a/relative", "/wiki/", None),
                app("team-a/ftp", "ftp://files.corp/", None),
                app("team-a/userinfo", "http://user:pw@wiki.corp/", None),
                app("team-a/query", "http://wiki.corp/?a=b", None),
                app("team-a/garbage", "http://exa mple/", None),
                app(
                    "team-a/badname",
                    "https://wiki.corp/",
                    Some(BackendTls {
                        ca_secret_ref: None,
                        ca_pem: None,
                        server_name: Some("not a name".to_owned()),
                        insecure_skip_verify: false,
                    }),
                ),
                bad_timeout,
            ],
        ));
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(current.version().as_deref(), Some("v1"));
        assert_eq!(current.app_ids(), ["team-a/wiki", "team-a/zero"]);
        let zero = current.app("team-a/zero");
        assert_eq!(
            zero.as_ref().map(|a| (a.timeout(), a.path_prefix())),
            Some((DEFAULT_BACKEND_TIMEOUT, "/"))
        );
        let wiki = current
            .app("team-a/wiki")
            .unwrap_or_else(|| panic!("team-a/wiki is served"));
        assert!(!wiki.client().is_tls());
        assert_eq!(
            wiki.check_uri(&uri("http://wiki.corp.internal/wiki/a?b=c")),
            Ok(())
        );
        assert_eq!(
            wiki.check_uri(&uri("http://WIKI.corp.internal:80/wiki/")),
            Ok(())
        );
        assert_eq!(
            wiki.check_uri(&uri("https://wiki.corp.internal/wiki/")),
            Err(UriRefused::Scheme)
        );
        assert_eq!(wiki.check_uri(&uri("/wiki/")), Err(UriRefused::Scheme));
        for other in [
            "http://wiki.corp.internal:8080/wiki/",
            "http://evil.corp/wiki/",
            "http://x@wiki.corp.internal/wiki/",
        ] {
            assert_eq!(
                wiki.check_uri(&uri(other)),
                Err(UriRefused::Authority),
                "{other}"
            );
        }
        assert_eq!(
            wiki.check_uri(&uri("http://wiki.corp.internal/admin")),
            Err(UriRefused::Path)
        );
    }

    #[test]
    fn a_newer_schema_is_refused_and_the_current_slice_kept() {
        let current = CurrentSlice::new();
        let taken = current.replace(slice("v1", vec![app("a/b", "http://b.corp/", None)]));
        assert!(taken.is_ok());
        let mut newer = slice("v2", vec![]);
        newer.schema_version = SCHEMA_VERSION + 1;
        assert!(matches!(
            current.replace(newer),
            Err(SliceError::UnsupportedSchemaVersion { .. })
        ));
        assert_eq!(current.version().as_deref(), Some("v1"));
        assert!(current.app("a/b").is_some());
    }

    #[tokio::test]
    async fn clients_survive_unchanged_settings_and_are_shared_per_setting() {
        let current = CurrentSlice::new();
        let named = |name: &str| {
            Some(BackendTls {
                ca_secret_ref: None,
                ca_pem: None,
                server_name: Some(name.to_owned()),
                insecure_skip_verify: false,
            })
        };
        let first = current.replace(slice(
            "v1",
            vec![
                app("a/one", "https://one.corp/", named("app.corp.test")),
                app("a/two", "https://two.corp/", named("app.corp.test")),
                app("a/three", "https://three.corp/", None),
                app("a/plain", "http://plain.corp/", None),
            ],
        ));
        assert!(first.is_ok());
        let id = |app: &str| current.app(app).map(|a| a.client_id());
        let (one, two, three, plain) = (id("a/one"), id("a/two"), id("a/three"), id("a/plain"));
        assert_eq!(one, two, "equal TLS settings share a client");
        assert_ne!(one, three);
        assert_eq!(plain, Some(0));
        let second = current.replace(slice(
            "v2",
            vec![
                app("a/one", "https://one.corp/", named("app.corp.test")),
                app("a/three", "https://three.corp/", named("other.corp.test")),
                app("a/plain", "http://plain.corp/other/", None),
            ],
        ));
        assert!(second.is_ok());
        assert_eq!(id("a/one"), one, "an unchanged setting keeps its client");
        assert_ne!(id("a/three"), three, "a changed setting gets a new client");
        assert_eq!(id("a/plain"), plain);
        assert_eq!(id("a/two"), None);
    }

    /// A private CA and a server configuration for `names` signed by it.
    fn private_ca(names: &[&str]) -> (String, Arc<rustls::ServerConfig>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
        fn ok<T>(result: Result<T, rcgen::Error>) -> T {
            result.unwrap_or_else(|e| panic!("{e}"))
        }
        let ca_key = ok(KeyPair::generate());
        let mut ca_params = ok(CertificateParams::new(Vec::<String>::new()));
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca_cert = ok(ca_params.self_signed(&ca_key));
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = ok(KeyPair::generate());
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let cert = ok(CertificateParams::new(names).and_then(|p| p.signed_by(&key, &issuer)));
        let key = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der())
            .unwrap_or_else(|e| panic!("{e}"));
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_no_client_auth()
                    .with_single_cert(vec![cert.der().clone()], key)
            })
            .unwrap_or_else(|e| panic!("{e}"));
        (ca_cert.pem(), Arc::new(config))
    }

    /// Serves TLS handshakes with `config` on loopback until the test ends.
    async fn tls_server(config: Arc<rustls::ServerConfig>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let address = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = acceptor.accept(tcp).await;
                });
            }
        });
        address
    }

    /// Whether the app's own-connection TLS settings complete a handshake with the
    /// server at `address` for `host` (the internal URL's host).
    async fn handshake(
        current: &CurrentSlice,
        app: &str,
        address: std::net::SocketAddr,
        host: &str,
    ) -> Result<(), String> {
        let backend = current.app(app).ok_or("the app is not served")?;
        let tls = backend.http1_tls().ok_or("the app has no TLS settings")?;
        let name = match &tls.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?,
        };
        let tcp = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| e.to_string())?;
        tokio_rustls::TlsConnector::from(tls.config.clone())
            .connect(name, tcp)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn with_ca(ca_pem: Option<&str>, server_name: Option<&str>) -> Option<BackendTls> {
        Some(BackendTls {
            ca_secret_ref: Some(SecretKeyRef {
                namespace: "team-a".to_owned(),
                name: "corp-ca".to_owned(),
                key: "ca.crt".to_owned(),
            }),
            ca_pem: ca_pem.map(str::to_owned),
            server_name: server_name.map(str::to_owned),
            insecure_skip_verify: false,
        })
    }

    #[tokio::test]
    async fn an_apps_own_ca_is_the_only_trust_for_its_backend() {
        let (ca, server) = private_ca(&["backend.corp.test"]);
        let (other_ca, _) = private_ca(&["backend.corp.test"]);
        let address = tls_server(server).await;
        let current = CurrentSlice::new();
        let url = format!("https://backend.corp.test:{}/", address.port());
        let by_ip = format!("https://127.0.0.1:{}/", address.port());
        let taken = current.replace(slice(
            "v1",
            vec![
                app("a/right", &url, with_ca(Some(&ca), None)),
                app("a/wrong", &url, with_ca(Some(&other_ca), None)),
                app("a/system", &url, None),
                app("a/unresolved", &url, with_ca(None, None)),
                app(
                    "a/by-ip",
                    &by_ip,
                    with_ca(Some(&ca), Some("backend.corp.test")),
                ),
                app("a/by-ip-unnamed", &by_ip, with_ca(Some(&ca), None)),
                app("a/garbage", &url, with_ca(Some("not a certificate"), None)),
            ],
        ));
        assert!(taken.is_ok(), "{taken:?}");
        assert!(
            current.app("a/garbage").is_none(),
            "an unusable CA skips the app"
        );

        let host = "backend.corp.test";
        assert_eq!(handshake(&current, "a/right", address, host).await, Ok(()));
        for refused in ["a/wrong", "a/system", "a/unresolved"] {
            let result = handshake(&current, refused, address, host).await;
            assert!(
                result.as_ref().is_err_and(|e| e.contains("certificate")),
                "{refused}: {result:?}"
            );
        }
        // serverName: the certificate's name, not the internal URL's IP, is verified.
        assert_eq!(
            handshake(&current, "a/by-ip", address, "127.0.0.1").await,
            Ok(())
        );
        let unnamed = handshake(&current, "a/by-ip-unnamed", address, "127.0.0.1").await;
        assert!(unnamed.is_err(), "{unnamed:?}");

        // A new CA in the next slice version is trusted, with a client of its own.
        let id = |app: &str| current.app(app).map(|a| a.client_id());
        let wrong_before = id("a/wrong");
        let right_before = id("a/right");
        let taken = current.replace(slice(
            "v2",
            vec![
                app("a/right", &url, with_ca(Some(&ca), None)),
                app("a/wrong", &url, with_ca(Some(&ca), None)),
            ],
        ));
        assert!(taken.is_ok(), "{taken:?}");
        assert_eq!(handshake(&current, "a/wrong", address, host).await, Ok(()));
        assert_ne!(id("a/wrong"), wrong_before);
        assert_eq!(
            id("a/right"),
            right_before,
            "an unchanged CA keeps its client"
        );
        assert_eq!(
            id("a/wrong"),
            id("a/right"),
            "the same CA and serverName share a client"
        );
    }

    fn notice(version: &str) -> Option<FleetNotice> {
        Some(FleetNotice {
            replica: "proxy-0".to_owned(),
            replicas: vec!["proxy-0".to_owned()],
            config_version: version.to_owned(),
        })
    }

    #[test]
    fn the_replaced_slice_serves_within_its_grace_only() {
        let current = CurrentSlice::new();
        let taken = current.replace(slice("v1", vec![app("a/wiki", "http://old.corp/", None)]));
        assert!(taken.is_ok());
        assert!(
            current.previous_app("a/wiki").is_none(),
            "the empty start is no previous slice"
        );
        let taken = current.replace(slice("v2", vec![app("a/wiki", "http://new.corp/", None)]));
        assert!(taken.is_ok());
        let previous = current
            .previous_app("a/wiki")
            .unwrap_or_else(|| panic!("v1 is the previous slice"));
        assert_eq!(previous.version, "v1");
        assert_eq!(previous.backend.internal_url(), "http://old.corp/");
        assert!(current.previous_app("a/other").is_none());

        // At the end of the grace it is ignored, and dropped.
        let replaced_at = current
            .shared
            .previous
            .load_full()
            .map(|previous| previous.replaced_at)
            .unwrap_or_else(|| panic!("a previous slice"));
        let just_before = replaced_at + PREVIOUS_SLICE_GRACE - Duration::from_millis(1);
        assert!(current.previous_app_at("a/wiki", just_before).is_some());
        assert!(
            current
                .previous_app_at("a/wiki", replaced_at + PREVIOUS_SLICE_GRACE)
                .is_none()
        );
        assert!(current.shared.previous.load().is_none(), "dropped");
        assert!(
            current.previous_app_at("a/wiki", just_before).is_none(),
            "gone for good"
        );

        // A shorter grace applies to the next lookups.
        let taken = current.replace(slice("v3", vec![]));
        assert!(taken.is_ok());
        assert!(current.previous_app("a/wiki").is_some());
        current.set_change_windows(ChangeWindows {
            previous_grace: Duration::ZERO,
            ..ChangeWindows::default()
        });
        assert!(current.previous_app("a/wiki").is_none());
    }

    #[tokio::test]
    async fn the_previous_slice_is_dropped_when_its_grace_ends() {
        let current = CurrentSlice::new();
        current.set_change_windows(ChangeWindows {
            previous_grace: Duration::from_millis(20),
            ..ChangeWindows::default()
        });
        for version in ["v1", "v2"] {
            let taken = current.replace(slice(version, vec![app("a/b", "http://b.corp/", None)]));
            assert!(taken.is_ok());
        }
        assert!(current.shared.previous.load().is_some());
        // No lookup: the timer drops it.
        tokio::time::timeout(Duration::from_secs(30), async {
            while current.shared.previous.load().is_some() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the previous slice was not dropped"));
    }

    #[test]
    fn a_newer_version_is_known_from_a_notice_until_its_pull_ends() {
        let current = CurrentSlice::new();
        let taken = current.replace(slice("v1", vec![]));
        assert!(taken.is_ok());
        assert_eq!(current.newer_announced(), None, "no notices followed");
        let (notices, receiver) = watch::channel(None);
        current.follow_notices(receiver);
        assert_eq!(current.newer_announced(), None, "no notice yet");
        notices.send_replace(notice("v1"));
        assert_eq!(current.newer_announced(), None, "the version served");
        notices.send_replace(notice("v2"));
        assert_eq!(current.newer_announced().as_deref(), Some("v2"));

        // The pull ends without v2 (the fleet answered with v1): nothing to wait for,
        // until a pull for it starts again.
        let mut changes = current.changes();
        current.announced_pull_ended("v2");
        assert!(changes.has_changed().unwrap_or(false), "waiters are woken");
        assert_eq!(current.newer_announced(), None);
        current.announced_pull_started();
        assert_eq!(current.newer_announced().as_deref(), Some("v2"));
        current.announced_pull_ended("v2");
        notices.send_replace(notice("v3"));
        assert_eq!(current.newer_announced().as_deref(), Some("v3"));

        // The slice arrives: nothing newer.
        changes.mark_unchanged();
        let taken = current.replace(slice("v3", vec![]));
        assert!(taken.is_ok());
        assert!(changes.has_changed().unwrap_or(false), "waiters are woken");
        assert_eq!(current.newer_announced(), None);
    }

    #[test]
    fn a_backend_ca_bundle_must_be_pem_certificates() {
        assert!(matches!(
            CurrentSlice::with_backend_ca(Some("not pem")),
            Err(SliceError::BackendCa(_))
        ));
        assert!(CurrentSlice::with_backend_ca(None).is_ok());
    }
}
