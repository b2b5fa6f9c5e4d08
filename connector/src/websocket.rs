//! WebSockets, the connector's half: an extended CONNECT stream (RFC 8441) from the proxy
//! becomes an HTTP/1.1 `Upgrade: websocket` at the app's backend, and the two upgraded
//! connections are bridged byte for byte.
//!
//! [`Backends::handle`](crate::backend::Backends::handle) has checked the app and the URI
//! already; [`serve`] then:
//!
//! 1. refuses a `CONNECT` without `:protocol websocket` (501 `UnsupportedConnect`) and a
//!    WebSocket for an app whose `backend.websockets` is off (403 `WebSocketsDisabled`);
//! 2. opens a connection of its own to the backend (TCP; for `https` then TLS with the
//!    app's client settings and ALPN `http/1.1` only, see
//!    [`AppBackend::http1_tls`]) and sends `GET` with `Upgrade: websocket`,
//!    `Connection: Upgrade`, the internal URL's `Host`, the `Sec-WebSocket-*` headers and
//!    the request's other end-to-end headers (`X-Forwarded-*`, cookies, the request id).
//!    A user on HTTP/2 sends no `Sec-WebSocket-Key`: one is made here. Connecting, the
//!    handshake and the backend's answer share `backend.timeout` (504 after it, 502 when
//!    the backend cannot be reached);
//! 3. on `101 Switching Protocols` answers the stream 200 with the backend's response
//!    headers (`Sec-WebSocket-Accept`, `-Protocol`, `-Extensions`, cookies) and copies
//!    bytes both ways until both sides have closed ([`sallyport_tunnel::splice`]). Any other answer is passed on with
//!    its status and body, except a 2xx or a 101 to another protocol: the backend is no
//!    WebSocket server there, answered 502 `UpgradeRefused`.
//!
//! The WebSocket frames are never parsed here: the backend and the user's client speak
//! RFC 6455 to each other through the stream.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{
    CONNECTION, CONTENT_LENGTH, HOST, HeaderValue, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION,
    UPGRADE,
};
use http::{Request, Response, StatusCode, Version};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use rand::Rng as _;
use rustls_pki_types::ServerName;
use sallyport_tunnel::body::{TunnelBody, empty, incoming};
use sallyport_tunnel::splice::{Splice, splice};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{Instrument as _, debug, info};

use crate::backend::{ErrorChain, Refusal, refuse, remove_hop_by_hop, remove_sallyport_headers};
use crate::slice::AppBackend;

/// The `:protocol` of a WebSocket extended CONNECT (RFC 8441, section 4).
pub const WEBSOCKET_PROTOCOL: &str = "websocket";

/// The only WebSocket version (RFC 6455), sent when the proxy named none.
const WEBSOCKET_VERSION: &str = "13";

/// How long the tunnel stream may take to turn into a byte stream once the 200 is sent.
const TUNNEL_UPGRADE_WAIT: Duration = Duration::from_secs(30);

/// Why a WebSocket could not be opened to an app's backend.
#[derive(Debug, thiserror::Error)]
pub enum WebSocketError {
    /// The TCP connection to the backend failed.
    #[error("app {app}: connecting to the backend at {address}: {source}")]
    Connect {
        /// The app, `namespace/name`.
        app: String,
        /// `host:port` dialled.
        address: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The internal URL's host cannot be a TLS server name (and `backend.tls.serverName`
    /// does not name one).
    #[error(
        "app {app}: the internal URL's host {host:?} is not a TLS server name; set backend.tls.serverName"
    )]
    ServerName {
        /// The app, `namespace/name`.
        app: String,
        /// The internal URL's host.
        host: String,
    },
    /// The TLS handshake with the backend failed (its certificate, or ALPN `http/1.1`).
    #[error("app {app}: TLS handshake with the backend at {address}: {source}")]
    Tls {
        /// The app, `namespace/name`.
        app: String,
        /// `host:port` dialled.
        address: String,
        /// The error rustls reported.
        source: std::io::Error,
    },
    /// The HTTP/1.1 exchange with the backend failed.
    #[error("app {app}: WebSocket upgrade request to the backend at {address}: {source}")]
    Http {
        /// The app, `namespace/name`.
        app: String,
        /// `host:port` dialled.
        address: String,
        /// hyper's error.
        source: hyper::Error,
    },
    /// The backend's request could not be built from the tunneled one.
    #[error("app {app}: the WebSocket upgrade request for the backend is invalid: {source}")]
    Request {
        /// The app, `namespace/name`.
        app: String,
        /// Why.
        source: http::Error,
    },
}

