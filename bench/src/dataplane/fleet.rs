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

use super::authenticated;
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

/// Where the proxy and connector executables are: the flags every scenario with a
/// standalone fleet shares.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct BinaryArgs {
    /// The `sallyport-proxy` executable (default: next to this one).
    #[arg(long, value_name = "PATH", env = "SALLYPORT_BENCH_PROXY_BIN")]
    pub proxy_bin: Option<PathBuf>,

    /// The `sallyport-connector` executable (default: next to this one).
    #[arg(long, value_name = "PATH", env = "SALLYPORT_BENCH_CONNECTOR_BIN")]
    pub connector_bin: Option<PathBuf>,
}

impl BinaryArgs {
    /// The executables: the given paths, else the files next to this benchmark (where
    /// `cargo build --release --workspace --bins` puts them).
    pub fn locate(&self) -> Result<Binaries, DataplaneError> {
        let bench =
            std::env::current_exe().map_err(DataplaneError::io("finding this executable"))?;
        Ok(Binaries {
            proxy: super::locate(self.proxy_bin.as_ref(), "sallyport-proxy", &bench)?,
            connector: super::locate(self.connector_bin.as_ref(), "sallyport-connector", &bench)?,
            bench,
        })
    }
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
    /// Also publish the backend as the OIDC app of [`authenticated`], with its policies,
    /// and seal a session cookie for it.
    pub authenticated_app: bool,
}

/// The authenticated app, when the fleet publishes it ([`FleetOptions::authenticated_app`]).
#[derive(Clone)]
pub struct AuthenticatedApp {
    /// HTTPS to it through the proxy, with the session cookie.
    pub via_proxy: Target,
    /// Its certificate, PEM file.
    pub ca_file: PathBuf,
    /// The `Cookie` header value carrying the signed-in user's session.
    pub cookie: String,
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
    /// The authenticated app, when published.
    pub authenticated: Option<AuthenticatedApp>,
    /// The proxy's probe address (`/metrics`, `/readyz`).
    pub probe_address: SocketAddr,
    /// How the connector was started: to start more of the group's connectors.
    pub connector_launch: ConnectorLaunch,
}

/// How to start a connector of the benchmark's group: the executable, the flags that
/// reach the proxy, the log filter and the registration token. Several connectors of the
/// group run side by side with state directories of their own.
#[derive(Clone, Debug)]
pub struct ConnectorLaunch {
    /// `sallyport-connector`.
    pub program: PathBuf,
    /// `run` and its flags, without `--state-dir`.
    pub args: Vec<String>,
    /// `RUST_LOG`.
    pub log_filter: String,
    /// The group's static registration token.
    pub token: String,
}

impl ConnectorLaunch {
    /// Starts a connector keeping its state in `state_dir` (it registers when the
    /// directory holds no state, else it reuses it: a restart), logging to `log`, with
    /// `extra_args` added.
    pub fn start(
        &self,
        name: &'static str,
        state_dir: &Path,
        log: &Path,
        extra_args: &[String],
    ) -> Result<ChildProcess, DataplaneError> {
        let mut args = self.args.clone();
        args.extend(["--state-dir".to_owned(), state_dir.display().to_string()]);
        args.extend(extra_args.iter().cloned());
        ChildProcess::start(
            name,
            &self.program,
            &args,
            &[
                ("RUST_LOG", &self.log_filter),
                ("SALLYPORT_REGISTRATION_TOKEN", &self.token),
            ],
            log,
        )
    }
}

/// A free loopback address (bound, read, released), for processes told their port up
/// front.
pub fn free_address() -> Result<SocketAddr, DataplaneError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map_err(DataplaneError::io("finding a free loopback port"))
}

/// A free loopback port (see [`free_address`]).
fn free_port() -> Result<u16, DataplaneError> {
    free_address().map(|address| address.port())
}

/// Waits until a `GET /` through `target` gets the backend's small answer, while `alive`
/// says the processes behind it run; past `deadline`, a timeout naming `what` (and the
/// wait, `within`) with the last answer or error.
pub async fn wait_for_backend_answer(
    target: &Target,
    deadline: Instant,
    within: Duration,
    what: String,
    mut alive: impl FnMut() -> Result<(), DataplaneError>,
) -> Result<(), DataplaneError> {
    loop {
        alive()?;
        let attempt = async {
            let mut connection = target.connect().await?;
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
                what,
                waited: within,
                last: Some(last),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `address` accepts TCP connections, while `process` runs.
pub async fn wait_for_port(
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
        let authenticated = if options.authenticated_app {
            std::fs::write(
                manifest_dir.join("bench-authenticated.yaml"),
                authenticated::manifests(
                    NAMESPACE,
                    GROUP,
                    proxy_address.port(),
                    &format!("http://{backend_address}/"),
                ),
            )
            .map_err(DataplaneError::io(
                "writing the authenticated app's manifests",
            ))?;
            let ca = pki::write_app_certificate(
                &tls_dir,
                NAMESPACE,
                authenticated::TLS_SECRET,
                authenticated::APP_HOST,
            )?;
            let ca_file = dir.join("auth-app-ca.crt");
            std::fs::write(&ca_file, &ca)
                .map_err(DataplaneError::io(format!("writing {}", ca_file.display())))?;
            let cookie = authenticated::write_keys_and_seal_cookie(&tls_dir, NAMESPACE)?;
            let via_proxy = Target::proxy(
                proxy_address,
                authenticated::APP_HOST,
                proxy_address.port(),
                &ca,
            )?
            .with_cookie(&cookie)?;
            Some(AuthenticatedApp {
                via_proxy,
                ca_file,
                cookie,
            })
        } else {
            None
        };
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
        let connector_launch = ConnectorLaunch {
            program: binaries.connector.clone(),
            args: [
                "run",
                "--fleet-address",
                &proxy_address.to_string(),
                "--fleet-server-name",
                TUNNEL_HOST,
                "--fleet-ca-file",
                &path(&fleet_pki.root_ca_file),
                "--group",
                &group_id,
                "--tunnels-per-replica",
                &options.tunnels.to_string(),
            ]
            .map(str::to_owned)
            .to_vec(),
            log_filter: options.log_filter.clone(),
            token: token.clone(),
        };
        let connector = connector_launch.start(
            "sallyport-connector",
            &dir.join("connector-state"),
            &dir.join("connector.log"),
            &[],
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
            authenticated,
            probe_address,
            connector_launch,
        };
        fleet.wait_until_served(Duration::from_secs(60)).await?;
        Ok(fleet)
    }

    /// Waits until a small GET through the proxy gets the backend's answer, for the
    /// passthrough app and (when published) the authenticated one.
    async fn wait_until_served(&mut self, within: Duration) -> Result<(), DataplaneError> {
        let deadline = Instant::now() + within;
        let mut targets = vec![self.via_proxy.clone()];
        targets.extend(self.authenticated.as_ref().map(|app| app.via_proxy.clone()));
        for target in targets {
            let what = format!(
                "the first answer from the backend through the proxy and connector ({})",
                target.host_header()
            );
            wait_for_backend_answer(&target, deadline, within, what, || self.check_running())
                .await?;
        }
        Ok(())
    }

    /// Fails when the backend, the proxy or the connector has exited.
    pub fn check_running(&mut self) -> Result<(), DataplaneError> {
        self.backend.check_running()?;
        self.proxy.check_running()?;
        self.connector.check_running()
    }
}
