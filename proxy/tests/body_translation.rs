//! Response body translation through its public entry point,
//! `body_translation::translate_body`: what is rewritten in HTML and CSS, what is left
//! alone, headers, compressed bodies and chunking.

use async_compression::tokio::bufread::{BrotliEncoder, DeflateEncoder, GzipEncoder, ZlibEncoder};
use bytes::Bytes;
use http::Response;
use http_body::Frame;
use http_body_util::{BodyExt as _, StreamBody};
use sallyport_api::fleet_config::Route;
use sallyport_proxy::body_translation::translate_body;
use sallyport_tunnel::body::{BoxError, TunnelBody};
use tokio::io::AsyncReadExt as _;

const INTERNAL: &str = "http://wiki.corp.internal:8080/w";
const EXTERNAL: &str = "https://apps.example.com/wiki";

/// A passthrough route of `team-a/wiki`, `https://apps.example.com/wiki/` to
/// `http://wiki.corp.internal:8080/w/`, with body translation on.
fn wiki() -> Route {
    let mut route: Route = serde_json::from_value(serde_json::json!({
        "app": "team-a/wiki",
        "host": "apps.example.com",
        "port": 443,
        "pathPrefix": "/wiki/",
        "url": "https://apps.example.com/wiki/",
        "internalUrl": "http://wiki.corp.internal:8080/w/",
        "connectorGroup": "infra/east",
        "preAuthentication": { "type": "Passthrough" },
        "tls": { "secretRef": { "namespace": "sallyport-system", "name": "default-tls" } },
        "backend": { "timeout": "85s", "websockets": true },
        "rateLimit": { "requestsPerSecond": 500, "burst": 1000 },
    }))
    .unwrap_or_else(|e| panic!("fixture route: {e}"));
    route.translation.body = true;
    route
}

fn frames_body(chunks: Vec<Bytes>) -> TunnelBody {
    let frames = chunks
        .into_iter()
        .map(|chunk| Ok::<_, BoxError>(Frame::data(chunk)));
    StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
}

fn backend(headers: &[(&str, &str)], chunks: Vec<Bytes>) -> Response<TunnelBody> {
    let mut builder = Response::builder().status(200);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(frames_body(chunks))
        .unwrap_or_else(|e| panic!("{e}"))
}

async fn collect(response: Response<TunnelBody>) -> Vec<u8> {
    response
        .into_body()
        .collect()
        .await
        .unwrap_or_else(|e| panic!("body: {e}"))
        .to_bytes()
        .to_vec()
}

/// `body` as `content_type`, translated for `route`, in one chunk.
async fn translate_as(route: &Route, content_type: &str, body: &str) -> String {
    let response = backend(
        &[("content-type", content_type)],
        vec![Bytes::copy_from_slice(body.as_bytes())],
    );
    let out = collect(translate_body(route, response)).await;
    String::from_utf8(out).unwrap_or_else(|e| panic!("{e}"))
}

async fn html(body: &str) -> String {
    translate_as(&wiki(), "text/html; charset=utf-8", body).await
}

#[tokio::test]
async fn every_url_attribute_is_translated() {
    let cases = [
        ("a", "href"),
        ("area", "href"),
        ("link", "href"),
        ("base", "href"),
        ("img", "src"),
        ("script", "src"),
        ("iframe", "src"),
        ("frame", "src"),
        ("embed", "src"),
        ("source", "src"),
        ("video", "src"),
        ("video", "poster"),
        ("audio", "src"),
        ("track", "src"),
        ("input", "src"),
        ("object", "data"),
        ("form", "action"),
        ("button", "formaction"),
        ("input", "formaction"),
    ];
    for (tag, attribute) in cases {
        let input = format!("<{tag} id=\"x\" {attribute}=\"{INTERNAL}/page?a=1&amp;b=2#top\">");
        let expected = format!("<{tag} id=\"x\" {attribute}=\"{EXTERNAL}/page?a=1&amp;b=2#top\">");
        assert_eq!(html(&input).await, expected, "{tag} {attribute}");
    }
    // Single quotes, no quotes, surrounding whitespace, scheme-relative, upper case.
    assert_eq!(
        html(&format!("<A HREF=' {INTERNAL}/x '>")).await,
        format!("<A HREF=\"{EXTERNAL}/x\">")
    );
    assert_eq!(
        html(&format!("<img src={INTERNAL}/i.png alt=x>")).await,
        format!("<img src=\"{EXTERNAL}/i.png\" alt=x>")
    );
    assert_eq!(
        html("<script src=\"//wiki.corp.internal:8080/w/app.js\"></script>").await,
        format!("<script src=\"{EXTERNAL}/app.js\"></script>")
    );
    assert_eq!(
        html(&format!("<a href=\"{INTERNAL}\">")).await,
        format!("<a href=\"{EXTERNAL}\">")
    );
}

