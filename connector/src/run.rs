//! `sallyport-connector run` and `register`: register once (or reuse the saved state),
//! pull the group's configuration, keep tunnels to every proxy replica, renew the
//! certificate before it ages out, and drain on SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use clap::Args;
use sallyport_tunnel::dial::{DialSettings, DialStatus, Dialer};
use sallyport_tunnel::tls::{Credentials, TlsError, certificates_from_pem};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backend::Backends;
use crate::metrics::{self, ConnectorMetrics, MetricsError};
use crate::register::{self, FleetEndpoint, RegisterError};
use crate::slice::{CurrentSlice, SliceError};
use crate::state::{ConnectorState, StateArgs, StateError, StateStore};

/// How often the configuration is pulled even without a notice from the fleet.
pub const CONFIG_POLL: Duration = Duration::from_secs(60);
/// The longest pause between retries of a failed pull or renewal.
pub const MAX_RETRY: Duration = Duration::from_secs(30);
/// The fleet's reasons for refusing a registered connector for good: it was revoked (its
/// `Connector` object deleted) or its ConnectorGroup removed. Retrying cannot help.
pub const REFUSED_FOR_GOOD: [&str; 2] = ["ConnectorRevoked", "GroupNotFound"];

/// Where the fleet is and how to join it: shared by `register` and `run`.
#[derive(Debug, Args, Clone)]
pub struct FleetArgs {
    /// The fleet's public address connectors dial, as HOST:PORT (443 in production).
    /// Repeat for several (tried in turn).
    #[arg(
        long = "fleet-address",
        env = "SALLYPORT_FLEET_ADDRESS",
        value_delimiter = ',',
        required = true
    )]
    pub fleet_addresses: Vec<String>,

    /// The fleet's tunnel host name: sent as SNI and checked against the fleet's
    /// certificate. Defaults to the host of the first --fleet-address.
    #[arg(long, env = "SALLYPORT_FLEET_SERVER_NAME")]
    pub fleet_server_name: Option<String>,

    /// The fleet's root CA (PEM text). The operator puts it in the group's
    /// registration token Secret (key `ca.crt`).
    #[arg(
        long,
        env = "SALLYPORT_FLEET_CA",
        hide_env_values = true,
        conflicts_with = "fleet_ca_file"
    )]
    pub fleet_ca: Option<String>,

    /// The fleet's root CA, as a PEM file.
    #[arg(long, env = "SALLYPORT_FLEET_CA_FILE")]
    pub fleet_ca_file: Option<PathBuf>,

    /// The ConnectorGroup to join, as namespace/name.
    #[arg(long, env = "SALLYPORT_CONNECTOR_GROUP")]
    pub group: Option<String>,

    /// The group's bootstrap registration token; needed only until the connector has
    /// registered (the state directory or state Secret keeps its certificate). An empty
    /// value counts as none (an emptied line of an environment file).
    #[arg(long, env = "SALLYPORT_REGISTRATION_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// How long registration is retried while the fleet is unreachable or has not
    /// loaded the group yet (a group created moments ago); refusals (a wrong or expired
    /// token) end it at once.
    #[arg(long, env = "SALLYPORT_REGISTRATION_RETRY_FOR", default_value = "5m", value_parser = sallyport_service::parse_duration)]
    pub registration_retry_for: Duration,

    /// Where the connector keeps its key, certificate and identity.
    #[command(flatten)]
    pub state: StateArgs,

    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, env = "SALLYPORT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// Arguments of `sallyport-connector run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Where the fleet is and how to join it.
    #[command(flatten)]
    pub fleet: FleetArgs,

    /// Tunnels to keep to every proxy replica.
    #[arg(long, env = "SALLYPORT_TUNNELS_PER_REPLICA", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub tunnels_per_replica: u16,

    /// How long requests in flight may run after SIGTERM before the connector exits.
    #[arg(long, env = "SALLYPORT_DRAIN_TIMEOUT", default_value = "30s", value_parser = sallyport_service::parse_duration)]
    pub drain_timeout: Duration,

    /// Extra CA certificates (PEM file) trusted for https backends, beside the system
    /// roots.
    #[arg(long, env = "SALLYPORT_BACKEND_CA_FILE")]
    pub backend_ca_file: Option<PathBuf>,

    /// Where to serve Prometheus metrics (`/metrics`) and `/livez`, as ADDRESS:PORT, e.g.
    /// `127.0.0.1:9090` (only this host) or `0.0.0.0:9090` (for a Prometheus in the
    /// cluster). Unset (the default): not served. Plain HTTP without authentication: keep
    /// it off networks the connector does not trust.
    #[arg(long, env = "SALLYPORT_METRICS_ADDRESS")]
    pub metrics_address: Option<SocketAddr>,
}

