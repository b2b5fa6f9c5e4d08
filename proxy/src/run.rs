//! `sallyport-proxy run`: wires the configuration source, the PKI material, the
//! registry, the replica set and the listener together, and runs until SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use clap::Args;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sallyport_api::fleet_config::FleetConfig;
use sallyport_oidc::{ProviderHttpClient, Providers};
use sallyport_policy::MfaSettings;
use sallyport_tunnel::pool::{PoolSettings, TunnelPool};
use sallyport_tunnel::tls::{Credentials, TlsError, certificates_from_pem};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::access::AccessSettings;
use crate::app_tls::{self, SecretSource};
use crate::auth::{AuthSettings, Authenticator};
use crate::certs::CertificateStore;
use crate::config_source::ConfigSource;
use crate::fleet_api::FleetApi;
use crate::forward::{IpNetwork, TrustedProxies};
use crate::identity_keys::{self, KeySource};
use crate::issuer::{Issuer, IssuerError};
use crate::protection::{ProtectionArgs, ProtectionError};
use crate::registry::tunnel_status::{self, ReportSettings};
use crate::registry::{KubeRegistry, MemoryRegistry, Registry, StaticToken};
use crate::replicas;
use crate::serve::{DrainSettings, Proxy, ProxyParts, ServeError, TUNNEL_DRAIN_TIMEOUT};