/// Serves a `CONNECT` stream for `app` (whose app and URI checks passed): see the module
/// documentation. Never fails: every problem becomes a response.
pub async fn serve(
    app: &AppBackend,
    mut request: Request<Incoming>,
    request_id: Option<&HeaderValue>,
) -> Response<TunnelBody> {
    let protocol = request
        .extensions()
        .get::<hyper::ext::Protocol>()
        .map(|protocol| protocol.as_str().to_owned());
    if !protocol
        .as_deref()
        .is_some_and(|p| p.eq_ignore_ascii_case(WEBSOCKET_PROTOCOL))
    {
        return refuse(
            Refusal::UnsupportedConnect,
            app.app(),
            request_id,
            &format_args!("CONNECT with :protocol {protocol:?}"),
        );
    }
    if !app.websockets() {
        return refuse(
            Refusal::WebSocketsDisabled,
            app.app(),
            request_id,
            &"backend.websockets is false for the app",
        );
    }
    let request_id_text = request_id
        .map(|id| String::from_utf8_lossy(id.as_bytes()).into_owned())
        .unwrap_or_else(|| "-".to_owned());
    let tunnel = hyper::upgrade::on(&mut request);
    let upgrade = match backend_request(app, request) {
        Ok(upgrade) => upgrade,
        Err(error) => {
            return refuse(
                Refusal::BackendUnreachable,
                app.app(),
                request_id,
                &ErrorChain(&error),
            );
        }
    };
    let opened = tokio::time::timeout(app.timeout(), open(app, upgrade)).await;
    let mut response = match opened {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            return refuse(
                Refusal::BackendUnreachable,
                app.app(),
                request_id,
                &ErrorChain(&error),
            );
        }
        Err(_elapsed) => {
            return refuse(
                Refusal::BackendTimeout,
                app.app(),
                request_id,
                &format_args!("no WebSocket handshake answer within {:?}", app.timeout()),
            );
        }
    };
    let status = response.status();
    let switched = status == StatusCode::SWITCHING_PROTOCOLS
        && response.headers().get(UPGRADE).is_some_and(|v| {
            v.as_bytes()
                .eq_ignore_ascii_case(WEBSOCKET_PROTOCOL.as_bytes())
        });
    if !switched {
        if status.is_informational() || status.is_success() {
            return refuse(
                Refusal::UpgradeRefused,
                app.app(),
                request_id,
                &format_args!("the backend answered {status} to the WebSocket upgrade"),
            );
        }
        info!(app = %app.app(), request_id = %request_id_text, status = status.as_u16(), "the backend refused the WebSocket upgrade");
        let (mut parts, body) = response.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        remove_sallyport_headers(&mut parts.headers);
        return Response::from_parts(parts, incoming(body));
    }
    let backend_upgrade = hyper::upgrade::on(&mut response);
    let backend = match tokio::time::timeout(app.timeout(), backend_upgrade).await {
        Ok(Ok(backend)) => backend,
        Ok(Err(error)) => {
            return refuse(
                Refusal::BackendUnreachable,
                app.app(),
                request_id,
                &format_args!("the backend's upgraded connection: {}", ErrorChain(&error)),
            );
        }
        Err(_elapsed) => {
            return refuse(
                Refusal::BackendTimeout,
                app.app(),
                request_id,
                &"the backend's upgraded connection did not come up",
            );
        }
    };
    let (mut parts, _) = response.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    remove_sallyport_headers(&mut parts.headers);
    parts.headers.remove(CONTENT_LENGTH);
    let mut answer = Response::new(empty());
    *answer.headers_mut() = parts.headers;
    let span = tracing::info_span!("websocket", app = %app.app(), request_id = %request_id_text);
    tokio::spawn(bridge(tunnel, backend).instrument(span));
    info!(app = %app.app(), request_id = %request_id_text, "WebSocket open");
    answer
}

