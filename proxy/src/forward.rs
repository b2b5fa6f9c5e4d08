//! Shaping a user's request for the tunnel, and the backend's response for the user.
//!
//! Pure functions on `http` types, generic over the body, so the streaming body passes
//! through untouched.
//!
//! **Requests** ([`to_tunnel_request`]). The external path under the route's path
//! prefix maps onto the internal URL's path, the query kept as sent; the URI becomes the
//! absolute internal URL, which the connector checks against the app's internal URL.
//! Hop-by-hop headers go, and so do client-sent `sallyport-*` headers and, unless the
//! client is a trusted proxy, client-sent forwarding headers. The proxy then sets
//! `X-Forwarded-For/-Proto/-Host`, the app and request id headers, and a `Host` header
//! naming the internal host: the reference product's default host-header translation
//! (the [`Translation`](sallyport_api::published_app::Translation) settings have no
//! switch to keep the external host yet; the private `host_header` is where it would go).
//! Paths are mapped after [`normalize_path`], as the router matched them; `..` segments
//! (plain, encoded, split by `\` or cut at `;`) are refused. A bare prefix (`/wiki` for the
//! prefix `/wiki/`) maps to the internal prefix without its slash (`/w` for `/w/`);
//! the proxy should have answered it with
//! [`slash_redirect`](crate::pages::slash_redirect) already, since a connector may
//! refuse a path outside the app's internal URL.
//!
//! **Responses** ([`translate_response`]). Hop-by-hop headers go. When the route's
//! `translation.headers` is on, `Location`, `Content-Location` and `Refresh` URLs that
//! point into the app's internal URL (its origin and path prefix) are rewritten onto the
//! external URL; URLs elsewhere (an identity provider, another internal app) and
//! relative ones are left alone. When `translation.cookies` is on, `Set-Cookie` paths
//! under the internal prefix move to the external prefix, and an internal `Domain` is
//! dropped so the cookie becomes host-only on the external host.
//!
//! **Order.** Call [`to_tunnel_request`] *before* adding identity headers: a client may
//! name any header in `Connection`, and such headers are removed here.
//!
//! **Cost.** Both directions run on every request: what depends only on the route (its
//! internal URL split, the app header) is worked out once per configuration version
//! ([`PreparedRoute`], kept by the [`Router`](crate::router::Router)), and what depends
//! on the client's address once per request ([`ClientInfo`], see [`client`]).

mod client;

pub use client::{ClientInfo, IpNetwork, NetworkError, TrustedProxies};

use std::cell::RefCell;
use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use sallyport_api::fleet_config::Route;
use sallyport_tunnel::wire::{APP_HEADER, REQUEST_ID_HEADER};

use crate::router::normalize_path;

/// A request cannot be forwarded to its app.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The route's internal URL cannot be used as a request target.
    #[error(
        "route {app}: internalUrl {url:?} is not an absolute http(s) URL with a host and without user info"
    )]
    InternalUrl {
        /// The app id of the route.
        app: String,
        /// The route's internal URL.
        url: String,
    },
    /// The request path is not under the route's path prefix: it was routed elsewhere.
    #[error("route {app}: request path {path:?} is not under pathPrefix {prefix:?}")]
    OutsidePrefix {
        /// The app id of the route.
        app: String,
        /// The request path.
        path: String,
        /// The route's path prefix.
        prefix: String,
    },
    /// The path holds a `..` segment (plain or encoded) that a backend could resolve to
    /// a path outside the app's internal prefix.
    #[error("request path {path:?} holds a '..' segment")]
    DotSegment {
        /// The request path.
        path: String,
    },
    /// The internal URI built for the request is not a valid URI.
    #[error("route {app}: the internal request URI {uri:?} is invalid: {source}")]
    Uri {
        /// The app id of the route.
        app: String,
        /// The URI that failed to parse.
        uri: String,
        /// Why.
        source: http::uri::InvalidUri,
    },
    /// A value the proxy sets cannot be a header value.
    #[error("route {app}: {header} {value:?} is not a valid header value")]
    HeaderValue {
        /// The app id of the route.
        app: String,
        /// The header that would carry it.
        header: &'static str,
        /// The value.
        value: String,
    },
}

impl ForwardError {
    /// The status to answer the user with: 400 for requests no app may receive, 502 for
    /// a route whose internal URL cannot be used, 500 for a request given the wrong
    /// route.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::DotSegment { .. } => StatusCode::BAD_REQUEST,
            // Only a request routed to the wrong route gets here: the proxy's fault.
            Self::OutsidePrefix { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Self::InternalUrl { .. } | Self::Uri { .. } | Self::HeaderValue { .. } => {
                StatusCode::BAD_GATEWAY
            }
        }
    }
}

/// Headers that concern one connection only (RFC 9110 section 7.6.1), besides those
/// the `Connection` header names. `TE` is handled apart: `TE: trailers` survives.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Headers through which a client claims where a request came from; dropped unless the
/// client is a trusted proxy, so nobody can forge an origin IP, scheme, host or prefix.
const CLIENT_FORWARDING: [HeaderName; 7] = [
    header::FORWARDED,
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-real-ip"),
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const APP: HeaderName = HeaderName::from_static(APP_HEADER);
const REQUEST_ID: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);

/// The prefix of the headers only the proxy may set.
const RESERVED_PREFIX: &str = "sallyport-";

/// The host a request is for: the URI's authority (HTTP/2 `:authority`, HTTP/1
/// absolute-form, which RFC 9112 says overrides `Host`), else the `Host` header. Route
/// and forward with the same host.
pub fn request_host<B>(request: &Request<B>) -> Option<&str> {
    match request.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => request.headers().get(header::HOST)?.to_str().ok(),
    }
}

/// True when `headers` ask for a WebSocket upgrade (`Connection: upgrade` and
/// `Upgrade: websocket`): the caller carries such requests as an extended CONNECT
/// stream (RFC 8441) instead of through [`to_tunnel_request`] alone.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let upgrade = headers
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    upgrade && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// `request`, addressed to `route`'s internal URL and shaped for the tunnel: see the
/// module documentation. `request_id` becomes [`REQUEST_ID_HEADER`].
pub fn to_tunnel_request<R, B>(
    forward_route: &R,
    request: Request<B>,
    client: &ClientInfo,
    request_id: &str,
) -> Result<Request<B>, ForwardError>
where
    R: ForwardRoute + ?Sized,
{
    let route = forward_route.route();
    let internal = forward_route
        .internal_url()
        .ok_or_else(|| ForwardError::InternalUrl {
            app: route.app.clone(),
            url: route.internal_url.clone(),
        })?;
    let (target, host) = internal_target(route, &internal, request.uri())?;
    let app = forward_route
        .app_header()
        .ok_or_else(|| ForwardError::HeaderValue {
            app: route.app.clone(),
            header: APP_HEADER,
            value: route.app.clone(),
        })?;
    let external_host = external_host(&request);
    let mut request_id = header_value(route, REQUEST_ID_HEADER, request_id)?;
    // New on every request, so never worth a place in the tunnel's HPACK tables: sent as
    // a never-indexed literal, it spares both ends inserting and evicting an entry per
    // request (and keeps the repeated headers' entries from being pushed out).
    request_id.set_sensitive(true);

    let (mut parts, body) = request.into_parts();
    parts.uri = target;
    parts.version = Version::HTTP_2;
    let headers = &mut parts.headers;
    // WebSocket upgrades are carried as extended CONNECT streams (see websocket.rs),
    // which set the method and protocol themselves: Upgrade goes with the other
    // hop-by-hop headers.
    remove_hop_by_hop(headers, Keep::TeTrailers);
    remove_reserved(headers);
    // One pass over the names present first: most clients send none of these.
    if !client.via_trusted_proxy && headers.keys().any(|name| CLIENT_FORWARDING.contains(name)) {
        for name in &CLIENT_FORWARDING {
            headers.remove(name);
        }
    }
    // The headers set below, at once: one growth of the map instead of several.
    headers.reserve(ADDED_HEADERS);
    set_forwarding(headers, client, external_host);
    headers.insert(header::HOST, host_header(route, host));
    headers.insert(APP, app);
    headers.insert(REQUEST_ID, request_id);
    Ok(Request::from_parts(parts, body))
}