/// Arguments of `sallyport-proxy run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Where to serve users, connector tunnels and the fleet API (one TLS port), as
    /// ADDRESS:PORT.
    #[arg(long, env = "SALLYPORT_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,

    /// Where to serve the kubelet's probes (`/livez`, `/readyz`) and Prometheus metrics
    /// (`/metrics`), as ADDRESS:PORT.
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

    /// A network (CIDR, IPv4 or IPv6, e.g. `10.0.0.0/8`; a bare address is one host) of
    /// proxies in front of the fleet, such as a cloud load balancer. From a peer inside
    /// one, the client is the right-most `X-Forwarded-For` address that is not itself a
    /// trusted proxy, and its `X-Forwarded-Proto`/`-Host` are kept; from any other peer
    /// every client-sent forwarding header is dropped. Repeat for several. Default: none.
    #[arg(
        long = "trusted-proxy",
        env = "SALLYPORT_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub trusted_proxies: Vec<IpNetwork>,

    /// How long a request waits for a tunnel of its app's group when none is up.
    #[arg(long, env = "SALLYPORT_WAIT_FOR_TUNNEL", default_value = "2s", value_parser = sallyport_service::parse_duration)]
    pub wait_for_tunnel: Duration,

    /// Drain: how long the proxy goes on accepting and serving after SIGTERM, unready,
    /// while load balancers stop sending it new connections (a `preStop` sleep).
    #[arg(long, env = "SALLYPORT_DRAIN_DELAY", default_value = "5s", value_parser = duration_or_zero)]
    pub drain_delay: Duration,

    /// Drain: how long requests in flight get to finish once the proxy stopped accepting;
    /// connections still open then are cut.
    #[arg(long, env = "SALLYPORT_DRAIN_TIMEOUT", default_value = "30s", value_parser = sallyport_service::parse_duration)]
    pub drain_timeout: Duration,

    /// How long a starting replica stays unready waiting for a tunnel of every connector
    /// group that has apps, before it declares itself ready anyway.
    #[arg(long, env = "SALLYPORT_TUNNEL_WARMUP", default_value = "10s", value_parser = duration_or_zero)]
    pub tunnel_warmup: Duration,

    /// In a cluster: how often this replica renews its entry in the `status.tunnels` of
    /// each Connector holding a tunnel to it (and their `lastSeen`). Keep it well under
    /// the operator's `--tunnel-stale-after` (60 s by default), after which an entry
    /// not renewed no longer counts.
    #[arg(long, env = "SALLYPORT_TUNNEL_STATUS_HEARTBEAT", default_value = "20s", value_parser = sallyport_service::parse_duration)]
    pub tunnel_status_heartbeat: Duration,

    /// PEM file of extra CA certificates to trust for identity providers (besides the
    /// system's), for providers with a private CA.
    #[arg(long, env = "SALLYPORT_IDENTITY_PROVIDER_CA_FILE")]
    pub identity_provider_ca_file: Option<PathBuf>,

    /// `iss` of the identity assertions passed to backends (backends pin it). Default:
    /// `https://` and the first tunnel host name.
    #[arg(long, env = "SALLYPORT_ASSERTION_ISSUER")]
    pub assertion_issuer: Option<String>,

    /// An `acr` value meaning the user completed multi-factor authentication (repeat the
    /// flag, or separate with commas). A sign-in whose `acr` is one of them meets a
    /// policy's `mfa` requirement, as does an `amr` holding `mfa`; a step-up for MFA asks
    /// the provider for these `acr_values`. Without any, an MFA step-up only forces a
    /// fresh sign-in (`prompt=login`).
    #[arg(
        long = "mfa-acr-value",
        env = "SALLYPORT_MFA_ACR_VALUES",
        value_delimiter = ','
    )]
    pub mfa_acr_values: Vec<String>,

    /// ID token claim carrying the sign-in risk level (`low`, `medium`, `high`) for
    /// policies' `signInRisk` condition, when the provider computes one. Unset: no
    /// sign-in risk is known, and policies with that condition do not apply.
    #[arg(long, env = "SALLYPORT_SIGN_IN_RISK_CLAIM")]
    pub sign_in_risk_claim: Option<String>,

    /// ID token claim carrying the user risk level, for policies' `userRisk` condition.
    #[arg(long, env = "SALLYPORT_USER_RISK_CLAIM")]
    pub user_risk_claim: Option<String>,

    /// Risk detections at sign-in (see docs/risk.md).
    #[command(flatten)]
    pub risk: crate::risk::RiskArgs,

    /// Abuse limits: rates, caps, timeouts and sizes (see docs/protection.md).
    #[command(flatten)]
    pub protection: ProtectionArgs,

    /// Delivery of sign-in and audit events to a SIEM (see docs/siem.md).
    #[command(flatten)]
    pub events: sallyport_events::EventArgs,

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
    /// The HTTPS client for identity providers could not be built.
    #[error(transparent)]
    IdentityProviders(sallyport_oidc::HttpError),
    /// The abuse limits' flags do not fit together.
    #[error(transparent)]
    Protection(#[from] ProtectionError),
    /// Risk detection's flags are unusable.
    #[error(transparent)]
    Risk(#[from] crate::risk::RiskSetupError),
    /// The event sinks' flags are unusable.
    #[error(transparent)]
    Events(#[from] sallyport_events::PipelineError),
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// The sign-in machinery: providers, keys (followed as the operator rotates them).
async fn authenticator(
    args: &RunArgs,
    tunnel_hostnames: &[String],
    secrets: SecretSource,
    stopped: &CancellationToken,
) -> Result<Arc<Authenticator>, RunError> {
    let extra_roots = match &args.identity_provider_ca_file {
        Some(path) => certificates_from_pem("identity provider CA", &read(path.clone())?)?,
        None => Vec::new(),
    };
    let http = ProviderHttpClient::new(
        sallyport_tunnel::tls::provider(),
        &extra_roots,
        sallyport_oidc::http::DEFAULT_TIMEOUT,
    )
    .map_err(RunError::IdentityProviders)?;
    let assertion_issuer = args.assertion_issuer.clone().unwrap_or_else(|| {
        format!(
            "https://{}",
            tunnel_hostnames.first().map_or("sallyport", String::as_str)
        )
    });
    let cluster = match &secrets {
        SecretSource::Cluster(client) => Some((client.clone(), args.namespace.clone())),
        SecretSource::Dir(_) => None,
    };
    let risk = crate::risk::start(&args.risk, cluster, stopped)?;
    let auth = Arc::new(Authenticator::new(
        AuthSettings {
            assertion_issuer,
            risk,
            access: AccessSettings {
                mfa: MfaSettings {
                    acr_values: args.mfa_acr_values.clone(),
                },
                sign_in_risk_claim: args.sign_in_risk_claim.clone(),
                user_risk_claim: args.user_risk_claim.clone(),
            },
        },
        Providers::new(http),
        secrets.clone(),
    ));
    let source = KeySource {
        secrets,
        namespace: args.namespace.clone(),
        ephemeral_fallback: args.fleet_config_file.is_some(),
    };
    identity_keys::load(&auth, &source, true).await;
    tokio::spawn(identity_keys::follow(auth.clone(), source, stopped.clone()));
    Ok(auth)
}

/// A duration argument that may also be zero (`0s`: no delay, no wait).
fn duration_or_zero(text: &str) -> Result<Duration, String> {
    if text.trim_end_matches(['s', 'm', 'h']) == "0" {
        return Ok(Duration::ZERO);
    }
    sallyport_service::parse_duration(text)
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

/// Runs the proxy until SIGTERM or SIGINT, then drains: `/readyz` answers 503 at once,
/// the Lease goes, connections are closed after their requests while the proxy still
/// accepts for `--drain-delay`, then it stops accepting, gives requests in flight
/// `--drain-timeout`, closes its tunnels and returns.
pub async fn run(args: RunArgs) -> Result<(), RunError> {
    // SIGTERM or SIGINT starts the drain; `stopped` ends the background work (following
    // the configuration, probes) once the proxy has drained, or on any early return.
    let shutdown = CancellationToken::new();
    let stopped = CancellationToken::new();
    let _stop_background = stopped.clone().drop_guard();
    let replica = args
        .replica
        .clone()
        .or_else(|| hostname::get().ok().and_then(|h| h.into_string().ok()))
        .unwrap_or_else(|| "sallyport-proxy".to_owned());
    // Sign-in and audit events: standard output and the SIEM sinks (docs/siem.md),
    // flushed after the drain.
    let events = sallyport_events::Events::start(
        &args.events,
        sallyport_events::Actor::new("sallyport-proxy", &replica),
    )?;
    if !events.install() {
        warn!("an event pipeline was installed before in this process; it stays in use");
    }
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
    let protection = args
        .protection
        .settings_with_store(args.risk.risk_store.as_deref())?;
    record_certificate_expiry(&args.tunnel_tls_dir, &issuer);

    // Where the configuration, tokens, certificates and replicas come from.
    let (configs_tx, mut configs) = watch::channel(None::<Arc<FleetConfig>>);
    let (replicas_tx, replicas_rx) = watch::channel(vec![replica.clone()]);
    let mut cluster = None;
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
                cluster = Some(client.clone());
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
    let trusted: Vec<String> = args
        .trusted_proxies
        .iter()
        .map(ToString::to_string)
        .collect();
    info!(%replica, source = ?source, listen = %args.listen, trusted_proxies = ?trusted, ?protection, "starting");
    // The configuration is followed while the proxy drains too: a revocation still
    // closes tunnels.
    tokio::spawn(source.follow(configs_tx, stopped.clone()));
    sallyport_service::cancel_on_signals(shutdown.clone());

    // Probes answer from the start until the proxy has drained; /readyz turns 200 once a
    // configuration is served and connectors have come (see `warm_up`), 503 again at
    // SIGTERM.
    let readiness = Arc::new(ReadinessState::default());
    let probes = TcpListener::bind(args.probe_address)
        .await
        .map_err(|source| RunError::Bind {
            address: args.probe_address,
            source,
        })?;
    tokio::spawn(serve_probes(probes, readiness.clone(), stopped.clone()));

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
    let authenticator = authenticator(&args, &tunnel_hostnames, secrets.clone(), &stopped).await?;
    tokio::spawn(app_tls::follow(
        certificates.clone(),
        secrets,
        configs.clone(),
        stopped.clone(),
    ));

    let config = Arc::new(ArcSwap::new(first));
    let fleet_api = FleetApi::new(
        Arc::new(ArcSwap::from_pointee(issuer)),
        registry,
        config.clone(),
    );
    let pool = TunnelPool::new(PoolSettings {
        wait_for_tunnel: args.wait_for_tunnel,
        drain_timeout: TUNNEL_DRAIN_TIMEOUT,
        ..PoolSettings::default()
    });
    if let Some(metrics) = crate::metrics::global() {
        metrics.count_tunnels_of(pool.clone());
    }
    // In a cluster, the tunnels held here are reported on their Connectors' status.
    let reporting = cluster.map(|client| {
        let stop = CancellationToken::new();
        let settings = ReportSettings::new(replica.clone(), args.tunnel_status_heartbeat);
        let task = tokio::spawn(tunnel_status::report(
            client,
            pool.clone(),
            settings,
            stop.clone(),
        ));
        (task, stop)
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
        trusted_proxies: TrustedProxies::new(args.trusted_proxies.iter().copied()),
        protection,
    })?;

    proxy.set_authenticator(authenticator);

    // Configuration and replica changes reach the proxy and the connectors.
    let follower = proxy.clone();
    let follow_stopped = stopped.clone();
    tokio::spawn(async move {
        let mut replicas = replicas_rx;
        // The replica set stops changing when the Lease heartbeat ends (at SIGTERM).
        let mut replicas_followed = true;
        loop {
            tokio::select! {
                changed = configs.changed() => {
                    if changed.is_err() { return }
                    let config = configs.borrow_and_update().clone();
                    if let Some(config) = config {
                        follower.apply_config(config).await;
                    }
                }
                changed = replicas.changed(), if replicas_followed => {
                    if changed.is_err() {
                        replicas_followed = false;
                        continue;
                    }
                    follower.notify_connectors().await;
                }
                () = follow_stopped.cancelled() => return,
            }
        }
    });

    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| RunError::Bind {
            address: args.listen,
            source,
        })?;
    readiness.advance(Readiness::WaitingForTunnels);
    info!(address = %args.listen, "serving");
    tokio::spawn(warm_up(
        proxy.clone(),
        readiness.clone(),
        args.tunnel_warmup,
    ));

    // SIGTERM: unready first, so that load balancers stop sending connections, then the
    // drain (which still serves for --drain-delay).
    let drain = CancellationToken::new();
    let drain_start = drain.clone();
    let unready = readiness.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        unready.advance(Readiness::Draining);
        info!("/readyz answers 503 (draining)");
        drain_start.cancel();
    });
    let settings = DrainSettings {
        delay: args.drain_delay,
        timeout: args.drain_timeout,
    };
    proxy.serve_with_drain(listener, drain, settings).await;
    // The tunnels are closed: this replica's entries go from the Connectors' status.
    if let Some((task, stop)) = reporting {
        stop.cancel();
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            warn!(
                "could not remove this replica's tunnel entries from Connector status within 5s; the operator lets them lapse"
            );
        }
    }
    // Events written during the drain reach the sinks before the process ends.
    events.close().await;
    info!("drained; stopped");
    Ok(())
}

