//! What data-plane e2e tests need beside the control plane: a real backend server, an
//! HTTPS client that speaks to the proxy as a browser would (SNI, the app's CA), the
//! fleet's PKI Secrets written out as the pods would mount them, and the proxy and
//! connector processes.
//!
//! On top of those: [`Fleet`], the common start of a data-plane test (operator, PKI,
//! proxy replicas; groups, apps and connectors on demand); [`HttpsConnection`] for
//! HTTP/1.1 or HTTP/2 clients with streaming bodies; [`pattern`] bodies made and checked
//! on the fly ([`PatternBody`], [`PatternCheck`]); [`TrafficBackend`], which tells which
//! connector process sent each request; [`run_load`]; [`MemoryWatch`] for the processes'
//! RSS; and a real [`Nginx`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

use sallyport_api::fleet_config::{FleetConfig, STORAGE_KEY};

use crate::controlplane::Mode;
use crate::identity::proxy_kubeconfig;
use crate::process::{OwnedProcess, ProcessError, start_operator};
use crate::testbed::Testbed;

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

impl ProxyPorts {
    /// Two free ports of 127.0.0.1.
    pub fn free() -> Result<Self, StepError> {
        Ok(Self {
            listen: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            probes: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        })
    }
}

/// nginx's `*_temp_path` directives for the modules the `nginx` binary was built with,
/// inside `dir` (a test's directory), so that nginx writes nothing elsewhere.
pub fn nginx_temp_paths(nginx: &Path, dir: &Path) -> Result<String, std::io::Error> {
    let built = std::process::Command::new(nginx).arg("-V").output()?;
    let built = String::from_utf8_lossy(&built.stderr).into_owned();
    let mut temp_paths = format!("client_body_temp_path {0}/body;\n", dir.display());
    for module in ["proxy", "fastcgi", "uwsgi", "scgi"] {
        if !built.contains(&format!("--without-http_{module}_module")) {
            temp_paths.push_str(&format!(
                "    {module}_temp_path {}/{module};\n",
                dir.display()
            ));
        }
    }
    Ok(temp_paths)
}

/// Starts `nginx` with `config` (written to `<dir>/nginx.conf`, prefix `dir`, errors to
/// its output) and waits up to 10 s until it listens on `address`.
pub async fn run_nginx(
    nginx: &Path,
    dir: &Path,
    config: &str,
    address: SocketAddr,
) -> Result<OwnedProcess, StepError> {
    let config_file = dir.join("nginx.conf");
    std::fs::write(&config_file, config)?;
    let prefix = format!("{}/", dir.display());
    let config_arg = config_file.display().to_string();
    let mut process = OwnedProcess::start_program(
        nginx,
        &["-p", &prefix, "-e", "stderr", "-c", &config_arg],
        &[],
        true,
    )?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if !process.is_running() {
            return Err(format!("nginx exited at start: {}", process.output()).into());
        }
        if TcpStream::connect(address).await.is_ok() {
            return Ok(process);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("nginx does not listen on {address}: {}", process.output()).into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A PEM file in a fleet's PKI directory that, when present, proxies started there trust
/// for identity providers (`--identity-provider-ca-file`).
pub const IDENTITY_PROVIDER_CA_FILE: &str = "identity-provider-ca.crt";

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
    let ports = ProxyPorts::free()?;
    let process = start_proxy_on(
        kubeconfig,
        namespace,
        replica,
        pki_dir,
        tunnel_hostname,
        ports,
    )?;
    Ok((process, ports))
}

/// Like [`start_proxy`], on the given `ports`: a replica restarted where its
/// predecessor listened, as a pod behind a stable Service address.
pub fn start_proxy_on(
    kubeconfig: &Path,
    namespace: &str,
    replica: &str,
    pki_dir: &Path,
    tunnel_hostname: &str,
    ports: ProxyPorts,
) -> Result<OwnedProcess, StepError> {
    start_proxy_with(
        kubeconfig,
        namespace,
        replica,
        pki_dir,
        tunnel_hostname,
        ports,
        &ProxyOptions::default(),
    )
}

/// What a test adds to a proxy's start ([`start_proxy_with`]).
#[derive(Debug, Clone, Default)]
pub struct ProxyOptions {
    /// Further `sallyport-proxy run` arguments, e.g. `--mfa-acr-value` or
    /// `--trusted-proxy`.
    pub extra_args: Vec<String>,
    /// A file that receives the proxy's standard output, which is its sign-in log (one
    /// JSON line per decision); its standard error still reaches the test's.
    pub stdout_file: Option<PathBuf>,
}

/// Like [`start_proxy_on`], with `options`.
pub fn start_proxy_with(
    kubeconfig: &Path,
    namespace: &str,
    replica: &str,
    pki_dir: &Path,
    tunnel_hostname: &str,
    ports: ProxyPorts,
    options: &ProxyOptions,
) -> Result<OwnedProcess, StepError> {
    let listen = ports.listen.to_string();
    let probes = ports.probes.to_string();
    let tunnel_tls = pki_dir.join("tunnel-tls").display().to_string();
    let issuer = pki_dir.join("connector-issuer").display().to_string();
    let kubeconfig = kubeconfig.display().to_string();
    let mut args = vec![
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
    ];
    // An identity provider with a test CA: see IDENTITY_PROVIDER_CA_FILE.
    let provider_ca = pki_dir.join(IDENTITY_PROVIDER_CA_FILE);
    let provider_ca = provider_ca.display().to_string();
    if pki_dir.join(IDENTITY_PROVIDER_CA_FILE).is_file() {
        args.extend(["--identity-provider-ca-file", &provider_ca]);
    }
    args.extend(options.extra_args.iter().map(String::as_str));
    let mut envs = vec![
        ("KUBECONFIG", kubeconfig.as_str()),
        ("POD_NAME", replica),
        ("RUST_LOG", "info,kube=warn,sallyport_proxy::auth=debug"),
        // Every simulated user connects from 127.0.0.1: no limit per client address
        // (tests of the limits pass the flags, which take precedence).
        ("SALLYPORT_CLIENT_REQUESTS_PER_SECOND", "0"),
        ("SALLYPORT_MAX_CONNECTIONS_PER_CLIENT", "0"),
    ];
    let Some(stdout_file) = &options.stdout_file else {
        return Ok(OwnedProcess::start("sallyport-proxy", &args, &envs)?);
    };
    // A shell that execs the proxy (same process, same death signal) with its standard
    // output redirected: the file gets whole lines, never mixed with standard error.
    let proxy = crate::process::workspace_binary("sallyport-proxy")?;
    let proxy = proxy.display().to_string();
    let stdout_file = stdout_file.display().to_string();
    envs.push(("SALLYPORT_E2E_STDOUT_FILE", &stdout_file));
    let mut shell_args = vec![
        "-c",
        "exec \"$0\" \"$@\" >\"$SALLYPORT_E2E_STDOUT_FILE\"",
        &proxy,
    ];
    shell_args.extend(args);
    Ok(OwnedProcess::start_program(
        Path::new("/bin/sh"),
        &shell_args,
        &envs,
        false,
    )?)
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
    ConnectorLaunch {
        fleet_addresses: fleet_addresses.to_vec(),
        tunnel_hostname,
        fleet_ca,
        group,
        token,
        state_dir,
        drain_timeout: "10s",
        capture_output: false,
    }
    .start()
}

/// How to start one `sallyport-connector run`: [`start_connector`] with every knob.
#[derive(Debug, Clone)]
pub struct ConnectorLaunch<'a> {
    /// The fleet addresses it dials, in turn.
    pub fleet_addresses: Vec<SocketAddr>,
    /// The fleet's tunnel host name (SNI).
    pub tunnel_hostname: &'a str,
    /// The fleet's root CA, a PEM file.
    pub fleet_ca: &'a Path,
    /// The group, `namespace/name`.
    pub group: &'a str,
    /// The registration token.
    pub token: &'a str,
    /// Its state directory.
    pub state_dir: &'a Path,
    /// `--drain-timeout`, e.g. `10s`.
    pub drain_timeout: &'a str,
    /// Whether to keep its output for [`OwnedProcess::output`].
    pub capture_output: bool,
}

