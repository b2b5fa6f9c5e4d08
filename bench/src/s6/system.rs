//! S6's system under test, all real and on loopback: a control plane (etcd and
//! kube-apiserver through `sallyport-cluster`), `sallyport-operator run` as its
//! least-privileged ServiceAccount, N `sallyport-proxy run` replicas as the proxy's
//! ServiceAccount (watching the compiled configuration, as in a cluster), two
//! `sallyport-connector run` of one ConnectorGroup, and two of this benchmark's backends
//! named `blue` and `green`; one passthrough PublishedApp served from `blue` first.
//!
//! The steps are those of the e2e harness's `Fleet` (`e2e/src/dataplane.rs`), with its
//! pieces that take no executable path (control plane, CRDs, identities, the fleet's
//! PKI Secrets written out as the pods mount them, manifests); the processes are this
//! benchmark's own children, from the executables given or next to the benchmark, each
//! logging to a file in the run's directory. Everything is killed when the [`System`] is
//! dropped, the control plane last.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http::Request;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use sallyport_api::PublishedApp;
use sallyport_e2e::controlplane::{ControlPlane, Mode};
use sallyport_e2e::dataplane::{HttpsConnection, Protocol, empty_body, write_secret_dir};
use sallyport_e2e::identity::{operator_kubeconfig, proxy_kubeconfig};
use sallyport_e2e::manifests::{create, install_crds, self_signed_tls_secret};
use serde_json::json;

use super::probe::{PROBE_TIMEOUT, Seen, classify};
use crate::dataplane::DataplaneError;
use crate::dataplane::backend::NAME_HEADER;
use crate::dataplane::fleet::{free_address, wait_for_port};
use crate::dataplane::process::ChildProcess;
use crate::error::BenchError;
use crate::operator_process::{OperatorOptions, OperatorProcess};

/// The app's host name (users' SNI and `Host`; published on port 443).
pub const APP_HOST: &str = "s6.bench.test";
/// The PublishedApp.
pub const APP: &str = "s6-app";
/// The ConnectorGroup.
pub const GROUP: &str = "s6";
/// The fleet's tunnel host name (connectors' SNI).
pub const TUNNEL_HOST: &str = "tunnel.s6.bench.test";
/// The ConfigMap the operator publishes the compiled fleet configuration in.
pub const FLEET_CONFIG: &str = "sallyport-fleet-config";
/// The backends' names, in the order the app's changes alternate between them.
pub const BACKENDS: [&str; 2] = ["blue", "green"];
/// The proxy replicas' names (`POD_NAME`), as many as `--proxies` allows.
pub const REPLICAS: [&str; 8] = [
    "proxy-1", "proxy-2", "proxy-3", "proxy-4", "proxy-5", "proxy-6", "proxy-7", "proxy-8",
];
/// Bound on the operator coming up (PKI, leader election, caches) and on each later
/// setup step (group token, registrations, first answers).
const SETUP_TIMEOUT: Duration = Duration::from_secs(180);

/// The executables S6 starts.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `sallyport-cluster`, the control plane's supervisor.
    pub cluster: PathBuf,
    /// `sallyport-operator`.
    pub operator: PathBuf,
    /// `sallyport-proxy`.
    pub proxy: PathBuf,
    /// `sallyport-connector`.
    pub connector: PathBuf,
    /// This benchmark (the backends).
    pub bench: PathBuf,
}

/// How the system is started.
#[derive(Clone, Debug)]
pub struct SystemOptions {
    /// Proxy replicas.
    pub proxies: usize,
    /// `RUST_LOG` of the operator, the proxies and the connectors.
    pub log_filter: String,
}

/// One proxy replica.
pub struct Replica {
    /// Its name (`POD_NAME`).
    pub name: &'static str,
    /// Where users and connectors reach it.
    pub address: SocketAddr,
    /// The process.
    pub process: ChildProcess,
}

/// Everything running; dropped in field order, the control plane last.
pub struct System {
    /// The connectors.
    pub connectors: Vec<ChildProcess>,
    /// The proxy replicas.
    pub replicas: Vec<Replica>,
    /// The backends, in the order of [`BACKENDS`].
    pub backends: Vec<ChildProcess>,
    /// Their internal URLs, in the same order.
    pub backend_urls: Vec<String>,
    /// The operator.
    pub operator: OperatorProcess,
    /// An admin client.
    pub client: kube::Client,
    /// The operator's namespace.
    pub operator_namespace: String,
    /// The namespace of the group and the app.
    pub namespace: String,
    /// The app's certificate, PEM.
    pub app_ca: Vec<u8>,
    /// The same, as a file (for oha).
    pub app_ca_file: PathBuf,
    /// Control plane start until every replica answered from `blue`.
    pub setup: Duration,
    /// The control plane; stopped (and its state removed) last.
    pub control_plane: ControlPlane,
}