/// Where a replica is in its life, as `/readyz` tells it; it only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
enum Readiness {
    /// No fleet configuration yet: nothing is served.
    WaitingForConfig = 0,
    /// Serving, but connectors may not have reached this replica yet ([`warm_up`]).
    WaitingForTunnels = 1,
    /// Ready for users.
    Ready = 2,
    /// Draining after SIGTERM: no new users, please.
    Draining = 3,
}

/// The [`Readiness`] of the replica, shared with the probe server.
#[derive(Debug, Default)]
struct ReadinessState(AtomicU8);

impl ReadinessState {
    fn get(&self) -> Readiness {
        match self.0.load(Ordering::Acquire) {
            0 => Readiness::WaitingForConfig,
            1 => Readiness::WaitingForTunnels,
            2 => Readiness::Ready,
            _ => Readiness::Draining,
        }
    }

    /// Moves to `to` unless the replica is there or further already (a warm-up that ends
    /// during the drain does not make it ready again).
    fn advance(&self, to: Readiness) {
        self.0.fetch_max(to as u8, Ordering::AcqRel);
    }

    /// The answer to `/readyz`.
    fn answer(&self) -> (StatusCode, &'static str) {
        match self.get() {
            Readiness::WaitingForConfig => (
                StatusCode::SERVICE_UNAVAILABLE,
                "waiting for the fleet configuration\n",
            ),
            Readiness::WaitingForTunnels => (
                StatusCode::SERVICE_UNAVAILABLE,
                "waiting for connectors to open tunnels\n",
            ),
            Readiness::Ready => (StatusCode::OK, "ok\n"),
            Readiness::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        }
    }
}