impl ConnectorLaunch<'_> {
    /// Starts the connector.
    pub fn start(&self) -> Result<OwnedProcess, ProcessError> {
        let addresses = self
            .fleet_addresses
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let ca = self.fleet_ca.display().to_string();
        let state = self.state_dir.display().to_string();
        let args = [
            "run",
            "--fleet-address",
            &addresses,
            "--fleet-server-name",
            self.tunnel_hostname,
            "--fleet-ca-file",
            &ca,
            "--group",
            self.group,
            "--state-dir",
            &state,
            "--drain-timeout",
            self.drain_timeout,
        ];
        let envs = [
            ("SALLYPORT_REGISTRATION_TOKEN", self.token),
            ("RUST_LOG", "info"),
        ];
        if self.capture_output {
            OwnedProcess::start_capturing("sallyport-connector", &args, &envs)
        } else {
            OwnedProcess::start("sallyport-connector", &args, &envs)
        }
    }
}

/// Polls `step` until it yields a value, for at most `within`; an error of `step` is kept
/// for the message and polling goes on.
pub async fn eventually<T>(
    what: &str,
    within: Duration,
    mut step: impl AsyncFnMut() -> Result<Option<T>, StepError>,
) -> Result<T, StepError> {
    let deadline = tokio::time::Instant::now() + within;
    let mut last_error = None;
    loop {
        match step().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(error) => last_error = Some(error.to_string()),
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "{what} did not happen within {within:?} (last error: {last_error:?})"
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The tunnel host name (connectors' SNI) of every [`Fleet`].
pub const FLEET_TUNNEL_HOST: &str = "tunnel.dataplane.test";

/// The ConfigMap of the compiled fleet configuration, in the operator's namespace.
const FLEET_CONFIG_MAP: &str = "sallyport-fleet-config";

/// The compiled fleet configuration the operator in `operator_namespace` has published
/// for the proxies, if any yet.
pub async fn published_fleet_config(
    client: &kube::Client,
    operator_namespace: &str,
) -> Result<Option<FleetConfig>, StepError> {
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), operator_namespace);
    let Some(config_map) = config_maps.get_opt(FLEET_CONFIG_MAP).await? else {
        return Ok(None);
    };
    let Some(bytes) = config_map
        .binary_data
        .as_ref()
        .and_then(|data| data.get(STORAGE_KEY))
    else {
        return Ok(None);
    };
    Ok(Some(FleetConfig::from_gzip_json(&bytes.0)?))
}

/// How long a [`Fleet`] may take to react to a change (generous for a busy 2-core
/// machine).
pub const REACTION_TIMEOUT: Duration = Duration::from_secs(30);

/// One proxy replica of a [`Fleet`].
pub struct FleetProxy {
    /// Its replica name (`POD_NAME`).
    pub name: String,
    /// The process.
    pub process: OwnedProcess,
    /// Its ports.
    pub ports: ProxyPorts,
}

/// The data plane's common start: a [`Testbed`], the operator (tunnel host name
/// [`FLEET_TUNNEL_HOST`]), the fleet's PKI written out as the proxy pods mount it, and
/// proxy replicas running as the proxy's ServiceAccount, listening. Groups, apps and
/// connectors are added by the test.
pub struct Fleet {
    /// The control plane and the test's namespaces.
    pub bed: Testbed,
    /// The operator.
    pub operator: OwnedProcess,
    /// The fleet's PKI: `tunnel-tls/` and `connector-issuer/`.
    pub pki: tempfile::TempDir,
    /// A kubeconfig authenticating as the proxy's ServiceAccount.
    pub proxy_kubeconfig: PathBuf,
    /// The proxy replicas, in the order they were named.
    pub proxies: Vec<FleetProxy>,
}

/// What a connector needs to join a group: made by [`Fleet::create_group`].
pub struct GroupAccess {
    /// The group's name.
    pub name: String,
    /// The group's id, `namespace/name`.
    pub id: String,
    /// Its current registration token.
    pub token: String,
    /// The fleet's root CA (from the token Secret), as a PEM file.
    pub fleet_ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fleet {
    /// Starts a fleet whose test namespace is named after `prefix`, with one proxy
    /// replica per name in `replicas`; `supervisor` is the `sallyport-cluster` executable
    /// (`env!("CARGO_BIN_EXE_sallyport-cluster")` in a test).
    pub async fn start(
        supervisor: &Path,
        prefix: &str,
        replicas: &[&str],
    ) -> Result<Self, StepError> {
        Self::start_with(supervisor, prefix, replicas, &[], &ProxyOptions::default()).await
    }

    /// Like [`Fleet::start`], the operator started with `operator_args` besides the
    /// tunnel host name, and every replica with `proxy_options`.
    pub async fn start_with(
        supervisor: &Path,
        prefix: &str,
        replicas: &[&str],
        operator_args: &[&str],
        proxy_options: &ProxyOptions,
    ) -> Result<Self, StepError> {
        Self::start_in(
            supervisor,
            Mode::ApiServer,
            prefix,
            replicas,
            operator_args,
            proxy_options,
        )
        .await
    }

    /// Like [`Fleet::start_with`], on the shared control plane in `mode`: with
    /// [`Mode::WithControllers`] the operator's Deployments roll out (their pods run
    /// where a [`crate::node_agent::NodeAgent`] runs them).
    pub async fn start_in(
        supervisor: &Path,
        mode: Mode,
        prefix: &str,
        replicas: &[&str],
        operator_args: &[&str],
        proxy_options: &ProxyOptions,
    ) -> Result<Self, StepError> {
        let bed = Testbed::new(supervisor, mode, prefix)
            .await
            .map_err(|e| e.to_string())?;
        let operator = start_operator(
            &bed.operator_kubeconfig,
            &bed.operator_namespace,
            &[&["--tunnel-hostname", FLEET_TUNNEL_HOST][..], operator_args].concat(),
        )?;
        let pki = tempfile::tempdir()?;
        for (secret, dir) in [
            ("sallyport-tunnel-tls", "tunnel-tls"),
            ("sallyport-connector-issuer", "connector-issuer"),
        ] {
            eventually(&format!("Secret {secret}"), REACTION_TIMEOUT, async || {
                let files = write_secret_dir(
                    &bed.client,
                    &bed.operator_namespace,
                    secret,
                    &pki.path().join(dir),
                )
                .await?;
                Ok(files.contains_key("tls.key").then_some(()))
            })
            .await?;
        }
        let proxy_kubeconfig = proxy_kubeconfig(bed.control_plane, &bed.operator_namespace).await?;
        let mut fleet = Self {
            bed,
            operator,
            pki,
            proxy_kubeconfig,
            proxies: Vec::new(),
        };
        let replicas: Vec<(&str, ProxyOptions)> = replicas
            .iter()
            .map(|name| (*name, proxy_options.clone()))
            .collect();
        fleet.add_proxies(&replicas).await?;
        Ok(fleet)
    }

    /// Starts the proxy replicas `replicas` (each a name and its [`ProxyOptions`]) on free
    /// ports, and waits until they listen.
    pub async fn add_proxies(
        &mut self,
        replicas: &[(&str, ProxyOptions)],
    ) -> Result<(), StepError> {
        let first = self.proxies.len();
        for (name, options) in replicas {
            let ports = ProxyPorts::free()?;
            let process = start_proxy_with(
                &self.proxy_kubeconfig,
                &self.bed.operator_namespace,
                name,
                self.pki.path(),
                FLEET_TUNNEL_HOST,
                ports,
                options,
            )?;
            self.proxies.push(FleetProxy {
                name: (*name).to_owned(),
                process,
                ports,
            });
        }
        for proxy in &self.proxies[first..] {
            wait_for_port(proxy.ports.listen, REACTION_TIMEOUT).await?;
        }
        Ok(())
    }

    /// The compiled fleet configuration the operator has published for the proxies, if
    /// any yet.
    pub async fn fleet_config(&self) -> Result<Option<FleetConfig>, StepError> {
        published_fleet_config(&self.bed.client, &self.bed.operator_namespace).await
    }

    /// The replicas' listen addresses: what connectors dial and users reach.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.proxies.iter().map(|p| p.ports.listen).collect()
    }

    /// Starts replica `name` of this fleet on `ports` (e.g. where a stopped one listened).
    pub fn start_replica(&self, name: &str, ports: ProxyPorts) -> Result<OwnedProcess, StepError> {
        start_proxy_on(
            &self.proxy_kubeconfig,
            &self.bed.operator_namespace,
            name,
            self.pki.path(),
            FLEET_TUNNEL_HOST,
            ports,
        )
    }

    /// Creates ConnectorGroup `name` with `spec` in the test namespace and waits for its
    /// registration token Secret (with the fleet's CA) and for the group in the compiled
    /// fleet configuration.
    pub async fn create_group(
        &self,
        name: &str,
        spec: serde_json::Value,
    ) -> Result<GroupAccess, StepError> {
        crate::manifests::create(
            self.bed.client.clone(),
            &self.bed.namespace,
            &serde_json::json!({
                "apiVersion": "sallyport.dev/v1alpha1", "kind": "ConnectorGroup",
                "metadata": {"name": name}, "spec": spec
            }),
        )
        .await?;
        let secret_name = format!("{name}-registration");
        let secrets = Api::<Secret>::namespaced(self.bed.client.clone(), &self.bed.namespace);
        let data = eventually(
            &format!("the registration token of group {name}"),
            REACTION_TIMEOUT,
            async || {
                let secret = secrets.get_opt(&secret_name).await?;
                Ok(secret
                    .and_then(|s| s.data)
                    .filter(|d| d.contains_key("ca.crt") && d.contains_key("token")))
            },
        )
        .await?;
        // The operator writes the token Secret and compiles the fleet configuration
        // independently; a connector registering before the proxies know the group is
        // refused (as with an unknown group), so wait for the group in the compiled
        // configuration the proxies watch.
        let id = format!("{}/{name}", self.bed.namespace);
        eventually(
            &format!("group {id} in the fleet configuration"),
            REACTION_TIMEOUT,
            async || {
                let Some(config) = self.fleet_config().await? else {
                    return Ok(None);
                };
                Ok(config
                    .connector_groups
                    .iter()
                    .any(|group| group.id == id)
                    .then_some(()))
            },
        )
        .await?;
        let field = |key: &str| data.get(key).map(|v| v.0.clone()).unwrap_or_default();
        let dir = tempfile::tempdir()?;
        let fleet_ca = dir.path().join("fleet-ca.crt");
        std::fs::write(&fleet_ca, field("ca.crt"))?;
        Ok(GroupAccess {
            name: name.to_owned(),
            id,
            token: String::from_utf8(field("token"))?,
            fleet_ca,
            _dir: dir,
        })
    }

    /// Publishes a passthrough app `name` at `https://{host}/` served from `internal_url`
    /// through `group`, with a fresh self-signed certificate (Secret `{name}-tls`); returns
    /// that certificate, the CA a user trusts. The app's rate limit is raised far above
    /// any test's load: these tests measure the data path, and the default limit (500/s,
    /// shared by the replicas) would answer their load loops with 429.
    pub async fn publish_app(
        &self,
        name: &str,
        host: &str,
        internal_url: &str,
        group: &str,
    ) -> Result<Vec<u8>, StepError> {
        let tls = crate::manifests::self_signed_tls_secret(&format!("{name}-tls"), host)?;
        let app_ca = tls
            .data
            .as_ref()
            .and_then(|d| d.get("tls.crt"))
            .map(|v| v.0.clone())
            .ok_or("the TLS Secret has no tls.crt")?;
        Api::<Secret>::namespaced(self.bed.client.clone(), &self.bed.namespace)
            .create(&kube::api::PostParams::default(), &tls)
            .await?;
        crate::manifests::create(
            self.bed.client.clone(),
            &self.bed.namespace,
            &serde_json::json!({
                "apiVersion": "sallyport.dev/v1alpha1", "kind": "PublishedApp",
                "metadata": {"name": name},
                "spec": {
                    "externalUrl": format!("https://{host}/"),
                    "internalUrl": internal_url,
                    "preAuthentication": {"type": "Passthrough"},
                    "connectorGroup": {"name": group},
                    "tls": {"secretName": format!("{name}-tls")},
                    "rateLimit": {"requestsPerSecond": 1_000_000, "burst": 10_000_000}
                }
            }),
        )
        .await?;
        Ok(app_ca)
    }

    /// Starts two connectors of `group` (their states in `state_dirs`), has `backend`
    /// label their requests `labels`, and waits until requests for `app_host` through
    /// every replica reach both.
    pub async fn start_two_connectors(
        &self,
        group: &GroupAccess,
        state_dirs: [&Path; 2],
        backend: &TrafficBackend,
        labels: [&str; 2],
        app_host: &str,
        app_ca: &[u8],
    ) -> Result<(OwnedProcess, OwnedProcess), StepError> {
        let first = self.connector(group, state_dirs[0]).start()?;
        let second = self.connector(group, state_dirs[1]).start()?;
        backend.watch(&first, labels[0]);
        backend.watch(&second, labels[1]);
        let addresses = self.addresses();
        eventually(
            "requests through both replicas reaching both connectors",
            REACTION_TIMEOUT,
            async || {
                for address in &addresses {
                    let answer = https_get(*address, app_host, app_ca, "/").await?;
                    if answer.status != 200 {
                        return Ok(None);
                    }
                }
                let arrivals = backend.arrivals();
                let from = |label: &str| arrivals.iter().any(|a| a.from.as_deref() == Some(label));
                Ok((from(labels[0]) && from(labels[1])).then_some(()))
            },
        )
        .await?;
        Ok((first, second))
    }

    /// How to start a connector of `group` dialling every replica, with its state in
    /// `state_dir`; adjust the fields, then [`ConnectorLaunch::start`].
    pub fn connector<'a>(
        &'a self,
        group: &'a GroupAccess,
        state_dir: &'a Path,
    ) -> ConnectorLaunch<'a> {
        ConnectorLaunch {
            fleet_addresses: self.addresses(),
            tunnel_hostname: FLEET_TUNNEL_HOST,
            fleet_ca: &group.fleet_ca,
            group: &group.id,
            token: &group.token,
            state_dir,
            drain_timeout: "10s",
            capture_output: false,
        }
    }
}

