//! Link translation in response bodies (being written): for apps with
//! `translation.body`, internal URLs in HTML attributes and CSS `url()` are rewritten to
//! the external URL while the body streams.

use http::Response;
use sallyport_api::fleet_config::Route;
use sallyport_tunnel::body::TunnelBody;

/// `response` with internal URLs in its HTML or CSS body rewritten to `route`'s external
/// URL, when the route asks for it; otherwise `response` unchanged.
pub fn translate_body(route: &Route, response: Response<TunnelBody>) -> Response<TunnelBody> {
    let _ = route;
    response
}
