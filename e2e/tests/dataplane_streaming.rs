//! Bodies far larger than any buffer stream through the proxy and the connector as real
//! processes: a 1 GiB download (HTTP/2 user client) and a 1 GiB upload (HTTP/1.1), then
//! 256 MiB each way with the other protocol, arrive whole and unaltered (length and every
//! byte checked against the regenerated stream, never holding a body), while the proxy's
//! and the connector's resident memory stays within a bound far below the body size.

use std::path::Path;
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use sallyport_e2e::dataplane::{
    Fleet, HttpsConnection, MemoryWatch, PatternBody, Protocol, REACTION_TIMEOUT, StepError,
    TrafficBackend, check_pattern_body, empty_body, eventually, https_get,
};
use serde_json::json;

type TestResult = Result<(), StepError>;

const APP_HOST: &str = "bulk.streaming.test";
/// 1 GiB.
const GIB: u64 = 1 << 30;
/// The transfers with the other protocol: enough to pass every buffer many times over,
/// small enough to keep the test within a minute on debug builds.
const QUARTER_GIB: u64 = 256 << 20;
/// How far the RSS of the proxy or the connector may rise above its idle level while
/// gigabytes stream through.
const MAX_RSS_GROWTH: u64 = 128 << 20;
/// An upper bound on one transfer, so a stalled stream fails the test instead of
/// hanging it.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

async fn download(
    address: std::net::SocketAddr,
    app_ca: &[u8],
    protocol: Protocol,
    len: u64,
) -> Result<Duration, StepError> {
    let started = Instant::now();
    let mut connection = HttpsConnection::open(address, APP_HOST, app_ca, protocol).await?;
    let request = Request::get(format!("/bytes/{len}")).body(empty_body())?;
    let response = connection.send(request).await?;
    assert_eq!(response.status(), StatusCode::OK, "{protocol:?} download");
    let length = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(
        length,
        Some(len),
        "{protocol:?} download: the backend's Content-Length reaches the user"
    );
    let check = check_pattern_body(response.into_body()).await?;
    assert_eq!(
        check.received(),
        len,
        "{protocol:?} download: bytes received"
    );
    assert_eq!(
        check.first_mismatch(),
        None,
        "{protocol:?} download: first byte that differs from what the backend sent"
    );
    Ok(started.elapsed())
}

async fn upload(
    address: std::net::SocketAddr,
    app_ca: &[u8],
    protocol: Protocol,
    len: u64,
) -> Result<Duration, StepError> {
    let started = Instant::now();
    let mut connection = HttpsConnection::open(address, APP_HOST, app_ca, protocol).await?;
    let request = Request::post("/count")
        .header(http::header::CONTENT_LENGTH, len)
        .body(PatternBody::new(len).boxed_client())?;
    let response = connection.send(request).await?;
    let status = response.status();
    let text =
        String::from_utf8_lossy(&response.into_body().collect().await?.to_bytes()).into_owned();
    assert_eq!(status, StatusCode::OK, "{protocol:?} upload: {text}");
    assert_eq!(
        text,
        format!("received={len}\nmismatch=none\n"),
        "{protocol:?} upload: what the backend received"
    );
    Ok(started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gigabyte_downloads_and_uploads_stream_through_in_bounded_memory() -> TestResult {
    let fleet = Fleet::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "streaming",
        &["proxy-a"],
    )
    .await?;
    let backend = TrafficBackend::start("bulk").await?;
    let group = fleet.create_group("bulk", json!({})).await?;
    let app_ca = fleet
        .publish_app("bulk", APP_HOST, &backend.url(), "bulk")
        .await?;
    let state = tempfile::tempdir()?;
    let connector = fleet.connector(&group, state.path()).start()?;
    let proxy = &fleet.proxies[0];
    let address = proxy.ports.listen;
    eventually(
        "the app served through the tunnel",
        REACTION_TIMEOUT,
        async || {
            let answer = https_get(address, APP_HOST, &app_ca, "/").await?;
            Ok((answer.status == 200).then_some(()))
        },
    )
    .await?;
    // Warm both paths up with a small transfer each way, so the baseline is the
    // processes' working level rather than their first allocation.
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let mut connection = HttpsConnection::open(address, APP_HOST, &app_ca, protocol).await?;
        let answer = connection
            .request(Request::get("/bytes/1048576").body(empty_body())?)
            .await?;
        assert_eq!(answer.body.len(), 1 << 20);
        let answer = connection
            .request(Request::post("/count").body(PatternBody::new(1 << 20).boxed_client())?)
            .await?;
        assert_eq!(answer.text(), "received=1048576\nmismatch=none\n");
    }

    let watch = MemoryWatch::start(
        &[
            ("proxy", proxy.process.pid()),
            ("connector", connector.pid()),
        ],
        Duration::from_millis(50),
    )?;
    let transfers = [
        ("download", Protocol::Http2, GIB),
        ("upload", Protocol::Http1, GIB),
        ("download", Protocol::Http1, QUARTER_GIB),
        ("upload", Protocol::Http2, QUARTER_GIB),
    ];
    for (direction, protocol, len) in transfers {
        let transfer = async {
            match direction {
                "download" => download(address, &app_ca, protocol, len).await,
                _ => upload(address, &app_ca, protocol, len).await,
            }
        };
        let took = tokio::time::timeout(TRANSFER_TIMEOUT, transfer)
            .await
            .map_err(|_| {
                format!(
                    "{protocol:?} {direction} of {:.0} MiB took over {TRANSFER_TIMEOUT:?}",
                    mib(len)
                )
            })??;
        eprintln!(
            "{protocol:?} {direction} of {:.0} MiB: {took:.1?} ({:.0} MiB/s)",
            mib(len),
            mib(len) / took.as_secs_f64()
        );
    }
    for peak in watch.peaks() {
        eprintln!(
            "{}: RSS {:.1} MiB idle, {:.1} MiB at most ({} samples)",
            peak.label,
            mib(peak.baseline),
            mib(peak.peak),
            peak.samples
        );
        assert!(
            peak.growth() < MAX_RSS_GROWTH,
            "the {} grew by {:.1} MiB while streaming (bound {:.0} MiB)",
            peak.label,
            mib(peak.growth()),
            mib(MAX_RSS_GROWTH)
        );
    }
    // Every transfer reached the backend once: nothing was retried behind the user's back.
    let big = |target: &str| {
        target == "/count"
            || transfers
                .iter()
                .any(|(_, _, len)| target == format!("/bytes/{len}"))
    };
    let reached = backend.arrivals().iter().filter(|a| big(&a.target)).count();
    assert_eq!(reached, 4 + 2, "4 big transfers and 2 warm-up uploads");
    Ok(())
}
