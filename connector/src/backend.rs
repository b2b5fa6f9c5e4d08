//! The connector's request handler: a tunneled request in, the internal app's answer out.
//!
//! Each request the proxy sends on a tunnel names its app in [`APP_HEADER`] and carries
//! the app's internal URL as its URI. [`Backends::handle`]:
//!
//! 1. refuses (403) an app that is not in the group's current slice, and a URI that does
//!    not lie under the app's internal URL (scheme, host, port, path prefix): a
//!    compromised or buggy proxy cannot make a connector reach any other host. Around a
//!    configuration change (see [`crate::slice`]) a request the current slice refuses
//!    is served when the previous slice, replaced less than
//!    [`crate::slice::PREVIOUS_SLICE_GRACE`] ago, admits it; else, when the fleet
//!    announced a newer slice that is being pulled, it waits for it (at most
//!    [`crate::slice::CATCH_UP_WAIT`]) and is checked again. Either way only what one of
//!    the connector's own slices admits is served ([`Bridged`] marks such responses);
//! 2. removes the `sallyport-*` headers and the hop-by-hop headers, and sends the request
//!    as HTTP/1.1 (HTTP/2 when an `https` backend negotiates it) with the app's client;
//! 3. waits `backend.timeout` for the response headers (504 after that; 502 when the
//!    backend cannot be reached), then streams the body back as it arrives, without
//!    hop-by-hop and `sallyport-*` headers.
//!
//! Answers the connector makes itself carry [`ERROR_HEADER`], so that the proxy can tell
//! them from the backend's own, and a one-line plain-text body with the request id.
//!
//! A `CONNECT` (after the same app and URI checks) is a WebSocket: an extended CONNECT
//! with `:protocol websocket` (RFC 8441), which [`crate::websocket`] turns into an
//! HTTP/1.1 upgrade to the backend; any other `CONNECT` is refused (501).

use std::sync::Arc;

use http::header::{
    CONNECTION, CONTENT_TYPE, HeaderName, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE,
    TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use sallyport_tunnel::body::{TunnelBody, full, incoming};
use sallyport_tunnel::dial::Handler;
use sallyport_tunnel::wire::{APP_HEADER, REQUEST_ID_HEADER};
use tracing::{debug, warn};

use crate::slice::{AppBackend, CurrentSlice, UriRefused};
use crate::websocket;

/// Response header on every answer the connector makes itself rather than the backend:
/// the reason, e.g. `BackendTimeout`. Backends cannot set it (`sallyport-*` response
/// headers are removed).
pub const ERROR_HEADER: &str = "sallyport-error";

/// The prefix of the headers that belong to the tunnel and never reach a backend.
const SALLYPORT_PREFIX: &str = "sallyport-";

/// Why the connector answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 403: the app is not in the group's current slice (or the request names none).
    AppNotServed,
    /// 403: the request URI does not lie under the app's internal URL.
    OutsideInternalUrl,
    /// 403: a WebSocket for an app whose `backend.websockets` is off.
    WebSocketsDisabled,
    /// 501: a `CONNECT` that is not an extended CONNECT with `:protocol websocket`.
    UnsupportedConnect,
    /// 502: the backend answered a WebSocket upgrade without switching protocols (a 2xx,
    /// or a 101 to something else than `websocket`).
    UpgradeRefused,
    /// 502: the backend could not be reached or broke off before its response headers.
    BackendUnreachable,
    /// 504: the backend sent no response headers within `backend.timeout`.
    BackendTimeout,
}

