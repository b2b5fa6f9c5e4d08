//! The proxy's own answers: error pages, robots.txt and the trailing-slash redirect.
//!
//! Error pages are small self-contained HTML (inline CSS, no external assets, nothing
//! a browser fetches afterwards) or, for clients that ask for JSON, a JSON object. Both
//! carry the request id so users can quote it to support, are never cached, and never
//! reflect input unescaped: every dynamic text is HTML-escaped (or JSON-encoded), and a
//! strict Content-Security-Policy forbids scripts should anything slip through.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use sallyport_tunnel::body::{TunnelBody, full};
use sallyport_tunnel::wire::REQUEST_ID_HEADER;

/// How long a client should wait before retrying an app in maintenance, in seconds.
pub const MAINTENANCE_RETRY_AFTER_SECS: u32 = 300;

/// How long a client should wait before retrying an app without a connected connector,
/// in seconds: connectors redial within seconds.
pub const NO_TUNNEL_RETRY_AFTER_SECS: u32 = 10;

const HTML: HeaderValue = HeaderValue::from_static("text/html; charset=utf-8");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
const NOSNIFF: HeaderValue = HeaderValue::from_static("nosniff");
/// Inline styles only; no scripts, images, frames or form targets.
const CSP: HeaderValue = HeaderValue::from_static(
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
);
const REQUEST_ID: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);

/// An HTML error page: `status`, a short `title`, a sentence of `detail`, and the
/// request id. Every text is escaped.
pub fn error_page(
    status: StatusCode,
    title: &str,
    detail: &str,
    request_id: &str,
) -> Response<TunnelBody> {
    let body = html_page(status, title, detail, request_id);
    respond(status, HTML, body, request_id)
}

/// An error as HTML, or as JSON (`{"error", "detail", "status", "requestId"}`) when
/// `accept` prefers `application/json` (or any `+json` type) over HTML.
pub fn error_response(
    accept: Option<&HeaderValue>,
    status: StatusCode,
    title: &str,
    detail: &str,
    request_id: &str,
) -> Response<TunnelBody> {
    if !wants_json(accept) {
        return error_page(status, title, detail, request_id);
    }
    let body = serde_json::json!({
        "error": title,
        "detail": detail,
        "status": status.as_u16(),
        "requestId": request_id,
    });
    respond(status, JSON, body.to_string(), request_id)
}

/// 503: no connector of `group` (`namespace/name`) holds a tunnel to this replica.
pub fn no_tunnel(
    accept: Option<&HeaderValue>,
    group: &str,
    request_id: &str,
) -> Response<TunnelBody> {
    let detail = format!(
        "No connector of group {group} is connected, so the application cannot be reached. \
         Try again in a moment; if this persists, ask your administrator to check the connectors."
    );
    let mut response = error_response(
        accept,
        StatusCode::SERVICE_UNAVAILABLE,
        "Application unreachable",
        &detail,
        request_id,
    );
    set_retry_after(&mut response, NO_TUNNEL_RETRY_AFTER_SECS);
    response
}

/// 429: the app's rate limit is exhausted; `Retry-After` says when a request fits again.
pub fn too_many_requests(
    accept: Option<&HeaderValue>,
    app: &str,
    wait: std::time::Duration,
    request_id: &str,
) -> Response<TunnelBody> {
    let detail = format!(
        "The application {app} receives more requests than it accepts right now. Please try again in a moment."
    );
    let mut response = error_response(
        accept,
        StatusCode::TOO_MANY_REQUESTS,
        "Too many requests",
        &detail,
        request_id,
    );
    set_retry_after(&mut response, crate::rate_limit::retry_after_secs(wait));
    response
}

/// 429: this client sends more requests than the proxy accepts from one address.
pub fn client_too_many_requests(
    accept: Option<&HeaderValue>,
    wait: std::time::Duration,
    request_id: &str,
) -> Response<TunnelBody> {
    let mut response = error_response(
        accept,
        StatusCode::TOO_MANY_REQUESTS,
        "Too many requests",
        "Your address sends more requests than this service accepts from one address. Please slow down and try again in a moment.",
        request_id,
    );
    set_retry_after(&mut response, crate::rate_limit::retry_after_secs(wait));
    response
}

