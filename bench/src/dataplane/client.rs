//! The benchmark's own HTTP/1.1 client for the single-connection transfers of S3 and the
//! readiness checks: plain TCP to the backend, or TLS to the proxy as a browser connects
//! (SNI the app's host, only the app's certificate trusted, ALPN `http/1.1`). Bodies are
//! streamed: a download goes to a sink that only counts, an upload is generated on the
//! fly from one buffer.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, COOKIE, HOST};
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use super::error::DataplaneError;

type Body = BoxBody<Bytes, Infallible>;

/// How much of an answer's body a [`Transfer`] keeps.
pub const HEAD_BYTES: usize = 256;

/// Where requests go.
#[derive(Clone)]
pub enum Target {
    /// Plain HTTP straight to the backend.
    Direct {
        /// The backend's address.
        address: SocketAddr,
    },
    /// HTTPS to the proxy, for the app at `host:port`.
    Proxy {
        /// The proxy's listen address.
        address: SocketAddr,
        /// The app's host name (SNI and `Host`).
        host: String,
        /// The app's port, as in its external URL and the `Host` header.
        port: u16,
        /// TLS settings trusting only the app's certificate.
        tls: Arc<rustls::ClientConfig>,
        /// A `Cookie` header sent with every request (a signed-in user's session).
        cookie: Option<HeaderValue>,
    },
}

impl Target {
    /// HTTPS to the proxy at `address` for the app `host:port`, trusting `ca_pem` only.
    pub fn proxy(
        address: SocketAddr,
        host: &str,
        port: u16,
        ca_pem: &[u8],
    ) -> Result<Self, DataplaneError> {
        Ok(Self::Proxy {
            address,
            host: host.to_owned(),
            port,
            tls: tls_trusting(ca_pem, "the app's certificate")?,
            cookie: None,
        })
    }

    /// This target with `cookie` (a `Cookie` header value) on every request; a plain
    /// target is returned unchanged.
    pub fn with_cookie(self, cookie: &str) -> Result<Self, DataplaneError> {
        match self {
            Self::Proxy {
                address,
                host,
                port,
                tls,
                ..
            } => Ok(Self::Proxy {
                address,
                host,
                port,
                tls,
                cookie: Some(
                    HeaderValue::from_str(cookie)
                        .map_err(DataplaneError::client("the session cookie"))?,
                ),
            }),
            direct => Ok(direct),
        }
    }

    /// A short name for progress lines.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Direct { .. } => "direct",
            Self::Proxy { .. } => "proxy",
        }
    }

    /// The `Host` header its requests carry.
    pub fn host_header(&self) -> String {
        match self {
            Self::Direct { address } => address.to_string(),
            Self::Proxy { host, port, .. } => format!("{host}:{port}"),
        }
    }

    /// Opens one HTTP/1.1 connection.
    pub async fn connect(&self) -> Result<Connection, DataplaneError> {
        let what = format!("connecting ({})", self.label());
        let sender = match self {
            Self::Direct { address } => {
                let tcp = TcpStream::connect(address)
                    .await
                    .map_err(DataplaneError::client(what.clone()))?;
                let _ = tcp.set_nodelay(true);
                handshake(TokioIo::new(tcp), &what).await?
            }
            Self::Proxy {
                address, host, tls, ..
            } => {
                let tcp = TcpStream::connect(address)
                    .await
                    .map_err(DataplaneError::client(what.clone()))?;
                let _ = tcp.set_nodelay(true);
                let name = ServerName::try_from(host.clone())
                    .map_err(DataplaneError::client(what.clone()))?;
                let stream = tokio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(DataplaneError::client(what.clone()))?;
                handshake(TokioIo::new(stream), &what).await?
            }
        };
        Ok(Connection {
            sender,
            host: self.host_header(),
            cookie: match self {
                Self::Proxy { cookie, .. } => cookie.clone(),
                Self::Direct { .. } => None,
            },
        })
    }
}

