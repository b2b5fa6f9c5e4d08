//! `sallyport-proxy run`: wires the configuration source, the PKI material, the
//! registry, the replica set and the listener together, and runs until SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use clap::Args;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sallyport_api::fleet_config::FleetConfig;
use sallyport_tunnel::pool::{PoolSettings, TunnelPool};
use sallyport_tunnel::tls::{Credentials, TlsError, certificates_from_pem};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::app_tls::{self, SecretSource};
use crate::certs::CertificateStore;
use crate::config_source::ConfigSource;
use crate::fleet_api::FleetApi;
use crate::issuer::{Issuer, IssuerError};
use crate::registry::{KubeRegistry, MemoryRegistry, Registry, StaticToken};
use crate::replicas;
use crate::serve::{Proxy, ProxyParts, ServeError};

/// Arguments of `sallyport-proxy run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Where to serve users, connector tunnels and the fleet API (one TLS port), as
    /// ADDRESS:PORT.
    #[arg(long, env = "SALLYPORT_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,

    /// Where to serve the kubelet's probes (`/livez`, `/readyz`), as ADDRESS:PORT.
    #[arg(long, env = "SALLYPORT_PROBE_ADDRESS", default_value = "0.0.0.0:8080")]
    pub probe_address: SocketAddr,

    /// The fleet's namespace (where the operator keeps the configuration and the
    /// replicas their Leases).
    #[arg(long, env = "POD_NAMESPACE", default_value = "sallyport-system")]
    pub namespace: String,

    /// The ConfigMap holding the compiled fleet configuration, watched in the fleet's
    /// namespace.
    #[arg(
        long,
        env = "SALLYPORT_FLEET_CONFIG",
        default_value = "sallyport-fleet-config"
    )]
    pub fleet_config: String,

    /// Standalone mode: read the fleet configuration from this file (JSON or gzip JSON,
    /// e.g. from `sallyport-operator compile`) instead of the cluster, re-reading it when
    /// it changes. Registration tokens then come from --registration-token and app
    /// certificates from --tls-dir.
    #[arg(long, env = "SALLYPORT_FLEET_CONFIG_FILE")]
    pub fleet_config_file: Option<PathBuf>,

    /// This replica's name, as connectors and logs see it.
    #[arg(long, env = "POD_NAME")]
    pub replica: Option<String>,

    /// A host name connectors reach the fleet at (SNI of tunnels and the fleet API).
    /// Repeat for several. Defaults to the proxy Service's in-cluster name.
    #[arg(
        long = "tunnel-hostname",
        env = "SALLYPORT_TUNNEL_HOSTNAMES",
        value_delimiter = ','
    )]
    pub tunnel_hostnames: Vec<String>,

    /// Directory of the tunnel serving certificate (`tls.crt`, `tls.key`) and the fleet
    /// root CA (`ca.crt`), as the Secret sallyport-tunnel-tls is mounted.
    #[arg(
        long,
        env = "SALLYPORT_TUNNEL_TLS_DIR",
        default_value = "/etc/sallyport/tunnel-tls"
    )]
    pub tunnel_tls_dir: PathBuf,

    /// Directory of the connector issuer (`tls.crt`, `tls.key`, `ca.crt`), as the Secret
    /// sallyport-connector-issuer is mounted.
    #[arg(
        long,
        env = "SALLYPORT_CONNECTOR_ISSUER_DIR",
        default_value = "/etc/sallyport/connector-issuer"
    )]
    pub connector_issuer_dir: PathBuf,

    /// Standalone mode: directory of app TLS certificates laid out like Secrets,
    /// `<namespace>/<name>/tls.crt` and `tls.key`.
    #[arg(long, env = "SALLYPORT_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,

    /// Standalone mode: a registration token, as GROUP=TOKEN (GROUP is
    /// `namespace/name`). Repeat for several. Unlimited uses, no expiry: prefer the
    /// cluster mode's tokens, which the operator rotates.
    #[arg(
        long = "registration-token",
        env = "SALLYPORT_REGISTRATION_TOKENS",
        value_delimiter = ','
    )]
    pub registration_tokens: Vec<String>,

    /// Standalone mode: the other replicas of the fleet (connectors keep tunnels to
    /// each). Repeat for several.
    #[arg(long = "peer", env = "SALLYPORT_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,

    /// How long a request waits for a tunnel of its app's group when none is up.
    #[arg(long, env = "SALLYPORT_WAIT_FOR_TUNNEL", default_value = "2s", value_parser = sallyport_service::parse_duration)]
    pub wait_for_tunnel: Duration,

    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, env = "SALLYPORT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// The proxy could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The connector issuer is unusable.
    #[error(transparent)]
    Issuer(#[from] IssuerError),
    /// The listener could not be set up.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// A --registration-token is not GROUP=TOKEN.
    #[error("--registration-token {0:?}: expected GROUP=TOKEN with GROUP as namespace/name")]
    TokenArgument(String),
    /// No Kubernetes client could be made.
    #[error(
        "cannot reach the cluster (set KUBECONFIG, run in a pod, or use --fleet-config-file): {0}"
    )]
    Kube(#[source] kube::Error),
    /// The listen address is taken or not allowed.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

fn read(path: PathBuf) -> Result<Vec<u8>, RunError> {
    std::fs::read(&path).map_err(|source| RunError::Read { path, source })
}

fn static_tokens(arguments: &[String]) -> Result<Vec<StaticToken>, RunError> {
    arguments
        .iter()
        .map(|argument| {
            let (group, token) = argument
                .split_once('=')
                .filter(|(group, token)| group.contains('/') && !token.is_empty())
                .ok_or_else(|| RunError::TokenArgument(argument.clone()))?;
            Ok(StaticToken {
                group_id: group.to_owned(),
                token: token.to_owned(),
                expires_at: None,
                max_uses: 0,
            })
        })
        .collect()
}

/// Runs the proxy until SIGTERM or SIGINT.
pub async fn run(args: RunArgs) -> Result<(), RunError> {
    let shutdown = CancellationToken::new();
    let replica = args
        .replica
        .clone()
        .or_else(|| hostname::get().ok().and_then(|h| h.into_string().ok()))
        .unwrap_or_else(|| "sallyport-proxy".to_owned());
    let tunnel_hostnames = if args.tunnel_hostnames.is_empty() {
        vec![format!("sallyport-proxy.{}.svc", args.namespace)]
    } else {
        args.tunnel_hostnames.clone()
    };
    let tunnel_tls = Credentials::from_pem(
        "tunnel serving certificate",
        &read(args.tunnel_tls_dir.join("tls.crt"))?,
        &read(args.tunnel_tls_dir.join("tls.key"))?,
    )?;
    let connector_roots =
        certificates_from_pem("fleet root CA", &read(args.tunnel_tls_dir.join("ca.crt"))?)?;
    let issuer = Issuer::from_dir(&args.connector_issuer_dir)?;

    // Where the configuration, tokens, certificates and replicas come from.
    let (configs_tx, mut configs) = watch::channel(None::<Arc<FleetConfig>>);
    let (replicas_tx, replicas_rx) = watch::channel(vec![replica.clone()]);
    let (source, registry, secrets): (ConfigSource, Arc<dyn Registry>, SecretSource) =
        match &args.fleet_config_file {
            Some(file) => {
                let mut all = vec![replica.clone()];
                all.extend(args.peers.iter().cloned());
                all.sort();
                all.dedup();
                replicas_tx.send_replace(all);
                (
                    ConfigSource::File(file.clone()),
                    Arc::new(MemoryRegistry::new(static_tokens(
                        &args.registration_tokens,
                    )?)),
                    SecretSource::Dir(
                        args.tls_dir
                            .clone()
                            .unwrap_or_else(|| PathBuf::from("/etc/sallyport/tls")),
                    ),
                )
            }
            None => {
                let client = kube::Client::try_default().await.map_err(RunError::Kube)?;
                tokio::spawn(replicas::heartbeat(
                    client.clone(),
                    args.namespace.clone(),
                    replica.clone(),
                    replicas_tx,
                    shutdown.clone(),
                ));
                (
                    ConfigSource::ConfigMap {
                        client: client.clone(),
                        namespace: args.namespace.clone(),
                        name: args.fleet_config.clone(),
                    },
                    Arc::new(KubeRegistry::new(client.clone())),
                    SecretSource::Cluster(client),
                )
            }
        };
    info!(%replica, source = ?source, listen = %args.listen, "starting");
    tokio::spawn(source.follow(configs_tx, shutdown.clone()));
    sallyport_service::cancel_on_signals(shutdown.clone());

    // Probes answer from the start; /readyz turns 200 once a configuration is served.
    let ready = Arc::new(AtomicBool::new(false));
    let probes = TcpListener::bind(args.probe_address)
        .await
        .map_err(|source| RunError::Bind {
            address: args.probe_address,
            source,
        })?;
    tokio::spawn(serve_probes(probes, ready.clone(), shutdown.clone()));

    // Nothing is served before the first configuration.
    let first = loop {
        if let Some(config) = configs.borrow_and_update().clone() {
            break config;
        }
        tokio::select! {
            changed = configs.changed() => if changed.is_err() { return Ok(()) },
            () = tokio::time::sleep(Duration::from_secs(10)) => warn!("still waiting for the first fleet configuration"),
            () = shutdown.cancelled() => return Ok(()),
        }
    };
    let certificates = Arc::new(CertificateStore::new(None));
    app_tls::load(&certificates, &secrets, &first).await;
    tokio::spawn(app_tls::follow(
        certificates.clone(),
        secrets,
        configs.clone(),
        shutdown.clone(),
    ));

    let config = Arc::new(ArcSwap::new(first));
    let fleet_api = FleetApi::new(
        Arc::new(ArcSwap::from_pointee(issuer)),
        registry,
        config.clone(),
    );
    let pool = TunnelPool::new(PoolSettings {
        wait_for_tunnel: args.wait_for_tunnel,
        ..PoolSettings::default()
    });
    let proxy = Proxy::new(ProxyParts {
        replica,
        tunnel_hostnames,
        tunnel_tls,
        connector_roots,
        certificates,
        fleet_api,
        config,
        pool,
        replicas: replicas_rx.clone(),
    })?;

    // Configuration and replica changes reach the proxy and the connectors.
    let follower = proxy.clone();
    let follow_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut replicas = replicas_rx;
        loop {
            tokio::select! {
                changed = configs.changed() => {
                    if changed.is_err() { return }
                    let config = configs.borrow_and_update().clone();
                    if let Some(config) = config {
                        follower.apply_config(config).await;
                    }
                }
                changed = replicas.changed() => {
                    if changed.is_err() { return }
                    follower.notify_connectors().await;
                }
                () = follow_shutdown.cancelled() => return,
            }
        }
    });

    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| RunError::Bind {
            address: args.listen,
            source,
        })?;
    ready.store(true, Ordering::Release);
    info!(address = %args.listen, "serving");
    proxy.serve(listener, shutdown).await;
    info!("stopped");
    Ok(())
}

async fn serve_probes(listener: TcpListener, ready: Arc<AtomicBool>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let ready = ready.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let ready = ready.load(Ordering::Acquire);
                async move {
                    let (status, text) = match request.uri().path() {
                        "/livez" => (StatusCode::OK, "ok\n"),
                        "/readyz" if ready => (StatusCode::OK, "ok\n"),
                        "/readyz" => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "waiting for the fleet configuration\n",
                        ),
                        _ => (StatusCode::NOT_FOUND, "not found\n"),
                    };
                    let mut response =
                        Response::new(Full::new(Bytes::from_static(text.as_bytes())));
                    *response.status_mut() = status;
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_tokens_are_group_equals_token() {
        let tokens = static_tokens(&["infra/east=abc".to_owned()]).unwrap_or_default();
        assert_eq!(
            tokens.first().map(|t| t.group_id.as_str()),
            Some("infra/east")
        );
        assert!(static_tokens(&["east=abc".to_owned()]).is_err());
        assert!(static_tokens(&["infra/east=".to_owned()]).is_err());
    }
}
