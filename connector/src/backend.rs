//! The connector's request handler: a tunneled request in, the internal app's answer out.
//!
//! Each request the proxy sends on a tunnel names its app in [`APP_HEADER`] and carries
//! the app's internal URL as its URI. [`Backends::handle`]:
//!
//! 1. refuses (403) an app that is not in the group's current slice, and a URI that does
//!    not lie under the app's internal URL (scheme, host, port, path prefix): a
//!    compromised or buggy proxy cannot make a connector reach any other host;
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
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use sallyport_tunnel::body::{TunnelBody, full, incoming};
use sallyport_tunnel::dial::Handler;
use sallyport_tunnel::wire::{APP_HEADER, REQUEST_ID_HEADER};
use tracing::warn;

use crate::slice::{AppBackend, CurrentSlice};
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
    pub async fn handle_app(
        &self,
        mut request: Request<Incoming>,
        app: Option<Arc<AppBackend>>,
    ) -> Response<TunnelBody> {
        let request_id = request.headers().get(REQUEST_ID_HEADER).cloned();
        let Some(app) = app else {
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
        };
        if let Err(refused) = app.check_uri(request.uri()) {
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
        if request.method() == Method::CONNECT {
            // Boxed: a rare branch with a large future, kept out of the state every
            // request's future carries (and moves).
            return Box::pin(websocket::serve(&app, request, request_id.as_ref())).await;
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
                request_id.as_ref(),
                &ErrorChain(&error),
            ),
            Err(_elapsed) => refuse(
                Refusal::BackendTimeout,
                app.app(),
                request_id.as_ref(),
                &format_args!("no response headers within {:?}", app.timeout()),
            ),
        }
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