/// The HTTP version a test client asks the proxy for with ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `http/1.1`.
    Http1,
    /// `h2`.
    Http2,
}

/// A streaming request body for [`HttpsConnection`].
pub type ClientBody = http_body_util::combinators::BoxBody<Bytes, StepError>;

/// An empty [`ClientBody`].
pub fn empty_body() -> ClientBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

enum ClientSender {
    Http1(hyper::client::conn::http1::SendRequest<ClientBody>),
    Http2(hyper::client::conn::http2::SendRequest<ClientBody>),
}

/// One HTTPS connection to the proxy as a browser opens it (SNI `host`, only the app's CA
/// trusted, ALPN for the chosen [`Protocol`]), sending requests one after another with
/// streaming bodies both ways.
pub struct HttpsConnection {
    host: String,
    sender: ClientSender,
}

fn client_tls(ca_pem: &[u8], alpn: &[&[u8]]) -> Result<rustls::ClientConfig, StepError> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(certificate?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

impl HttpsConnection {
    /// Connects to `address` and negotiates `protocol`; fails when the proxy picks
    /// another one.
    pub async fn open(
        address: SocketAddr,
        host: &str,
        ca_pem: &[u8],
        protocol: Protocol,
    ) -> Result<Self, StepError> {
        let alpn: &[u8] = match protocol {
            Protocol::Http1 => b"http/1.1",
            Protocol::Http2 => b"h2",
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(ca_pem, &[alpn])?));
        let tcp = TcpStream::connect(address).await?;
        tcp.set_nodelay(true)?;
        let tls = connector
            .connect(ServerName::try_from(host.to_owned())?, tcp)
            .await?;
        let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        if negotiated.as_deref() != Some(alpn) {
            return Err(format!(
                "asked {address} for ALPN {:?}, it negotiated {:?}",
                String::from_utf8_lossy(alpn),
                negotiated.map(|p| String::from_utf8_lossy(&p).into_owned())
            )
            .into());
        }
        let sender = match protocol {
            Protocol::Http1 => {
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
                tokio::spawn(connection);
                ClientSender::Http1(sender)
            }
            Protocol::Http2 => {
                let (sender, connection) =
                    hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .timer(hyper_util::rt::TokioTimer::new())
                        .handshake(TokioIo::new(tls))
                        .await?;
                tokio::spawn(connection);
                ClientSender::Http2(sender)
            }
        };
        Ok(Self {
            host: host.to_owned(),
            sender,
        })
    }

    /// The protocol spoken.
    pub fn protocol(&self) -> Protocol {
        match self.sender {
            ClientSender::Http1(_) => Protocol::Http1,
            ClientSender::Http2(_) => Protocol::Http2,
        }
    }

    /// Sends `request` (its URI a path and query) for the connection's host: `Host`
    /// over HTTP/1.1, an `https://host/...` URI (`:authority`) over HTTP/2. Returns once
    /// the response head arrived; the body streams.
    pub async fn send(
        &mut self,
        mut request: Request<ClientBody>,
    ) -> Result<Response<Incoming>, StepError> {
        match &mut self.sender {
            ClientSender::Http1(sender) => {
                request
                    .headers_mut()
                    .insert(http::header::HOST, http::HeaderValue::from_str(&self.host)?);
                sender.ready().await?;
                Ok(sender.send_request(request).await?)
            }
            ClientSender::Http2(sender) => {
                let path = request
                    .uri()
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned();
                *request.uri_mut() = format!("https://{}{path}", self.host).parse()?;
                sender.ready().await?;
                Ok(sender.send_request(request).await?)
            }
        }
    }

    /// Waits until the connection can take a request; `false` when the server has closed
    /// it (HTTP/1.1 `Connection: close` or an idle close, HTTP/2 GOAWAY): the next
    /// request needs a new connection.
    pub async fn ready(&mut self) -> bool {
        match &mut self.sender {
            ClientSender::Http1(sender) => sender.ready().await.is_ok(),
            ClientSender::Http2(sender) => sender.ready().await.is_ok(),
        }
    }

    /// Like [`HttpsConnection::send`], but tells a request that never left apart from one
    /// that failed on the way ([`SendFailure::unsent`]).
    pub async fn try_send(
        &mut self,
        mut request: Request<ClientBody>,
    ) -> Result<Response<Incoming>, SendFailure> {
        let failed = |error: StepError| SendFailure {
            unsent: true,
            error,
        };
        let sent = match &mut self.sender {
            ClientSender::Http1(sender) => {
                let host = http::HeaderValue::from_str(&self.host).map_err(|e| failed(e.into()))?;
                request.headers_mut().insert(http::header::HOST, host);
                sender.try_send_request(request).await
            }
            ClientSender::Http2(sender) => {
                let path = request
                    .uri()
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned();
                *request.uri_mut() = format!("https://{}{path}", self.host)
                    .parse()
                    .map_err(|e: http::uri::InvalidUri| failed(e.into()))?;
                sender.try_send_request(request).await
            }
        };
        sent.map_err(|mut error| {
            let handed_back = error.take_message().is_some();
            let error = error.into_error();
            SendFailure {
                unsent: handed_back || never_processed(&error),
                error: error.into(),
            }
        })
    }

    /// Sends `request` and reads the whole answer.
    pub async fn request(&mut self, request: Request<ClientBody>) -> Result<Answer, StepError> {
        let response = self.send(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// Why [`HttpsConnection::try_send`] got no response.
#[derive(Debug)]
pub struct SendFailure {
    /// The request never reached the application: hyper handed it back because the
    /// connection closed before it was written, or the server's HTTP/2 GOAWAY said it
    /// was not processed ([`never_processed`]); sending it again on another connection
    /// cannot repeat its effect, whatever its method.
    pub unsent: bool,
    /// What went wrong.
    pub error: StepError,
}

/// Whether `error` is HTTP/2's word that the server never processed the stream: it lay
/// beyond the last stream of the server's GOAWAY (or the client had the GOAWAY before it
/// could open it), or the server refused it (RFC 9113, 8.7). Such a request may be sent
/// again whatever its method. Read from the h2 error's debug form (`GoAway(.., Remote)`,
/// `Reset(.., REFUSED_STREAM, Remote)`): h2 is not a dependency of the harness.
pub fn never_processed(error: &hyper::Error) -> bool {
    let Some(source) = std::error::Error::source(error) else {
        return false;
    };
    let text = format!("{source:?}");
    text.contains("Remote") && (text.contains("GoAway(") || text.contains("REFUSED_STREAM"))
}

/// [`https_request`] over HTTP/2 (ALPN `h2`): the host goes in `:authority`.
pub async fn https_request_h2(
    address: SocketAddr,
    host: &str,
    ca_pem: &[u8],
    request: Request<Full<Bytes>>,
) -> Result<Answer, StepError> {
    let mut connection = HttpsConnection::open(address, host, ca_pem, Protocol::Http2).await?;
    connection
        .request(request.map(|body| body.map_err(|never| match never {}).boxed()))
        .await
}

/// Length of the repeating block of [`pattern`]: a prime, so that it never lines up with
/// the power-of-two buffer and frame sizes on the way, and a lost, repeated or reordered
/// chunk shows.
pub const PATTERN_LEN: usize = 1_048_573;

/// The bytes test bodies are made of: a fixed pseudo-random block of [`PATTERN_LEN`]
/// bytes, repeated. Bodies of any length are sliced from it without copying, and a
/// receiver checks what arrived byte for byte ([`PatternCheck`]), never holding a body.
pub fn pattern() -> &'static Bytes {
    static PATTERN: OnceLock<Bytes> = OnceLock::new();
    PATTERN.get_or_init(|| {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut bytes = Vec::with_capacity(PATTERN_LEN + 8);
        while bytes.len() < PATTERN_LEN {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            bytes.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        bytes.truncate(PATTERN_LEN);
        Bytes::from(bytes)
    })
}

/// A body of `len` bytes of [`pattern`], made as it is read (64 KiB frames).
#[derive(Debug)]
pub struct PatternBody {
    remaining: u64,
    offset: usize,
}

impl PatternBody {
    /// The first `len` bytes of the repeated pattern.
    pub fn new(len: u64) -> Self {
        Self {
            remaining: len,
            offset: 0,
        }
    }

    /// As a [`ClientBody`].
    pub fn boxed_client(self) -> ClientBody {
        self.map_err(|never| match never {}).boxed()
    }
}

impl hyper::body::Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        const FRAME: usize = 64 * 1024;
        if self.remaining == 0 {
            return std::task::Poll::Ready(None);
        }
        let left = usize::try_from(self.remaining).unwrap_or(usize::MAX);
        let len = FRAME.min(PATTERN_LEN - self.offset).min(left);
        let chunk = pattern().slice(self.offset..self.offset + len);
        self.offset = (self.offset + len) % PATTERN_LEN;
        self.remaining -= len as u64;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.remaining)
    }
}