fn cluster_error(
    what: &str,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> DataplaneError {
    let what = what.to_owned();
    move |error| DataplaneError::Cluster {
        what,
        message: error.to_string(),
    }
}

fn kube_error(what: &str) -> impl FnOnce(kube::Error) -> DataplaneError {
    let what = what.to_owned();
    move |source| DataplaneError::Bench(BenchError::Kube { what, source })
}

impl System {
    /// Starts everything, logs in `dir`, and waits until every replica answers from
    /// `blue` (every wait bounded).
    pub async fn start(
        dir: &Path,
        binaries: &Binaries,
        options: &SystemOptions,
    ) -> Result<Self, DataplaneError> {
        let started = Instant::now();
        eprintln!("s6: starting a control plane (etcd, kube-apiserver) on loopback");
        let control_plane =
            ControlPlane::start(&binaries.cluster, Mode::ApiServer).map_err(BenchError::from)?;
        let client = control_plane.client().await.map_err(BenchError::from)?;
        install_crds(&client).await.map_err(BenchError::from)?;
        let namespace_error = |e: sallyport_e2e::controlplane::Error| BenchError::from(e);
        let operator_namespace = control_plane
            .create_namespace("sallyport-system")
            .await
            .map_err(namespace_error)?;
        let namespace = control_plane
            .create_namespace("bench-s6")
            .await
            .map_err(namespace_error)?;
        let identity_error = |what: &'static str| {
            move |error: sallyport_e2e::identity::IdentityError| DataplaneError::Cluster {
                what: what.to_owned(),
                message: error.to_string(),
            }
        };
        let operator_config = operator_kubeconfig(&control_plane, &operator_namespace)
            .await
            .map_err(identity_error("the operator's identity"))?;

        eprintln!(
            "s6: control plane up in {:.1?}; starting the operator",
            started.elapsed()
        );
        let mut operator = OperatorProcess::start(&OperatorOptions {
            program: binaries.operator.clone(),
            kubeconfig: operator_config,
            namespace: operator_namespace.clone(),
            extra_args: vec!["--tunnel-hostname".to_owned(), TUNNEL_HOST.to_owned()],
            log_filter: options.log_filter.clone(),
            log: dir.join("operator.log"),
        })?;
        let pki = dir.join("pki");
        for (secret, sub) in [
            ("sallyport-tunnel-tls", "tunnel-tls"),
            ("sallyport-connector-issuer", "connector-issuer"),
        ] {
            let target = pki.join(sub);
            until(&format!("the operator's Secret {secret}"), async || {
                operator.check_running()?;
                // Not there yet (404) until the operator has made it.
                let files = write_secret_dir(&client, &operator_namespace, secret, &target).await;
                Ok(files
                    .is_ok_and(|files| files.contains_key("tls.key"))
                    .then_some(()))
            })
            .await?;
        }
        let proxy_config = proxy_kubeconfig(&control_plane, &operator_namespace)
            .await
            .map_err(identity_error("the proxies' identity"))?;

        let mut replicas = Vec::new();
        for name in REPLICAS.iter().copied().take(options.proxies) {
            let address = free_address()?;
            let probes = free_address()?;
            let mut args: Vec<String> = [
                "run",
                "--namespace",
                &operator_namespace,
                "--listen",
                &address.to_string(),
                "--probe-address",
                &probes.to_string(),
                "--tunnel-hostname",
                TUNNEL_HOST,
                "--tunnel-tls-dir",
                &pki.join("tunnel-tls").display().to_string(),
                "--connector-issuer-dir",
                &pki.join("connector-issuer").display().to_string(),
            ]
            .iter()
            .map(|arg| (*arg).to_owned())
            .collect();
            // The per-client and in-flight limits off: every user is on loopback.
            args.extend(crate::s5::LIMITS_OFF.iter().map(|arg| (*arg).to_owned()));
            let process = ChildProcess::start(
                name,
                &binaries.proxy,
                &args,
                &[
                    ("KUBECONFIG", &proxy_config.display().to_string()),
                    ("POD_NAME", name),
                    ("RUST_LOG", &options.log_filter),
                ],
                &dir.join(format!("{name}.log")),
            )?;
            replicas.push(Replica {
                name,
                address,
                process,
            });
        }
        for replica in &mut replicas {
            wait_for_port(replica.address, &mut replica.process, SETUP_TIMEOUT).await?;
        }

        let mut backends = Vec::new();
        let mut backend_urls = Vec::new();
        for name in BACKENDS {
            let address = free_address()?;
            let mut backend = ChildProcess::start(
                name,
                &binaries.bench,
                &[
                    "dataplane-backend".to_owned(),
                    "--listen".to_owned(),
                    address.to_string(),
                    "--name".to_owned(),
                    name.to_owned(),
                ],
                &[],
                &dir.join(format!("backend-{name}.log")),
            )?;
            wait_for_port(address, &mut backend, SETUP_TIMEOUT).await?;
            backends.push(backend);
            backend_urls.push(format!("http://{address}/"));
        }

        eprintln!(
            "s6: {} proxies up; creating the group and the app",
            replicas.len()
        );
        let (token, fleet_ca) =
            create_group(&client, &namespace, &operator_namespace, &mut operator).await?;
        let fleet_ca_file = dir.join("fleet-ca.crt");
        std::fs::write(&fleet_ca_file, &fleet_ca).map_err(DataplaneError::io(format!(
            "writing {}",
            fleet_ca_file.display()
        )))?;
        let app_ca = publish_app(&client, &namespace, &backend_urls[0]).await?;
        let app_ca_file = dir.join("app-ca.crt");
        std::fs::write(&app_ca_file, &app_ca).map_err(DataplaneError::io(format!(
            "writing {}",
            app_ca_file.display()
        )))?;

        let fleet_addresses = replicas
            .iter()
            .map(|r| r.address.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let group_id = format!("{namespace}/{GROUP}");
        let mut connectors = Vec::new();
        for name in ["connector-1", "connector-2"] {
            let state = dir.join(format!("{name}-state"));
            connectors.push(ChildProcess::start(
                name,
                &binaries.connector,
                &[
                    "run",
                    "--fleet-address",
                    &fleet_addresses,
                    "--fleet-server-name",
                    TUNNEL_HOST,
                    "--fleet-ca-file",
                    &fleet_ca_file.display().to_string(),
                    "--group",
                    &group_id,
                    "--state-dir",
                    &state.display().to_string(),
                ]
                .iter()
                .map(|arg| (*arg).to_owned())
                .collect::<Vec<_>>(),
                &[
                    ("SALLYPORT_REGISTRATION_TOKEN", token.as_str()),
                    ("RUST_LOG", &options.log_filter),
                ],
                &dir.join(format!("{name}.log")),
            )?);
        }

        let mut system = Self {
            connectors,
            replicas,
            backends,
            backend_urls,
            operator,
            client,
            operator_namespace,
            namespace,
            app_ca,
            app_ca_file,
            setup: Duration::ZERO,
            control_plane,
        };
        eprintln!("s6: connectors started; waiting for every replica to answer from blue");
        let names: Vec<String> = BACKENDS.iter().map(|n| (*n).to_owned()).collect();
        let addresses: Vec<SocketAddr> = system.replicas.iter().map(|r| r.address).collect();
        for address in addresses {
            let app_ca = system.app_ca.clone();
            let names = names.clone();
            until(
                &format!("an answer from blue through the replica at {address}"),
                async || {
                    system.check_running()?;
                    let seen = tokio::time::timeout(PROBE_TIMEOUT, async {
                        let mut connection =
                            HttpsConnection::open(address, APP_HOST, &app_ca, Protocol::Http1)
                                .await?;
                        let request = Request::get("/").body(empty_body())?;
                        let answer = connection.request(request).await?;
                        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(classify(
                            answer.status,
                            answer
                                .headers
                                .get(NAME_HEADER)
                                .and_then(|v| v.to_str().ok()),
                            None,
                            &names,
                        ))
                    })
                    .await;
                    Ok(matches!(seen, Ok(Ok(Seen::Backend(0)))).then_some(()))
                },
            )
            .await?;
        }
        system.setup = started.elapsed();
        eprintln!("s6: system ready in {:.1?}", system.setup);
        Ok(system)
    }

    /// Fails when a process of the system has exited.
    pub fn check_running(&mut self) -> Result<(), DataplaneError> {
        self.operator.check_running()?;
        for replica in &mut self.replicas {
            replica.process.check_running()?;
        }
        for process in self.connectors.iter_mut().chain(self.backends.iter_mut()) {
            process.check_running()?;
        }
        Ok(())
    }

    /// The PublishedApps of the app's namespace.
    pub fn apps(&self) -> Api<PublishedApp> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The ConfigMaps of the operator's namespace.
    pub fn config_maps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.operator_namespace)
    }

    /// Points the app at `internal_url` (a merge patch of `spec.internalUrl`); returns
    /// once the apiserver accepted it, with the new generation.
    pub async fn point_app_at(&self, internal_url: &str) -> Result<Option<i64>, DataplaneError> {
        let patch = json!({"spec": {"internalUrl": internal_url}});
        let patched = self
            .apps()
            .patch(APP, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(kube_error(&format!(
                "patching PublishedApp {APP} to {internal_url}"
            )))?;
        Ok(patched.metadata.generation)
    }
}

