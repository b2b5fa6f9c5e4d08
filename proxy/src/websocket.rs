//! WebSockets through the tunnel, the proxy's half.
//!
//! A user's WebSocket handshake, an HTTP/1.1 `GET` with `Upgrade: websocket` (RFC 6455)
//! or, on an HTTP/2 connection, an extended CONNECT with `:protocol websocket` (RFC 8441),
//! becomes one extended CONNECT stream on a tunnel of the app's group
//! ([`tunnel_upgrade`]):
//!
//! 1. An app whose `backend.websockets` is off is refused with an error page (403), a
//!    malformed handshake with 400, and a WebSocket version other than 13 with 426
//!    (`Sec-WebSocket-Version: 13`, as RFC 6455 asks). Nothing reaches the tunnel.
//! 2. The request is shaped as any other ([`forward::to_tunnel_request`]: the internal
//!    URL, `X-Forwarded-*`, the app and request id headers; `Upgrade` and `Connection` go
//!    with the other hop-by-hop headers) and sent as `CONNECT` with `:protocol websocket`
//!    ([`hyper::ext::Protocol`]). `Sec-WebSocket-Key`, `-Version`, `-Protocol` and
//!    `-Extensions` stay: the connector repeats them in its HTTP/1.1 handshake with the
//!    backend, whose `Sec-WebSocket-Accept` therefore answers the user's key.
//! 3. A 2xx from the tunnel means the backend switched: the user gets `101 Switching
//!    Protocols` (200 on HTTP/2) with the backend's response headers
//!    (`Sec-WebSocket-Accept`, `-Protocol`, `-Extensions`; cookies translated as for any
//!    response), then bytes are copied both ways between the user's upgraded connection
//!    and the tunnel stream until both sides have closed
//!    ([`sallyport_tunnel::splice`]: once one side closed, the other gets a few seconds
//!    to follow). The stream counts as outstanding on its tunnel for as long
//!    ([`ResponseBody`] is kept with it).
//! 4. Any other answer (the backend's refusal with its body, or the connector's) reaches
//!    the user as a response would; no tunnel, no answer in time and a failed stream get
//!    the usual error pages.
//!
//! The frames are never parsed here: the user's client and the backend speak RFC 6455 to
//! each other through the tunnel.

use std::time::Duration;

use http::header::{
    ACCEPT, CONNECTION, CONTENT_LENGTH, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_VERSION, TRANSFER_ENCODING, UPGRADE,
};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::ext::Protocol;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use sallyport_api::fleet_config::Route;
use sallyport_tunnel::body::{self, TunnelBody};
use sallyport_tunnel::pool::{PoolError, ResponseBody, TunnelPool};
use sallyport_tunnel::splice::{Splice, splice};
use sallyport_tunnel::wire::REQUEST_ID_HEADER;
use tracing::{Instrument as _, debug, info, warn};

use crate::access::StreamGuard;
use crate::body_translation;
use crate::forward::{self, ClientInfo};
use crate::pages;
use crate::serve::TUNNEL_GRACE;

/// The `:protocol` of a WebSocket extended CONNECT (RFC 8441, section 4), and the
/// `Upgrade` token of an HTTP/1.1 WebSocket handshake.
pub const WEBSOCKET_PROTOCOL: &str = "websocket";

/// The only WebSocket version (RFC 6455).
const WEBSOCKET_VERSION: &str = "13";

/// How long the user's connection may take to turn into a byte stream once the 101 is
/// written.
const USER_UPGRADE_WAIT: Duration = Duration::from_secs(30);

/// The backend timeout when the route's is not a positive duration (as for requests).
const DEFAULT_BACKEND_TIMEOUT: Duration = Duration::from_secs(85);

/// How the user asked for the WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UserHandshake {
    /// HTTP/1.1 `Upgrade: websocket`: answered 101 with `Sec-WebSocket-Accept`.
    Http1,
    /// HTTP/2 extended CONNECT: answered 200, without `Sec-WebSocket-Accept`.
    Http2,
}

/// True when `request` opens a WebSocket: an HTTP/1.x `Upgrade: websocket` request (see
/// [`forward::is_websocket_upgrade`]) or an HTTP/2 extended CONNECT with `:protocol
/// websocket`. Such requests go to [`tunnel_upgrade`].
pub fn is_websocket_request<B>(request: &Request<B>) -> bool {
    if request.version() == Version::HTTP_2 {
        request.method() == Method::CONNECT
            && request
                .extensions()
                .get::<Protocol>()
                .is_some_and(|protocol| protocol.as_str().eq_ignore_ascii_case(WEBSOCKET_PROTOCOL))
    } else {
        forward::is_websocket_upgrade(request.headers())
    }
}