#[tokio::test]
async fn meta_refresh_is_translated() {
    assert_eq!(
        html(&format!(
            "<meta http-equiv=\"Refresh\" content=\"5; url={INTERNAL}/next\">"
        ))
        .await,
        format!("<meta http-equiv=\"Refresh\" content=\"5; url={EXTERNAL}/next\">")
    );
    assert_eq!(
        html(&format!(
            "<meta http-equiv=refresh content=\"0;URL='{INTERNAL}/n'\">"
        ))
        .await,
        format!("<meta http-equiv=refresh content=\"0;URL='{EXTERNAL}/n'\">")
    );
    // Only refresh: other http-equiv values and named metas keep their content.
    for input in [
        format!("<meta http-equiv=\"content-security-policy\" content=\"5; url={INTERNAL}/x\">"),
        format!("<meta name=\"refresh\" content=\"5; url={INTERNAL}/x\">"),
        "<meta http-equiv=\"refresh\" content=\"5; url=/relative\">".to_owned(),
    ] {
        assert_eq!(html(&input).await, input);
    }
}

#[tokio::test]
async fn srcset_candidates_are_translated() {
    let input = format!(
        "<img srcset=\"{INTERNAL}/a.png 1x, /rel.png 1.5x, {INTERNAL}/b.png 2x\" src=\"/rel.png\">\
         <picture><source srcset=\"{INTERNAL}/c.webp 480w,https://cdn.example.net/d.webp 800w\"></picture>\
         <link rel=preload as=image imagesrcset=\"{INTERNAL}/e.png 1x\">"
    );
    let expected = format!(
        "<img srcset=\"{EXTERNAL}/a.png 1x, /rel.png 1.5x, {EXTERNAL}/b.png 2x\" src=\"/rel.png\">\
         <picture><source srcset=\"{EXTERNAL}/c.webp 480w,https://cdn.example.net/d.webp 800w\"></picture>\
         <link rel=preload as=image imagesrcset=\"{EXTERNAL}/e.png 1x\">"
    );
    assert_eq!(html(&input).await, expected);
}

#[tokio::test]
async fn style_attributes_and_elements_are_translated() {
    let input = format!(
        "<div style=\"background: url('{INTERNAL}/bg.png'); color: red\">x</div>\
         <style>@import \"{INTERNAL}/a.css\"; body {{ background: url({INTERNAL}/b.png) }} \
         .r {{ background: url(/rel.png) }}</style>\
         <svg><style>rect {{ fill: url({INTERNAL}/s.svg#g) }}</style></svg>"
    );
    let expected = format!(
        "<div style=\"background: url('{EXTERNAL}/bg.png'); color: red\">x</div>\
         <style>@import \"{EXTERNAL}/a.css\"; body {{ background: url({EXTERNAL}/b.png) }} \
         .r {{ background: url(/rel.png) }}</style>\
         <svg><style>rect {{ fill: url({EXTERNAL}/s.svg#g) }}</style></svg>"
    );
    assert_eq!(html(&input).await, expected);
}