impl Refusal {
    /// The status code answered.
    pub fn status(self) -> StatusCode {
        match self {
            Self::AppNotServed | Self::OutsideInternalUrl | Self::WebSocketsDisabled => {
                StatusCode::FORBIDDEN
            }
            Self::UnsupportedConnect => StatusCode::NOT_IMPLEMENTED,
            Self::BackendUnreachable | Self::UpgradeRefused => StatusCode::BAD_GATEWAY,
            Self::BackendTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The stable reason, as sent in [`ERROR_HEADER`].
    pub fn reason(self) -> &'static str {
        match self {
            Self::AppNotServed => "AppNotServed",
            Self::OutsideInternalUrl => "OutsideInternalUrl",
            Self::WebSocketsDisabled => "WebSocketsDisabled",
            Self::UnsupportedConnect => "UnsupportedConnect",
            Self::UpgradeRefused => "UpgradeRefused",
            Self::BackendUnreachable => "BackendUnreachable",
            Self::BackendTimeout => "BackendTimeout",
        }
    }

    /// The first words of the body.
    pub fn message(self) -> &'static str {
        match self {
            Self::AppNotServed => "app not served by this connector group",
            Self::OutsideInternalUrl => "request URI outside the app's internal URL",
            Self::WebSocketsDisabled => "WebSockets are not enabled for this app",
            Self::UnsupportedConnect => {
                "only WebSocket extended CONNECT (:protocol websocket) is served"
            }
            Self::UpgradeRefused => "the app's backend did not switch to the WebSocket protocol",
            Self::BackendUnreachable => "the app's backend could not be reached",
            Self::BackendTimeout => "the app's backend did not answer in time",
        }
    }
}

/// How a request the current slice refused was served anyway, around a configuration
/// change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bridge {
    /// The previous slice, replaced less than its grace ago, admitted it.
    PreviousSlice,
    /// The slice the fleet had announced arrived while the request waited, and admitted
    /// it.
    CatchUp,
}

impl Bridge {
    /// The stable name, as in the metrics' `how` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::PreviousSlice => "previous_slice",
            Self::CatchUp => "catch_up",
        }
    }
}

/// A response extension on the answers to requests served by a [`Bridge`]: how, and the
/// app's backend that served it (for the metrics).
#[derive(Debug, Clone)]
pub struct Bridged {
    /// How the request was admitted.
    pub by: Bridge,
    /// The app's backend that served it.
    pub app: Arc<AppBackend>,
}

/// The outcome of a request's app and URI checks.
#[derive(Debug)]
pub enum Admission {
    /// Served by `app`; `bridged` when the current slice had refused it.
    Admitted {
        /// The app's backend.
        app: Arc<AppBackend>,
        /// How, when the current slice had refused it.
        bridged: Option<Bridge>,
    },
    /// No app of the request's name in the current slice.
    NotServed,
    /// The URI does not lie under the current slice's internal URL of `app`.
    Outside {
        /// The app's backend in the current slice.
        app: Arc<AppBackend>,
        /// Why the URI is refused.
        refused: UriRefused,
    },
}

/// Serves tunneled requests from the group's current slice.
#[derive(Clone, Debug)]
pub struct Backends {
    slice: CurrentSlice,
}

impl Backends {
    /// A handler serving the apps of `slice`, as it is at the time of each request.
    pub fn new(slice: CurrentSlice) -> Self {
        Self { slice }
    }

    /// The slice served.
    pub fn slice(&self) -> &CurrentSlice {
        &self.slice
    }

    /// `self` as the tunnel's request handler ([`sallyport_tunnel::dial::Handler`]).
    pub fn handler(self: Arc<Self>) -> Handler {
        Arc::new(move |request| {
            let backends = Arc::clone(&self);
            Box::pin(async move { backends.handle(request).await })
        })
    }