/// The backend's upgrade request, made of the tunneled `request`.
fn backend_request(
    app: &AppBackend,
    request: Request<Incoming>,
) -> Result<Request<Empty<Bytes>>, WebSocketError> {
    let invalid = |source: http::Error| WebSocketError::Request {
        app: app.app().to_owned(),
        source,
    };
    let (parts, _body) = request.into_parts();
    let mut headers = parts.headers;
    remove_sallyport_headers(&mut headers);
    remove_hop_by_hop(&mut headers);
    headers.remove(CONTENT_LENGTH);
    let host = match parts.uri.authority() {
        Some(authority) => {
            HeaderValue::from_str(authority.as_str()).map_err(|e| invalid(http::Error::from(e)))?
        }
        None => HeaderValue::from_str(app.host()).map_err(|e| invalid(http::Error::from(e)))?,
    };
    headers.insert(HOST, host);
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static(WEBSOCKET_PROTOCOL));
    headers
        .entry(SEC_WEBSOCKET_VERSION)
        .or_insert(HeaderValue::from_static(WEBSOCKET_VERSION));
    if !headers.contains_key(SEC_WEBSOCKET_KEY) {
        let nonce: [u8; 16] = rand::rng().random();
        let key = base64::engine::general_purpose::STANDARD.encode(nonce);
        headers.insert(
            SEC_WEBSOCKET_KEY,
            HeaderValue::from_str(&key).map_err(|e| invalid(http::Error::from(e)))?,
        );
    }
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", |path| path.as_str())
        .to_owned();
    let mut upgrade = Request::builder()
        .method(http::Method::GET)
        .uri(target)
        .version(Version::HTTP_11)
        .body(Empty::new())
        .map_err(invalid)?;
    *upgrade.headers_mut() = headers;
    Ok(upgrade)
}

/// Connects to `app`'s backend (TLS for `https`) and sends `upgrade` on a connection of
/// its own; the backend's answer.
async fn open(
    app: &AppBackend,
    upgrade: Request<Empty<Bytes>>,
) -> Result<Response<Incoming>, WebSocketError> {
    let host = bare_host(app.host());
    let address = format!("{}:{}", app.host(), app.port());
    let tcp = TcpStream::connect((host, app.port()))
        .await
        .map_err(|source| WebSocketError::Connect {
            app: app.app().to_owned(),
            address: address.clone(),
            source,
        })?;
    if let Err(error) = tcp.set_nodelay(true) {
        debug!(app = %app.app(), %error, "TCP_NODELAY not set on the backend connection");
    }
    let Some(tls) = app.http1_tls() else {
        return exchange(app, &address, tcp, upgrade).await;
    };
    let server_name = match &tls.server_name {
        Some(name) => name.clone(),
        None => ServerName::try_from(host.to_owned()).map_err(|_| WebSocketError::ServerName {
            app: app.app().to_owned(),
            host: app.host().to_owned(),
        })?,
    };
    let stream = TlsConnector::from(tls.config.clone())
        .connect(server_name, tcp)
        .await
        .map_err(|source| WebSocketError::Tls {
            app: app.app().to_owned(),
            address: address.clone(),
            source,
        })?;
    exchange(app, &address, stream, upgrade).await
}

/// HTTP/1.1 on `io`: sends `upgrade` and returns the answer; the connection is driven by
/// a task of its own, which hands the connection over once the backend switched.
async fn exchange<IO>(
    app: &AppBackend,
    address: &str,
    io: IO,
    upgrade: Request<Empty<Bytes>>,
) -> Result<Response<Incoming>, WebSocketError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let failed = |source| WebSocketError::Http {
        app: app.app().to_owned(),
        address: address.to_owned(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(failed)?;
    let app_id = app.app().to_owned();
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            debug!(app = %app_id, %error, "backend connection of a WebSocket upgrade failed");
        }
    });
    sender.send_request(upgrade).await.map_err(failed)
}

/// Copies bytes between the tunnel stream and the backend until both have closed (see
/// [`splice`]).
async fn bridge(tunnel: OnUpgrade, backend: Upgraded) {
    let tunnel = match tokio::time::timeout(TUNNEL_UPGRADE_WAIT, tunnel).await {
        Ok(Ok(tunnel)) => tunnel,
        Ok(Err(error)) => {
            info!(error = %ErrorChain(&error), "the tunnel stream ended before the WebSocket started");
            return;
        }
        Err(_elapsed) => {
            info!(wait = ?TUNNEL_UPGRADE_WAIT, "the tunnel stream did not turn into a WebSocket in time");
            return;
        }
    };
    let spliced = splice(
        TokioIo::new(tunnel),
        TokioIo::new(backend),
        Splice::default(),
    )
    .await;
    let (to_backend, from_backend) = (spliced.a_to_b, spliced.b_to_a);
    match spliced.error {
        None => info!(to_backend, from_backend, "WebSocket closed"),
        Some(error) => info!(to_backend, from_backend, %error, "WebSocket broken off"),
    }
}

/// `host` without the brackets of an IPv6 literal.
fn bare_host(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::bare_host;

    #[test]
    fn ipv6_hosts_lose_their_brackets() {
        assert_eq!(bare_host("[::1]"), "::1");
        assert_eq!(bare_host("wiki.corp"), "wiki.corp");
        assert_eq!(bare_host("127.0.0.1"), "127.0.0.1");
    }
}