#[tokio::test]
async fn stylesheets_are_translated() {
    let input = format!(
        "@import \"{INTERNAL}/a.css\";\n@import '{INTERNAL}/b.css' print;\n@import url({INTERNAL}/c.css);\n\
         @import url(\"{INTERNAL}/d.css\");\n\
         .a {{ background: url({INTERNAL}/a.png) }}\n.b {{ background: url( '{INTERNAL}/b.png' ) }}\n\
         .c {{ background: url(\"https://cdn.example.net/c.png\") }}\n.d {{ background: url(../d.png) }}\n"
    );
    let expected = format!(
        "@import \"{EXTERNAL}/a.css\";\n@import '{EXTERNAL}/b.css' print;\n@import url({EXTERNAL}/c.css);\n\
         @import url(\"{EXTERNAL}/d.css\");\n\
         .a {{ background: url({EXTERNAL}/a.png) }}\n.b {{ background: url( '{EXTERNAL}/b.png' ) }}\n\
         .c {{ background: url(\"https://cdn.example.net/c.png\") }}\n.d {{ background: url(../d.png) }}\n"
    );
    assert_eq!(
        translate_as(&wiki(), "text/css; charset=utf-8", &input).await,
        expected
    );
    assert_eq!(
        translate_as(&wiki(), "text/css; charset=iso-8859-1", &input).await,
        expected
    );
}

#[tokio::test]
async fn urls_elsewhere_and_relative_urls_stay_as_they_are() {
    let page = "<a href=\"https://login.example.com/authorize?redirect_uri=http://wiki.corp.internal:8080/w/\">\
        <a href=\"http://wiki.corp.internal:9090/w/\"><a href=\"https://wiki.corp.internal/w/\">\
        <a href=\"http://wiki.corp.internal:8080/other/\"><a href=\"http://wiki.corp.internal:8080/wx\">\
        <a href=\"http://user@wiki.corp.internal:8080/w/\"><a href=\"http://wiki.corp.internal.evil:8080/w/\">\
        <a href=\"/w/relative\"><a href=\"relative/page\"><a href=\"?q=1\"><a href=\"#top\">\
        <a href=\"mailto:someone@wiki.corp.internal\"><a href=\"https://apps.example.com/wiki/\">\
        <a title=\"http://wiki.corp.internal:8080/w/\" data-x=\"http://wiki.corp.internal:8080/w/\">\
        <p>Text http://wiki.corp.internal:8080/w/ stays.</p>\
        <script>var u = \"http://wiki.corp.internal:8080/w/api\";</script>\
        <!-- <a href=\"http://wiki.corp.internal:8080/w/\"> -->";
    assert_eq!(html(page).await, page);
}

#[tokio::test]
async fn one_byte_chunks_give_the_same_output() {
    let page = format!(
        "<!DOCTYPE html><html><head><meta charset=utf-8>\
         <meta http-equiv=\"refresh\" content=\"30; url={INTERNAL}/again\">\
         <link rel=stylesheet href=\"{INTERNAL}/s.css\"><base href=\"{INTERNAL}/\">\
         <style>@import '{INTERNAL}/i.css'; a {{ background: url({INTERNAL}/a.png) }} b {{ x: myurl({INTERNAL}/b) }}</style>\
         </head><body><h1>Grüße ✓</h1><a href=\"{INTERNAL}/page?x=1&amp;y=2\">link</a>\
         <img srcset=\"{INTERNAL}/a.png 1x, {INTERNAL}/b.png 2x\" style=\"background:url({INTERNAL}/c.png)\">\
         <form action=\"{INTERNAL}/save\" method=post></form><a href=\"/rel\">rel</a>\
         <script>if (a < b) document.write('<a href=\"{INTERNAL}/js\">');</script></body></html>"
    );
    // Everything but a function that is not url() and a script.
    let expected = page
        .replace(INTERNAL, EXTERNAL)
        .replace(&format!("myurl({EXTERNAL}"), &format!("myurl({INTERNAL}"))
        .replace(
            &format!("href=\"{EXTERNAL}/js"),
            &format!("href=\"{INTERNAL}/js"),
        );
    assert_eq!(html(&page).await, expected);
    assert_eq!(
        String::from_utf8_lossy(&one_byte_chunks(&page, "text/html").await),
        expected
    );
    // The same page with single quotes: the rewriter re-quotes only what it changes.
    let single = page.replace('"', "'");
    let whole = translate_as(&wiki(), "text/html", &single).await;
    assert!(whole.contains(&format!("<a href=\"{EXTERNAL}/page?x=1&amp;y=2\">")));
    assert_eq!(
        String::from_utf8_lossy(&one_byte_chunks(&single, "text/html").await),
        whole
    );

    let css = format!(
        "@import \"{INTERNAL}/a.css\"; .a {{ background: url( '{INTERNAL}/a.png' ) }} .b{{b:url({INTERNAL}/b.png)}}"
    );
    let expected = css.replace(INTERNAL, EXTERNAL);
    assert_eq!(translate_as(&wiki(), "text/css", &css).await, expected);
    assert_eq!(
        String::from_utf8_lossy(&one_byte_chunks(&css, "text/css").await),
        expected
    );
}

