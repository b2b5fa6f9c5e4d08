//! WebSockets through the tunnel (being written): a user's HTTP/1.1 `Upgrade: websocket`
//! (or HTTP/2 extended CONNECT) is carried as an extended CONNECT stream (RFC 8441) on
//! the tunnel, and the connector upgrades to the backend.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use sallyport_api::fleet_config::Route;
use sallyport_tunnel::body::TunnelBody;
use sallyport_tunnel::pool::TunnelPool;

use crate::forward::ClientInfo;
use crate::pages;

/// Carries the WebSocket upgrade `request` for `route` through a tunnel of its group and
/// answers the user (101 and a bridged connection, or an error page).
pub async fn tunnel_upgrade(
    pool: &TunnelPool,
    route: &Route,
    request: Request<Incoming>,
    client: &ClientInfo,
    request_id: &str,
) -> Response<TunnelBody> {
    let _ = (pool, client);
    let accept = request.headers().get(http::header::ACCEPT);
    pages::error_response(
        accept,
        StatusCode::NOT_IMPLEMENTED,
        "WebSockets unavailable",
        &format!(
            "The application {} asked for a WebSocket, which this proxy does not carry yet.",
            route.app
        ),
        request_id,
    )
}