    /// Serves one tunneled request: checks it, forwards it to the app's backend and
    /// streams the answer back (see the module docs). Never fails: every problem becomes
    /// a response.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<TunnelBody> {
        let app = self.app_of(&request);
        self.handle_app(request, app).await
    }

    /// The app of the current slice that `request` names in [`APP_HEADER`], if any.
    pub fn app_of<B>(&self, request: &Request<B>) -> Option<Arc<AppBackend>> {
        request
            .headers()
            .get(APP_HEADER)
            .and_then(|value| value.to_str().ok())
            .and_then(|id| self.slice.app(id))
    }

    /// [`Backends::handle`] with the app already looked up by [`Backends::app_of`] (one
    /// lookup per request when the caller needs the app too, as the metrics do).
    /// A response served by a [`Bridge`] carries a [`Bridged`] extension.
    pub async fn handle_app(
        &self,
        request: Request<Incoming>,
        app: Option<Arc<AppBackend>>,
    ) -> Response<TunnelBody> {
        let request_id = request.headers().get(REQUEST_ID_HEADER).cloned();
        let admission = match check(app, request.uri()) {
            admitted @ Admission::Admitted { .. } => admitted,
            refused => {
                let named = request
                    .headers()
                    .get(APP_HEADER)
                    .and_then(|value| value.to_str().ok());
                self.bridge(named, request.uri(), refused).await
            }
        };
        let (app, bridged) = match admission {
            Admission::Admitted { app, bridged } => (app, bridged),
            Admission::NotServed => {
                let named = request
                    .headers()
                    .get(APP_HEADER)
                    .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
                return refuse(
                    Refusal::AppNotServed,
                    named.as_deref().unwrap_or("(no sallyport-app header)"),
                    request_id.as_ref(),
                    &"the app is not in the group's current configuration slice",
                );
            }
            Admission::Outside { app, refused } => {
                return refuse(
                    Refusal::OutsideInternalUrl,
                    app.app(),
                    request_id.as_ref(),
                    &format_args!(
                        "{refused}: {} is not under {}",
                        request.uri(),
                        app.internal_url()
                    ),
                );
            }
        };
        let mut response = self.forward(request, &app, request_id.as_ref()).await;
        if let Some(by) = bridged {
            response.extensions_mut().insert(Bridged { by, app });
        }
        response
    }

    /// Checks that the request for app `named` (its [`APP_HEADER`]) with `uri` may be
    /// served, given `app`, the current slice's entry for it: by the current slice, else
    /// by the previous slice within its grace, else by the slice the fleet announced if
    /// it arrives within the catch-up wait (see [`crate::slice`]). Refuses at once when
    /// nothing newer is announced.
    pub async fn admit(
        &self,
        named: Option<&str>,
        uri: &Uri,
        app: Option<Arc<AppBackend>>,
    ) -> Admission {
        match check(app, uri) {
            admitted @ Admission::Admitted { .. } => admitted,
            refused => self.bridge(named, uri, refused).await,
        }
    }

    /// A request the current slice `refused`: admitted by the previous slice within its
    /// grace, or by the announced slice if it arrives within the catch-up wait.
    async fn bridge(&self, named: Option<&str>, uri: &Uri, refused: Admission) -> Admission {
        let Some(named) = named else {
            return refused;
        };
        if let Some(previous) = self.slice.previous_app(named)
            && previous.backend.check_uri(uri).is_ok()
        {
            debug!(
                app = %named,
                version = %previous.version,
                replaced_ago = ?previous.replaced_ago,
                "the current group slice refuses the request; served by the previous slice within its grace"
            );
            return Admission::Admitted {
                app: previous.backend,
                bridged: Some(Bridge::PreviousSlice),
            };
        }
        self.catch_up(named, uri).await
    }

    /// Waits (at most the catch-up wait) while a newer slice is announced and pulled,
    /// checking the request against each new current slice.
    async fn catch_up(&self, named: &str, uri: &Uri) -> Admission {
        let deadline = tokio::time::Instant::now() + self.slice.change_windows().catch_up_wait;
        let mut changes = self.slice.changes();
        let mut waited_for = None;
        let mut expired = false;
        loop {
            // After subscribing: a replacement since the caller's lookup is seen here,
            // a later one wakes the wait below.
            let admission = check(self.slice.app(named), uri);
            if let Admission::Admitted { app, .. } = admission {
                debug!(
                    app = %named,
                    version = %self.slice.version().unwrap_or_default(),
                    announced = waited_for.as_deref().unwrap_or_default(),
                    "the request waited for the announced group slice, which serves it"
                );
                return Admission::Admitted {
                    app,
                    bridged: Some(Bridge::CatchUp),
                };
            }
            if expired {
                debug!(
                    app = %named,
                    version = %self.slice.version().unwrap_or_default(),
                    announced = waited_for.as_deref().unwrap_or_default(),
                    "the announced group slice did not arrive within the catch-up wait"
                );
                return admission;
            }
            let Some(announced) = self.slice.newer_announced() else {
                return admission;
            };
            if waited_for.is_none() {
                debug!(
                    app = %named,
                    version = %self.slice.version().unwrap_or_default(),
                    announced = %announced,
                    "the current group slice refuses the request; waiting for the announced one"
                );
            }
            waited_for = Some(announced);
            // Past the deadline (or, never, without a sender): one last check.
            expired = !matches!(
                tokio::time::timeout_at(deadline, changes.changed()).await,
                Ok(Ok(()))
            );
        }
    }

    /// Forwards an admitted request to `app`'s backend (see the module docs).
    async fn forward(
        &self,
        mut request: Request<Incoming>,
        app: &Arc<AppBackend>,
        request_id: Option<&HeaderValue>,
    ) -> Response<TunnelBody> {
        if request.method() == Method::CONNECT {
            // Boxed: a rare branch with a large future, kept out of the state every
            // request's future carries (and moves).
            return Box::pin(websocket::serve(app, request, request_id)).await;
        }

        let headers = request.headers_mut();
        headers.remove(APP_HEADER);
        remove_sallyport_headers(headers);
        remove_hop_by_hop(headers);
        *request.version_mut() = Version::HTTP_11;

        let sent = tokio::time::timeout(app.timeout(), app.client().request(request)).await;
        match sent {
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                remove_hop_by_hop(&mut parts.headers);
                remove_sallyport_headers(&mut parts.headers);
                Response::from_parts(parts, incoming(body))
            }
            Ok(Err(error)) => refuse(
                Refusal::BackendUnreachable,
                app.app(),
                request_id,
                &ErrorChain(&error),
            ),
            Err(_elapsed) => refuse(
                Refusal::BackendTimeout,
                app.app(),
                request_id,
                &format_args!("no response headers within {:?}", app.timeout()),
            ),
        }
    }
}