/// Carries the WebSocket handshake `request` for `route` through a tunnel of its group
/// and answers the user: 101 (200 on HTTP/2) and a bridged connection, the backend's or
/// connector's refusal, or an error page. See the module documentation.
pub async fn tunnel_upgrade(
    pool: &TunnelPool,
    route: &Route,
    mut request: Request<Incoming>,
    client: &ClientInfo,
    request_id: &str,
    guard: Option<StreamGuard>,
) -> Response<TunnelBody> {
    let accept = request.headers().get(ACCEPT).cloned();
    let accept = accept.as_ref();
    if !route.backend.websockets {
        info!(app = %route.app, %request_id, "WebSocket refused: backend.websockets is off for the app");
        return pages::error_response(
            accept,
            StatusCode::FORBIDDEN,
            "WebSockets not allowed",
            &format!(
                "The application {} does not accept WebSocket connections. Nothing was sent to the application.",
                route.app
            ),
            request_id,
        );
    }
    let handshake = match check_handshake(&request) {
        Ok(handshake) => handshake,
        Err(refusal) => {
            debug!(app = %route.app, %request_id, reason = refusal.detail, "WebSocket handshake refused");
            return refusal.response(accept, request_id);
        }
    };

    let user = hyper::upgrade::on(&mut request);
    let request = request.map(|_| body::empty());
    let mut tunneled = match forward::to_tunnel_request(route, request, client, request_id) {
        Ok(tunneled) => tunneled,
        Err(error) => {
            debug!(app = %route.app, %request_id, %error, "WebSocket not forwarded");
            return pages::error_response(
                accept,
                error.status(),
                "Bad request",
                &error.to_string(),
                request_id,
            );
        }
    };
    *tunneled.method_mut() = Method::CONNECT;
    tunneled.headers_mut().remove(CONTENT_LENGTH);
    tunneled
        .extensions_mut()
        .insert(Protocol::from_static(WEBSOCKET_PROTOCOL));

    let limit = route
        .backend
        .timeout
        .to_std()
        .unwrap_or(DEFAULT_BACKEND_TIMEOUT)
        + TUNNEL_GRACE;
    let sent = tokio::time::timeout(limit, pool.send(&route.connector_group, tunneled)).await;
    let mut response = match sent {
        Ok(Ok(response)) => response,
        Ok(Err(PoolError::NoTunnel { group })) => {
            warn!(app = %route.app, %group, %request_id, "no tunnel for the app's group");
            return pages::no_tunnel(accept, &group, request_id);
        }
        Ok(Err(error)) => {
            warn!(app = %route.app, %request_id, %error, "tunneled WebSocket handshake failed");
            return pages::bad_gateway(accept, request_id);
        }
        Err(_) => {
            warn!(app = %route.app, %request_id, "no answer to the WebSocket handshake through the tunnel in time");
            return pages::gateway_timeout(accept, request_id);
        }
    };
    if !response.status().is_success() {
        info!(app = %route.app, %request_id, status = response.status().as_u16(), "WebSocket refused by the connector or the backend");
        let response =
            forward::translate_response(route, response.map(ResponseBody::into_tunnel_body));
        let mut response = body_translation::translate_body(route, response);
        set_request_id(&mut response, request_id);
        return response;
    }

    let tunnel = match hyper::upgrade::on(&mut response).await {
        Ok(tunnel) => tunnel,
        Err(error) => {
            warn!(app = %route.app, %request_id, %error, "the tunnel stream did not turn into a WebSocket");
            return pages::bad_gateway(accept, request_id);
        }
    };
    let (parts, stream) = response.into_parts();
    let translated = forward::translate_response(route, Response::from_parts(parts, ()));
    let mut headers = translated.into_parts().0.headers;
    headers.remove(CONTENT_LENGTH);
    headers.remove(TRANSFER_ENCODING);
    let status = match handshake {
        UserHandshake::Http1 => {
            headers.insert(UPGRADE, HeaderValue::from_static(WEBSOCKET_PROTOCOL));
            headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
            StatusCode::SWITCHING_PROTOCOLS
        }
        UserHandshake::Http2 => {
            headers.remove(SEC_WEBSOCKET_ACCEPT);
            StatusCode::OK
        }
    };
    let mut answer = Response::new(body::empty());
    *answer.status_mut() = status;
    *answer.headers_mut() = headers;
    set_request_id(&mut answer, request_id);
    info!(app = %route.app, %request_id, "WebSocket open");
    let span = tracing::info_span!("websocket", app = %route.app, %request_id);
    tokio::spawn(bridge(user, tunnel, stream, guard).instrument(span));
    answer
}

