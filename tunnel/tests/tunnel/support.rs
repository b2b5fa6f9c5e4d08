//! A test fleet and test connectors on loopback: a PKI made with rcgen, fleet replicas
//! (a [`TunnelPool`] behind a TLS listener), connectors (a [`Dialer`]) and a small app.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures::FutureExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sallyport_tunnel::ConnectorIdentity;
use sallyport_tunnel::body::{self, BoxError, TunnelBody};
use sallyport_tunnel::dial::{DialError, DialSettings, DialStatus, Dialer, Handler};
use sallyport_tunnel::pool::{PoolError, PoolSettings, ResponseBody, TunnelPool};
use sallyport_tunnel::tls::{self, Credentials};
use sallyport_tunnel::wire::{APP_HEADER, FleetNotice, TUNNEL_ALPN};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// The tunnel endpoint's name in the serving certificate.
pub const SERVER_NAME: &str = "tunnel.sallyport.test";

/// The bound of every wait in these tests: generous for a slow, shared machine.
pub const WAIT: Duration = Duration::from_secs(20);

/// Awaits `future` for at most [`WAIT`], naming `what` when it does not finish.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {WAIT:?}"))
}

/// `namespace/group/name` as an identity.
pub fn identity(namespace: &str, group: &str, name: &str) -> ConnectorIdentity {
    ConnectorIdentity::new(namespace, group, name).unwrap_or_else(|e| panic!("{e}"))
}

/// A root CA, the tunnel serving certificate it signed, and connector certificates.
pub struct Pki {
    ca: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// The fleet's tunnel serving certificate, for [`SERVER_NAME`].
    pub serving: Credentials,
}

/// Logs to the test's output, filtered by `RUST_LOG` (nothing when unset).
fn trace() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    });
}

impl Pki {
    /// A fresh PKI (and the tests' logging, on first use).
    pub fn new() -> Self {
        trace();
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "sallyport test root");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
        let issuer = Issuer::new(params, key);
        let mut serving =
            CertificateParams::new(vec![SERVER_NAME.to_owned()]).unwrap_or_else(|e| panic!("{e}"));
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving = sign(serving, &issuer);
        Self {
            ca: ca.der().clone(),
            issuer,
            serving,
        }
    }

    /// The roots both ends trust.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        vec![self.ca.clone()]
    }

    /// A new client certificate (and key) carrying `identity`.
    pub fn connector(&self, identity: &ConnectorIdentity) -> Credentials {
        let mut params = CertificateParams::default();
        let uri =
            rcgen::string::Ia5String::try_from(identity.uri()).unwrap_or_else(|e| panic!("{e}"));
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        sign(params, &self.issuer)
    }
}

