//! A real nginx behind the tunnel: a static file served by nginx reaches the user
//! through the proxy and the connector with nginx's own validators and length (ETag,
//! Last-Modified, Content-Length), over HTTP/1.1 and HTTP/2; HEAD, conditional requests
//! (304) and byte ranges (206) keep their meaning end to end, and nginx's own 404 is
//! passed through.
//!
//! nginx must be installed (Debian: `apt-get install -y nginx-light`; CI installs it with
//! `hack/install-test-packages.sh`). Without it the test fails and says how to install
//! it: it never skips.

use std::path::Path;

use bytes::Bytes;
use http::header::{
    CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, IF_MODIFIED_SINCE, IF_NONE_MATCH,
    LAST_MODIFIED, RANGE,
};
use http::{HeaderName, Method, Request, StatusCode};
use http_body_util::Full;
use sallyport_e2e::dataplane::{
    Answer, Fleet, Nginx, REACTION_TIMEOUT, StepError, eventually, http_request, https_get,
    https_request, https_request_h2, pattern,
};
use serde_json::json;

type TestResult = Result<(), StepError>;

const APP_HOST: &str = "static.nginx.test";
/// A file large enough to take many frames and tunnel windows.
const BLOB_LEN: usize = 3 * 1024 * 1024 + 17;

fn request(method: Method, path: &str, headers: &[(HeaderName, &str)]) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(Bytes::new()));
    *request.method_mut() = method;
    *request.uri_mut() = path.parse().unwrap_or_default();
    for (name, value) in headers {
        if let Ok(value) = value.parse() {
            request.headers_mut().insert(name.clone(), value);
        }
    }
    request
}

fn header<'a>(answer: &'a Answer, name: &HeaderName) -> Option<&'a str> {
    answer.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_files_from_a_real_nginx_pass_through_with_their_validators() -> TestResult {
    let blob = Bytes::from(
        pattern()
            .iter()
            .cycle()
            .take(BLOB_LEN)
            .copied()
            .collect::<Vec<u8>>(),
    );
    let page = b"<!doctype html><title>static</title><p>served by nginx</p>\n";
    let nginx = Nginx::start(&[("index.html", page), ("files/blob.bin", &blob)]).await?;
    let fleet = Fleet::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "nginx",
        &["proxy-a"],
    )
    .await?;
    let group = fleet.create_group("dc", json!({})).await?;
    let app_ca = fleet
        .publish_app("static", APP_HOST, &nginx.url(), "dc")
        .await?;
    let state = tempfile::tempdir()?;
    let _connector = fleet.connector(&group, state.path()).start()?;
    let address = fleet.proxies[0].ports.listen;
    let index = eventually(
        "nginx's page through the tunnel",
        REACTION_TIMEOUT,
        async || {
            let answer = https_get(address, APP_HOST, &app_ca, "/").await?;
            Ok((answer.status == 200).then_some(answer))
        },
    )
    .await?;
    assert_eq!(&index.body[..], &page[..]);
    assert_eq!(header(&index, &CONTENT_TYPE), Some("text/html"));

    // What nginx itself answers, asked directly.
    let origin = http_request(nginx.address, request(Method::GET, "/files/blob.bin", &[])).await?;
    assert_eq!(origin.status, StatusCode::OK);
    let etag = header(&origin, &ETAG)
        .ok_or("nginx sent no ETag")?
        .to_owned();
    let last_modified = header(&origin, &LAST_MODIFIED)
        .ok_or("nginx sent no Last-Modified")?
        .to_owned();
    assert_eq!(
        header(&origin, &CONTENT_LENGTH),
        Some(BLOB_LEN.to_string().as_str())
    );

    // Through the tunnel, over HTTP/1.1 and HTTP/2: the same file, the same validators.
    let over_h1 = https_request(
        address,
        APP_HOST,
        &app_ca,
        request(Method::GET, "/files/blob.bin", &[]),
    )
    .await?;
    let over_h2 = https_request_h2(
        address,
        APP_HOST,
        &app_ca,
        request(Method::GET, "/files/blob.bin", &[]),
    )
    .await?;
    for (protocol, answer) in [("HTTP/1.1", &over_h1), ("HTTP/2", &over_h2)] {
        assert_eq!(answer.status, StatusCode::OK, "{protocol}");
        assert_eq!(
            header(answer, &ETAG),
            Some(etag.as_str()),
            "{protocol} ETag"
        );
        assert_eq!(
            header(answer, &LAST_MODIFIED),
            Some(last_modified.as_str()),
            "{protocol} Last-Modified"
        );
        assert_eq!(
            header(answer, &CONTENT_LENGTH),
            Some(BLOB_LEN.to_string().as_str()),
            "{protocol} Content-Length"
        );
        assert_eq!(answer.body.len(), BLOB_LEN, "{protocol} body length");
        assert!(
            answer.body == blob,
            "{protocol}: the body differs from the file"
        );
    }

    // HEAD: the headers of a GET, no body.
    let head = https_request(
        address,
        APP_HOST,
        &app_ca,
        request(Method::HEAD, "/files/blob.bin", &[]),
    )
    .await?;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(header(&head, &ETAG), Some(etag.as_str()));
    assert_eq!(header(&head, &LAST_MODIFIED), Some(last_modified.as_str()));
    assert_eq!(
        header(&head, &CONTENT_LENGTH),
        Some(BLOB_LEN.to_string().as_str()),
        "HEAD keeps the length of the GET"
    );
    assert!(head.body.is_empty(), "HEAD answered with a body");

    // Conditional requests are answered by nginx: 304 without a body.
    for (name, value) in [
        (IF_NONE_MATCH, etag.as_str()),
        (IF_MODIFIED_SINCE, last_modified.as_str()),
    ] {
        let answer = https_request(
            address,
            APP_HOST,
            &app_ca,
            request(Method::GET, "/files/blob.bin", &[(name.clone(), value)]),
        )
        .await?;
        assert_eq!(answer.status, StatusCode::NOT_MODIFIED, "{name}: {value}");
        assert_eq!(header(&answer, &ETAG), Some(etag.as_str()), "{name}");
        assert!(answer.body.is_empty(), "a 304 with a body");
    }

    // A byte range: 206 with the slice.
    let range = https_request(
        address,
        APP_HOST,
        &app_ca,
        request(
            Method::GET,
            "/files/blob.bin",
            &[(RANGE, "bytes=1000-1999")],
        ),
    )
    .await?;
    assert_eq!(range.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        header(&range, &CONTENT_RANGE),
        Some(format!("bytes 1000-1999/{BLOB_LEN}").as_str())
    );
    assert_eq!(header(&range, &CONTENT_LENGTH), Some("1000"));
    assert!(
        range.body == blob.slice(1000..2000),
        "the range's bytes differ"
    );

    // nginx's own 404, not the proxy's page.
    let missing = https_get(address, APP_HOST, &app_ca, "/files/nothing-here").await?;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.text().contains("nginx"), "{}", missing.text());

    let log = std::fs::read_to_string(nginx.root.join("../access.log"))?;
    assert!(
        log.lines()
            .filter(|l| l.contains("/files/blob.bin"))
            .count()
            >= 7,
        "nginx served the requests: {log}"
    );
    Ok(())
}