/// Why a handshake is refused before it reaches the tunnel.
struct HandshakeRefusal {
    status: StatusCode,
    detail: &'static str,
}

impl HandshakeRefusal {
    fn response(&self, accept: Option<&HeaderValue>, request_id: &str) -> Response<TunnelBody> {
        let mut response = pages::error_response(
            accept,
            self.status,
            "Bad WebSocket handshake",
            self.detail,
            request_id,
        );
        if self.status == StatusCode::UPGRADE_REQUIRED {
            response.headers_mut().insert(
                SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static(WEBSOCKET_VERSION),
            );
        }
        response
    }
}

/// How the user asked for the WebSocket, or why the handshake is refused: RFC 6455
/// section 4.2.1 for HTTP/1.1 (a `GET` with a key and version 13); RFC 8441 for HTTP/2
/// (version 13 when named).
fn check_handshake(request: &Request<Incoming>) -> Result<UserHandshake, HandshakeRefusal> {
    let version = request.headers().get(SEC_WEBSOCKET_VERSION);
    let handshake = if request.version() == Version::HTTP_2 {
        UserHandshake::Http2
    } else {
        if request.method() != Method::GET {
            return Err(HandshakeRefusal {
                status: StatusCode::BAD_REQUEST,
                detail: "A WebSocket handshake must be a GET request.",
            });
        }
        if request.headers().get(SEC_WEBSOCKET_KEY).is_none() {
            return Err(HandshakeRefusal {
                status: StatusCode::BAD_REQUEST,
                detail: "The WebSocket handshake has no Sec-WebSocket-Key header.",
            });
        }
        if version.is_none() {
            return Err(HandshakeRefusal {
                status: StatusCode::UPGRADE_REQUIRED,
                detail: "The WebSocket handshake names no Sec-WebSocket-Version; version 13 is supported.",
            });
        }
        UserHandshake::Http1
    };
    if version.is_some_and(|v| v.as_bytes() != WEBSOCKET_VERSION.as_bytes()) {
        return Err(HandshakeRefusal {
            status: StatusCode::UPGRADE_REQUIRED,
            detail: "Only WebSocket version 13 is supported.",
        });
    }
    Ok(handshake)
}

fn set_request_id(response: &mut Response<TunnelBody>, request_id: &str) {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response
            .headers_mut()
            .entry(REQUEST_ID_HEADER)
            .or_insert(value);
    }
}

/// Copies bytes between the user's connection and the tunnel stream until both have
/// closed (see [`splice`]) or conditional access withdraws the session (`guard`: both
/// sides are then closed at once); `stream` keeps the tunnel stream counted as
/// outstanding until then.
async fn bridge(
    user: OnUpgrade,
    tunnel: Upgraded,
    stream: ResponseBody,
    guard: Option<StreamGuard>,
) {
    let user = match tokio::time::timeout(USER_UPGRADE_WAIT, user).await {
        Ok(Ok(user)) => user,
        Ok(Err(error)) => {
            info!(%error, "the user's connection ended before the WebSocket started");
            return;
        }
        Err(_elapsed) => {
            info!(wait = ?USER_UPGRADE_WAIT, "the user's connection did not turn into a WebSocket in time");
            return;
        }
    };
    let spliced = splice(TokioIo::new(user), TokioIo::new(tunnel), Splice::default());
    let revoked = async {
        match guard {
            Some(guard) => guard.revoked().await,
            None => std::future::pending().await,
        }
    };
    let spliced = tokio::select! {
        spliced = spliced => spliced,
        () = revoked => {
            info!("WebSocket closed: conditional access no longer allows the session");
            drop(stream);
            return;
        }
    };
    let (to_app, from_app) = (spliced.a_to_b, spliced.b_to_a);
    match spliced.error {
        None => info!(to_app, from_app, "WebSocket closed"),
        Some(error) => info!(to_app, from_app, %error, "WebSocket broken off"),
    }
    drop(stream);
}
