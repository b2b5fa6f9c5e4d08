//! The system under test, standalone on loopback: the backend, one `sallyport-proxy run`
//! reading a fleet configuration file, and one `sallyport-connector run` that registers
//! with a static token and keeps its tunnels to the proxy. The configuration is compiled
//! from a ConnectorGroup and a passthrough PublishedApp written as YAML, exactly as
//! `sallyport-operator compile -f <dir> --strict -o fleet-config.json` does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sallyport_operator::compile::command::{self, CompileArgs, Format};
use tokio::net::TcpStream;

use super::backend::SMALL_BODY;
use super::client::Target;
use super::error::DataplaneError;
use super::pki;
use super::process::ChildProcess;

/// The namespace of the benchmark's app and group.
pub const NAMESPACE: &str = "bench";
/// The ConnectorGroup.
pub const GROUP: &str = "bench";
/// The PublishedApp.
pub const APP: &str = "bench-app";
/// The app's host name (users' SNI and `Host`).
pub const APP_HOST: &str = "app.bench.test";
/// The fleet's tunnel host name (connectors' SNI).
pub const TUNNEL_HOST: &str = "tunnel.bench.test";
/// The app's TLS Secret name (a directory under the proxy's `--tls-dir`).
const APP_TLS_SECRET: &str = "bench-app-tls";

/// The executables the benchmark starts.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `sallyport-proxy`.
    pub proxy: PathBuf,
    /// `sallyport-connector`.
    pub connector: PathBuf,
    /// This benchmark's own executable (it serves as the backend).
    pub bench: PathBuf,
}

/// How the system under test is started.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// Worker threads of the backend.
    pub backend_workers: u16,
    /// Chunk size of the backend's downloads, KiB.
    pub chunk_kib: u32,
    /// `RUST_LOG` of the proxy and the connector.
    pub log_filter: String,
    /// `--tunnels-per-replica` of the connector.
    pub tunnels: u16,
    /// Further `sallyport-proxy run` flags (e.g. its abuse limits).
    pub proxy_args: Vec<String>,
}

/// The backend, the proxy and the connector, running; all killed when dropped.
pub struct Fleet {
    /// The backend process.
    pub backend: ChildProcess,
    /// The proxy process.
    pub proxy: ChildProcess,
    /// The connector process.
    pub connector: ChildProcess,
    /// Plain HTTP straight to the backend.
    pub direct: Target,
    /// HTTPS to the app through the proxy, the tunnel and the connector.
    pub via_proxy: Target,
    /// The backend's address.
    pub backend_address: SocketAddr,
    /// The proxy's user (and tunnel) address.
    pub proxy_address: SocketAddr,
    /// The app's certificate, PEM file (what oha trusts).
    pub app_ca_file: PathBuf,
}

/// A free loopback port (bound, read, released), for processes told their port up front.
fn free_port() -> Result<u16, DataplaneError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .map_err(DataplaneError::io("finding a free loopback port"))
}