/// Checks a stream against [`pattern`] as it arrives: how many bytes, and the offset of
/// the first that differs.
#[derive(Debug, Default, Clone, Copy)]
pub struct PatternCheck {
    received: u64,
    first_mismatch: Option<u64>,
}

impl PatternCheck {
    /// Nothing received yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next `chunk` of the stream.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        let pattern = pattern();
        while !chunk.is_empty() {
            let offset = usize::try_from(self.received % PATTERN_LEN as u64).unwrap_or(0);
            let len = chunk.len().min(PATTERN_LEN - offset);
            let (head, rest) = chunk.split_at(len);
            let expected = pattern.get(offset..offset + len).unwrap_or_default();
            if self.first_mismatch.is_none() && head != expected {
                let at = head
                    .iter()
                    .zip(expected)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                self.first_mismatch = Some(self.received + at as u64);
            }
            self.received += len as u64;
            chunk = rest;
        }
    }

    /// Bytes received.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Offset of the first byte that is not the pattern's.
    pub fn first_mismatch(&self) -> Option<u64> {
        self.first_mismatch
    }
}

/// Reads `body` to its end through a [`PatternCheck`], holding one frame at a time.
pub async fn check_pattern_body(mut body: Incoming) -> Result<PatternCheck, StepError> {
    let mut check = PatternCheck::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            check.feed(&data);
        }
    }
    Ok(check)
}