/// `body` translated as `content_type`, one byte per chunk.
async fn one_byte_chunks(body: &str, content_type: &str) -> Vec<u8> {
    let chunks = body.bytes().map(|b| Bytes::copy_from_slice(&[b])).collect();
    let response = backend(&[("content-type", content_type)], chunks);
    collect(translate_body(&wiki(), response)).await
}

#[tokio::test]
async fn disabled_translation_leaves_the_response_untouched() {
    let mut route = wiki();
    route.translation.body = false;
    let page = format!("<a href=\"{INTERNAL}/x\">");
    let response = backend(
        &[
            ("content-type", "text/html"),
            ("content-length", "44"),
            ("etag", "\"v1\""),
        ],
        vec![Bytes::from(page.clone())],
    );
    let out = translate_body(&route, response);
    assert_eq!(
        out.headers().get("content-length").map(|v| v.as_bytes()),
        Some(&b"44"[..])
    );
    assert_eq!(
        out.headers().get("etag").map(|v| v.as_bytes()),
        Some(&b"\"v1\""[..])
    );
    assert_eq!(collect(out).await, page.as_bytes());
}

#[tokio::test]
async fn other_content_is_left_untouched() {
    let page = format!("<a href=\"{INTERNAL}/x\">");
    for content_type in [
        "application/javascript",
        "application/json",
        "image/svg+xml",
        "text/plain",
        "text/html; charset=utf-16le",
        "text/css; charset=shift_jis",
    ] {
        let response = backend(
            &[("content-type", content_type), ("content-length", "44")],
            vec![Bytes::from(page.clone())],
        );
        let out = translate_body(&wiki(), response);
        assert!(
            out.headers().contains_key("content-length"),
            "{content_type}"
        );
        assert_eq!(collect(out).await, page.as_bytes(), "{content_type}");
    }
    // No Content-Type at all, a partial response, an unsupported coding.
    let out = translate_body(&wiki(), backend(&[], vec![Bytes::from(page.clone())]));
    assert_eq!(collect(out).await, page.as_bytes());
    let mut partial = backend(
        &[
            ("content-type", "text/html"),
            ("content-range", "bytes 0-43/100"),
        ],
        vec![Bytes::from(page.clone())],
    );
    *partial.status_mut() = http::StatusCode::PARTIAL_CONTENT;
    assert_eq!(
        collect(translate_body(&wiki(), partial)).await,
        page.as_bytes()
    );
    let zstd = backend(
        &[("content-type", "text/html"), ("content-encoding", "zstd")],
        vec![Bytes::from(page.clone())],
    );
    let out = translate_body(&wiki(), zstd);
    assert_eq!(
        out.headers().get("content-encoding").map(|v| v.as_bytes()),
        Some(&b"zstd"[..])
    );
    assert_eq!(collect(out).await, page.as_bytes());
}