/// How many headers [`to_tunnel_request`] may add: `X-Forwarded-For`, `-Proto`,
/// `-Host`, `Forwarded`, `Host`, the app and the request id.
const ADDED_HEADERS: usize = 7;

/// A route as forwarding sees it: the configuration's [`Route`] and its internal URL,
/// split once per configuration version ([`AppRoute`](crate::router::AppRoute), what
/// the router hands out) or on the spot (a bare `Route`).
pub trait ForwardRoute {
    /// The route.
    fn route(&self) -> &Route;
    /// The route's internal URL, split; `None` when it cannot be used as a request
    /// target (see [`InternalUrl::parse`]).
    fn internal_url(&self) -> Option<InternalUrl<'_>>;
    /// The route's app id as the value of [`APP_HEADER`]; `None` when it cannot be one.
    fn app_header(&self) -> Option<HeaderValue>;
}

impl ForwardRoute for Route {
    fn route(&self) -> &Route {
        self
    }

    fn internal_url(&self) -> Option<InternalUrl<'_>> {
        InternalUrl::parse(&self.internal_url)
    }

    fn app_header(&self) -> Option<HeaderValue> {
        HeaderValue::from_str(&self.app).ok()
    }
}

/// What forwarding needs of one route and can work out ahead of its requests: where
/// the parts of its internal URL are, and its app header.
#[derive(Debug, Clone)]
pub struct PreparedRoute {
    internal: Option<InternalSpans>,
    app: Option<HeaderValue>,
}

impl PreparedRoute {
    /// Prepares `route`. A route whose internal URL or app id is unusable is prepared
    /// too: its requests fail as they would unprepared.
    pub fn new(route: &Route) -> Self {
        Self {
            internal: InternalSpans::parse(&route.internal_url),
            app: route.app_header(),
        }
    }

    /// `route`'s internal URL, split as prepared. `route` must be the route this was
    /// prepared from.
    pub fn internal_url<'a>(&self, route: &'a Route) -> Option<InternalUrl<'a>> {
        self.internal?.view(&route.internal_url)
    }

    /// The app header, as prepared.
    pub fn app_header(&self) -> Option<HeaderValue> {
        self.app.clone()
    }
}

/// The `Host` header the backend sees: the internal host, as the reference product's
/// default host-header translation does. The hook for a future switch to keep the
/// external host, which the route's translation settings do not offer yet.
fn host_header(_route: &Route, internal_host: HeaderValue) -> HeaderValue {
    internal_host
}

/// `value` as a header value, or the error naming the route and header.
fn header_value(
    route: &Route,
    header: &'static str,
    value: &str,
) -> Result<HeaderValue, ForwardError> {
    HeaderValue::from_str(value).map_err(|_| ForwardError::HeaderValue {
        app: route.app.clone(),
        header,
        value: value.to_owned(),
    })
}

/// The external host as the client sent it (port included), for `X-Forwarded-Host`.
fn external_host<B>(request: &Request<B>) -> Option<HeaderValue> {
    match request.uri().authority() {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None => request.headers().get(header::HOST).cloned(),
    }
}

/// The absolute internal URI for `uri` and the internal authority as a `Host` value,
/// both sharing one buffer.
fn internal_target(
    route: &Route,
    internal: &InternalUrl<'_>,
    uri: &Uri,
) -> Result<(Uri, HeaderValue), ForwardError> {
    // Routed on the normalised path, so mapped from it too.
    let path = normalize_path(uri.path());
    let path = path.as_ref();
    let external_stem = stem(&route.path_prefix);
    let rest = path
        .strip_prefix(external_stem)
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        .ok_or_else(|| ForwardError::OutsidePrefix {
            app: route.app.clone(),
            path: path.to_owned(),
            prefix: route.path_prefix.clone(),
        })?;
    if has_dot_dot_segment(rest) {
        return Err(ForwardError::DotSegment {
            path: path.to_owned(),
        });
    }
    let internal_stem = stem(internal.path);
    let query = uri.query();

    let mut target = String::with_capacity(
        internal.scheme.len()
            + 3
            + internal.authority.len()
            + internal_stem.len()
            + rest.len()
            + query.map_or(0, |q| q.len() + 1)
            + 1,
    );
    target.push_str(internal.scheme);
    target.push_str("://");
    let authority_at = target.len();
    target.push_str(internal.authority);
    let authority_end = target.len();
    target.push_str(internal_stem);
    target.push_str(rest);
    if internal_stem.is_empty() && rest.is_empty() {
        target.push('/');
    }
    if let Some(query) = query {
        target.push('?');
        target.push_str(query);
    }

    let bytes = Bytes::from(target);
    let host =
        HeaderValue::from_maybe_shared(bytes.slice(authority_at..authority_end)).map_err(|_| {
            ForwardError::InternalUrl {
                app: route.app.clone(),
                url: route.internal_url.clone(),
            }
        })?;
    let uri = Uri::from_maybe_shared(bytes.clone()).map_err(|source| ForwardError::Uri {
        app: route.app.clone(),
        uri: String::from_utf8_lossy(&bytes).into_owned(),
        source,
    })?;
    Ok((uri, host))
}

/// A path prefix without its trailing slash: `/app/` -> `/app`, `/` -> ``.
fn stem(prefix: &str) -> &str {
    prefix.strip_suffix('/').unwrap_or(prefix)
}

/// True when `path` holds a segment a backend could read as `..`: plain or
/// percent-encoded dots, segments split by `/`, `\` (IIS) or encoded slashes, and
/// `;parameters` cut off (Tomcat and Jetty ignore them when resolving).
pub fn has_dot_dot_segment(path: &str) -> bool {
    path.split(['/', '\\'])
        .flat_map(split_encoded_slashes)
        .any(|segment| {
            let segment = segment.split(';').next().unwrap_or(segment);
            is_encoded_dot_dot(segment)
        })
}