/// 503: the proxy holds as many requests as it takes at once; retry in `retry_after`
/// seconds.
pub fn overloaded(
    accept: Option<&HeaderValue>,
    retry_after: u32,
    request_id: &str,
) -> Response<TunnelBody> {
    let mut response = error_response(
        accept,
        StatusCode::SERVICE_UNAVAILABLE,
        "Service busy",
        "This service is handling as many requests as it can right now. Please try again in a moment.",
        request_id,
    );
    set_retry_after(&mut response, retry_after);
    response
}

/// 413: the request body is larger than the `limit` bytes `app` accepts.
pub fn payload_too_large(
    accept: Option<&HeaderValue>,
    app: &str,
    limit: u64,
    request_id: &str,
) -> Response<TunnelBody> {
    let detail = format!("The application {app} accepts request bodies of at most {limit} bytes.");
    error_response(
        accept,
        StatusCode::PAYLOAD_TOO_LARGE,
        "Request too large",
        &detail,
        request_id,
    )
}

/// 504: the application did not answer in time.
pub fn gateway_timeout(accept: Option<&HeaderValue>, request_id: &str) -> Response<TunnelBody> {
    error_response(
        accept,
        StatusCode::GATEWAY_TIMEOUT,
        "Application timed out",
        "The application did not answer in time. Try again; if this persists, contact your administrator.",
        request_id,
    )
}

/// 502: the connector could not reach the application, or the answer was broken.
pub fn bad_gateway(accept: Option<&HeaderValue>, request_id: &str) -> Response<TunnelBody> {
    error_response(
        accept,
        StatusCode::BAD_GATEWAY,
        "Application error",
        "The application could not be reached or sent an invalid answer. Try again; if this persists, contact your administrator.",
        request_id,
    )
}

/// 404: no application is published at this host and path.
pub fn not_found(accept: Option<&HeaderValue>, request_id: &str) -> Response<TunnelBody> {
    error_response(
        accept,
        StatusCode::NOT_FOUND,
        "Not found",
        "No application is published at this address. Check the link you followed.",
        request_id,
    )
}

/// 400: the request cannot be forwarded as sent (for example a `..` path segment).
pub fn bad_request(accept: Option<&HeaderValue>, request_id: &str) -> Response<TunnelBody> {
    error_response(
        accept,
        StatusCode::BAD_REQUEST,
        "Bad request",
        "The request cannot be forwarded to the application as sent.",
        request_id,
    )
}

/// 503 with `Retry-After`: `app` (`namespace/name`) is in maintenance mode.
pub fn maintenance(
    accept: Option<&HeaderValue>,
    app: &str,
    request_id: &str,
) -> Response<TunnelBody> {
    let detail = format!("The application {app} is down for maintenance. Please try again later.");
    let mut response = error_response(
        accept,
        StatusCode::SERVICE_UNAVAILABLE,
        "Down for maintenance",
        &detail,
        request_id,
    );
    set_retry_after(&mut response, MAINTENANCE_RETRY_AFTER_SECS);
    response
}

/// `robots.txt` for every published host: nothing here is for crawlers.
pub fn robots_txt() -> Response<TunnelBody> {
    let mut response = Response::new(full(Bytes::from_static(b"User-agent: *\nDisallow: /\n")));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, TEXT);
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400"),
    );
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, NOSNIFF);
    response
}

/// 308 to `path` with a trailing slash, the query kept: the answer to a request for an
/// app's path prefix without its slash (`/app` for `/app/`), so the app only ever sees
/// paths under its prefix and relative links resolve. The location is path-absolute.
pub fn slash_redirect(path: &str, query: Option<&str>) -> Response<TunnelBody> {
    // A leading `//` would make the location scheme-relative: another host.
    let path = format!("/{}", path.trim_start_matches('/'));
    let mut location = String::with_capacity(path.len() + 2 + query.map_or(0, str::len));
    location.push_str(&path);
    location.push('/');
    if let Some(query) = query {
        location.push('?');
        location.push_str(query);
    }
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(location) = HeaderValue::try_from(location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// A response of `body` with the headers every proxy error carries.
fn respond(
    status: StatusCode,
    content_type: HeaderValue,
    body: String,
    request_id: &str,
) -> Response<TunnelBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(header::CACHE_CONTROL, NO_STORE);
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, NOSNIFF);
    headers.insert(header::CONTENT_SECURITY_POLICY, CSP);
    // An id that is not a valid header value is still shown, escaped, in the body.
    if let Ok(id) = HeaderValue::from_str(request_id) {
        headers.insert(REQUEST_ID, id);
    }
    response
}

