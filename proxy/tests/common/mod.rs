//! What the in-process proxy tests share: a test PKI, a fleet configuration of one
//! connector group, and a [`Fleet`]: a real `serve::Proxy` on a TLS listener on
//! 127.0.0.1 with one connector (its `Backends` behind a `Dialer`) tunnelled to it, in
//! the test's own process.
//!
//! Each test binary takes this module with `mod common;`; an item a binary does not use
//! is marked `#[allow(dead_code)]`.
//!
//! Every wait is bounded by [`WAIT`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName};
use sallyport_api::FleetConfig;
use sallyport_api::connector_group::{CertificatePolicy, Registration};
use sallyport_api::fleet_config::{ConnectorGroupConfig, Route};
use sallyport_connector::backend::Backends;
use sallyport_connector::slice::CurrentSlice;
use sallyport_proxy::certs::{CertificateStore, certified_key_from_pem};
use sallyport_proxy::fleet_api::FleetApi;
use sallyport_proxy::forward::TrustedProxies;
use sallyport_proxy::issuer::Issuer;
use sallyport_proxy::protection::ProtectionSettings;
use sallyport_proxy::registry::MemoryRegistry;
use sallyport_proxy::serve::{DrainSettings, Proxy, ProxyParts};
use sallyport_tunnel::ConnectorIdentity;
use sallyport_tunnel::dial::{DialSettings, Dialer};
use sallyport_tunnel::pool::{PoolSettings, TunnelPool};
use sallyport_tunnel::tls::{self, Credentials};
use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

/// The bound of every wait: generous for a slow, shared machine.
pub const WAIT: Duration = Duration::from_secs(30);
/// The fleet's tunnel host name (SNI of tunnels, name of the serving certificate).
pub const TUNNEL_HOST: &str = "tunnel.sallyport.test";
/// The connector group of every app.
pub const GROUP: &str = "infra/east";
/// The host of the plain app of [`web_route`].
pub const WEB_HOST: &str = "web.apps.example.com";
/// The names of the apps' certificate: every app's host is under `apps.example.com`.
pub const APPS_CERTIFICATE_NAME: &str = "*.apps.example.com";

/// The value of `result`, or a panic with its error.
pub fn ok<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// Awaits `future` for at most [`WAIT`], naming `what` when it does not finish.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {WAIT:?}"))
}

/// Waits at most [`WAIT`] for `condition`, checking it every 10 ms; `what` names it when
/// it does not come true.
#[allow(dead_code)]
pub async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A plain HTTP/1.1 backend on 127.0.0.1 answering every request with 200 and the text
/// `answer` makes of it; its address.
pub async fn http_backend<F, A>(answer: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> A + Clone + Send + Sync + 'static,
    A: Future<Output = String> + Send + 'static,
{
    let listener = ok(TcpListener::bind("127.0.0.1:0").await);
    let address = ok(listener.local_addr());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let text = answer(request);
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text.await)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    address
}

// ---------------------------------------------------------------------------------------
// PKI

/// A root CA signing everything: the tunnel serving certificate, the connector's client
/// certificate, the apps' certificate, TLS backends' certificates and the connector
/// issuer.
pub struct Pki {
    /// The root certificate, PEM.
    pub root_pem: String,
    /// The root certificate, DER.
    pub root_der: CertificateDer<'static>,
    root: rcgen::Issuer<'static, KeyPair>,
}

/// Parameters of a CA certificate named `name`, valid from an hour ago for 30 days.
fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = OffsetDateTime::now_utc() + time::Duration::days(30);
    params
}