/// Whether the current slice's `app` admits `uri`.
fn check(app: Option<Arc<AppBackend>>, uri: &Uri) -> Admission {
    match app {
        None => Admission::NotServed,
        Some(app) => match app.check_uri(uri) {
            Ok(()) => Admission::Admitted { app, bridged: None },
            Err(refused) => Admission::Outside { app, refused },
        },
    }
}

/// Logs `refusal` and answers it: status, [`ERROR_HEADER`] and a one-line body naming the
/// request id.
pub(crate) fn refuse(
    refusal: Refusal,
    app: &str,
    request_id: Option<&HeaderValue>,
    error: &dyn std::fmt::Display,
) -> Response<TunnelBody> {
    let request_id = request_id
        .map(|id| String::from_utf8_lossy(id.as_bytes()))
        .unwrap_or(std::borrow::Cow::Borrowed("-"));
    let status = refusal.status();
    warn!(
        app = %app,
        request_id = %request_id,
        status = status.as_u16(),
        reason = refusal.reason(),
        error = %error,
        "{}",
        refusal.message()
    );
    let mut response = Response::new(full(format!(
        "{} (request id {request_id})\n",
        refusal.message()
    )));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(
        HeaderName::from_static(ERROR_HEADER),
        HeaderValue::from_static(refusal.reason()),
    );
    response
}

/// An error and its sources, `: `-separated.
pub(crate) struct ErrorChain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

/// Removes every `sallyport-*` header. Allocates nothing when there is none.
pub(crate) fn remove_sallyport_headers(headers: &mut HeaderMap) {
    while let Some(name) = headers
        .keys()
        .find(|name| name.as_str().starts_with(SALLYPORT_PREFIX))
        .cloned()
    {
        headers.remove(&name);
    }
}

