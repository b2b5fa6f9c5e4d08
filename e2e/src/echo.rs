//! A backend that shows and records what reached it: every request's method, target and
//! headers, answered as a small HTML page (so a browser test can read them off the page)
//! and kept for the test to inspect (the exact headers, e.g. an identity assertion).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// One request as the backend saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Its method.
    pub method: String,
    /// Its path and query.
    pub target: String,
    /// Its headers.
    pub headers: HeaderMap,
}

impl SeenRequest {
    /// The value of header `name`, when present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl SeenRequest {
    /// The method, target and headers of `request`.
    pub fn of<B>(request: &Request<B>) -> Self {
        Self {
            method: request.method().to_string(),
            target: request
                .uri()
                .path_and_query()
                .map_or("/".to_owned(), |p| p.as_str().to_owned()),
            headers: request.headers().clone(),
        }
    }
}

/// A plain HTTP/1.1 backend on loopback that records every request, then answers it as
/// the test's function says; stops when dropped. [`EchoBackend`] is one, and so is
/// [`crate::access::AppBackend`].
pub struct RecordingBackend {
    /// Where it listens.
    pub address: SocketAddr,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingBackend {
    /// Starts it on a free port of 127.0.0.1, each request answered by `answer` (given
    /// the request as recorded, and the request itself, e.g. for an upgrade).
    pub async fn start<B>(
        answer: fn(&SeenRequest, Request<Incoming>) -> Response<B>,
    ) -> Result<Self, std::io::Error>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let seen = SeenRequest::of(&request);
                        record
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(seen.clone());
                        let response = answer(&seen, request);
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Ok(Self {
            address,
            seen,
            task,
        })
    }

    /// Its URL, `http://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.address)
    }

    /// Every request so far, oldest first.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The latest request whose target starts with `prefix`.
    pub fn last_for(&self, prefix: &str) -> Option<SeenRequest> {
        self.seen()
            .into_iter()
            .rev()
            .find(|r| r.target.starts_with(prefix))
    }
}

impl Drop for RecordingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running echo backend on loopback; stops when dropped.
pub struct EchoBackend(RecordingBackend);

impl EchoBackend {
    /// Starts it on a free port of 127.0.0.1.
    pub async fn start() -> Result<Self, std::io::Error> {
        RecordingBackend::start(answer).await.map(Self)
    }
}

impl Deref for EchoBackend {
    type Target = RecordingBackend;

    fn deref(&self) -> &RecordingBackend {
        &self.0
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn answer(seen: &SeenRequest, _request: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut lines = format!("method: {}\ntarget: {}\n", seen.method, seen.target);
    for (name, value) in &seen.headers {
        lines.push_str(&format!(
            "{}: {}\n",
            name.as_str(),
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    let body = format!(
        "<!doctype html><html><head><title>echo</title></head><body><pre id=\"echo\">{}</pre></body></html>",
        escape(&lines)
    );
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}