#[tokio::test]
async fn translated_responses_lose_their_length_and_strong_validators() {
    let page = format!("<a href=\"{INTERNAL}/x\">");
    let response = backend(
        &[
            ("content-type", "text/html; charset=utf-8"),
            ("content-length", "44"),
            ("etag", "\"v1\""),
            ("content-md5", "Q2hlY2sgSW50ZWdyaXR5IQ=="),
            ("accept-ranges", "bytes"),
            ("cache-control", "no-cache"),
        ],
        vec![Bytes::from(page)],
    );
    let out = translate_body(&wiki(), response);
    let header = |name: &str| out.headers().get(name).map(|v| v.as_bytes().to_vec());
    assert_eq!(header("content-length"), None);
    assert_eq!(header("content-md5"), None);
    assert_eq!(header("etag"), Some(b"W/\"v1\"".to_vec()));
    assert_eq!(header("accept-ranges"), Some(b"none".to_vec()));
    assert_eq!(header("cache-control"), Some(b"no-cache".to_vec()));
    assert_eq!(
        collect(out).await,
        format!("<a href=\"{EXTERNAL}/x\">").into_bytes()
    );

    let weak = response_with_etag("W/\"v2\"");
    let out = translate_body(&wiki(), weak);
    assert_eq!(
        out.headers().get("etag").map(|v| v.as_bytes()),
        Some(&b"W/\"v2\""[..])
    );
}

fn response_with_etag(etag: &str) -> Response<TunnelBody> {
    backend(
        &[("content-type", "text/html"), ("etag", etag)],
        vec![Bytes::from_static(b"<p>")],
    )
}

async fn compress(coding: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let read = match coding {
        "gzip" => GzipEncoder::new(data).read_to_end(&mut out).await,
        "zlib" => ZlibEncoder::new(data).read_to_end(&mut out).await,
        "raw-deflate" => DeflateEncoder::new(data).read_to_end(&mut out).await,
        "br" => BrotliEncoder::new(data).read_to_end(&mut out).await,
        other => panic!("no encoder for {other}"),
    };
    read.unwrap_or_else(|e| panic!("{coding}: {e}"));
    out
}

#[tokio::test]
async fn compressed_bodies_are_decoded_and_translated() {
    let page = format!(
        "<html><body>{}<a href=\"{INTERNAL}/last\">end</a></body></html>",
        format!("<p><a href=\"{INTERNAL}/p\">p</a> filler text</p>\n").repeat(2000)
    );
    let expected = html(&page).await;
    assert!(expected.ends_with(&format!(
        "<a href=\"{EXTERNAL}/last\">end</a></body></html>"
    )));
    for (coding, header) in [
        ("gzip", "gzip"),
        ("zlib", "deflate"),
        ("raw-deflate", "deflate"),
        ("br", "br"),
    ] {
        let compressed = compress(coding, page.as_bytes()).await;
        for chunk_size in [1, 7, 4096, compressed.len()] {
            let chunks = compressed
                .chunks(chunk_size)
                .map(Bytes::copy_from_slice)
                .collect();
            let response = backend(
                &[
                    ("content-type", "text/html"),
                    ("content-encoding", header),
                    ("content-length", &compressed.len().to_string()),
                ],
                chunks,
            );
            let out = translate_body(&wiki(), response);
            assert!(!out.headers().contains_key("content-encoding"), "{coding}");
            assert!(!out.headers().contains_key("content-length"), "{coding}");
            let body = collect(out).await;
            assert_eq!(
                String::from_utf8_lossy(&body),
                expected,
                "{coding}, chunks of {chunk_size}"
            );
        }
    }
    // Two gzip members, as a concatenating server may send.
    let css = format!(".a{{b:url({INTERNAL}/a.png)}}");
    let mut two = compress("gzip", css.as_bytes()).await;
    two.extend(compress("gzip", css.as_bytes()).await);
    let response = backend(
        &[("content-type", "text/css"), ("content-encoding", "gzip")],
        vec![Bytes::from(two)],
    );
    assert_eq!(
        collect(translate_body(&wiki(), response)).await,
        format!(".a{{b:url({EXTERNAL}/a.png)}}")
            .repeat(2)
            .into_bytes()
    );
}

#[tokio::test]
async fn an_empty_compressed_body_ends_cleanly() {
    let response = backend(
        &[("content-type", "text/html"), ("content-encoding", "gzip")],
        vec![],
    );
    assert_eq!(collect(translate_body(&wiki(), response)).await, b"");
}

