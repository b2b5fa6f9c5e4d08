//! The benchmark's backend: a small, fast HTTP/1.1 server (hyper) that the data-plane
//! scenarios reach directly and through the proxy and connector. It runs as its own
//! process (`sallyport-bench dataplane-backend`, hidden), so that its CPU time is its own.
//!
//! - `GET /` (any other path too): `ok`, two bytes, for the small-GET scenario (S1);
//! - `GET /bytes/N`: N bytes generated on the fly in chunks of `--chunk-kib` KiB (the same
//!   buffer sent again and again, nothing read from disk), with a `Content-Length`, for the
//!   download (S3);
//! - `POST /upload`: reads the whole body, counting it, and answers the count as text,
//!   for the upload (S3);
//! - `GET /slow/MS`: `ok` after MS milliseconds, counted while it waits (S5's mass
//!   cancellation: requests that stay in flight); `GET /inflight`: how many `/slow`
//!   requests wait now (a request whose client went away stops counting);
//! - `GET /ws` with `Upgrade: websocket`: the WebSocket handshake (101 with the
//!   `Sec-WebSocket-Accept` of RFC 6455), then every byte received is sent back as it
//!   came; frames are not parsed (S4: idle tunneled streams).
//!
//! Started with `--name NAME`, every answer carries `x-backend-name: NAME`, so that a
//! client can tell which of two backends served it (S6's blue/green cut-over).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use clap::Args;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use http::header::{
    CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE,
};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::error::DataplaneError;

/// The path prefix of the generated download.
pub const BYTES_PATH: &str = "/bytes/";
/// The path of the counted upload.
pub const UPLOAD_PATH: &str = "/upload";
/// The body of every small GET.
pub const SMALL_BODY: &[u8] = b"ok";
/// The path prefix of the delayed answer.
pub const SLOW_PATH: &str = "/slow/";
/// The path of the count of `/slow` requests waiting.
pub const INFLIGHT_PATH: &str = "/inflight";
/// The path of the WebSocket echo.
pub const WEBSOCKET_PATH: &str = "/ws";
/// The response header naming the backend, when started with `--name`.
pub const NAME_HEADER: &str = "x-backend-name";
/// The GUID of RFC 6455's `Sec-WebSocket-Accept`.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// The longest `/slow` wait, milliseconds.
const SLOW_MAX_MS: u64 = 600_000;

/// `/slow` requests waiting now.
static SLOW_IN_FLIGHT: AtomicU64 = AtomicU64::new(0);

/// Options of `sallyport-bench dataplane-backend`.
#[derive(Clone, Debug, Args)]
pub struct BackendArgs {
    /// Where to listen, as ADDRESS:PORT.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Worker threads of the backend's async runtime.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,

    /// Size of the chunks a download is written in, KiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=16_384))]
    pub chunk_kib: u32,

    /// A name sent back in an `x-backend-name` header on every answer (none by default).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
}

type Body = BoxBody<Bytes, Infallible>;