/// The connector could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The saved state could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// Registration, renewal or a configuration pull failed.
    #[error(transparent)]
    Register(#[from] RegisterError),
    /// TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The backend CA is unusable.
    #[error(transparent)]
    Slice(#[from] SliceError),
    /// Something needed to register is missing.
    #[error("cannot register: {0}")]
    Missing(&'static str),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The saved state names another group than --group.
    #[error(
        "the state in {store} belongs to group {saved}, not {asked}; use another --state-dir (or --state-secrets) or remove it to register anew"
    )]
    OtherGroup {
        /// The state file or Secret.
        store: String,
        /// The group of the saved state.
        saved: String,
        /// The group asked for.
        asked: String,
    },
    /// The saved registration was made with a fleet whose root CA is not the one given
    /// now (the fleet was rebuilt): only a new registration helps.
    #[error(
        "the registration in {store} belongs to a fleet with another root CA than the one given; give a registration token (--token) to register anew"
    )]
    OtherFleet {
        /// The state file or Secret.
        store: String,
    },
    /// The fleet refused the registered connector for good ([`REFUSED_FOR_GOOD`]): it was
    /// revoked or its group removed. It stops rather than retry for ever.
    #[error(
        "the fleet no longer accepts connector {connector} ({reason}: {message}); it stops. To serve again it must register anew: remove its saved state ({store}) and start it with a registration token of the group"
    )]
    Revoked {
        /// The connector, `namespace/name`.
        connector: String,
        /// The fleet's reason, e.g. `ConnectorRevoked`.
        reason: String,
        /// The fleet's explanation.
        message: String,
        /// The state file or Secret.
        store: String,
    },
    /// The saved certificate expired: only a new registration helps.
    #[error(
        "the certificate in {store} expired on {not_after}; give a registration token (--token) to register anew"
    )]
    Expired {
        /// The state file or Secret.
        store: String,
        /// When it expired.
        not_after: OffsetDateTime,
    },
    /// The tunnels could not run.
    #[error(transparent)]
    Dial(#[from] sallyport_tunnel::dial::DialError),
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The metrics could not be set up or served.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

impl RunError {
    /// Whether restarting the connector cannot help until an administrator acts: the
    /// fleet refused it for good (a revoked connector, a removed group, a refused
    /// registration token) or its settings or saved state cannot be used as they are.
    /// Transient failures (the fleet unreachable for longer than the retries allow) are
    /// not: a supervisor should start it again.
    pub fn needs_administrator(&self) -> bool {
        match self {
            Self::Revoked { .. }
            | Self::Missing(_)
            | Self::OtherGroup { .. }
            | Self::OtherFleet { .. }
            | Self::Expired { .. } => true,
            Self::Register(RegisterError::Refused { status, .. }) => {
                (400..500).contains(status) && *status != 429
            }
            _ => false,
        }
    }

    /// This error as [`RunError::Revoked`] when the fleet refused connector `connector`
    /// (its state in `store`) for good.
    fn revoked(&self, connector: &str, store: &str) -> Option<Self> {
        let Self::Register(RegisterError::Refused {
            reason, message, ..
        }) = self
        else {
            return None;
        };
        REFUSED_FOR_GOOD
            .contains(&reason.as_str())
            .then(|| Self::Revoked {
                connector: connector.to_owned(),
                reason: reason.clone(),
                message: message.clone(),
                store: store.to_owned(),
            })
    }
}

impl FleetArgs {
    /// The registration token given, if any: an empty one counts as none.
    pub fn registration_token(&self) -> Option<&str> {
        self.token
            .as_deref()
            .filter(|token| !token.trim().is_empty())
    }

    /// The fleet endpoint these arguments describe.
    pub fn endpoint(&self, saved_ca: Option<&str>) -> Result<FleetEndpoint, RunError> {
        let address = self
            .fleet_addresses
            .first()
            .cloned()
            .ok_or(RunError::Missing("--fleet-address"))?;
        let server_name = self.fleet_server_name.clone().unwrap_or_else(|| {
            address
                .rsplit_once(':')
                .map_or(address.clone(), |(host, _)| {
                    host.trim_matches(['[', ']']).to_owned()
                })
        });
        let ca_pem = match (&self.fleet_ca, &self.fleet_ca_file, saved_ca) {
            (Some(pem), _, _) => pem.clone().into_bytes(),
            (None, Some(path), _) => std::fs::read(path).map_err(|source| RunError::Read {
                path: path.clone(),
                source,
            })?,
            (None, None, Some(saved)) => saved.as_bytes().to_vec(),
            (None, None, None) => {
                return Err(RunError::Missing(
                    "the fleet's CA (--fleet-ca or --fleet-ca-file)",
                ));
            }
        };
        Ok(FleetEndpoint {
            address,
            server_name,
            ca: certificates_from_pem("fleet CA", &ca_pem)?,
        })
    }

    /// The fleet CA given on the command line or environment (not a saved one), parsed.
    fn given_ca(&self) -> Result<Option<Vec<rustls_pki_types::CertificateDer<'static>>>, RunError> {
        let pem = match (&self.fleet_ca, &self.fleet_ca_file) {
            (Some(pem), _) => pem.clone().into_bytes(),
            (None, Some(path)) => std::fs::read(path).map_err(|source| RunError::Read {
                path: path.clone(),
                source,
            })?,
            (None, None) => return Ok(None),
        };
        Ok(Some(certificates_from_pem("fleet CA", &pem)?))
    }

    /// The state saved in `store`, or a new registration saved there when there is none
    /// (or it expired and a token is at hand).
    pub async fn state(&self, store: &StateStore) -> Result<ConnectorState, RunError> {
        let now = OffsetDateTime::now_utc();
        if let Some(saved) = store.load().await? {
            if let Some(asked) = &self.group
                && *asked != saved.group_id
            {
                return Err(RunError::OtherGroup {
                    store: store.to_string(),
                    saved: saved.group_id,
                    asked: asked.clone(),
                });
            }
            let other_fleet = self.given_ca()?.is_some_and(|given| {
                certificates_from_pem("saved fleet CA", saved.ca_pem.as_bytes())
                    .map_or(true, |saved| saved != given)
            });
            if other_fleet {
                if self.registration_token().is_none() {
                    return Err(RunError::OtherFleet {
                        store: store.to_string(),
                    });
                }
                warn!(connector = %saved.connector_id, %store, "the saved registration belongs to a fleet with another root CA than the one given now; registering anew");
            } else if !saved.expired(now) {
                info!(connector = %saved.connector_id, group = %saved.group_id, %store, "using the saved registration");
                return Ok(saved);
            }
            if !other_fleet && self.registration_token().is_none() {
                return Err(RunError::Expired {
                    store: store.to_string(),
                    not_after: saved.not_after,
                });
            }
            if !other_fleet {
                warn!(connector = %saved.connector_id, "the saved certificate expired; registering anew");
            }
        }
        let group = self.group.as_deref().ok_or(RunError::Missing("--group"))?;
        let token = self
            .registration_token()
            .ok_or(RunError::Missing("a registration token (--token)"))?;
        let endpoint = self.endpoint(None)?;
        let hostname = hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "connector".to_owned());
        info!(%group, fleet = %endpoint.address, %hostname, "registering with the fleet");
        let retry = register::RetryPolicy::for_total(self.registration_retry_for);
        let state =
            register::register_with_retry(&endpoint, group, token, &hostname, retry).await?;
        store.save(&state).await?;
        info!(connector = %state.connector_id, %group, renew_at = %state.renew_at, %store, "registered");
        Ok(state)
    }
}

