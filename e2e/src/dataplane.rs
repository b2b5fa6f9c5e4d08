//! What data-plane e2e tests need beside the control plane: a real backend server, an
//! HTTPS client that speaks to the proxy as a browser would (SNI, the app's CA), the
//! fleet's PKI Secrets written out as the pods would mount them, and the proxy and
//! connector processes.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

use crate::process::{OwnedProcess, ProcessError};

/// A test step failed; the message says which and why.
pub type StepError = Box<dyn std::error::Error + Send + Sync>;

/// A free loopback port, for processes that must be told their port up front.
pub fn free_port() -> Result<u16, std::io::Error> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A plain HTTP/1.1 backend on loopback that answers every request with a text body
/// naming itself, the method, the path and query, and the forwarding headers it got;
/// POST bodies are echoed back as they stream in.
pub struct Backend {
    /// Where it listens.
    pub address: SocketAddr,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    /// Starts a backend named `name`.
    pub async fn start(name: &'static str) -> Result<Self, std::io::Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        async move { Ok::<_, Infallible>(answer(name, request)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            address,
            requests,
            task,
        })
    }

    /// How many requests reached it.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Its base URL, `http://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.address)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(
    name: &str,
    request: Request<Incoming>,
) -> Response<http_body_util::combinators::BoxBody<Bytes, hyper::Error>> {
    if request.method() == http::Method::POST {
        return Response::new(request.into_body().boxed());
    }
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let text = format!(
        "backend={name}\nmethod={}\ntarget={}\nhost={}\nx-forwarded-for={}\nx-forwarded-host={}\nx-forwarded-proto={}\nsallyport-app={}\n",
        request.method(),
        request.uri().path_and_query().map_or("/", |p| p.as_str()),
        header("host"),
        header("x-forwarded-for"),
        header("x-forwarded-host"),
        header("x-forwarded-proto"),
        header("sallyport-app"),
    );
    Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    )
}

/// An answer as a test sees it.
#[derive(Debug)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

impl Answer {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `request` over HTTPS to `address` with SNI `host`, trusting only `ca_pem`, over
/// HTTP/1.1; the request's URI is sent as is (origin form) with `Host: host`.
pub async fn https_request(
    address: SocketAddr,
    host: &str,
    ca_pem: &[u8],
    request: Request<Full<Bytes>>,
) -> Result<Answer, StepError> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(certificate?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(address).await?;
    let tls = connector
        .connect(ServerName::try_from(host.to_owned())?, tcp)
        .await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let mut request = request;
    request
        .headers_mut()
        .insert(http::header::HOST, http::HeaderValue::from_str(host)?);
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// `GET path` over HTTPS, as [`https_request`] sends it.
pub async fn https_get(
    address: SocketAddr,
    host: &str,
    ca_pem: &[u8],
    path: &str,
) -> Result<Answer, StepError> {
    let request = Request::get(path).body(Full::new(Bytes::new()))?;
    https_request(address, host, ca_pem, request).await
}

/// Writes the data of Secret `namespace/name` into `dir`, one file per key, as a pod
/// would see it mounted; returns the keys' contents.
pub async fn write_secret_dir(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    dir: &Path,
) -> Result<BTreeMap<String, Vec<u8>>, StepError> {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(name)
        .await?;
    std::fs::create_dir_all(dir)?;
    let mut files = BTreeMap::new();
    for (key, value) in secret.data.unwrap_or_default() {
        std::fs::write(dir.join(&key), &value.0)?;
        files.insert(key, value.0);
    }
    Ok(files)
}

/// Waits until `address` accepts TCP connections.
pub async fn wait_for_port(address: SocketAddr, within: Duration) -> Result<(), StepError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if TcpStream::connect(address).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("nothing listens on {address} after {within:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A proxy replica's ports.
#[derive(Debug, Clone, Copy)]
pub struct ProxyPorts {
    /// Users, tunnels and the fleet API.
    pub listen: SocketAddr,
    /// `/livez`, `/readyz`.
    pub probes: SocketAddr,
}

/// Starts `sallyport-proxy run` as replica `replica` of the fleet in `namespace`, with
/// the fleet's PKI in `pki_dir` (subdirectories `tunnel-tls` and `connector-issuer`) and
/// `tunnel_hostname` as the connectors' SNI.
pub fn start_proxy(
    kubeconfig: &Path,
    namespace: &str,
    replica: &str,
    pki_dir: &Path,
    tunnel_hostname: &str,
) -> Result<(OwnedProcess, ProxyPorts), StepError> {
    let ports = ProxyPorts {
        listen: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        probes: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
    };
    let listen = ports.listen.to_string();
    let probes = ports.probes.to_string();
    let tunnel_tls = pki_dir.join("tunnel-tls").display().to_string();
    let issuer = pki_dir.join("connector-issuer").display().to_string();
    let kubeconfig = kubeconfig.display().to_string();
    let process = OwnedProcess::start(
        "sallyport-proxy",
        &[
            "run",
            "--namespace",
            namespace,
            "--listen",
            &listen,
            "--probe-address",
            &probes,
            "--tunnel-hostname",
            tunnel_hostname,
            "--tunnel-tls-dir",
            &tunnel_tls,
            "--connector-issuer-dir",
            &issuer,
            "--wait-for-tunnel",
            "1s",
        ],
        &[
            ("KUBECONFIG", &kubeconfig),
            ("POD_NAME", replica),
            ("RUST_LOG", "info,kube=warn"),
        ],
    )?;
    Ok((process, ports))
}

/// Starts `sallyport-connector run` for `group` (`namespace/name`) against the fleet
/// addresses, with its state in `state_dir`.
pub fn start_connector(
    fleet_addresses: &[SocketAddr],
    tunnel_hostname: &str,
    fleet_ca: &Path,
    group: &str,
    token: &str,
    state_dir: &Path,
) -> Result<OwnedProcess, ProcessError> {
    let addresses = fleet_addresses
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let ca = fleet_ca.display().to_string();
    let state = state_dir.display().to_string();
    OwnedProcess::start(
        "sallyport-connector",
        &[
            "run",
            "--fleet-address",
            &addresses,
            "--fleet-server-name",
            tunnel_hostname,
            "--fleet-ca-file",
            &ca,
            "--group",
            group,
            "--state-dir",
            &state,
            "--drain-timeout",
            "10s",
        ],
        &[
            ("SALLYPORT_REGISTRATION_TOKEN", token),
            ("RUST_LOG", "info"),
        ],
    )
}