fn set_retry_after(response: &mut Response<TunnelBody>, seconds: u32) {
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
}

/// The HTML of an error page.
fn html_page(status: StatusCode, title: &str, detail: &str, request_id: &str) -> String {
    let code = status.as_u16();
    let title = escape_html(title);
    let detail = escape_html(detail);
    let request_id = escape_html(request_id);
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{code} {title}</title>
<style>
body{{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:#f4f5f7;color:#1f2328}}
main{{max-width:36rem;margin:12vh auto;padding:2rem;background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12)}}
h1{{margin:0 0 .5rem;font-size:1.4rem}}
.code{{color:#8c959f;font-weight:400}}
p{{margin:.5rem 0}}
.id{{margin-top:1.5rem;font-size:.85rem;color:#57606a}}
code{{font:.85rem ui-monospace,SFMono-Regular,Menlo,monospace;user-select:all}}
</style>
</head>
<body>
<main>
<h1><span class="code">{code}</span> {title}</h1>
<p>{detail}</p>
<p class="id">Request ID: <code>{request_id}</code></p>
</main>
</body>
</html>
"#
    )
}

/// `text` safe inside HTML elements and quoted attributes.
fn escape_html(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains(['&', '<', '>', '"', '\'']) {
        return text.into();
    }
    let mut escaped = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped.into()
}

/// True when `accept` rates a JSON type above HTML: the highest `q` wins, ties go to
/// the type listed first. Wildcards (`*/*`) count as neither, so browsers and bare
/// clients get HTML.
fn wants_json(accept: Option<&HeaderValue>) -> bool {
    let Some(accept) = accept.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mut best_html: Option<f32> = None;
    let mut best_json: Option<f32> = None;
    let mut json_first = false;
    for range in accept.split(',') {
        let mut params = range.split(';');
        let media = params.next().unwrap_or_default().trim();
        let q = params
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        if q <= 0.0 {
            continue;
        }
        let is_json = media.eq_ignore_ascii_case("application/json")
            || media
                .get(media.len().saturating_sub(5)..)
                .is_some_and(|suffix| suffix.eq_ignore_ascii_case("+json"));
        let is_html = media.eq_ignore_ascii_case("text/html")
            || media.eq_ignore_ascii_case("application/xhtml+xml");
        if is_json {
            if best_json.is_none() && best_html.is_none() {
                json_first = true;
            }
            best_json = Some(best_json.map_or(q, |b| b.max(q)));
        } else if is_html {
            best_html = Some(best_html.map_or(q, |b| b.max(q)));
        }
    }
    match (best_json, best_html) {
        (Some(_), None) => true,
        (Some(json), Some(html)) => json > html || (json == html && json_first),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    const ID: &str = "00112233445566778899aabbccddeeff";

    async fn body_text(response: Response<TunnelBody>) -> String {
        let bytes = response
            .into_body()
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn header<'a>(response: &'a Response<TunnelBody>, name: &str) -> Option<&'a str> {
        response.headers().get(name).and_then(|v| v.to_str().ok())
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
            .block_on(future)
    }

    #[test]
    fn error_pages_carry_status_and_safe_headers() {
        let response = error_page(StatusCode::BAD_GATEWAY, "Oops", "Broken.", ID);
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            header(&response, "content-type"),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(header(&response, "cache-control"), Some("no-store"));
        assert_eq!(header(&response, "x-content-type-options"), Some("nosniff"));
        assert_eq!(header(&response, REQUEST_ID_HEADER), Some(ID));
        assert!(
            header(&response, "content-security-policy")
                .is_some_and(|csp| csp.contains("default-src 'none'"))
        );
        let html = block_on(body_text(response));
        assert!(html.starts_with("<!doctype html>"));
        assert!(html.contains("<title>502 Oops</title>"));
        assert!(html.contains(ID));
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "no external assets"
        );
    }

    #[test]
    fn dynamic_text_is_escaped() {
        let evil = "<script>alert('x')</script>&\"";
        let response = error_page(StatusCode::NOT_FOUND, evil, evil, "<id>\"");
        assert_eq!(header(&response, REQUEST_ID_HEADER), Some("<id>\""));
        let html = block_on(body_text(response));
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"));
        assert!(html.contains("&lt;id&gt;&quot;"));

        let response = no_tunnel(None, "<b>infra/east</b>", ID);
        let html = block_on(body_text(response));
        assert!(html.contains("&lt;b&gt;infra/east&lt;/b&gt;") && !html.contains("<b>"));

        // A request id that is no header value is left out of the headers.
        let response = error_page(StatusCode::NOT_FOUND, "t", "d", "bad\nid");
        assert_eq!(header(&response, REQUEST_ID_HEADER), None);
    }

    #[test]
    fn named_pages_have_their_statuses() {
        let cases = [
            (no_tunnel(None, "infra/east", ID), 503, Some("10")),
            (gateway_timeout(None, ID), 504, None),
            (bad_gateway(None, ID), 502, None),
            (not_found(None, ID), 404, None),
            (bad_request(None, ID), 400, None),
            (maintenance(None, "team-a/wiki", ID), 503, Some("300")),
        ];
        for (response, status, retry_after) in cases {
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(header(&response, "retry-after"), retry_after, "{status}");
            assert_eq!(header(&response, "cache-control"), Some("no-store"));
            assert_eq!(header(&response, REQUEST_ID_HEADER), Some(ID));
        }
        let html = block_on(body_text(no_tunnel(None, "infra/east", ID)));
        assert!(html.contains("No connector of group infra/east is connected"));
        let html = block_on(body_text(maintenance(None, "team-a/wiki", ID)));
        assert!(html.contains("team-a/wiki"));
    }

    #[test]
    fn json_clients_get_json() {
        let accept = HeaderValue::from_static("application/json");
        let response = no_tunnel(Some(&accept), "infra/\"east\"", ID);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(header(&response, "content-type"), Some("application/json"));
        assert_eq!(header(&response, "cache-control"), Some("no-store"));
        let json: serde_json::Value =
            serde_json::from_str(&block_on(body_text(response))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(json["error"], "Application unreachable");
        assert_eq!(json["requestId"], ID);
        assert_eq!(json["status"], 503);
        assert!(
            json["detail"]
                .as_str()
                .is_some_and(|d| d.contains("infra/\"east\""))
        );
    }

    #[test]
    fn accept_negotiation_prefers_html_for_browsers() {
        let wants = |accept: &str| {
            wants_json(Some(
                &HeaderValue::from_str(accept).unwrap_or_else(|e| panic!("{e}")),
            ))
        };
        assert!(!wants_json(None));
        assert!(!wants(
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        ));
        assert!(!wants("*/*"));
        assert!(wants("application/json"));
        assert!(wants("application/problem+json"));
        assert!(wants("application/json, text/plain, */*"));
        assert!(wants("text/html;q=0.5, application/json"));
        assert!(!wants("application/json;q=0.5, text/html"));
        assert!(!wants("text/html, application/json"));
        assert!(wants("application/json, text/html"));
        assert!(!wants("application/json;q=0"));
    }

    #[test]
    fn robots_txt_forbids_everything() {
        let response = robots_txt();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            header(&response, "content-type"),
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(
            block_on(body_text(response)),
            "User-agent: *\nDisallow: /\n"
        );
    }

    #[test]
    fn the_slash_redirect_stays_on_this_host() {
        let response = slash_redirect("/app", Some("a=1"));
        assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(header(&response, "location"), Some("/app/?a=1"));
        let response = slash_redirect("//evil.example/app", None);
        assert_eq!(header(&response, "location"), Some("/evil.example/app/"));
    }
}