/// A replica that just started is ready once every connector group with apps has a
/// tunnel here, or after `within` at the latest (a group whose connectors are all down
/// must not keep the fleet unready). Connectors learn of a new replica from the others'
/// notices and dial it then, a few seconds after it started; without the wait, users'
/// requests sent to it meanwhile would wait for a tunnel and could fail.
async fn warm_up(proxy: Arc<Proxy>, readiness: Arc<ReadinessState>, within: Duration) {
    let served = proxy
        .pool()
        .wait_for(|_| proxy.groups_without_tunnel().is_empty());
    match tokio::time::timeout(within, served).await {
        Ok(()) => info!("every connector group with apps has a tunnel here; ready"),
        Err(_) => info!(
            groups = ?proxy.groups_without_tunnel(),
            ?within,
            "some connector groups have no tunnel here yet; ready anyway"
        ),
    }
    readiness.advance(Readiness::Ready);
}

/// The answer to `/metrics`: every metric of the process in Prometheus text format.
fn metrics_response() -> Response<Full<Bytes>> {
    let encoded = crate::metrics::global().map(crate::metrics::ProxyMetrics::encode);
    let (status, body) = match encoded {
        Some(Ok(text)) => (StatusCode::OK, text),
        Some(Err(error)) => {
            warn!(%error, "cannot encode the metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the metrics\n".to_owned(),
            )
        }
        None => (StatusCode::SERVICE_UNAVAILABLE, "no metrics\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if status == StatusCode::OK {
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        );
    }
    response
}