/// `part` split at `%2f` and `%5c` (either case).
fn split_encoded_slashes(part: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(part);
    std::iter::from_fn(move || {
        let current = rest?;
        let bytes = current.as_bytes();
        let split = (0..bytes.len().saturating_sub(2)).find(|&i| {
            bytes.get(i) == Some(&b'%')
                && matches!(
                    bytes.get(i + 1..i + 3),
                    Some([b'2', b'f' | b'F']) | Some([b'5', b'c' | b'C'])
                )
        });
        match split {
            Some(i) => {
                rest = current.get(i + 3..);
                current.get(..i)
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

/// True for `..` written with any mix of `.` and `%2e`.
fn is_encoded_dot_dot(segment: &str) -> bool {
    let mut dots = 0;
    let mut bytes = segment.as_bytes();
    while !bytes.is_empty() {
        if let Some(rest) = bytes.strip_prefix(b".") {
            bytes = rest;
        } else if let Some(rest) = bytes
            .strip_prefix(b"%2e")
            .or_else(|| bytes.strip_prefix(b"%2E"))
        {
            bytes = rest;
        } else {
            return false;
        }
        dots += 1;
    }
    dots == 2
}

/// Sets `X-Forwarded-For` (the trusted chain plus the peer, or the peer alone),
/// `X-Forwarded-Proto: https` and `X-Forwarded-Host` unless a trusted proxy sent them,
/// and, when a trusted proxy sent one, extends `Forwarded`.
fn set_forwarding(headers: &mut HeaderMap, client: &ClientInfo, host: Option<HeaderValue>) {
    let peer = client.peer_ip.to_canonical();
    let chain = if client.via_trusted_proxy && client.extends_chain {
        extended_chain(headers, peer)
    } else {
        None
    };
    headers.insert(
        X_FORWARDED_FOR,
        chain.unwrap_or_else(|| ip_header_value(peer)),
    );
    if !client.via_trusted_proxy {
        // The client's own forwarding headers are gone: set ours.
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        match host {
            Some(host) => headers.insert(X_FORWARDED_HOST, host),
            None => headers.remove(X_FORWARDED_HOST),
        };
        return;
    }
    if let Some(forwarded) = forwarded_element(headers, peer, host.as_ref())
        && let Ok(value) = HeaderValue::try_from(forwarded)
    {
        headers.insert(header::FORWARDED, value);
    }
    // What the trusted proxy saw (its users may have come over plain HTTP, or to
    // another host name) is the truth; ours only when it said nothing.
    if !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    }
    if let Some(host) = host
        && !headers.contains_key(X_FORWARDED_HOST)
    {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

/// Every `X-Forwarded-For` value a trusted proxy sent, joined, then `peer`; `None` when
/// it sent none.
fn extended_chain(headers: &HeaderMap, peer: IpAddr) -> Option<HeaderValue> {
    let mut chain = Vec::new();
    for value in headers.get_all(&X_FORWARDED_FOR) {
        let value = value.as_bytes().trim_ascii();
        if !value.is_empty() {
            chain.extend_from_slice(value);
            chain.extend_from_slice(b", ");
        }
    }
    if chain.is_empty() {
        return None;
    }
    chain.extend_from_slice(IpText::new(peer).as_bytes());
    HeaderValue::from_maybe_shared(Bytes::from(chain)).ok()
}

/// `ip` as a header value, written without the formatting machinery.
fn ip_header_value(ip: IpAddr) -> HeaderValue {
    // Digits, dots, colons and hex letters are always valid header bytes.
    HeaderValue::from_bytes(IpText::new(ip).as_bytes())
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// An IP address as text, on the stack.
struct IpText {
    bytes: [u8; 46],
    len: usize,
}

impl IpText {
    fn new(ip: IpAddr) -> Self {
        let mut text = Self {
            bytes: [0; 46],
            len: 0,
        };
        match ip {
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        text.push(b'.');
                    }
                    if octet >= 100 {
                        text.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        text.push(b'0' + octet / 10 % 10);
                    }
                    text.push(b'0' + octet % 10);
                }
            }
            IpAddr::V6(v6) => {
                use std::fmt::Write as _;
                // Rare enough for the formatter; 45 bytes hold any IPv6 text.
                let _ = write!(text, "{v6}");
            }
        }
        text
    }

    fn push(&mut self, byte: u8) {
        if let Some(slot) = self.bytes.get_mut(self.len) {
            *slot = byte;
            self.len += 1;
        }
    }

    fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }
}

impl std::fmt::Write for IpText {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        if self.len + text.len() > self.bytes.len() {
            return Err(std::fmt::Error);
        }
        text.bytes().for_each(|b| self.push(b));
        Ok(())
    }
}

/// The `Forwarded` header (RFC 7239) extended by this hop, when one is present (only a
/// trusted proxy's survives); `None` when there is none to extend.
fn forwarded_element(
    headers: &HeaderMap,
    peer: IpAddr,
    host: Option<&HeaderValue>,
) -> Option<String> {
    let existing: Vec<&str> = headers
        .get_all(header::FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if existing.is_empty() {
        return None;
    }
    let node = match peer {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let mut value = existing.join(", ");
    value.push_str(", for=");
    value.push_str(&node);
    if let Some(host) = host.and_then(|h| h.to_str().ok())
        && !host.contains(['"', '\\'])
    {
        value.push_str(";host=\"");
        value.push_str(host);
        value.push('"');
    }
    value.push_str(";proto=https");
    Some(value)
}

/// Which hop-by-hop header survives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// `TE: trailers`, on requests: HTTP/2 allows it and gRPC needs it.
    TeTrailers,
    /// Nothing, on responses.
    Nothing,
}

/// The comma-separated tokens of every `Connection` header.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes the hop-by-hop headers, those the `Connection` header names included.
fn remove_hop_by_hop(headers: &mut HeaderMap, keep: Keep) {
    // Most requests and responses carry none: one pass over the names present instead
    // of a lookup (and a hash) per hop-by-hop header. Without `Connection` no other
    // header is named hop-by-hop.
    if !headers
        .keys()
        .any(|name| HOP_BY_HOP.contains(name) || name == header::UPGRADE || name == header::TE)
    {
        return;
    }
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
    let trailers = keep == Keep::TeTrailers
        && headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| {
                t.split(';')
                    .next()
                    .unwrap_or(t)
                    .trim()
                    .eq_ignore_ascii_case("trailers")
            });
    headers.remove(header::TE);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Removes client-sent headers in the proxy's own `sallyport-` namespace.
fn remove_reserved(headers: &mut HeaderMap) {
    let reserved = |name: &&HeaderName| name.as_str().starts_with(RESERVED_PREFIX);
    if !headers.keys().any(|name| reserved(&name)) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(reserved).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}

/// `response` from `route`'s backend, shaped for the user: see the module
/// documentation. Rewrites allocate only for headers that actually change.
pub fn translate_response<R, B>(route: &R, mut response: Response<B>) -> Response<B>
where
    R: ForwardRoute + ?Sized,
{
    let headers = response.headers_mut();
    // A WebSocket's 101 is made by websocket.rs from the tunnel's 200 to the extended
    // CONNECT; here every hop-by-hop header goes.
    remove_hop_by_hop(headers, Keep::Nothing);
    let translation = &route.route().translation;
    if !translation.headers && !translation.cookies {
        return response;
    }
    let Some(map) = route
        .internal_url()
        .and_then(|internal| UrlMap::with_internal(route.route(), internal))
    else {
        return response;
    };
    if translation.headers {
        rewrite_values(headers, header::LOCATION, |v| map.rewrite_url(v));
        rewrite_values(headers, header::CONTENT_LOCATION, |v| map.rewrite_url(v));
        rewrite_values(headers, header::REFRESH, |v| map.rewrite_refresh(v));
    }
    if translation.cookies {
        rewrite_values(headers, header::SET_COOKIE, |v| map.rewrite_set_cookie(v));
    }
    response
}

/// Replaces each value of `name` for which `rewrite` returns a new text.
fn rewrite_values(
    headers: &mut HeaderMap,
    name: HeaderName,
    rewrite: impl Fn(&str) -> Option<String>,
) {
    let Entry::Occupied(mut entry) = headers.entry(name) else {
        return;
    };
    for value in entry.iter_mut() {
        if let Some(new) = value.to_str().ok().and_then(&rewrite)
            && let Ok(new) = HeaderValue::try_from(new)
        {
            *value = new;
        }
    }
}

/// The rules [`translate_response`] applies to `Location` and `Refresh`, owned so that a
/// streaming body can keep them (response body translation uses them for links).
///
/// A URL is translated when it is absolute (`http`/`https`) or scheme-relative and points
/// into the route's internal URL: same host, same port (or both on their scheme's default
/// port) and a path under the internal path prefix. It then moves onto the external URL
/// (path-absolute for a wildcard host). Anything else, relative URLs included, is left
/// alone.
#[derive(Debug, Clone)]
pub struct LinkTranslation {
    host: String,
    url: String,
    path_prefix: String,
    internal_url: String,
}

impl LinkTranslation {
    /// The translation of `route`'s URLs; `None` when its internal or external URL
    /// cannot be parsed (such a route's URLs are never translated).
    pub fn new(route: &Route) -> Option<Self> {
        UrlMap::new(route)?;
        Some(Self {
            host: route.host.clone(),
            url: route.url.clone(),
            path_prefix: route.path_prefix.clone(),
            internal_url: route.internal_url.clone(),
        })
    }

    /// `url` on the external URL when it points into the internal URL; `None` to leave
    /// it as it is.
    pub fn rewrite_url(&self, url: &str) -> Option<String> {
        // Only absolute and scheme-relative URLs can be internal: skip the map for the
        // relative links most pages are made of.
        if !url.starts_with("//") && !url.contains("://") {
            return None;
        }
        self.map()?.rewrite_url(url)
    }

    /// A `Refresh` value (`5; url=http://...`, also the `content` of an HTML
    /// `<meta http-equiv="refresh">`) with its URL translated; `None` when it does not
    /// change.
    pub fn rewrite_refresh(&self, value: &str) -> Option<String> {
        self.map()?.rewrite_refresh(value)
    }

    fn map(&self) -> Option<UrlMap<'_>> {
        UrlMap::from_parts(&self.host, &self.url, &self.path_prefix, &self.internal_url)
    }
}

/// A route's internal URL, split without allocation.
#[derive(Debug, Clone, Copy)]
pub struct InternalUrl<'a> {
    /// `http` or `https`, as written.
    scheme: &'a str,
    /// `host[:port]`.
    authority: &'a str,
    /// The host, without port.
    host: &'a str,
    /// The port, explicit or the scheme's default.
    port: u16,
    /// The path, `/` when the URL has none.
    path: &'a str,
}

impl<'a> InternalUrl<'a> {
    /// `None` unless `url` is `http(s)://host[:port][/path]` without user info, query or
    /// fragment.
    pub fn parse(url: &'a str) -> Option<Self> {
        InternalSpans::parse(url)?.view(url)
    }
}

/// Where the parts of an [`InternalUrl`] are in its text, and its port: kept per route
/// so that requests do not split the URL again.
#[derive(Debug, Clone, Copy)]
struct InternalSpans {
    /// The scheme ends here (`://` follows).
    scheme_end: usize,
    /// The authority's end; it starts after `://`.
    authority_end: usize,
    /// The host's end; it starts with the authority.
    host_end: usize,
    /// The port, explicit or the scheme's default.
    port: u16,
    /// True when the URL has a path (from `authority_end` on); else it is `/`.
    has_path: bool,
}

impl InternalSpans {
    /// See [`InternalUrl::parse`].
    fn parse(url: &str) -> Option<Self> {
        let (scheme, rest) = url.split_once("://")?;
        let default_port = default_port(scheme)?;
        let (authority, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains(['@', '?', '#']) || path.contains(['?', '#'])
        {
            return None;
        }
        // The host is always the start of the authority, brackets included.
        let (host, port) = split_authority(authority)?;
        let authority_start = scheme.len() + 3;
        Some(Self {
            scheme_end: scheme.len(),
            authority_end: authority_start + authority.len(),
            host_end: authority_start + host.len(),
            port: port.unwrap_or(default_port),
            has_path: authority.len() < rest.len(),
        })
    }

    /// The parts of `url`, the text these spans were parsed from.
    fn view(self, url: &str) -> Option<InternalUrl<'_>> {
        let authority_start = self.scheme_end + 3;
        Some(InternalUrl {
            scheme: url.get(..self.scheme_end)?,
            authority: url.get(authority_start..self.authority_end)?,
            host: url.get(authority_start..self.host_end)?,
            port: self.port,
            path: if self.has_path {
                url.get(self.authority_end..)?
            } else {
                "/"
            },
        })
    }
}

/// The default port of `scheme`, for http and https only.
fn default_port(scheme: &str) -> Option<u16> {
    if scheme.eq_ignore_ascii_case("http") {
        Some(80)
    } else if scheme.eq_ignore_ascii_case("https") {
        Some(443)
    } else {
        None
    }
}

/// `host[:port]` split; `None` for an empty host or a malformed port. IPv6 literals
/// keep their brackets.
fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if authority.starts_with('[') {
        let end = authority.find(']')?;
        let (host, after) = authority.split_at(end + 1);
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    match port {
        None => Some((host, None)),
        Some(port) => Some((host, Some(port.parse().ok()?))),
    }
}

/// How internal URLs of one route map onto its external URL.
#[derive(Debug)]
struct UrlMap<'a> {
    internal: InternalUrl<'a>,
    /// The internal path prefix without its trailing slash.
    internal_stem: &'a str,
    /// `https://host[:port]` for an exact host; `None` for a wildcard host, whose
    /// rewritten URLs are path-absolute (`/app/x`) so that they resolve against
    /// whichever host the user used.
    external_origin: Option<&'a str>,
    /// The external path prefix without its trailing slash.
    external_stem: &'a str,
    /// For cookies: the external host, or a wildcard route's parent domain.
    external_domain: &'a str,
}