fn sign(params: CertificateParams, issuer: &Issuer<'static, KeyPair>) -> Credentials {
    let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let certificate = params
        .signed_by(&key, issuer)
        .unwrap_or_else(|e| panic!("{e}"));
    Credentials {
        chain: vec![certificate.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

/// Pool settings for tests: a short hold while no tunnel is up.
pub fn pool_settings(wait_for_tunnel: Duration) -> PoolSettings {
    PoolSettings {
        wait_for_tunnel,
        drain_timeout: Duration::from_secs(10),
        ..PoolSettings::default()
    }
}

/// One proxy replica: a pool and what the test fleet's listener needs to admit tunnels.
pub struct Replica {
    /// Its tunnels.
    pub pool: TunnelPool,
    notice: Mutex<FleetNotice>,
    revoked: Mutex<HashSet<String>>,
    /// Cancelled to drop every connection the replica holds.
    connections: Mutex<CancellationToken>,
    /// The leaf certificate of every tunnel admitted, in order.
    presented: Mutex<Vec<CertificateDer<'static>>>,
    /// Tunnels whose `routed` signal arrived ([`TunnelPool::attach_signalling`]).
    routed: std::sync::atomic::AtomicUsize,
}

impl Replica {
    /// The replica `name` of a fleet made of `replicas`, serving config version `v1`.
    pub fn new(name: &str, replicas: &[&str], settings: PoolSettings) -> Arc<Self> {
        Arc::new(Self {
            pool: TunnelPool::new(settings),
            notice: Mutex::new(FleetNotice {
                replica: name.to_owned(),
                replicas: replicas.iter().map(|r| (*r).to_owned()).collect(),
                config_version: "v1".to_owned(),
            }),
            revoked: Mutex::new(HashSet::new()),
            connections: Mutex::new(CancellationToken::new()),
            presented: Mutex::new(Vec::new()),
            routed: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// How many tunnels signalled that they carry requests.
    pub fn routed(&self) -> usize {
        self.routed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The notice sent on new tunnels.
    pub fn notice(&self) -> FleetNotice {
        lock(&self.notice).clone()
    }

    /// Changes the configuration version of later notices.
    pub fn set_config_version(&self, version: &str) {
        lock(&self.notice).config_version = version.to_owned();
    }

    /// Refuses the connector `connector_id` from now on, as the proxy's listener does.
    pub fn revoke(&self, connector_id: &str) {
        lock(&self.revoked).insert(connector_id.to_owned());
    }

    /// Drops every connection, as a replica that loses its network would.
    pub fn drop_connections(&self) {
        let mut connections = lock(&self.connections);
        connections.cancel();
        *connections = CancellationToken::new();
    }

    /// The leaf certificates of the tunnels admitted so far.
    pub fn presented(&self) -> Vec<CertificateDer<'static>> {
        lock(&self.presented).clone()
    }

    async fn admit(&self, tcp: TcpStream, acceptor: TlsAcceptor) {
        let Ok(stream) = acceptor.accept(tcp).await else {
            return;
        };
        let (_, connection) = stream.get_ref();
        if connection.alpn_protocol() != Some(TUNNEL_ALPN) {
            return;
        }
        let Some(Ok(identity)) = tls::peer_identity(connection) else {
            return;
        };
        let Some(leaf) = connection.peer_certificates().and_then(|c| c.first()) else {
            return;
        };
        lock(&self.presented).push(leaf.clone().into_owned());
        if lock(&self.revoked).contains(&identity.connector_id()) {
            return;
        }
        let dropped = lock(&self.connections).clone();
        let notice = self.notice();
        let (routed_tx, routed_rx) = tokio::sync::oneshot::channel();
        let signalled = async {
            if routed_rx.await.is_ok() {
                self.routed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            attached = self.pool.attach_signalling(identity, stream, notice, Some(routed_tx)) => {
                if let Err(error) = attached {
                    tracing::debug!(%error, "tunnel ended");
                }
            }
            () = signalled => {}
            () = dropped.cancelled() => {}
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A TLS listener of the test fleet; stops when dropped.
pub struct Listener {
    /// `127.0.0.1:port`.
    pub address: String,
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A fleet listener handing the n-th connection to `replicas[route(n) % len]`: one
/// replica, or a load balancer in front of several.
pub async fn listen(
    pki: &Pki,
    replicas: Vec<Arc<Replica>>,
    route: impl Fn(usize) -> usize + Send + 'static,
) -> Listener {
    let config =
        tls::fleet_server_config(&pki.serving, &pki.roots()).unwrap_or_else(|e| panic!("{e}"));
    let acceptor = TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let address = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("{e}"))
        .to_string();
    let task = tokio::spawn(async move {
        let mut accepted = 0;
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let replica = replicas[route(accepted) % replicas.len()].clone();
            accepted += 1;
            let acceptor = acceptor.clone();
            tokio::spawn(async move { replica.admit(tcp, acceptor).await });
        }
    });
    Listener { address, task }
}

/// Dial settings for tests: fast backoff, short drain.
pub fn dial_settings(addresses: Vec<String>) -> DialSettings {
    DialSettings {
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(200),
        drain_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        ..DialSettings::new(addresses, SERVER_NAME)
    }
}

/// A running connector.
pub struct Connector {
    /// Who it is.
    pub identity: ConnectorIdentity,
    /// Its current client certificate; swap it to rotate.
    pub credentials: Arc<ArcSwap<Credentials>>,
    /// Its tunnels.
    pub status: watch::Receiver<DialStatus>,
    /// The latest fleet notice it received.
    pub notices: watch::Receiver<Option<FleetNotice>>,
    /// The configuration version it reports.
    pub config_version: watch::Sender<String>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), DialError>>>,
}

impl Connector {
    /// Starts `identity`'s dialer with a new certificate and `handler`.
    pub fn start(
        pki: &Pki,
        identity: ConnectorIdentity,
        settings: DialSettings,
        handler: Handler,
    ) -> Self {
        let credentials = Arc::new(ArcSwap::from_pointee(pki.connector(&identity)));
        let (config_version, config_version_rx) = watch::channel("v1".to_owned());
        let dialer = Dialer::new(
            settings,
            credentials.clone(),
            pki.roots(),
            handler,
            identity.connector_id(),
            config_version_rx,
        );
        let status = dialer.status_updates();
        let notices = dialer.notices();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(dialer.run(shutdown.clone()));
        Self {
            identity,
            credentials,
            status,
            notices,
            config_version,
            shutdown,
            task: Some(task),
        }
    }

    /// Waits until `condition` holds for the dialer's status.
    pub async fn wait_status(&mut self, what: &str, condition: impl FnMut(&DialStatus) -> bool) {
        within(what, self.status.wait_for(condition))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }

    /// Asks the dialer to drain and stop.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits for the dialer to return.
    pub async fn join(&mut self) -> Result<(), DialError> {
        let task = self.task.take().unwrap_or_else(|| panic!("joined twice"));
        within("the dialer returns", task)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A small app behind a connector.
pub struct TestApp {
    /// Names the answers, e.g. the connector's name.
    pub name: String,
    /// Requests answered, of any kind.
    pub hits: AtomicUsize,
    /// How many `/slow` requests arrived.
    pub slow_seen: watch::Sender<usize>,
    /// `/slow` and the rest of `/stream` wait until this is true.
    pub gate: watch::Sender<bool>,
}

impl TestApp {
    /// A new app with the gate closed.
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            hits: AtomicUsize::new(0),
            slow_seen: watch::Sender::new(0),
            gate: watch::Sender::new(false),
        })
    }

    /// Opens the gate.
    pub fn open_gate(&self) {
        self.gate.send_replace(true);
    }

    /// Waits until at least `count` `/slow` requests arrived.
    pub async fn wait_slow(&self, count: usize) {
        let mut seen = self.slow_seen.subscribe();
        within(
            &format!("{count} slow requests reach {}", self.name),
            seen.wait_for(|n| *n >= count),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// The app as a connector handler.
    pub fn handler(self: &Arc<Self>) -> Handler {
        let app = self.clone();
        Arc::new(move |request| app.clone().answer(request).boxed())
    }

    async fn answer(self: Arc<Self>, request: Request<Incoming>) -> Response<TunnelBody> {
        self.hits.fetch_add(1, Ordering::Relaxed);
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/hello") => {
                Response::new(body::full(format!("hello from {}", self.name)))
            }
            (&Method::POST, "/echo") => Response::new(body::incoming(request.into_body())),
            (&Method::GET, "/stream") => Response::new(self.stream()),
            (&Method::GET, "/slow") => {
                self.slow_seen.send_modify(|n| *n += 1);
                self.gate_opened().await;
                Response::new(body::full("slow done"))
            }
            _ => {
                let mut response = Response::new(body::empty());
                *response.status_mut() = StatusCode::NOT_FOUND;
                response
            }
        }
    }

    async fn gate_opened(&self) {
        let mut gate = self.gate.subscribe();
        let _ = gate.wait_for(|open| *open).await;
    }

    /// `first;`, then, once the gate opens, [`STREAM_CHUNKS`] chunks of 64 KiB of `x`.
    fn stream(self: &Arc<Self>) -> TunnelBody {
        let app = self.clone();
        let frames = futures::stream::unfold(0usize, move |sent| {
            let app = app.clone();
            async move {
                let data = match sent {
                    0 => Bytes::from_static(b"first;"),
                    n if n <= STREAM_CHUNKS => {
                        if n == 1 {
                            app.gate_opened().await;
                        }
                        Bytes::from(vec![b'x'; 64 * 1024])
                    }
                    _ => return None,
                };
                Some((Ok::<_, BoxError>(Frame::data(data)), sent + 1))
            }
        });
        StreamBody::new(frames).boxed_unsync()
    }
}

/// How many 64 KiB chunks `/stream` sends after its first frame.
pub const STREAM_CHUNKS: usize = 16;

/// A request for `path` of the app `infra/app`.
pub fn request(method: Method, path: &str, body: TunnelBody) -> Request<TunnelBody> {
    Request::builder()
        .method(method)
        .uri(format!("http://app.internal{path}"))
        .header(APP_HEADER, "infra/app")
        .body(body)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `GET path`.
pub fn get(path: &str) -> Request<TunnelBody> {
    request(Method::GET, path, body::empty())
}

/// The whole body of a tunneled response.
pub async fn read_body(response: Response<ResponseBody>) -> Bytes {
    within("the response body", response.into_body().collect())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .to_bytes()
}

/// Sends `GET path` to `group` and returns status and body.
pub async fn fetch(
    pool: &TunnelPool,
    group: &str,
    path: &str,
) -> Result<(StatusCode, Bytes), PoolError> {
    let response = within("a response head", pool.send(group, get(path))).await?;
    let status = response.status();
    Ok((status, read_body(response).await))
}

/// The group of the [`OneReplica`] connector.
pub const GROUP: &str = "infra/east";

/// A one-replica fleet and one connector `infra/vm-1` of [`GROUP`] holding its two
/// tunnels to it.
pub struct OneReplica {
    /// The PKI of both ends.
    pub pki: Pki,
    /// The replica.
    pub replica: Arc<Replica>,
    /// The connector.
    pub connector: Connector,
    /// The app behind the connector.
    pub app: Arc<TestApp>,
    /// The replica's listener, open for the test's life.
    _listener: Listener,
}

impl OneReplica {
    /// Starts the fleet and the connector and waits for both tunnels.
    pub async fn start(wait_for_tunnel: Duration) -> Self {
        let pki = Pki::new();
        let replica = Replica::new("proxy-0", &["proxy-0"], pool_settings(wait_for_tunnel));
        let listener = listen(&pki, vec![replica.clone()], |_| 0).await;
        let app = TestApp::new("vm-1");
        let connector = Connector::start(
            &pki,
            identity("infra", "east", "vm-1"),
            dial_settings(vec![listener.address.clone()]),
            app.handler(),
        );
        within(
            "two tunnels up",
            replica.pool.wait_for(|tunnels| tunnels.len() == 2),
        )
        .await;
        Self {
            pki,
            replica,
            connector,
            app,
            _listener: listener,
        }
    }
}