/// Serves until the process is killed.
pub fn serve(args: &BackendArgs) -> Result<(), DataplaneError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.workers))
        .enable_all()
        .build()
        .map_err(DataplaneError::io("starting the backend's async runtime"))?;
    let chunk = Bytes::from(vec![b'x'; args.chunk_kib as usize * 1024]);
    let name = match &args.name {
        Some(name) => Some(
            HeaderValue::from_str(name).map_err(|error| DataplaneError::Io {
                what: format!("the backend's --name {name:?}"),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, error),
            })?,
        ),
        None => None,
    };
    runtime.block_on(async move {
        let listener = TcpListener::bind(args.listen)
            .await
            .map_err(DataplaneError::io(format!("binding {}", args.listen)))?;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let chunk = chunk.clone();
            let name = name.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let chunk = chunk.clone();
                    let name = name.clone();
                    async move {
                        let mut response = answer(request, chunk).await;
                        if let Some(name) = name {
                            response.headers_mut().insert(NAME_HEADER, name);
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    })
}

async fn answer(request: Request<Incoming>, chunk: Bytes) -> Response<Body> {
    let path = request.uri().path();
    if path == WEBSOCKET_PATH {
        return websocket(request);
    }
    if let Some(ms) = path.strip_prefix(SLOW_PATH) {
        return match ms.parse::<u64>() {
            Ok(ms) if ms <= SLOW_MAX_MS => {
                let _waiting = SlowGuard::enter();
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                let mut response = Response::new(Full::new(Bytes::from_static(SMALL_BODY)).boxed());
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                response
            }
            _ => text(StatusCode::BAD_REQUEST, format!("bad delay {ms:?}")),
        };
    }
    if path == INFLIGHT_PATH {
        return text(
            StatusCode::OK,
            SLOW_IN_FLIGHT.load(Ordering::Relaxed).to_string(),
        );
    }
    if request.method() == Method::POST && path == UPLOAD_PATH {
        let mut body = request.into_body();
        let mut received: u64 = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        received += data.len() as u64;
                    }
                }
                Err(error) => return text(StatusCode::BAD_REQUEST, error.to_string()),
            }
        }
        return text(StatusCode::OK, received.to_string());
    }
    if let Some(size) = path.strip_prefix(BYTES_PATH) {
        return match size.parse::<u64>() {
            Ok(size) => download(size, chunk),
            Err(_) => text(StatusCode::BAD_REQUEST, format!("bad size {size:?}")),
        };
    }
    let mut response = Response::new(Full::new(Bytes::from_static(SMALL_BODY)).boxed());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// `size` bytes of `chunk` repeated (the last chunk cut short), with a Content-Length.
fn download(size: u64, chunk: Bytes) -> Response<Body> {
    let step = chunk.len() as u64;
    let chunks = size.div_ceil(step.max(1));
    let frames = (0..chunks).map(move |index| {
        let left = size - index * step;
        let piece = if left >= step {
            chunk.clone()
        } else {
            chunk.slice(..left as usize)
        };
        Ok::<_, Infallible>(Frame::data(piece))
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(futures::stream::iter(
        frames,
    ))));
    let headers = response.headers_mut();
    headers.insert(CONTENT_LENGTH, HeaderValue::from(size));
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

/// Counts a `/slow` request while it waits; dropped with the request (also when hyper
/// drops it because the client went away).
struct SlowGuard;

impl SlowGuard {
    fn enter() -> Self {
        SLOW_IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
        Self
    }
}

impl Drop for SlowGuard {
    fn drop(&mut self) {
        SLOW_IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The `Sec-WebSocket-Accept` answering `key` (RFC 6455, section 4.2.2).
pub fn websocket_accept(key: &[u8]) -> String {
    let mut input = key.to_vec();
    input.extend_from_slice(WEBSOCKET_GUID.as_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// The WebSocket handshake of `/ws`, then an echo of the raw bytes until either side
/// closes.
fn websocket(mut request: Request<Incoming>) -> Response<Body> {
    let upgrade = request
        .headers()
        .get(UPGRADE)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let Some(key) = request.headers().get(SEC_WEBSOCKET_KEY).cloned() else {
        return text(StatusCode::BAD_REQUEST, "no Sec-WebSocket-Key".to_owned());
    };
    if !upgrade {
        return text(StatusCode::BAD_REQUEST, "no Upgrade: websocket".to_owned());
    }
    let Ok(accept) = HeaderValue::from_str(&websocket_accept(key.as_bytes())) else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "accept key".to_owned());
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
        let _ = tokio::io::copy(&mut reader, &mut writer).await;
    });
    let mut response = Response::new(Empty::new().boxed());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
    response
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_accept_is_rfc_6455s() {
        // The example of RFC 6455, section 1.3.
        assert_eq!(
            websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