impl<'a> UrlMap<'a> {
    fn new(route: &'a Route) -> Option<Self> {
        Self::from_parts(
            &route.host,
            &route.url,
            &route.path_prefix,
            &route.internal_url,
        )
    }

    /// The map of a route with these external host, external URL, path prefix and
    /// internal URL; `None` when either URL cannot be parsed.
    fn from_parts(
        host: &'a str,
        url: &'a str,
        path_prefix: &'a str,
        internal_url: &'a str,
    ) -> Option<Self> {
        Self::from_internal(host, url, path_prefix, InternalUrl::parse(internal_url)?)
    }

    /// The map of `route`, whose internal URL is `internal`.
    fn with_internal(route: &'a Route, internal: InternalUrl<'a>) -> Option<Self> {
        Self::from_internal(&route.host, &route.url, &route.path_prefix, internal)
    }

    fn from_internal(
        host: &'a str,
        url: &'a str,
        path_prefix: &'a str,
        internal: InternalUrl<'a>,
    ) -> Option<Self> {
        let wildcard = host.strip_prefix("*.");
        let external_origin = match wildcard {
            Some(_) => None,
            None => Some(origin_of(url)?),
        };
        Some(Self {
            internal,
            internal_stem: stem(internal.path),
            external_origin,
            external_stem: stem(path_prefix),
            external_domain: wildcard.unwrap_or(host),
        })
    }