#[tokio::test]
async fn a_corrupt_compressed_body_ends_with_an_error() {
    let response = backend(
        &[("content-type", "text/html"), ("content-encoding", "gzip")],
        vec![Bytes::from_static(
            b"\x1f\x8b\x08\x00 this is not gzip at all",
        )],
    );
    let result = translate_body(&wiki(), response)
        .into_body()
        .collect()
        .await;
    let error = result
        .err()
        .unwrap_or_else(|| panic!("a corrupt body decoded"));
    assert!(error.to_string().contains("gzip"), "{error}");
}

#[tokio::test]
async fn the_charset_of_the_page_is_honoured() {
    // "Grüße" in windows-1252, around an internal link.
    let mut page = b"<p>Gr\xfc\xdfe</p><a title=\"\xfc\" href=\"".to_vec();
    page.extend_from_slice(INTERNAL.as_bytes());
    page.extend_from_slice(b"/\xfc\">");
    let mut expected = b"<p>Gr\xfc\xdfe</p><a title=\"\xfc\" href=\"".to_vec();
    expected.extend_from_slice(EXTERNAL.as_bytes());
    expected.extend_from_slice(b"/\xfc\">");
    let response = backend(
        &[("content-type", "text/html; charset=windows-1252")],
        vec![Bytes::from(page.clone())],
    );
    assert_eq!(collect(translate_body(&wiki(), response)).await, expected);
    // Declared in the page only.
    let mut declared = b"<meta charset=\"windows-1252\">".to_vec();
    declared.extend_from_slice(&page);
    let mut expected_declared = b"<meta charset=\"windows-1252\">".to_vec();
    expected_declared.extend_from_slice(&expected);
    let response = backend(
        &[("content-type", "text/html")],
        vec![Bytes::from(declared)],
    );
    assert_eq!(
        collect(translate_body(&wiki(), response)).await,
        expected_declared
    );
}

#[tokio::test]
async fn wildcard_routes_get_path_absolute_links() {
    let mut route: Route = wiki();
    route.host = "*.apps.example.com".into();
    route.url = "https://*.apps.example.com/wiki/".into();
    assert_eq!(
        translate_as(&route, "text/html", &format!("<a href=\"{INTERNAL}/x\">")).await,
        "<a href=\"/wiki/x\">"
    );
}

#[tokio::test]
async fn a_huge_tag_stops_translation_without_breaking_the_page() {
    let data_url = format!("data:image/png;base64,{}", "A".repeat(3 * 1024 * 1024));
    let page = format!(
        "<a href=\"{INTERNAL}/before\"><img src=\"{data_url}\"><a href=\"{INTERNAL}/after\">"
    );
    let chunks = page
        .as_bytes()
        .chunks(16 * 1024)
        .map(Bytes::copy_from_slice)
        .collect();
    let response = backend(&[("content-type", "text/html")], chunks);
    let out = String::from_utf8(collect(translate_body(&wiki(), response)).await)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(out.starts_with(&format!("<a href=\"{EXTERNAL}/before\">")));
    assert!(out.contains(&format!("<img src=\"{data_url}\">")));
    assert!(out.ends_with(&format!("<a href=\"{INTERNAL}/after\">")));
    assert_eq!(out.len(), page.len() - (INTERNAL.len() - EXTERNAL.len()));
}

#[tokio::test]
async fn trailers_follow_the_translated_data() {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", http::HeaderValue::from_static("abc"));
    let frames = vec![
        Ok::<_, BoxError>(Frame::data(Bytes::from(format!(
            "<a href=\"{INTERNAL}/x\">"
        )))),
        Ok(Frame::trailers(trailers)),
    ];
    let body = StreamBody::new(futures::stream::iter(frames)).boxed_unsync();
    let response = Response::builder()
        .header("content-type", "text/html")
        .body(body)
        .unwrap_or_else(|e| panic!("{e}"));
    let collected = translate_body(&wiki(), response)
        .into_body()
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        collected.trailers().and_then(|t| t.get("x-checksum")),
        Some(&http::HeaderValue::from_static("abc"))
    );
    assert_eq!(
        collected.to_bytes(),
        format!("<a href=\"{EXTERNAL}/x\">").into_bytes()
    );
}