/// Polls `step` every 100 ms until it yields a value, at most [`SETUP_TIMEOUT`]; an error
/// of `step` ends the wait.
async fn until<T>(
    what: &str,
    mut step: impl AsyncFnMut() -> Result<Option<T>, DataplaneError>,
) -> Result<T, DataplaneError> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        if let Some(value) = step().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(DataplaneError::Timeout {
                what: what.to_owned(),
                waited: SETUP_TIMEOUT,
                last: None,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates the ConnectorGroup and waits for its registration token and for the group in
/// the compiled configuration (a connector registering before the proxies know the group
/// is told to retry); returns the token and the fleet's CA.
async fn create_group(
    client: &kube::Client,
    namespace: &str,
    operator_namespace: &str,
    operator: &mut OperatorProcess,
) -> Result<(String, Vec<u8>), DataplaneError> {
    create(
        client.clone(),
        namespace,
        &json!({
            "apiVersion": "sallyport.dev/v1alpha1", "kind": "ConnectorGroup",
            "metadata": {"name": GROUP}, "spec": {}
        }),
    )
    .await
    .map_err(kube_error(&format!("creating ConnectorGroup {GROUP}")))?;
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    let secret = format!("{GROUP}-registration");
    let data = until(&format!("the registration Secret {secret}"), async || {
        operator.check_running()?;
        let found = secrets
            .get_opt(&secret)
            .await
            .map_err(kube_error(&format!("reading Secret {secret}")))?;
        Ok(found
            .and_then(|s| s.data)
            .filter(|d| d.contains_key("ca.crt") && d.contains_key("token")))
    })
    .await?;
    let id = format!("{namespace}/{GROUP}");
    until(
        &format!("group {id} in the fleet configuration"),
        async || {
            operator.check_running()?;
            let config =
                sallyport_e2e::dataplane::published_fleet_config(client, operator_namespace)
                    .await
                    .map_err(cluster_error("reading the fleet configuration"))?;
            Ok(config
                .filter(|c| c.connector_groups.iter().any(|g| g.id == id))
                .map(|_| ()))
        },
    )
    .await?;
    let field = |key: &str| data.get(key).map(|v| v.0.clone()).unwrap_or_default();
    let token = String::from_utf8(field("token")).map_err(|error| DataplaneError::Cluster {
        what: format!("the token in Secret {secret}"),
        message: error.to_string(),
    })?;
    Ok((token, field("ca.crt")))
}

/// Publishes the passthrough app at `https://APP_HOST/` from `internal_url` with a fresh
/// self-signed certificate; returns the certificate (what users trust). Its rate limit
/// is the highest the API allows: S6 measures the change, not the limiter.
async fn publish_app(
    client: &kube::Client,
    namespace: &str,
    internal_url: &str,
) -> Result<Vec<u8>, DataplaneError> {
    let secret_name = format!("{APP}-tls");
    let tls =
        self_signed_tls_secret(&secret_name, APP_HOST).map_err(|error| DataplaneError::Pki {
            what: "app certificate",
            message: error.to_string(),
        })?;
    let app_ca = tls
        .data
        .as_ref()
        .and_then(|d| d.get("tls.crt"))
        .map(|v| v.0.clone())
        .unwrap_or_default();
    Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &tls)
        .await
        .map_err(kube_error(&format!("creating Secret {secret_name}")))?;
    create(
        client.clone(),
        namespace,
        &json!({
            "apiVersion": "sallyport.dev/v1alpha1", "kind": "PublishedApp",
            "metadata": {"name": APP},
            "spec": {
                "externalUrl": format!("https://{APP_HOST}/"),
                "internalUrl": internal_url,
                "preAuthentication": {"type": "Passthrough"},
                "connectorGroup": {"name": GROUP},
                "tls": {"secretName": secret_name},
                "rateLimit": {"requestsPerSecond": 1_000_000, "burst": 10_000_000}
            }
        }),
    )
    .await
    .map_err(kube_error(&format!("creating PublishedApp {APP}")))?;
    Ok(app_ca)
}