/// Registers (unless already registered) and exits.
pub async fn register_only(args: FleetArgs) -> Result<ConnectorState, RunError> {
    let store = StateStore::open(&args.state, &CancellationToken::new()).await?;
    let state = args.state(&store).await;
    store.release().await;
    state
}

/// Runs the connector until SIGTERM or SIGINT, then drains.
pub async fn run(args: RunArgs) -> Result<(), RunError> {
    let shutdown = CancellationToken::new();
    sallyport_service::cancel_on_signals(shutdown.clone());
    // Metrics are served from the start (registration may take a while) until the
    // connector has drained.
    let metrics = ConnectorMetrics::new()?;
    let metrics_stopped = CancellationToken::new();
    let _stop_metrics = metrics_stopped.clone().drop_guard();
    if let Some(address) = args.metrics_address {
        let listener = metrics::bind(address).await?;
        tokio::spawn(metrics::serve(
            listener,
            metrics.clone(),
            metrics_stopped.clone(),
        ));
    }
    let store = StateStore::open(&args.fleet.state, &shutdown).await?;
    let store_name = store.to_string();
    let state = args.fleet.state(&store).await?;
    metrics.set_certificate(
        state.not_after.unix_timestamp(),
        state.renew_at.unix_timestamp(),
    );
    let endpoint = args.fleet.endpoint(Some(&state.ca_pem))?;
    let credentials = Arc::new(ArcSwap::from_pointee(state.credentials()?));

    let backend_ca = match &args.backend_ca_file {
        Some(path) => Some(
            std::fs::read_to_string(path).map_err(|source| RunError::Read {
                path: path.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let slice = CurrentSlice::with_backend_ca(backend_ca.as_deref())?;
    let (version_tx, version_rx) = watch::channel(String::new());
    // The first configuration before the first tunnel, so no request finds it empty.
    let state = Arc::new(ArcSwap::from_pointee(state));
    let fleet = Fleet {
        endpoint: &endpoint,
        state: &state,
        store: &store_name,
        metrics: &metrics,
    };
    if let Err(error) = pull_until_done(&fleet, &slice, &version_tx, &shutdown).await {
        store.release().await;
        return Err(error);
    }

    let mut settings = DialSettings::new(
        args.fleet.fleet_addresses.clone(),
        endpoint.server_name.clone(),
    );
    settings.tunnels_per_replica = usize::from(args.tunnels_per_replica);
    settings.drain_timeout = args.drain_timeout;
    let backends = Arc::new(Backends::new(slice.clone()));
    let dialer = Dialer::new(
        settings,
        credentials.clone(),
        endpoint.ca.clone(),
        metrics.handler(backends),
        state.load().connector_id.clone(),
        version_rx,
    );
    let notices = dialer.notices();
    // Requests the current slice refuses wait for an announced newer one (bounded).
    slice.follow_notices(dialer.notices());
    let tunnels = dialer.status_updates();
    tokio::spawn(metrics::follow_tunnels(
        metrics.clone(),
        dialer.status_updates(),
        metrics_stopped.clone(),
    ));

    let config_loop = follow_config(
        &fleet,
        slice,
        version_tx,
        notices,
        tunnels,
        shutdown.clone(),
    );
    // Not ready from the moment it starts draining, so a rollout waits for the next one.
    tokio::spawn({
        let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
        async move {
            shutdown.cancelled().await;
            metrics.set_draining();
        }
    });
    let renew_loop = renew_certificate(
        &fleet,
        credentials,
        store.clone(),
        metrics.clone(),
        &shutdown,
    );
    let (dialed, followed, renewed) =
        tokio::join!(dialer.run(shutdown.clone()), config_loop, renew_loop);
    store.release().await;
    dialed?;
    followed?;
    renewed?;
    store.check()?;
    info!("stopped");
    Ok(())
}

/// The fleet as the running connector's loops see it: where it is, the connector's
/// current state, and where that state is kept (for messages).
struct Fleet<'a> {
    endpoint: &'a FleetEndpoint,
    state: &'a ArcSwap<ConnectorState>,
    store: &'a str,
    metrics: &'a ConnectorMetrics,
}

impl Fleet<'_> {
    /// `error` as [`RunError::Revoked`] when the fleet refused this connector for good.
    fn revoked(&self, error: &RunError) -> Option<RunError> {
        error.revoked(&self.state.load().connector_id, self.store)
    }
}

async fn pull(
    fleet: &Fleet<'_>,
    slice: &CurrentSlice,
    version: &watch::Sender<String>,
) -> Result<(), RunError> {
    let known = slice.version();
    if let Some(new) =
        register::fetch_config(fleet.endpoint, &fleet.state.load(), known.as_deref()).await?
    {
        let new_version = new.version.clone();
        let apps = new.apps.len();
        let desired = new.group.connector_version.clone();
        slice.replace(new)?;
        info!(version = %new_version, apps, "configuration loaded");
        version.send_replace(new_version);
        fleet.metrics.set_desired_version(desired.as_deref());
        if let Some(desired) = desired.filter(|d| d != register::VERSION) {
            warn!(
                running = register::VERSION,
                wanted = %desired,
                "the connector group wants another connector version: install it and restart this connector (it drains first); see docs/connector-install.md#upgrade"
            );
        }
    }
    Ok(())
}

/// Pulls the configuration, retrying until it succeeds or `shutdown` fires; fails only
/// when the fleet refused the connector for good.
async fn pull_until_done(
    fleet: &Fleet<'_>,
    slice: &CurrentSlice,
    version: &watch::Sender<String>,
    shutdown: &CancellationToken,
) -> Result<(), RunError> {
    let mut retry = Duration::from_millis(200);
    loop {
        match pull(fleet, slice, version).await {
            Ok(()) => return Ok(()),
            Err(error) => {
                if let Some(revoked) = fleet.revoked(&error) {
                    error!(%error, "the fleet refused the configuration pull for good; stopping");
                    return Err(revoked);
                }
                warn!(%error, retry_in = ?retry, "cannot pull the configuration");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
        retry = (retry * 2).min(MAX_RETRY);
    }
}

/// Pulls the configuration when the fleet announces a new version, every
/// [`CONFIG_POLL`], and when every tunnel is down and dials fail (the pull, authenticated
/// like a tunnel, gets the fleet's reason: a revoked connector learns it at once). Tells
/// `slice` when the pull for an announced version starts and ends (requests it refuses
/// wait for the announced slice meanwhile). Stops the connector (cancels `shutdown`)
/// when the fleet refused it for good.
async fn follow_config(
    fleet: &Fleet<'_>,
    slice: CurrentSlice,
    version: watch::Sender<String>,
    mut notices: watch::Receiver<Option<sallyport_tunnel::wire::FleetNotice>>,
    mut tunnels: watch::Receiver<DialStatus>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    // Whether the fleet was asked since the tunnels were last cut off.
    let mut asked_why = false;
    loop {
        // The announced version this pull is for: requests waiting for it stop waiting
        // when the pull ends ([`CurrentSlice::announced_pull_ended`]).
        let mut announced_version = None;
        tokio::select! {
            changed = notices.changed() => {
                if changed.is_err() { return Ok(()) }
                let announced = notices.borrow_and_update().as_ref().map(|n| n.config_version.clone());
                if announced.is_none() || announced == slice.version() {
                    continue;
                }
                slice.announced_pull_started();
                announced_version = announced;
            }
            changed = tunnels.changed() => {
                if changed.is_err() { return Ok(()) }
                let cut_off = {
                    let status = tunnels.borrow_and_update();
                    status.serving() == 0 && status.consecutive_failures > 0
                };
                if !cut_off || asked_why {
                    asked_why = cut_off;
                    continue;
                }
                asked_why = true;
                info!("no tunnel to the fleet is up and dials fail; asking the fleet whether it still accepts this connector");
            }
            () = tokio::time::sleep(CONFIG_POLL) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
        let pulled = pull_until_done(fleet, &slice, &version, &shutdown).await;
        if let Some(announced) = &announced_version {
            slice.announced_pull_ended(announced);
        }
        if let Err(error) = pulled {
            shutdown.cancel();
            return Err(error);
        }
    }
}

/// Renews the certificate when it is due, retrying failures; stops the connector
/// (cancels `shutdown`) when the fleet refused it for good.
async fn renew_certificate(
    fleet: &Fleet<'_>,
    credentials: Arc<ArcSwap<Credentials>>,
    store: StateStore,
    metrics: ConnectorMetrics,
    shutdown: &CancellationToken,
) -> Result<(), RunError> {
    let mut retry = Duration::from_secs(1);
    loop {
        let current = fleet.state.load_full();
        let wait = (current.renew_at - OffsetDateTime::now_utc())
            .try_into()
            .unwrap_or(Duration::ZERO);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
        let renewed = async {
            let renewed = register::renew(fleet.endpoint, &current).await?;
            let new_credentials = renewed.credentials()?;
            store.save(&renewed).await?;
            Ok::<_, RunError>((renewed, new_credentials))
        };
        match renewed.await {
            Ok((renewed, new_credentials)) => {
                info!(connector = %renewed.connector_id, not_after = %renewed.not_after, renew_at = %renewed.renew_at, "certificate renewed; new tunnels use it");
                credentials.store(Arc::new(new_credentials));
                metrics.set_certificate(
                    renewed.not_after.unix_timestamp(),
                    renewed.renew_at.unix_timestamp(),
                );
                fleet.state.store(Arc::new(renewed));
                retry = Duration::from_secs(1);
            }
            Err(error) => {
                if let Some(revoked) = fleet.revoked(&error) {
                    error!(%error, "the fleet refused the renewal for good; stopping");
                    shutdown.cancel();
                    return Err(revoked);
                }
                warn!(%error, retry_in = ?retry, "cannot renew the certificate");
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    () = shutdown.cancelled() => return Ok(()),
                }
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::state::{ConnectorState, DiskState};

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        fleet: FleetArgs,
    }

    fn ca_pem(name: &str) -> String {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("{e}"))
            .pem()
    }

    #[tokio::test]
    async fn a_saved_registration_of_another_fleet_is_not_used() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let state_dir = dir.path().join("state");
        let saved = ConnectorState {
            connector_id: "infra/vm-1".to_owned(),
            group_id: "infra/east".to_owned(),
            chain_pem: "chain".to_owned(),
            key_pem: "key".to_owned(),
            ca_pem: ca_pem("old fleet"),
            not_after: OffsetDateTime::now_utc() + time::Duration::days(30),
            renew_at: OffsetDateTime::now_utc() + time::Duration::days(20),
        };
        DiskState::new(&state_dir)
            .save(&saved)
            .unwrap_or_else(|e| panic!("{e}"));
        let args = |ca: &str| {
            Command::try_parse_from([
                "connector",
                "--fleet-address",
                "127.0.0.1:1",
                &format!("--fleet-ca={ca}"),
                "--state-dir",
                &state_dir.display().to_string(),
            ])
            .unwrap_or_else(|e| panic!("{e}"))
            .fleet
        };
        let store = StateStore::Disk(DiskState::new(&state_dir));
        // The same fleet: the saved registration is used.
        let same = args(&saved.ca_pem).state(&store).await;
        assert_eq!(
            same.ok().map(|s| s.connector_id),
            Some("infra/vm-1".to_owned())
        );
        // A rebuilt fleet (another root CA) and no token: a clear refusal, not a connector
        // that fails every TLS handshake for ever.
        let other = args(&ca_pem("new fleet")).state(&store).await;
        assert!(
            matches!(other, Err(RunError::OtherFleet { .. })),
            "{other:?}"
        );
    }

    fn refused(status: u16, reason: &str) -> RunError {
        RunError::Register(RegisterError::Refused {
            action: "configuration",
            status,
            reason: reason.to_owned(),
            message: "because".to_owned(),
            retry_after: None,
        })
    }

    #[test]
    fn refusals_for_good_stop_the_connector_and_need_an_administrator() {
        for reason in REFUSED_FOR_GOOD {
            let revoked = refused(403, reason)
                .revoked("infra/vm-1", "/var/lib/sallyport/connector-state.json");
            let Some(revoked) = revoked else {
                panic!("{reason} is a refusal for good");
            };
            let message = revoked.to_string();
            assert!(
                message.contains("infra/vm-1") && message.contains(reason),
                "{message}"
            );
            assert!(
                message.contains("/var/lib/sallyport/connector-state.json"),
                "{message}"
            );
            assert!(revoked.needs_administrator());
        }
        // Other refusals are retried by the loops, and are not revocations.
        assert!(refused(503, "GroupNotLoaded").revoked("c", "s").is_none());
        assert!(
            refused(401, "CertificateRequired")
                .revoked("c", "s")
                .is_none()
        );
        // A refused registration token needs an administrator; a busy fleet does not.
        assert!(refused(401, "TokenInvalid").needs_administrator());
        assert!(!refused(503, "GroupNotLoaded").needs_administrator());
        assert!(!refused(429, "TooManyRequests").needs_administrator());
        assert!(RunError::Missing("--group").needs_administrator());
        let gave_up = RunError::Register(RegisterError::GaveUp {
            action: "registration",
            attempts: 3,
            elapsed: Duration::from_secs(300),
            allowed: Duration::from_secs(300),
            last: Box::new(RegisterError::Timeout {
                action: "registration",
                address: "fleet:443".to_owned(),
                timeout: Duration::from_secs(30),
            }),
        });
        assert!(!gave_up.needs_administrator());
    }

    #[test]
    fn an_empty_token_counts_as_none() {
        let parse = |token: &str| {
            Command::try_parse_from([
                "connector",
                "--fleet-address",
                "127.0.0.1:1",
                &format!("--token={token}"),
            ])
            .unwrap_or_else(|e| panic!("{e}"))
            .fleet
        };
        assert_eq!(parse("").registration_token(), None);
        assert_eq!(parse("  ").registration_token(), None);
        assert_eq!(parse("abc").registration_token(), Some("abc"));
    }
}