    /// `url` on the external URL when it points into the internal URL (absolute or
    /// scheme-relative, under the internal path prefix); `None` to leave it as is.
    fn rewrite_url(&self, url: &str) -> Option<String> {
        let (scheme, rest) = match url.strip_prefix("//") {
            Some(rest) => (self.internal.scheme, rest),
            None => {
                let (scheme, rest) = url.split_once("://")?;
                (scheme, rest)
            }
        };
        let location_default = default_port(scheme)?;
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, remainder) = rest.split_at(authority_end);
        if authority.contains('@') {
            return None;
        }
        let (host, port) = split_authority(authority)?;
        if !host.eq_ignore_ascii_case(self.internal.host) {
            return None;
        }
        let port = port.unwrap_or(location_default);
        let internal_default = default_port(self.internal.scheme) == Some(self.internal.port);
        // Same port, or both on their scheme's default port: a backend told it is
        // reached over https (X-Forwarded-Proto) may name its own host with https.
        if port != self.internal.port && !(port == location_default && internal_default) {
            return None;
        }
        let (suffix_path, tail) = self.under_internal_prefix(remainder)?;
        let mut out = String::with_capacity(url.len() + 64);
        if let Some(origin) = self.external_origin {
            out.push_str(origin);
        }
        push_path(&mut out, self.external_stem, suffix_path);
        out.push_str(tail);
        Some(out)
    }

    /// The path under the internal prefix (empty or starting with `/`) and the query
    /// and fragment, of `remainder` (what follows the authority); `None` when the path
    /// is outside the internal prefix.
    fn under_internal_prefix<'u>(&self, remainder: &'u str) -> Option<(&'u str, &'u str)> {
        let path_end = remainder.find(['?', '#']).unwrap_or(remainder.len());
        let (path, tail) = remainder.split_at(path_end);
        let suffix = path.strip_prefix(self.internal_stem)?;
        if suffix.is_empty() || suffix.starts_with('/') {
            Some((suffix, tail))
        } else {
            None
        }
    }

    /// A `Refresh` value (`5; url=http://...`) with its URL rewritten, when it changes.
    fn rewrite_refresh(&self, value: &str) -> Option<String> {
        let (_delay, after) = value.split_once([';', ','])?;
        let target = after.trim_start();
        let target = match target.get(..3) {
            Some(key) if key.eq_ignore_ascii_case("url") => {
                let rest = target.get(3..)?.trim_start();
                rest.strip_prefix('=').map_or(target, str::trim_start)
            }
            _ => target,
        };
        let (url_start_text, url) = match target.strip_prefix(['"', '\'']) {
            Some(quoted) => {
                let quote = target.chars().next()?;
                (quoted, quoted.split(quote).next()?)
            }
            None => (target, target.trim_end()),
        };
        let rewritten = self.rewrite_url(url)?;
        let start = value.len() - url_start_text.len();
        let end = start + url.len();
        Some(format!(
            "{}{}{}",
            value.get(..start)?,
            rewritten,
            value.get(end..)?
        ))
    }

    /// A `Set-Cookie` value with an internal `Domain` dropped and a `Path` under the
    /// internal prefix moved under the external one; `None` when nothing changes.
    fn rewrite_set_cookie(&self, cookie: &str) -> Option<String> {
        let mut out: Option<String> = None;
        let mut copied = 0;
        for (start, end) in attribute_spans(cookie) {
            let attribute = cookie.get(start + 1..end)?;
            let (key, value) = attribute.split_once('=').unwrap_or((attribute, ""));
            let key = key.trim();
            let value = value.trim();
            let replacement = if key.eq_ignore_ascii_case("domain") {
                self.is_internal_domain(value).then(String::new)
            } else if key.eq_ignore_ascii_case("path") {
                self.rewrite_cookie_path(value)
                    .map(|path| format!("; Path={path}"))
            } else {
                None
            };
            if let Some(replacement) = replacement {
                let out = out.get_or_insert_with(|| String::with_capacity(cookie.len() + 16));
                out.push_str(cookie.get(copied..start)?);
                out.push_str(&replacement);
                copied = end;
            }
        }
        let mut out = out?;
        out.push_str(cookie.get(copied..)?);
        Some(out)
    }

    /// True when a cookie `Domain` covers the internal host but would not be accepted
    /// for the external host(s): dropping it makes the cookie host-only on the external
    /// host, which also keeps it from other apps published under that host's subdomains.
    fn is_internal_domain(&self, domain: &str) -> bool {
        let domain = domain.strip_prefix('.').unwrap_or(domain);
        !domain.is_empty()
            && domain_covers(domain, self.internal.host)
            && !domain_covers(domain, self.external_domain)
    }

    /// A cookie `Path` under the internal prefix, moved under the external prefix.
    fn rewrite_cookie_path(&self, path: &str) -> Option<String> {
        if self.internal_stem == self.external_stem {
            return None;
        }
        let (suffix, tail) = self.under_internal_prefix(path)?;
        let mut out = String::with_capacity(path.len() + self.external_stem.len() + 1);
        push_path(&mut out, self.external_stem, suffix);
        out.push_str(tail);
        Some(out)
    }
}

/// Appends `stem` and `suffix`, or `/` when both are empty.
fn push_path(out: &mut String, stem: &str, suffix: &str) {
    out.push_str(stem);
    out.push_str(suffix);
    if stem.is_empty() && suffix.is_empty() {
        out.push('/');
    }
}

/// `scheme://authority` of an absolute URL.
fn origin_of(url: &str) -> Option<&str> {
    let scheme_end = url.find("://")? + 3;
    let authority_end = url
        .get(scheme_end..)?
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| scheme_end + i);
    url.get(..authority_end)
}

/// True when a cookie for `domain` is sent to `host` (RFC 6265 domain-match).
fn domain_covers(domain: &str, host: &str) -> bool {
    host.eq_ignore_ascii_case(domain)
        || (host.len() > domain.len()
            && host
                .get(host.len() - domain.len()..)
                .is_some_and(|end| end.eq_ignore_ascii_case(domain))
            && host.as_bytes().get(host.len() - domain.len() - 1) == Some(&b'.'))
}

/// The spans of a cookie's attributes, each from its `;` to the next or the end.
fn attribute_spans(cookie: &str) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut starts = cookie.match_indices(';').map(|(i, _)| i).peekable();
    std::iter::from_fn(move || {
        let start = starts.next()?;
        let end = starts.peek().copied().unwrap_or(cookie.len());
        Some((start, end))
    })
}

/// Random bytes drawn from the OS in batches, per thread: one `getrandom` call serves
/// many request ids.
struct RandomPool {
    bytes: [u8; 512],
    used: usize,
}

impl RandomPool {
    /// Fills `out` from the pool, refilling it when it runs dry.
    fn take(&mut self, out: &mut [u8]) {
        if self.used + out.len() > self.bytes.len() {
            self.refill();
        }
        let end = self.used + out.len();
        if let Some(source) = self.bytes.get(self.used..end) {
            out.copy_from_slice(source);
        }
        self.used = end;
    }

    fn refill(&mut self) {
        if getrandom::fill(&mut self.bytes).is_err() {
            // The OS source never fails on supported systems; should it, ids must still
            // differ, which a randomly keyed hash of a counter and the time ensures.
            fallback_random(&mut self.bytes);
        }
        self.used = 0;
    }
}

/// Distinct, unpredictable-enough bytes without the OS random source.
fn fallback_random(out: &mut [u8]) {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let keys = std::hash::RandomState::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    for chunk in out.chunks_mut(8) {
        let mut hasher = keys.build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        hasher.write_u128(now);
        let word = hasher.finish().to_le_bytes();
        for (to, from) in chunk.iter_mut().zip(word) {
            *to = from;
        }
    }
}

thread_local! {
    static RANDOM: RefCell<RandomPool> = const {
        RefCell::new(RandomPool { bytes: [0; 512], used: 512 })
    };
}