/// `Keep-Alive` and `Proxy-Connection` have no constant in `http`.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The hop-by-hop headers removed whatever `Connection` names, `Connection` first.
const HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// Removes the hop-by-hop headers (RFC 9110 section 7.6.1): those `Connection` names,
/// `Connection` itself, `Keep-Alive`, `Proxy-Connection`, `Proxy-Authenticate`,
/// `Proxy-Authorization`, `Trailer`, `Transfer-Encoding` and `Upgrade`; and `TE` unless it
/// is exactly `trailers` (which gRPC over HTTP/2 needs). Allocates only when a
/// `Connection` header names other headers.
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most requests and responses carry none: one pass over the names present instead
    // of a lookup (and a hash) per hop-by-hop header. Without `Connection` no other
    // header is named hop-by-hop.
    if !headers
        .keys()
        .any(|name| HOP_BY_HOP.contains(name) || name == TE)
    {
        return;
    }
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(CONNECTION);
    }
    for name in &HOP_BY_HOP[1..] {
        headers.remove(name);
    }
    let te_is_trailers = {
        let mut values = headers.get_all(TE).iter();
        match (values.next(), values.next()) {
            (Some(value), None) => value.as_bytes().eq_ignore_ascii_case(b"trailers"),
            _ => false,
        }
    };
    if !te_is_trailers {
        headers.remove(TE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        map
    }

    fn names(map: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_go() {
        let mut map = headers(&[
            ("connection", "close, x-hop"),
            ("connection", "x-other-hop"),
            ("x-hop", "1"),
            ("x-other-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic eA=="),
            ("proxy-authenticate", "Basic"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("trailer", "x-checksum"),
            ("te", "gzip"),
            ("x-kept", "1"),
            ("content-length", "5"),
        ]);
        remove_hop_by_hop(&mut map);
        assert_eq!(names(&map), ["content-length", "x-kept"]);
    }

    #[test]
    fn te_trailers_stays() {
        let mut map = headers(&[("te", "trailers")]);
        remove_hop_by_hop(&mut map);
        assert_eq!(names(&map), ["te"]);
    }

    #[test]
    fn sallyport_headers_go() {
        let mut map = headers(&[
            ("sallyport-app", "a/b"),
            ("sallyport-other", "x"),
            ("sallyport-error", "x"),
            ("x-request-id", "r1"),
        ]);
        remove_sallyport_headers(&mut map);
        assert_eq!(names(&map), ["x-request-id"]);
    }

    mod bridging {
        use std::time::Duration;

        use sallyport_api::Duration as ApiDuration;
        use sallyport_api::connector_group::{CertificatePolicy, Registration};
        use sallyport_api::fleet_config::{
            Backend, ConnectorGroupConfig, GroupSlice, SCHEMA_VERSION, SliceApp,
        };
        use sallyport_tunnel::wire::FleetNotice;
        use tokio::sync::watch;

        use super::super::*;
        use crate::slice::ChangeWindows;

        const WIKI: &str = "team-a/wiki";

        fn slice(version: &str, apps: &[(&str, &str)]) -> GroupSlice {
            let duration = |text| ApiDuration::parse(text).unwrap_or_else(|e| panic!("{e}"));
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
                apps: apps
                    .iter()
                    .map(|(app, url)| SliceApp {
                        app: (*app).to_owned(),
                        internal_url: (*url).to_owned(),
                        backend: Backend {
                            timeout: duration("10s"),
                            websockets: false,
                            tls: None,
                        },
                    })
                    .collect(),
            }
        }

        fn serve(current: &CurrentSlice, version: &str, apps: &[(&str, &str)]) {
            current
                .replace(slice(version, apps))
                .unwrap_or_else(|e| panic!("{version}: {e}"));
        }

        fn uri(text: &str) -> Uri {
            text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
        }

        /// The request's app looked up in the current slice, then admitted, within a
        /// bound no admission comes near unless it waits for a long window.
        async fn admit(backends: &Backends, app: &str, url: &str) -> Admission {
            let looked_up = backends.slice().app(app);
            tokio::time::timeout(
                Duration::from_secs(30),
                backends.admit(Some(app), &uri(url), looked_up),
            )
            .await
            .unwrap_or_else(|_| panic!("the admission of {url} waited"))
        }

        /// `(internal URL of the backend, bridge)` when admitted, else the refusal.
        fn outcome(admission: &Admission) -> Result<(String, Option<Bridge>), Refusal> {
            match admission {
                Admission::Admitted { app, bridged } => {
                    Ok((app.internal_url().to_owned(), *bridged))
                }
                Admission::NotServed => Err(Refusal::AppNotServed),
                Admission::Outside { .. } => Err(Refusal::OutsideInternalUrl),
            }
        }

        fn windows(previous_grace: Duration, catch_up_wait: Duration) -> ChangeWindows {
            ChangeWindows {
                previous_grace,
                catch_up_wait,
            }
        }

        fn notice(version: &str) -> Option<FleetNotice> {
            Some(FleetNotice {
                replica: "proxy-0".to_owned(),
                replicas: vec!["proxy-0".to_owned()],
                config_version: version.to_owned(),
            })
        }

        /// A slice that follows `notices`, with windows long enough that a wait shows as
        /// a test timeout.
        fn following(notices: &watch::Sender<Option<FleetNotice>>) -> Backends {
            let current = CurrentSlice::new();
            current.set_change_windows(windows(
                Duration::from_secs(3600),
                Duration::from_secs(3600),
            ));
            current.follow_notices(notices.subscribe());
            Backends::new(current)
        }

        #[tokio::test]
        async fn the_previous_slice_serves_its_internal_url_within_its_grace() {
            let (_notices, receiver) = watch::channel(None);
            let backends = Backends::new(CurrentSlice::new());
            backends.slice().follow_notices(receiver);
            serve(backends.slice(), "v1", &[(WIKI, "http://old.corp/wiki/")]);
            serve(backends.slice(), "v2", &[(WIKI, "http://new.corp/wiki/")]);

            let old = admit(&backends, WIKI, "http://old.corp/wiki/a").await;
            assert_eq!(
                outcome(&old),
                Ok((
                    "http://old.corp/wiki/".to_owned(),
                    Some(Bridge::PreviousSlice)
                ))
            );
            let new = admit(&backends, WIKI, "http://new.corp/wiki/a").await;
            assert_eq!(
                outcome(&new),
                Ok(("http://new.corp/wiki/".to_owned(), None))
            );
            // Neither slice admits these: refused, at once (nothing newer announced).
            let outside = admit(&backends, WIKI, "http://old.corp/admin").await;
            assert_eq!(outcome(&outside), Err(Refusal::OutsideInternalUrl));
            let other = admit(&backends, "team-b/crm", "http://old.corp/wiki/").await;
            assert_eq!(outcome(&other), Err(Refusal::AppNotServed));

            // An app the new slice dropped, too.
            serve(backends.slice(), "v3", &[]);
            let dropped = admit(&backends, WIKI, "http://new.corp/wiki/a").await;
            assert_eq!(
                outcome(&dropped),
                Ok((
                    "http://new.corp/wiki/".to_owned(),
                    Some(Bridge::PreviousSlice)
                ))
            );
        }

        #[tokio::test]
        async fn past_its_grace_the_previous_slice_admits_nothing() {
            let backends = Backends::new(CurrentSlice::new());
            backends
                .slice()
                .set_change_windows(windows(Duration::ZERO, Duration::from_secs(3600)));
            serve(backends.slice(), "v1", &[(WIKI, "http://old.corp/wiki/")]);
            serve(backends.slice(), "v2", &[(WIKI, "http://new.corp/wiki/")]);
            let old = admit(&backends, WIKI, "http://old.corp/wiki/a").await;
            assert_eq!(outcome(&old), Err(Refusal::OutsideInternalUrl));
            serve(backends.slice(), "v3", &[]);
            let dropped = admit(&backends, WIKI, "http://new.corp/wiki/a").await;
            assert_eq!(outcome(&dropped), Err(Refusal::AppNotServed));
        }

        #[tokio::test]
        async fn a_request_waits_for_the_announced_slice_and_is_served_by_it() {
            let (notices, _receiver) = watch::channel(None);
            let backends = following(&notices);
            serve(backends.slice(), "v1", &[(WIKI, "http://old.corp/wiki/")]);
            notices.send_replace(notice("v2"));

            // The pull lands while the requests wait.
            let slice = backends.slice().clone();
            let pulled = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                serve(
                    &slice,
                    "v2",
                    &[
                        (WIKI, "http://new.corp/wiki/"),
                        ("team-a/chat", "http://chat.corp/"),
                    ],
                );
            });
            let (moved, published) = tokio::join!(
                admit(&backends, WIKI, "http://new.corp/wiki/a"),
                admit(&backends, "team-a/chat", "http://chat.corp/room"),
            );
            assert_eq!(
                outcome(&moved),
                Ok(("http://new.corp/wiki/".to_owned(), Some(Bridge::CatchUp)))
            );
            assert_eq!(
                outcome(&published),
                Ok(("http://chat.corp/".to_owned(), Some(Bridge::CatchUp)))
            );
            pulled.await.unwrap_or_else(|e| panic!("{e}"));
        }

        #[tokio::test]
        async fn nothing_announced_or_nothing_newer_means_no_wait() {
            let (notices, _receiver) = watch::channel(None);
            let backends = following(&notices);
            serve(backends.slice(), "v1", &[(WIKI, "http://old.corp/wiki/")]);
            // No notice yet; then a notice of the version served.
            for announced in [None, notice("v1")] {
                notices.send_replace(announced);
                let refused = admit(&backends, WIKI, "http://new.corp/wiki/a").await;
                assert_eq!(outcome(&refused), Err(Refusal::OutsideInternalUrl));
                let refused = admit(&backends, "team-b/crm", "http://crm.corp/").await;
                assert_eq!(outcome(&refused), Err(Refusal::AppNotServed));
            }
            // A version whose pull ended without it (the fleet answered v1).
            notices.send_replace(notice("v2"));
            backends.slice().announced_pull_ended("v2");
            let refused = admit(&backends, WIKI, "http://new.corp/wiki/a").await;
            assert_eq!(outcome(&refused), Err(Refusal::OutsideInternalUrl));
            // A connector that follows no notices at all.
            let plain = Backends::new(CurrentSlice::new());
            plain
                .slice()
                .set_change_windows(windows(Duration::ZERO, Duration::from_secs(3600)));
            serve(plain.slice(), "v1", &[]);
            let refused = admit(&plain, WIKI, "http://new.corp/wiki/a").await;
            assert_eq!(outcome(&refused), Err(Refusal::AppNotServed));
        }

        #[tokio::test]
        async fn a_wait_ends_with_the_pull_or_the_catch_up_window_and_refuses() {
            let (notices, _receiver) = watch::channel(None);
            let backends = following(&notices);
            serve(backends.slice(), "v1", &[(WIKI, "http://old.corp/wiki/")]);
            notices.send_replace(notice("v2"));

            // The pull ends without v2: the waiting request is refused then.
            let slice = backends.slice().clone();
            let ended = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                slice.announced_pull_ended("v2");
            });
            let refused = admit(&backends, WIKI, "http://new.corp/wiki/a").await;
            assert_eq!(outcome(&refused), Err(Refusal::OutsideInternalUrl));
            ended.await.unwrap_or_else(|e| panic!("{e}"));

            // v2 arrives but does not admit the request either.
            backends.slice().announced_pull_started();
            let slice = backends.slice().clone();
            let pulled = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                serve(&slice, "v2", &[(WIKI, "http://new.corp/wiki/")]);
            });
            let refused = admit(&backends, "team-b/crm", "http://crm.corp/").await;
            assert_eq!(outcome(&refused), Err(Refusal::AppNotServed));
            pulled.await.unwrap_or_else(|e| panic!("{e}"));

            // Nothing arrives: the catch-up window bounds the wait.
            backends
                .slice()
                .set_change_windows(windows(Duration::ZERO, Duration::from_millis(50)));
            notices.send_replace(notice("v3"));
            let refused = admit(&backends, WIKI, "http://old.corp/wiki/a").await;
            assert_eq!(outcome(&refused), Err(Refusal::OutsideInternalUrl));
        }
    }

    #[test]
    fn refusals_carry_status_reason_and_request_id() {
        let response = refuse(
            Refusal::BackendTimeout,
            "team-a/wiki",
            Some(&HeaderValue::from_static("req-7")),
            &"slow",
        );
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            response.headers().get(ERROR_HEADER),
            Some(&HeaderValue::from_static("BackendTimeout"))
        );
    }
}