/// One request as a [`TrafficBackend`] saw it.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// When its head arrived.
    pub at: tokio::time::Instant,
    /// Its path and query.
    pub target: String,
    /// The label of the watched process whose connection carried it
    /// ([`TrafficBackend::watch`]), if any.
    pub from: Option<String>,
}

struct TrafficState {
    name: String,
    watched: Mutex<Vec<(u32, String)>>,
    arrivals: Mutex<Vec<Arrival>>,
}

/// A plain HTTP/1.1 backend for data-plane tests that records every request with the
/// process that sent it (told apart by the owner of the connection's client socket, see
/// [`TrafficBackend::watch`]). It answers:
///
/// - `GET /bytes/<n>`: `n` bytes of [`pattern`], made on the fly, with `Content-Length`;
/// - `POST /count`: reads the body through a [`PatternCheck`] and answers
///   `received=<n>\nmismatch=<offset or none>\n`;
/// - `GET /slow/<ms>`: the text answer below, after `ms` milliseconds;
/// - anything else: a text body naming the backend (`backend=<name>`), the method and
///   the target.
pub struct TrafficBackend {
    /// Where it listens.
    pub address: SocketAddr,
    state: Arc<TrafficState>,
    task: tokio::task::JoinHandle<()>,
}

impl TrafficBackend {
    /// Starts a backend named `name` on a free loopback port.
    pub async fn start(name: &str) -> Result<Self, std::io::Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let state = Arc::new(TrafficState {
            name: name.to_owned(),
            watched: Mutex::new(Vec::new()),
            arrivals: Mutex::new(Vec::new()),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let watched = state
                        .watched
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone();
                    let from = tokio::task::spawn_blocking(move || {
                        socket_owner(peer.port(), address.port(), &watched)
                    })
                    .await
                    .ok()
                    .flatten();
                    let service = service_fn(move |request: Request<Incoming>| {
                        let state = state.clone();
                        let from = from.clone();
                        async move { Ok::<_, Infallible>(traffic_answer(&state, from, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            address,
            state,
            task,
        })
    }

    /// Attributes connections from `process` to `label` from now on (a connector, say),
    /// so that [`Arrival::from`] says which process sent each request.
    pub fn watch(&self, process: &OwnedProcess, label: &str) {
        self.state
            .watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((process.pid(), label.to_owned()));
    }

    /// Every request so far, in arrival order.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.state
            .arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many requests arrived.
    pub fn requests(&self) -> usize {
        self.state
            .arrivals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Its base URL, `http://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.address)
    }
}

impl Drop for TrafficBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type BackendBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

fn text_response(text: String) -> Response<BackendBody> {
    Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    )
}

async fn traffic_answer(
    state: &TrafficState,
    from: Option<String>,
    request: Request<Incoming>,
) -> Response<BackendBody> {
    let target = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    state
        .arrivals
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Arrival {
            at: tokio::time::Instant::now(),
            target: target.clone(),
            from,
        });
    let path = request.uri().path().to_owned();
    if let Some(len) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        let mut response = Response::new(
            PatternBody::new(len)
                .map_err(|never| match never {})
                .boxed(),
        );
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/octet-stream"),
        );
        response
            .headers_mut()
            .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
        return response;
    }
    if request.method() == http::Method::POST && path == "/count" {
        let mut body = request.into_body();
        let mut check = PatternCheck::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        check.feed(&data);
                    }
                }
                Err(error) => {
                    let mut response = text_response(format!("body broke off: {error}\n"));
                    *response.status_mut() = StatusCode::BAD_REQUEST;
                    return response;
                }
            }
        }
        return text_response(format!(
            "received={}\nmismatch={}\n",
            check.received(),
            check
                .first_mismatch()
                .map_or_else(|| "none".to_owned(), |at| at.to_string())
        ));
    }
    if let Some(ms) = path
        .strip_prefix("/slow/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    text_response(format!(
        "backend={}\nmethod={}\ntarget={target}\n",
        state.name,
        request.method()
    ))
}

/// The label of the process among `watched` (pid, label) that owns the loopback TCP
/// socket connected from local port `client_port` to `server_port`: the socket's inode
/// from `/proc/net/tcp{,6}`, then the process whose `/proc/<pid>/fd` links to it.
pub fn socket_owner(
    client_port: u16,
    server_port: u16,
    watched: &[(u32, String)],
) -> Option<String> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = |field: Option<&&str>| {
                field
                    .and_then(|f| f.rsplit_once(':'))
                    .and_then(|(_, port)| u16::from_str_radix(port, 16).ok())
            };
            if port(fields.get(1)) == Some(client_port)
                && port(fields.get(2)) == Some(server_port)
                && let Some(inode) = fields.get(9).filter(|i| **i != "0")
            {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    watched.iter().find_map(|(pid, label)| {
        let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        entries
            .filter_map(Result::ok)
            .filter_map(|entry| std::fs::read_link(entry.path()).ok())
            .any(|link| {
                inodes
                    .iter()
                    .any(|inode| link.as_os_str() == inode.as_str())
            })
            .then(|| label.clone())
    })
}

/// The resident set size of process `pid`, in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> Result<u64, StepError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kib * 1024)
}

/// The memory of one process as a [`MemoryWatch`] saw it.
#[derive(Debug, Clone)]
pub struct MemoryPeak {
    /// The label given.
    pub label: String,
    /// Its RSS when the watch started, in bytes.
    pub baseline: u64,
    /// The highest RSS sampled, in bytes.
    pub peak: u64,
    /// How many samples were taken.
    pub samples: usize,
}

impl MemoryPeak {
    /// How far the RSS rose above the baseline, in bytes.
    pub fn growth(&self) -> u64 {
        self.peak.saturating_sub(self.baseline)
    }
}

/// Samples the RSS of some processes every `interval` until dropped.
pub struct MemoryWatch {
    peaks: Arc<Mutex<Vec<MemoryPeak>>>,
    task: tokio::task::JoinHandle<()>,
}

impl MemoryWatch {
    /// Starts watching `processes` (label, pid); their current RSS is the baseline.
    pub fn start(processes: &[(&str, u32)], interval: Duration) -> Result<Self, StepError> {
        let mut peaks = Vec::new();
        for (label, pid) in processes {
            let rss = rss_bytes(*pid)?;
            peaks.push(MemoryPeak {
                label: (*label).to_owned(),
                baseline: rss,
                peak: rss,
                samples: 1,
            });
        }
        let peaks = Arc::new(Mutex::new(peaks));
        let pids: Vec<u32> = processes.iter().map(|(_, pid)| *pid).collect();
        let shared = peaks.clone();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            loop {
                ticks.tick().await;
                let samples: Vec<Option<u64>> =
                    pids.iter().map(|pid| rss_bytes(*pid).ok()).collect();
                let mut peaks = shared.lock().unwrap_or_else(PoisonError::into_inner);
                for (peak, sample) in peaks.iter_mut().zip(samples) {
                    if let Some(rss) = sample {
                        peak.peak = peak.peak.max(rss);
                        peak.samples += 1;
                    }
                }
            }
        });
        Ok(Self { peaks, task })
    }

    /// The peaks so far.
    pub fn peaks(&self) -> Vec<MemoryPeak> {
        self.peaks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for MemoryWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where load requests go: an app through one proxy replica.
#[derive(Debug, Clone)]
pub struct LoadTarget {
    /// The replica.
    pub address: SocketAddr,
    /// The app's host.
    pub host: String,
    /// The app's CA.
    pub ca_pem: Vec<u8>,
    /// The path (and query) to `GET`.
    pub path: String,
    /// Text a good answer's body contains.
    pub expect: String,
}

impl LoadTarget {
    /// `GET path` of the app at `host` (trusting `ca_pem`) through each of `addresses`,
    /// a good answer containing `expect`: one target per proxy replica.
    pub fn per_replica(
        addresses: &[SocketAddr],
        host: &str,
        ca_pem: &[u8],
        path: &str,
        expect: &str,
    ) -> Vec<Self> {
        addresses
            .iter()
            .map(|address| Self {
                address: *address,
                host: host.to_owned(),
                ca_pem: ca_pem.to_vec(),
                path: path.to_owned(),
                expect: expect.to_owned(),
            })
            .collect()
    }
}

/// One request of a [`run_load`].
#[derive(Debug, Clone)]
pub struct LoadOutcome {
    /// Which client sent it.
    pub client: usize,
    /// When it was sent.
    pub started: tokio::time::Instant,
    /// When its answer ended (or it failed).
    pub finished: tokio::time::Instant,
    /// `Ok(())` for a 200 whose body holds the expected text; otherwise what went wrong.
    pub result: Result<(), String>,
}

/// Runs `clients` concurrent clients until `until`: client `i` sends `GET` after `GET`
/// to `targets[i % targets.len()]` over one keep-alive HTTP/1.1 connection (opened
/// again after a failure), each request bounded by `timeout`. Returns every outcome.
pub async fn run_load(
    targets: &[LoadTarget],
    clients: usize,
    until: tokio::time::Instant,
    timeout: Duration,
) -> Vec<LoadOutcome> {
    /// An upper bound on requests per client, so the loop ends even if time stood still.
    const MAX_REQUESTS: usize = 100_000;
    if targets.is_empty() {
        return Vec::new();
    }
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let target = targets[client % targets.len()].clone();
        tasks.spawn(async move {
            let mut outcomes = Vec::new();
            let mut connection: Option<HttpsConnection> = None;
            for _ in 0..MAX_REQUESTS {
                let started = tokio::time::Instant::now();
                if started >= until {
                    break;
                }
                let result = tokio::time::timeout(timeout, async {
                    let mut open = match connection.take() {
                        Some(open) => open,
                        None => HttpsConnection::open(
                            target.address,
                            &target.host,
                            &target.ca_pem,
                            Protocol::Http1,
                        )
                        .await
                        .map_err(|e| format!("connect: {e}"))?,
                    };
                    let request = Request::get(target.path.as_str())
                        .body(empty_body())
                        .map_err(|e| e.to_string())?;
                    let answer = open.request(request).await.map_err(|e| e.to_string())?;
                    connection = Some(open);
                    let text = answer.text();
                    if answer.status != StatusCode::OK || !text.contains(&target.expect) {
                        return Err(format!("{}: {}", answer.status, text.trim()));
                    }
                    Ok(())
                })
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
                if result.is_err() {
                    connection = None;
                }
                outcomes.push(LoadOutcome {
                    client,
                    started,
                    finished: tokio::time::Instant::now(),
                    result,
                });
            }
            outcomes
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Ok(outcomes) = done {
            all.extend(outcomes);
        }
    }
    all.sort_by_key(|o| o.started);
    all
}

/// A real nginx serving static files on a free loopback port, as a non-daemon single
/// process with a generated configuration; killed when dropped.
pub struct Nginx {
    /// Where it listens.
    pub address: SocketAddr,
    /// The directory it serves.
    pub root: PathBuf,
    /// The process (its output is captured: nginx logs errors to stderr).
    pub process: OwnedProcess,
    _dir: tempfile::TempDir,
}

/// How to get nginx where it is missing.
pub const NGINX_INSTALL_HINT: &str = "install it with `apt-get update && apt-get install -y nginx-light` (as root; `bash hack/install-test-packages.sh` does it)";

/// The nginx executable: on `PATH`, or Debian's `/usr/sbin/nginx`.
pub fn find_nginx() -> Result<PathBuf, StepError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            format!("nginx is not installed, and this test needs a real nginx as its backend: {NGINX_INSTALL_HINT}").into()
        })
}

impl Nginx {
    /// Writes `files` (path relative to the root, content) and starts nginx serving them.
    pub async fn start(files: &[(&str, &[u8])]) -> Result<Self, StepError> {
        let nginx = find_nginx()?;
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("www");
        for (path, content) in files {
            let file = root.join(path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(file, content)?;
        }
        std::fs::create_dir_all(&root)?;
        let temp_paths = nginx_temp_paths(&nginx, dir.path())?;
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let config = format!(
            "daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
    access_log {dir}/access.log;
    {temp_paths}
    types {{ text/html html; text/plain txt; application/octet-stream bin; }}
    default_type application/octet-stream;
    server {{
        listen {address};
        root {root};
        location / {{ }}
    }}
}}
",
            dir = dir.path().display(),
            root = root.display(),
        );
        let process = run_nginx(&nginx, dir.path(), &config, address).await?;
        Ok(Self {
            address,
            root,
            process,
            _dir: dir,
        })
    }

    /// Its base URL, `http://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.address)
    }
}

/// Sends `request` over plain HTTP/1.1 to `address` (a backend, directly); `Host` is the
/// address.
pub async fn http_request(
    address: SocketAddr,
    mut request: Request<Full<Bytes>>,
) -> Result<Answer, StepError> {
    let tcp = TcpStream::connect(address).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    request.headers_mut().insert(
        http::header::HOST,
        http::HeaderValue::from_str(&address.to_string())?,
    );
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}