/// Sets the certificate expiry gauges: the tunnel serving certificate in `tunnel_tls_dir`
/// and the connector issuer's.
fn record_certificate_expiry(tunnel_tls_dir: &std::path::Path, issuer: &Issuer) {
    let Some(metrics) = crate::metrics::global() else {
        return;
    };
    metrics.set_certificate_expiry("connector-issuer", issuer.not_after().unix_timestamp());
    let tunnel = std::fs::read(tunnel_tls_dir.join("tls.crt"))
        .ok()
        .and_then(|pem| sallyport_service::metrics::not_after_of_pem(&pem));
    match tunnel {
        Some(not_after) => metrics.set_certificate_expiry("tunnel-serving", not_after),
        None => {
            warn!(dir = %tunnel_tls_dir.display(), "cannot read the tunnel serving certificate's expiry for the metrics")
        }
    }
}

async fn serve_probes(
    listener: TcpListener,
    readiness: Arc<ReadinessState>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let ready = readiness.answer();
                async move {
                    let (status, text) = match request.uri().path() {
                        "/livez" => (StatusCode::OK, "ok\n"),
                        "/readyz" => ready,
                        "/metrics" => return Ok(metrics_response()),
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

    #[derive(Debug, clap::Parser)]
    struct Command {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn trusted_proxies_are_cidrs_repeated_or_comma_separated() {
        use clap::Parser as _;
        let parsed = Command::try_parse_from([
            "run",
            "--trusted-proxy",
            "10.0.0.0/8,fd00::/8",
            "--trusted-proxy",
            "192.0.2.7",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let networks: Vec<String> = parsed
            .run
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(networks, ["10.0.0.0/8", "fd00::/8", "192.0.2.7/32"]);

        let none = Command::try_parse_from(["run"]).unwrap_or_else(|e| panic!("{e}"));
        assert!(none.run.trusted_proxies.is_empty());

        let error = Command::try_parse_from(["run", "--trusted-proxy", "10.0.0.0/40"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("10.0.0.0/40"), "{error}");
    }

    #[test]
    fn drain_delay_and_warmup_may_be_zero() {
        assert_eq!(duration_or_zero("0s"), Ok(Duration::ZERO));
        assert_eq!(duration_or_zero("0"), Ok(Duration::ZERO));
        assert_eq!(duration_or_zero("5s"), Ok(Duration::from_secs(5)));
        assert!(duration_or_zero("-1s").is_err());
        assert!(duration_or_zero("soon").is_err());
    }

    #[test]
    fn readiness_only_moves_forward() {
        let readiness = ReadinessState::default();
        assert_eq!(readiness.answer().0, StatusCode::SERVICE_UNAVAILABLE);
        readiness.advance(Readiness::WaitingForTunnels);
        assert_eq!(readiness.get(), Readiness::WaitingForTunnels);
        readiness.advance(Readiness::Ready);
        assert_eq!(readiness.answer(), (StatusCode::OK, "ok\n"));
        readiness.advance(Readiness::Draining);
        // A warm-up that ends during the drain does not make the replica ready again.
        readiness.advance(Readiness::Ready);
        assert_eq!(
            readiness.answer(),
            (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        );
    }
}