/// A new request id: 16 random bytes as 32 lower-case hex digits.
pub fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut random = [0u8; 16];
    RANDOM.with_borrow_mut(|pool| pool.take(&mut random));
    let mut id = String::with_capacity(32);
    for byte in random {
        id.push(char::from(HEX[usize::from(byte >> 4)]));
        id.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    id
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;
    use crate::router::fixtures::route;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    /// The client at `ip`, connected directly or through a trusted proxy whose
    /// `X-Forwarded-For` is extended.
    fn client(ip: &str, trusted: bool) -> ClientInfo {
        let peer_ip: IpAddr = ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}"));
        ClientInfo {
            via_trusted_proxy: trusted,
            extends_chain: trusted,
            ..ClientInfo::direct(peer_ip)
        }
    }

    fn get(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn forward(route: &Route, request: Request<()>, client: &ClientInfo) -> Request<()> {
        to_tunnel_request(route, request, client, ID).unwrap_or_else(|e| panic!("{e}"))
    }

    fn header<'a, B>(request: &'a Request<B>, name: &str) -> Option<&'a str> {
        request.headers().get(name).and_then(|v| v.to_str().ok())
    }

    fn wiki() -> Route {
        route(
            "team-a/wiki",
            "apps.example.com",
            443,
            "/wiki/",
            "http://wiki.corp.internal:8080/w/",
        )
    }

    #[test]
    fn the_path_maps_onto_the_internal_url_keeping_the_query() {
        let r = wiki();
        let cases = [
            (
                "/wiki/page?a=1&b=%20",
                "http://wiki.corp.internal:8080/w/page?a=1&b=%20",
            ),
            ("/wiki/", "http://wiki.corp.internal:8080/w/"),
            ("/wiki", "http://wiki.corp.internal:8080/w"),
            ("/wiki/a/b/", "http://wiki.corp.internal:8080/w/a/b/"),
        ];
        for (path, expected) in cases {
            let out = forward(
                &r,
                get(path, &[("host", "apps.example.com")]),
                &client("192.0.2.1", false),
            );
            assert_eq!(out.uri().to_string(), expected, "{path}");
            assert_eq!(out.version(), Version::HTTP_2);
        }

        let root = route(
            "t/root",
            "apps.example.com",
            443,
            "/",
            "https://backend.corp",
        );
        let out = forward(&root, get("/?x", &[]), &client("192.0.2.1", false));
        assert_eq!(out.uri().to_string(), "https://backend.corp/?x");
        let out = forward(&root, get("/a/b", &[]), &client("192.0.2.1", false));
        assert_eq!(out.uri().to_string(), "https://backend.corp/a/b");

        let under = route(
            "t/under",
            "apps.example.com",
            443,
            "/app/",
            "http://b.corp/",
        );
        let out = forward(&under, get("/app", &[]), &client("192.0.2.1", false));
        assert_eq!(out.uri().to_string(), "http://b.corp/");
        let out = forward(&under, get("/app/x", &[]), &client("192.0.2.1", false));
        assert_eq!(out.uri().to_string(), "http://b.corp/x");
        let out = forward(
            &under,
            get("/%61pp/%7Ex%2F", &[]),
            &client("192.0.2.1", false),
        );
        assert_eq!(out.uri().to_string(), "http://b.corp/~x%2F");
    }

    #[test]
    fn requests_outside_the_prefix_or_with_dot_dot_segments_are_refused() {
        let r = wiki();
        let refuse =
            |path: &str| to_tunnel_request(&r, get(path, &[]), &client("192.0.2.1", false), ID);
        assert!(matches!(
            refuse("/wikipedia"),
            Err(ForwardError::OutsidePrefix { .. })
        ));
        for path in [
            "/wiki/../admin/",
            "/wiki/%2e%2e/admin",
            "/wiki/.%2E/admin",
            "/wiki/..;x=1/admin",
            "/wiki/..%2fadmin",
            "/wiki/x%5C..%5Cadmin",
            "/wiki/..",
        ] {
            let error = refuse(path).err();
            assert!(
                matches!(error, Some(ForwardError::DotSegment { .. })),
                "{path}"
            );
            assert_eq!(error.map(|e| e.status()), Some(StatusCode::BAD_REQUEST));
        }
        for path in ["/wiki/a..b", "/wiki/.../x", "/wiki/./x", "/wiki/.hidden"] {
            assert!(refuse(path).is_ok(), "{path}");
        }
    }

    #[test]
    fn a_bad_internal_url_is_an_error_naming_the_route() {
        for url in [
            "ftp://x/",
            "http://",
            "http://user@host/",
            "wiki.corp",
            "http://h:99999/",
        ] {
            let r = route("t/bad", "apps.example.com", 443, "/", url);
            let error = to_tunnel_request(&r, get("/", &[]), &client("192.0.2.1", false), ID).err();
            assert!(
                matches!(error, Some(ForwardError::InternalUrl { .. })),
                "{url}: {error:?}"
            );
            assert!(error.is_some_and(|e| e.to_string().contains("t/bad")));
        }
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let request = get(
            "/wiki/",
            &[
                ("connection", "keep-alive, X-Custom-Hop"),
                ("x-custom-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("proxy-connection", "keep-alive"),
                ("proxy-authorization", "Basic abc"),
                ("te", "gzip, trailers;q=1"),
                ("trailer", "x-checksum"),
                ("transfer-encoding", "chunked"),
                ("upgrade", "h2c"),
                ("accept", "text/html"),
            ],
        );
        let out = forward(&wiki(), request, &client("192.0.2.1", false));
        for name in [
            "connection",
            "x-custom-hop",
            "keep-alive",
            "proxy-connection",
            "proxy-authorization",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ] {
            assert!(!out.headers().contains_key(name), "{name} kept");
        }
        assert_eq!(header(&out, "te"), Some("trailers"));
        assert_eq!(header(&out, "accept"), Some("text/html"));

        let out = forward(
            &wiki(),
            get("/wiki/", &[("te", "gzip")]),
            &client("192.0.2.1", false),
        );
        assert!(!out.headers().contains_key("te"));
    }

    #[test]
    fn reserved_and_untrusted_forwarding_headers_are_replaced() {
        let request = get(
            "/wiki/",
            &[
                ("host", "Apps.Example.com"),
                ("sallyport-app", "team-b/admin"),
                ("Sallyport-Identity", "forged"),
                ("x-request-id", "forged"),
                ("x-forwarded-for", "10.0.0.1"),
                ("x-forwarded-proto", "http"),
                ("x-forwarded-host", "evil.example"),
                ("x-forwarded-prefix", "/evil"),
                ("x-real-ip", "10.0.0.1"),
                ("forwarded", "for=10.0.0.1"),
            ],
        );
        let out = forward(&wiki(), request, &client("192.0.2.7", false));
        assert_eq!(header(&out, APP_HEADER), Some("team-a/wiki"));
        assert!(!out.headers().contains_key("sallyport-identity"));
        assert_eq!(header(&out, REQUEST_ID_HEADER), Some(ID));
        assert_eq!(header(&out, "x-forwarded-for"), Some("192.0.2.7"));
        assert_eq!(header(&out, "x-forwarded-proto"), Some("https"));
        assert_eq!(header(&out, "x-forwarded-host"), Some("Apps.Example.com"));
        assert_eq!(header(&out, "host"), Some("wiki.corp.internal:8080"));
        for name in ["x-forwarded-prefix", "x-real-ip", "forwarded"] {
            assert!(!out.headers().contains_key(name), "{name} kept");
        }
    }

    #[test]
    fn a_trusted_proxys_chain_is_extended() {
        let request = get(
            "/wiki/",
            &[
                ("host", "apps.example.com"),
                ("x-forwarded-for", "203.0.113.9, 10.0.0.1"),
                ("x-forwarded-for", "10.0.0.2"),
                ("x-forwarded-proto", "http"),
                ("forwarded", "for=203.0.113.9;proto=https"),
            ],
        );
        let out = forward(&wiki(), request, &client("::ffff:10.0.0.3", true));
        assert_eq!(
            header(&out, "x-forwarded-for"),
            Some("203.0.113.9, 10.0.0.1, 10.0.0.2, 10.0.0.3")
        );
        // What the trusted proxy saw is kept: its user came over plain HTTP.
        assert_eq!(header(&out, "x-forwarded-proto"), Some("http"));
        assert_eq!(header(&out, "x-forwarded-host"), Some("apps.example.com"));
        assert_eq!(
            header(&out, "forwarded"),
            Some("for=203.0.113.9;proto=https, for=10.0.0.3;host=\"apps.example.com\";proto=https")
        );

        let request = get("/wiki/", &[("forwarded", "for=203.0.113.9")]);
        let v6 = ClientInfo {
            via_trusted_proxy: true,
            ..ClientInfo::direct(IpAddr::V6(Ipv6Addr::LOCALHOST))
        };
        let out = forward(&wiki(), request, &v6);
        assert_eq!(header(&out, "x-forwarded-for"), Some("::1"));
        assert_eq!(header(&out, "x-forwarded-proto"), Some("https"));
        assert_eq!(
            header(&out, "forwarded"),
            Some("for=203.0.113.9, for=\"[::1]\";proto=https")
        );
    }

    #[test]
    fn trusted_proxies_decide_what_the_backend_sees() {
        let proxies = TrustedProxies::parse(&["10.0.0.0/8"]).unwrap_or_else(|e| panic!("{e}"));
        let headers = [
            ("host", "apps.example.com"),
            ("x-forwarded-for", "198.51.100.4, 203.0.113.9"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "www.example.org"),
            ("x-real-ip", "198.51.100.4"),
        ];

        // A spoofed chain from an untrusted peer: gone, the socket's address instead.
        let request = get("/wiki/", &headers);
        let untrusted = proxies.client_info(
            "192.0.2.7".parse().unwrap_or_else(|e| panic!("{e}")),
            request.headers(),
        );
        assert_eq!(untrusted.client_ip.to_string(), "192.0.2.7");
        let out = forward(&wiki(), request, &untrusted);
        assert_eq!(header(&out, "x-forwarded-for"), Some("192.0.2.7"));
        assert_eq!(header(&out, "x-forwarded-proto"), Some("https"));
        assert_eq!(header(&out, "x-forwarded-host"), Some("apps.example.com"));
        assert!(!out.headers().contains_key("x-real-ip"));

        // The same from a trusted load balancer: kept and extended.
        let request = get("/wiki/", &headers);
        let trusted = proxies.client_info(
            "10.0.0.5".parse().unwrap_or_else(|e| panic!("{e}")),
            request.headers(),
        );
        assert_eq!(trusted.client_ip.to_string(), "203.0.113.9");
        let out = forward(&wiki(), request, &trusted);
        assert_eq!(
            header(&out, "x-forwarded-for"),
            Some("198.51.100.4, 203.0.113.9, 10.0.0.5")
        );
        assert_eq!(header(&out, "x-forwarded-proto"), Some("http"));
        assert_eq!(header(&out, "x-forwarded-host"), Some("www.example.org"));
        assert_eq!(header(&out, "x-real-ip"), Some("198.51.100.4"));

        // An unreadable chain from a trusted peer: the peer alone, never an error.
        let request = get(
            "/wiki/",
            &[
                ("host", "apps.example.com"),
                ("x-forwarded-for", "nonsense"),
            ],
        );
        let garbled = proxies.client_info(
            "10.0.0.5".parse().unwrap_or_else(|e| panic!("{e}")),
            request.headers(),
        );
        assert_eq!(garbled.client_ip.to_string(), "10.0.0.5");
        let out = forward(&wiki(), request, &garbled);
        assert_eq!(header(&out, "x-forwarded-for"), Some("10.0.0.5"));
        assert_eq!(header(&out, "x-forwarded-proto"), Some("https"));
        assert_eq!(header(&out, "x-forwarded-host"), Some("apps.example.com"));
    }

    #[test]
    fn addresses_are_written_as_std_writes_them() {
        for text in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.0.3",
            "192.168.100.9",
            "::1",
            "2001:db8::7",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:1.2.3.4",
        ] {
            let ip: IpAddr = text.parse().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                ip_header_value(ip).to_str().ok(),
                Some(ip.to_string().as_str())
            );
        }
    }

    #[test]
    fn prepared_routes_forward_as_bare_routes_do() {
        for url in [
            "http://wiki.corp.internal:8080/w/",
            "https://backend.corp",
            "http://[fd00::1]:8080/x/",
            "http://[fd00::1]",
            "http://b.corp/",
            "ftp://x/",
            "http://",
            "http://user@host/",
            "http://h:99999/",
        ] {
            let r = route("t/app", "apps.example.com", 443, "/app/", url);
            let prepared = crate::router::AppRoute::new(r.clone());
            for path in ["/app/", "/app/x/y?q=1", "/app", "/app/../x"] {
                let bare = to_tunnel_request(&r, get(path, &[]), &client("192.0.2.1", false), ID);
                let fast =
                    to_tunnel_request(&prepared, get(path, &[]), &client("192.0.2.1", false), ID);
                match (bare, fast) {
                    (Ok(bare), Ok(fast)) => {
                        assert_eq!(bare.uri(), fast.uri(), "{url} {path}");
                        assert_eq!(bare.headers(), fast.headers(), "{url} {path}");
                    }
                    (Err(bare), Err(fast)) => {
                        assert_eq!(bare.to_string(), fast.to_string(), "{url} {path}")
                    }
                    (bare, fast) => panic!("{url} {path}: {bare:?} vs {fast:?}"),
                }
            }
            let location = format!("{}/z", url.trim_end_matches('/'));
            let bare = translate_response(&r, response(&[("location", &location)]));
            let fast = translate_response(&prepared, response(&[("location", &location)]));
            assert_eq!(bare.headers(), fast.headers(), "{url}");
        }
    }

    #[test]
    fn the_external_host_comes_from_the_authority_of_http2_requests() {
        let request = get("https://apps.example.com:8443/wiki/x", &[]);
        assert_eq!(request_host(&request), Some("apps.example.com:8443"));
        let out = forward(&wiki(), request, &client("192.0.2.1", false));
        assert_eq!(
            header(&out, "x-forwarded-host"),
            Some("apps.example.com:8443")
        );
        assert_eq!(header(&out, "host"), Some("wiki.corp.internal:8080"));
        assert_eq!(out.uri().to_string(), "http://wiki.corp.internal:8080/w/x");

        let request = get("/wiki/", &[("host", "apps.example.com")]);
        assert_eq!(request_host(&request), Some("apps.example.com"));
    }

    #[test]
    fn websocket_upgrades_are_recognised() {
        let ws = get(
            "/",
            &[
                ("connection", "keep-alive, Upgrade"),
                ("upgrade", "websocket"),
            ],
        );
        assert!(is_websocket_upgrade(ws.headers()));
        let h2c = get("/", &[("connection", "upgrade"), ("upgrade", "h2c")]);
        assert!(!is_websocket_upgrade(h2c.headers()));
    }

    fn response(headers: &[(&str, &str)]) -> Response<()> {
        let mut builder = Response::builder().status(302);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn translated(route: &Route, name: &str, value: &str) -> Vec<String> {
        let out = translate_response(route, response(&[(name, value)]));
        out.headers()
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("<binary>").to_owned())
            .collect()
    }

    fn one(route: &Route, name: &str, value: &str) -> String {
        translated(route, name, value).join(" | ")
    }

    #[test]
    fn internal_redirects_move_to_the_external_url() {
        let r = wiki();
        let cases = [
            (
                "http://wiki.corp.internal:8080/w/page?x=1#top",
                "https://apps.example.com/wiki/page?x=1#top",
            ),
            (
                "http://WIKI.corp.internal:8080/w/",
                "https://apps.example.com/wiki/",
            ),
            (
                "http://wiki.corp.internal:8080/w",
                "https://apps.example.com/wiki",
            ),
            (
                "http://wiki.corp.internal:8080/w?x",
                "https://apps.example.com/wiki?x",
            ),
            (
                "//wiki.corp.internal:8080/w/a",
                "https://apps.example.com/wiki/a",
            ),
        ];
        for (location, expected) in cases {
            assert_eq!(one(&r, "location", location), expected, "{location}");
            assert_eq!(
                one(&r, "content-location", location),
                expected,
                "{location}"
            );
        }
    }

    #[test]
    fn other_urls_stay_as_they_are() {
        let r = wiki();
        for location in [
            "https://login.example.com/authorize?redirect_uri=http://wiki.corp.internal:8080/w/",
            "http://wiki.corp.internal:9090/w/",
            "http://wiki.corp.internal/w/",
            "https://wiki.corp.internal/w/",
            "http://wiki.corp.internal:8080/other/",
            "http://wiki.corp.internal:8080/wx",
            "http://user@wiki.corp.internal:8080/w/",
            "http://wiki.corp.internal.evil:8080/w/",
            "/w/relative",
            "relative/page",
            "mailto:someone@wiki.corp.internal",
            "https://apps.example.com/wiki/",
        ] {
            assert_eq!(one(&r, "location", location), location);
        }
    }

    #[test]
    fn default_ports_and_scheme_changes_of_the_internal_host_are_translated() {
        let r = route("t/crm", "crm.example.com", 443, "/", "http://crm.corp/");
        assert_eq!(
            one(&r, "location", "https://crm.corp/x"),
            "https://crm.example.com/x"
        );
        assert_eq!(
            one(&r, "location", "http://crm.corp:80/x"),
            "https://crm.example.com/x"
        );
        assert_eq!(
            one(&r, "location", "http://crm.corp"),
            "https://crm.example.com/"
        );
        assert_eq!(
            one(&r, "location", "http://crm.corp?q"),
            "https://crm.example.com/?q"
        );
        assert_eq!(
            one(&r, "location", "https://crm.corp:8443/x"),
            "https://crm.corp:8443/x"
        );

        let alt = route(
            "t/alt",
            "alt.example.com",
            8443,
            "/a/",
            "https://alt.corp/b/",
        );
        assert_eq!(
            one(&alt, "location", "https://alt.corp/b/c"),
            "https://alt.example.com:8443/a/c"
        );
    }

    #[test]
    fn wildcard_routes_get_path_absolute_redirects() {
        let r = route(
            "t/star",
            "*.apps.example.com",
            443,
            "/",
            "http://star.corp/s/",
        );
        assert_eq!(one(&r, "location", "http://star.corp/s/x?y"), "/x?y");
        assert_eq!(one(&r, "location", "http://star.corp/s"), "/");
    }

    #[test]
    fn refresh_urls_are_translated() {
        let r = wiki();
        let cases = [
            (
                "5; url=http://wiki.corp.internal:8080/w/next",
                "5; url=https://apps.example.com/wiki/next",
            ),
            (
                "0;URL='http://wiki.corp.internal:8080/w/n' ",
                "0;URL='https://apps.example.com/wiki/n' ",
            ),
            (
                "3; URL = \"//wiki.corp.internal:8080/w/\"",
                "3; URL = \"https://apps.example.com/wiki/\"",
            ),
            (
                "1, http://wiki.corp.internal:8080/w/x",
                "1, https://apps.example.com/wiki/x",
            ),
            (
                "5; url=https://login.example.com/",
                "5; url=https://login.example.com/",
            ),
            ("5", "5"),
            ("5; url=/relative", "5; url=/relative"),
        ];
        for (refresh, expected) in cases {
            assert_eq!(one(&r, "refresh", refresh), expected, "{refresh}");
        }
    }

    #[test]
    fn cookies_move_to_the_external_host_and_prefix() {
        let r = wiki();
        let cases = [
            (
                "sid=1; Path=/w/; Domain=wiki.corp.internal; HttpOnly",
                "sid=1; Path=/wiki/; HttpOnly",
            ),
            ("sid=1; domain=.corp.internal; path=/w", "sid=1; Path=/wiki"),
            (
                "sid=1; Path=/w/app/x; Secure",
                "sid=1; Path=/wiki/app/x; Secure",
            ),
            ("sid=1; Path=/", "sid=1; Path=/"),
            ("sid=1; Path=/wx", "sid=1; Path=/wx"),
            ("sid=1; Domain=example.com", "sid=1; Domain=example.com"),
            (
                "sid=1; Domain=login.example.net",
                "sid=1; Domain=login.example.net",
            ),
            ("sid=1", "sid=1"),
            ("a=b=c; Max-Age=5", "a=b=c; Max-Age=5"),
        ];
        for (cookie, expected) in cases {
            assert_eq!(one(&r, "set-cookie", cookie), expected, "{cookie}");
        }

        let root = route("t/root", "apps.example.com", 443, "/app/", "http://b.corp/");
        assert_eq!(one(&root, "set-cookie", "x=1; Path=/"), "x=1; Path=/app/");
        assert_eq!(one(&root, "set-cookie", "x=1; Path=/y"), "x=1; Path=/app/y");

        let out = translate_response(
            &wiki(),
            response(&[
                ("set-cookie", "a=1; Path=/w/"),
                ("set-cookie", "b=2; Path=/w/x"),
            ]),
        );
        let cookies: Vec<_> = out.headers().get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1; Path=/wiki/", "b=2; Path=/wiki/x"]);
    }

    #[test]
    fn a_domain_shared_by_internal_and_external_hosts_is_kept() {
        let same = route(
            "t/same",
            "wiki.example.com",
            443,
            "/",
            "https://wiki.example.com/",
        );
        assert_eq!(
            one(&same, "set-cookie", "a=1; Domain=example.com"),
            "a=1; Domain=example.com"
        );
        assert_eq!(
            one(&same, "location", "https://wiki.example.com/x"),
            "https://wiki.example.com/x"
        );
    }

    #[test]
    fn translation_switches_are_honoured() {
        let mut r = wiki();
        r.translation.headers = false;
        assert_eq!(
            one(&r, "location", "http://wiki.corp.internal:8080/w/x"),
            "http://wiki.corp.internal:8080/w/x"
        );
        assert_eq!(one(&r, "set-cookie", "a=1; Path=/w/"), "a=1; Path=/wiki/");
        r.translation.headers = true;
        r.translation.cookies = false;
        assert_eq!(one(&r, "set-cookie", "a=1; Path=/w/"), "a=1; Path=/w/");
        assert_eq!(
            one(&r, "location", "http://wiki.corp.internal:8080/w/x"),
            "https://apps.example.com/wiki/x"
        );
    }

    #[test]
    fn response_hop_by_hop_headers_are_removed() {
        let out = translate_response(
            &wiki(),
            response(&[
                ("connection", "close, x-hop"),
                ("x-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("transfer-encoding", "chunked"),
                ("upgrade", "websocket"),
                ("te", "trailers"),
                ("content-type", "text/html"),
            ]),
        );
        let names: Vec<&str> = out.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type"]);
    }

    #[test]
    fn request_ids_are_random_hex() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_request_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(|id| {
            id.len() == 32
                && id
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        }));
        let mut fallback = [0u8; 32];
        fallback_random(&mut fallback);
        assert_ne!(fallback, [0u8; 32]);
    }
}