impl Pki {
    /// A new root, with a fresh key.
    pub fn new() -> Self {
        let key = ok(KeyPair::generate());
        let params = ca_params("Sallyport proxy test root");
        let root = ok(params.self_signed(&key));
        Self {
            root_pem: root.pem(),
            root_der: root.der().clone(),
            root: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate signed by the root: PEM chain, PEM key.
    fn sign(&self, mut params: CertificateParams) -> (String, String) {
        params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = OffsetDateTime::now_utc() + time::Duration::days(30);
        let key = ok(KeyPair::generate());
        let certificate = ok(params.signed_by(&key, &self.root));
        (certificate.pem(), key.serialize_pem())
    }

    /// A server certificate for `names`: PEM chain, PEM key.
    pub fn server(&self, names: &[&str]) -> (String, String) {
        let mut params = ok(CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        ));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// `chain` and `key` (PEM) as tunnel credentials, `what` naming them in errors.
    pub fn credentials(what: &str, (chain, key): (String, String)) -> Credentials {
        ok(Credentials::from_pem(
            what,
            chain.as_bytes(),
            key.as_bytes(),
        ))
    }

    /// The client certificate of the connector `identity`.
    fn connector(&self, identity: &ConnectorIdentity) -> Credentials {
        let mut params = CertificateParams::default();
        let uri = ok(rcgen::string::Ia5String::try_from(identity.uri()));
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Self::credentials("connector certificate", self.sign(params))
    }

    /// The connector issuer, under the root.
    fn issuer(&self) -> Issuer {
        let mut params = ca_params("Sallyport connector issuer");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (chain, key) = self.sign(params);
        ok(Issuer::from_pem(&chain, &key, &self.root_pem))
    }

    /// A client configuration trusting the root, offering `alpn`.
    pub fn client(&self, alpn: &[&[u8]]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        ok(roots.add(self.root_der.clone()));
        let mut config = ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("{e}"))
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

// ---------------------------------------------------------------------------------------
// The fleet configuration

/// A passthrough route of `app` at `https://{host}:{port}/` to `internal_url` in
/// [`GROUP`], with WebSockets on or off and `tls` as its `backend.tls`.
pub fn route(
    app: &str,
    host: &str,
    port: u16,
    internal_url: &str,
    websockets: bool,
    tls: Option<serde_json::Value>,
) -> Route {
    let mut backend = serde_json::json!({ "timeout": "10s", "websockets": websockets });
    if let Some(tls) = tls {
        backend["tls"] = tls;
    }
    ok(serde_json::from_value(serde_json::json!({
        "app": app,
        "host": host,
        "port": port,
        "pathPrefix": "/",
        "url": format!("https://{host}:{port}/"),
        "internalUrl": internal_url,
        "connectorGroup": GROUP,
        "preAuthentication": { "type": "Passthrough" },
        "tls": { "secretRef": { "namespace": "sallyport-system", "name": "default-tls" } },
        "backend": backend,
        "rateLimit": { "requestsPerSecond": 500, "burst": 1000 },
    })))
}

/// The plain app `team-a/web` at [`WEB_HOST`] on `port`, behind the HTTP backend at
/// `backend`, without WebSockets.
pub fn web_route(port: u16, backend: SocketAddr) -> Route {
    route(
        "team-a/web",
        WEB_HOST,
        port,
        &format!("http://{backend}/"),
        false,
        None,
    )
}

/// [`GROUP`] with the default certificate and registration policies.
fn group() -> ConnectorGroupConfig {
    ConnectorGroupConfig {
        id: GROUP.to_owned(),
        certificate: CertificatePolicy::default(),
        registration: Registration::default(),
        inactive_connector_ttl: ok(sallyport_api::Duration::parse("240h")),
        connector_version: None,
    }
}

// ---------------------------------------------------------------------------------------
// The fleet: a proxy and a connector

/// How a test wants its [`Fleet`]; the default is the proxy's own.
#[derive(Default)]
pub struct FleetSettings {
    /// The proxy's trusted proxies.
    pub trusted_proxies: TrustedProxies,
    /// Whether the connector trusts the test root for TLS backends.
    pub backends_trust_root: bool,
    /// The proxy's drain settings; `serve::Proxy::serve`'s when `None`.
    pub drain: Option<DrainSettings>,
    /// The proxy's abuse limits.
    pub protection: ProtectionSettings,
}

/// A proxy on 127.0.0.1 with one connector of [`GROUP`] tunnelled to it. Dropping it
/// stops both.
pub struct Fleet {
    /// The PKI behind every certificate of the fleet.
    pub pki: Pki,
    /// The proxy's address, for users and for the connector's tunnels.
    pub address: SocketAddr,
    /// The proxy.
    #[allow(dead_code)]
    pub proxy: Arc<Proxy>,
    /// Stops the proxy: it drains and returns (see [`Fleet::served`]). The connector
    /// goes on until the fleet is dropped.
    pub shutdown: CancellationToken,
    /// The proxy's serving task, finished once the proxy returned.
    #[allow(dead_code)]
    pub served: JoinHandle<()>,
    connector_stop: CancellationToken,
    _replicas: watch::Sender<Vec<String>>,
    _config_version: watch::Sender<String>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.connector_stop.cancel();
    }
}

impl Fleet {
    /// Starts a proxy serving the routes `routes` makes for the proxy's port (apps'
    /// hosts under `apps.example.com`, all in [`GROUP`]), then a connector of the group,
    /// and waits for the connector's tunnel.
    pub async fn start(
        pki: Pki,
        settings: FleetSettings,
        routes: impl FnOnce(u16) -> Vec<Route>,
    ) -> Self {
        let listener = ok(TcpListener::bind("127.0.0.1:0").await);
        let address = ok(listener.local_addr());
        let config = ok(FleetConfig::new(
            routes(address.port()),
            vec![],
            vec![group()],
            vec![],
        ));
        let slice = ok(config.group_slice(GROUP)).unwrap_or_else(|| panic!("{GROUP} has a slice"));
        let config = Arc::new(ArcSwap::from_pointee(config));

        let (app_chain, app_key) = pki.server(&[APPS_CERTIFICATE_NAME]);
        let app_certificate = ok(certified_key_from_pem(
            app_chain.as_bytes(),
            app_key.as_bytes(),
        ));
        let fleet_api = FleetApi::new(
            Arc::new(ArcSwap::from_pointee(pki.issuer())),
            Arc::new(MemoryRegistry::new(vec![])),
            config.clone(),
        );
        let (replicas_tx, replicas) = watch::channel(vec!["proxy-0".to_owned()]);
        let proxy = ok(Proxy::new(ProxyParts {
            replica: "proxy-0".to_owned(),
            tunnel_hostnames: vec![TUNNEL_HOST.to_owned()],
            tunnel_tls: Pki::credentials("tunnel serving certificate", pki.server(&[TUNNEL_HOST])),
            connector_roots: vec![pki.root_der.clone()],
            certificates: Arc::new(CertificateStore::new(Some(app_certificate))),
            fleet_api,
            config,
            pool: TunnelPool::new(PoolSettings::default()),
            replicas,
            trusted_proxies: settings.trusted_proxies,
            protection: settings.protection,
        }));
        let shutdown = CancellationToken::new();
        let served = match settings.drain {
            Some(drain) => tokio::spawn(proxy.clone().serve_with_drain(
                listener,
                shutdown.clone(),
                drain,
            )),
            None => tokio::spawn(proxy.clone().serve(listener, shutdown.clone())),
        };

        // The connector: the group's slice, trusting the test root for TLS backends if
        // asked to.
        let backend_ca = settings
            .backends_trust_root
            .then_some(pki.root_pem.as_str());
        let current = ok(CurrentSlice::with_backend_ca(backend_ca));
        let version = slice.version.clone();
        ok(current.replace(slice));
        let identity = ok(ConnectorIdentity::new("infra", "east", "connector-1"));
        let (config_version, config_version_rx) = watch::channel(version);
        let connector_stop = CancellationToken::new();
        let dialer = Dialer::new(
            DialSettings {
                tunnels_per_replica: 1,
                ..DialSettings::new(vec![address.to_string()], TUNNEL_HOST)
            },
            Arc::new(ArcSwap::from_pointee(pki.connector(&identity))),
            vec![pki.root_der.clone()],
            Arc::new(Backends::new(current)).handler(),
            identity.connector_id(),
            config_version_rx,
        );
        tokio::spawn(dialer.run(connector_stop.clone()));
        within(
            "the connector's tunnel is up",
            proxy.pool().wait_for(|tunnels| !tunnels.is_empty()),
        )
        .await;
        Self {
            pki,
            address,
            proxy,
            shutdown,
            served,
            connector_stop,
            _replicas: replicas_tx,
            _config_version: config_version,
        }
    }

    /// TLS over `tcp` (a connection to the proxy) for `host`, offering `alpn`.
    pub async fn tls_over(
        &self,
        tcp: TcpStream,
        host: &str,
        alpn: &[&[u8]],
    ) -> TlsStream<TcpStream> {
        let name = ok(ServerName::try_from(host.to_owned()));
        within(
            "TLS handshake with the proxy",
            TlsConnector::from(self.pki.client(alpn)).connect(name, tcp),
        )
        .await
        .unwrap_or_else(|e| panic!("TLS with the proxy for {host}: {e}"))
    }

    /// A new TLS connection to the proxy for `host`, offering `alpn`.
    #[allow(dead_code)]
    pub async fn tls(&self, host: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        let tcp = within("connecting to the proxy", TcpStream::connect(self.address))
            .await
            .unwrap_or_else(|e| panic!("connecting to the proxy at {}: {e}", self.address));
        self.tls_over(tcp, host, alpn).await
    }
}