/// Client TLS settings as a browser's for the proxy's apps, trusting only the
/// certificates of `ca_pem` (`what` names them in errors), ALPN `http/1.1`.
pub fn tls_trusting(
    ca_pem: &[u8],
    what: &str,
) -> Result<Arc<rustls::ClientConfig>, DataplaneError> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(certificate.map_err(DataplaneError::client(what))?)
            .map_err(DataplaneError::client(what))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(DataplaneError::client("client TLS settings"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

async fn handshake<T>(io: T, what: &str) -> Result<SendRequest<Body>, DataplaneError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(io)
        .await
        .map_err(DataplaneError::client(what.to_owned()))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One open connection.
pub struct Connection {
    sender: SendRequest<Body>,
    host: String,
    cookie: Option<HeaderValue>,
}

/// What a request got.
#[derive(Clone, Debug)]
pub struct Transfer {
    /// The status.
    pub status: StatusCode,
    /// Body bytes received.
    pub received: u64,
    /// The first bytes of the body (up to [`HEAD_BYTES`]), as text (lossy).
    pub head: String,
    /// From sending the request until the last byte of the answer.
    pub elapsed: Duration,
}

impl Transfer {
    /// Bytes per second over [`Transfer::elapsed`] of `bytes`.
    pub fn rate(&self, bytes: u64) -> f64 {
        bytes as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl Connection {
    /// `GET path`, the body counted and dropped (its first bytes kept); the whole exchange
    /// bounded by `within`.
    pub async fn get(&mut self, path: &str, within: Duration) -> Result<Transfer, DataplaneError> {
        let body = Empty::new().boxed();
        self.exchange(Method::GET, path, body, None, within).await
    }

    /// `POST path` with `size` generated bytes (in `chunk`-sized pieces, with a
    /// Content-Length); the answer's body counted. Bounded by `within`.
    pub async fn upload(
        &mut self,
        path: &str,
        size: u64,
        chunk: Bytes,
        within: Duration,
    ) -> Result<Transfer, DataplaneError> {
        let step = chunk.len().max(1) as u64;
        let frames = (0..size.div_ceil(step)).map(move |index| {
            let left = size - index * step;
            let piece = if left >= step {
                chunk.clone()
            } else {
                chunk.slice(..left as usize)
            };
            Ok::<_, Infallible>(Frame::data(piece))
        });
        let body = BodyExt::boxed(StreamBody::new(futures::stream::iter(frames)));
        self.exchange(Method::POST, path, body, Some(size), within)
            .await
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Body,
        length: Option<u64>,
        what: &str,
    ) -> Result<Request<Body>, DataplaneError> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .body(body)
            .map_err(DataplaneError::client(what.to_owned()))?;
        let headers = request.headers_mut();
        headers.insert(
            HOST,
            HeaderValue::from_str(&self.host).map_err(DataplaneError::client(what.to_owned()))?,
        );
        if let Some(length) = length {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
        }
        if let Some(cookie) = &self.cookie {
            headers.insert(COOKIE, cookie.clone());
        }
        Ok(request)
    }

    async fn exchange(
        &mut self,
        method: Method,
        path: &str,
        body: Body,
        length: Option<u64>,
        within: Duration,
    ) -> Result<Transfer, DataplaneError> {
        let what = format!("{method} {path}");
        let request = self.request(method, path, body, length, &what)?;
        let started = Instant::now();
        let exchange = async {
            let response = self
                .sender
                .send_request(request)
                .await
                .map_err(DataplaneError::client(what.clone()))?;
            let status = response.status();
            let mut body = response.into_body();
            let mut received: u64 = 0;
            let mut head = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(DataplaneError::client(what.clone()))?;
                if let Some(data) = frame.data_ref() {
                    received += data.len() as u64;
                    if head.len() < HEAD_BYTES {
                        let take = data.len().min(HEAD_BYTES - head.len());
                        head.extend_from_slice(data.get(..take).unwrap_or_default());
                    }
                }
            }
            Ok(Transfer {
                status,
                received,
                head: String::from_utf8_lossy(&head).into_owned(),
                elapsed: started.elapsed(),
            })
        };
        tokio::time::timeout(within, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(DataplaneError::Timeout {
                    what,
                    waited: within,
                    last: None,
                })
            })
    }
}