/// Waits until `address` accepts TCP connections, while `process` runs.
async fn wait_for_port(
    address: SocketAddr,
    process: &mut ChildProcess,
    within: Duration,
) -> Result<(), DataplaneError> {
    let deadline = Instant::now() + within;
    loop {
        process.check_running()?;
        if TcpStream::connect(address).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(DataplaneError::Timeout {
                what: format!("{} listening on {address}", process.name()),
                waited: within,
                last: None,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The YAML of the benchmark's group and passthrough app, served at
/// `https://APP_HOST:proxy_port/` from `http://backend/`.
pub fn manifests(proxy_port: u16, backend: SocketAddr) -> String {
    format!(
        "apiVersion: sallyport.dev/v1alpha1
kind: ConnectorGroup
metadata:
  name: {GROUP}
  namespace: {NAMESPACE}
spec: {{}}
---
apiVersion: sallyport.dev/v1alpha1
kind: PublishedApp
metadata:
  name: {APP}
  namespace: {NAMESPACE}
spec:
  externalUrl: https://{APP_HOST}:{proxy_port}/
  internalUrl: http://{backend}/
  connectorGroup:
    name: {GROUP}
  preAuthentication:
    type: Passthrough
  tls:
    secretName: {APP_TLS_SECRET}
  # The benchmark measures the data path, not the limiter: the highest limit the API
  # allows (the check itself still runs on every request).
  rateLimit: {{requestsPerSecond: 1000000, burst: 10000000}}
"
    )
}

impl Fleet {
    /// Starts everything in `dir` (keys, configuration, state, logs) and waits until a
    /// small GET through the proxy is answered by the backend (at most 60 s).
    pub async fn start(
        dir: &Path,
        binaries: &Binaries,
        options: &FleetOptions,
    ) -> Result<Self, DataplaneError> {
        let backend_address = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let proxy_address = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let probe_address = SocketAddr::from(([127, 0, 0, 1], free_port()?));

        eprintln!("dataplane: starting the backend on {backend_address}");
        let mut backend = ChildProcess::start(
            "backend",
            &binaries.bench,
            &[
                "dataplane-backend".to_owned(),
                "--listen".to_owned(),
                backend_address.to_string(),
                "--workers".to_owned(),
                options.backend_workers.to_string(),
                "--chunk-kib".to_owned(),
                options.chunk_kib.to_string(),
            ],
            &[],
            &dir.join("backend.log"),
        )?;
        wait_for_port(backend_address, &mut backend, Duration::from_secs(10)).await?;

        // The fleet's PKI, the app's certificate, the compiled configuration.
        let fleet_pki = pki::write_fleet_pki(&dir.join("pki"), TUNNEL_HOST)?;
        let tls_dir = dir.join("tls");
        let app_ca = pki::write_app_certificate(&tls_dir, NAMESPACE, APP_TLS_SECRET, APP_HOST)?;
        let app_ca_file = dir.join("app-ca.crt");
        std::fs::write(&app_ca_file, &app_ca).map_err(DataplaneError::io(format!(
            "writing {}",
            app_ca_file.display()
        )))?;
        let manifest_dir = dir.join("manifests");
        std::fs::create_dir_all(&manifest_dir).map_err(DataplaneError::io(format!(
            "creating {}",
            manifest_dir.display()
        )))?;
        std::fs::write(
            manifest_dir.join("bench.yaml"),
            manifests(proxy_address.port(), backend_address),
        )
        .map_err(DataplaneError::io("writing the manifests"))?;
        let fleet_config = dir.join("fleet-config.json");
        let mut compile_report = Vec::new();
        command::run(
            &CompileArgs {
                files: vec![manifest_dir],
                output: Some(fleet_config.clone()),
                namespace: NAMESPACE.to_owned(),
                operator_namespace: "sallyport-system".to_owned(),
                format: Format::Json,
                default_tls_secret: None,
                default_oidc_issuer: None,
                default_oidc_client_id: None,
                revoked_connectors: Vec::new(),
                strict: true,
            },
            &mut std::io::sink(),
            &mut compile_report,
        )?;
        eprint!("dataplane: {}", String::from_utf8_lossy(&compile_report));

        // A registration token for the group: random enough for a run on loopback.
        let token = format!(
            "bench-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let group_id = format!("{NAMESPACE}/{GROUP}");
        let path = |p: &Path| p.display().to_string();
        eprintln!("dataplane: starting the proxy on {proxy_address}");
        let mut proxy_args = [
            "run",
            "--listen",
            &proxy_address.to_string(),
            "--probe-address",
            &probe_address.to_string(),
            "--fleet-config-file",
            &path(&fleet_config),
            "--tls-dir",
            &path(&tls_dir),
            "--registration-token",
            &format!("{group_id}={token}"),
            "--tunnel-hostname",
            TUNNEL_HOST,
            "--tunnel-tls-dir",
            &path(&fleet_pki.tunnel_tls_dir),
            "--connector-issuer-dir",
            &path(&fleet_pki.connector_issuer_dir),
            "--replica",
            "bench-proxy",
        ]
        .map(str::to_owned)
        .to_vec();
        proxy_args.extend(options.proxy_args.iter().cloned());
        let mut proxy = ChildProcess::start(
            "sallyport-proxy",
            &binaries.proxy,
            &proxy_args,
            &[("RUST_LOG", &options.log_filter)],
            &dir.join("proxy.log"),
        )?;
        wait_for_port(proxy_address, &mut proxy, Duration::from_secs(30)).await?;

        eprintln!("dataplane: starting the connector");
        let connector = ChildProcess::start(
            "sallyport-connector",
            &binaries.connector,
            &[
                "run",
                "--fleet-address",
                &proxy_address.to_string(),
                "--fleet-server-name",
                TUNNEL_HOST,
                "--fleet-ca-file",
                &path(&fleet_pki.root_ca_file),
                "--group",
                &group_id,
                "--state-dir",
                &path(&dir.join("connector-state")),
                "--tunnels-per-replica",
                &options.tunnels.to_string(),
            ]
            .map(str::to_owned),
            &[
                ("RUST_LOG", &options.log_filter),
                ("SALLYPORT_REGISTRATION_TOKEN", &token),
            ],
            &dir.join("connector.log"),
        )?;

        let mut fleet = Self {
            direct: Target::Direct {
                address: backend_address,
            },
            via_proxy: Target::proxy(proxy_address, APP_HOST, proxy_address.port(), &app_ca)?,
            backend,
            proxy,
            connector,
            backend_address,
            proxy_address,
            app_ca_file,
        };
        fleet.wait_until_served(Duration::from_secs(60)).await?;
        Ok(fleet)
    }

    /// Waits until a small GET through the proxy gets the backend's answer.
    async fn wait_until_served(&mut self, within: Duration) -> Result<(), DataplaneError> {
        let deadline = Instant::now() + within;
        loop {
            self.check_running()?;
            let attempt = async {
                let mut connection = self.via_proxy.connect().await?;
                connection.get("/", Duration::from_secs(5)).await
            };
            let last = match attempt.await {
                Ok(answer)
                    if answer.status == http::StatusCode::OK
                        && answer.head.as_bytes() == SMALL_BODY =>
                {
                    return Ok(());
                }
                Ok(answer) => format!("{}: {}", answer.status, answer.head.trim()),
                Err(error) => error.to_string(),
            };
            if Instant::now() > deadline {
                return Err(DataplaneError::Timeout {
                    what: "the first answer from the backend through the proxy and connector"
                        .to_owned(),
                    waited: within,
                    last: Some(last),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Fails when the backend, the proxy or the connector has exited.
    pub fn check_running(&mut self) -> Result<(), DataplaneError> {
        self.backend.check_running()?;
        self.proxy.check_running()?;
        self.connector.check_running()
    }
}
