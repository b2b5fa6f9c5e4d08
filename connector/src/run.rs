//! `sallyport-connector run` and `register`: register once (or reuse the saved state),
//! pull the group's configuration, keep tunnels to every proxy replica, renew the
//! certificate before it ages out, and drain on SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use clap::Args;
use sallyport_tunnel::dial::{DialSettings, Dialer};
use sallyport_tunnel::tls::{Credentials, TlsError, certificates_from_pem};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backend::Backends;
use crate::register::{self, FleetEndpoint, RegisterError};
use crate::slice::{CurrentSlice, SliceError};
use crate::state::{ConnectorState, DiskState, StateError};

/// How often the configuration is pulled even without a notice from the fleet.
pub const CONFIG_POLL: Duration = Duration::from_secs(60);
/// The longest pause between retries of a failed pull or renewal.
pub const MAX_RETRY: Duration = Duration::from_secs(30);

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
    /// registered (the state directory keeps its certificate).
    #[arg(long, env = "SALLYPORT_REGISTRATION_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Where the connector keeps its key, certificate and identity.
    #[arg(
        long,
        env = "SALLYPORT_STATE_DIR",
        default_value = "/var/lib/sallyport"
    )]
    pub state_dir: PathBuf,

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
        "the state in {dir} belongs to group {saved}, not {asked}; use another --state-dir or remove it to register anew"
    )]
    OtherGroup {
        /// The state directory.
        dir: PathBuf,
        /// The group of the saved state.
        saved: String,
        /// The group asked for.
        asked: String,
    },
    /// The saved certificate expired: only a new registration helps.
    #[error(
        "the certificate in {dir} expired on {not_after}; give a registration token (--token) to register anew"
    )]
    Expired {
        /// The state directory.
        dir: PathBuf,
        /// When it expired.
        not_after: OffsetDateTime,
    },
    /// The tunnels could not run.
    #[error(transparent)]
    Dial(#[from] sallyport_tunnel::dial::DialError),
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

impl FleetArgs {
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

    /// The saved state, or a new registration when there is none (or it expired and a
    /// token is at hand).
    pub async fn state(&self) -> Result<ConnectorState, RunError> {
        let store = DiskState::new(&self.state_dir);
        let now = OffsetDateTime::now_utc();
        if let Some(saved) = store.load()? {
            if let Some(asked) = &self.group
                && *asked != saved.group_id
            {
                return Err(RunError::OtherGroup {
                    dir: self.state_dir.clone(),
                    saved: saved.group_id,
                    asked: asked.clone(),
                });
            }
            if !saved.expired(now) {
                info!(connector = %saved.connector_id, group = %saved.group_id, "using the saved registration");
                return Ok(saved);
            }
            if self.token.is_none() {
                return Err(RunError::Expired {
                    dir: self.state_dir.clone(),
                    not_after: saved.not_after,
                });
            }
            warn!(connector = %saved.connector_id, "the saved certificate expired; registering anew");
        }
        let group = self.group.as_deref().ok_or(RunError::Missing("--group"))?;
        let token = self
            .token
            .as_deref()
            .ok_or(RunError::Missing("a registration token (--token)"))?;
        let endpoint = self.endpoint(None)?;
        let hostname = hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "connector".to_owned());
        info!(%group, fleet = %endpoint.address, %hostname, "registering with the fleet");
        let state = register::register(&endpoint, group, token, &hostname).await?;
        store.save(&state)?;
        info!(connector = %state.connector_id, %group, renew_at = %state.renew_at, "registered");
        Ok(state)
    }
}

/// Registers (unless already registered) and exits.
pub async fn register_only(args: FleetArgs) -> Result<ConnectorState, RunError> {
    args.state().await
}

/// Runs the connector until SIGTERM or SIGINT, then drains.
pub async fn run(args: RunArgs) -> Result<(), RunError> {
    let shutdown = CancellationToken::new();
    sallyport_service::cancel_on_signals(shutdown.clone());
    let state = args.fleet.state().await?;
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
    pull_until_done(&endpoint, &state, &slice, &version_tx, &shutdown).await;

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
        backends.handler(),
        state.load().connector_id.clone(),
        version_rx,
    );
    let notices = dialer.notices();

    let config_loop = follow_config(
        endpoint.clone(),
        state.clone(),
        slice,
        version_tx,
        notices,
        shutdown.clone(),
    );
    let renew_loop = renew_certificate(
        endpoint,
        state,
        credentials,
        DiskState::new(&args.fleet.state_dir),
        shutdown.clone(),
    );
    let (dialed, (), ()) = tokio::join!(dialer.run(shutdown.clone()), config_loop, renew_loop);
    dialed?;
    info!("stopped");
    Ok(())
}

async fn pull(
    endpoint: &FleetEndpoint,
    state: &ArcSwap<ConnectorState>,
    slice: &CurrentSlice,
    version: &watch::Sender<String>,
) -> Result<(), RunError> {
    let known = slice.version();
    if let Some(new) = register::fetch_config(endpoint, &state.load(), known.as_deref()).await? {
        let new_version = new.version.clone();
        let apps = new.apps.len();
        slice.replace(new)?;
        info!(version = %new_version, apps, "configuration loaded");
        version.send_replace(new_version);
    }
    Ok(())
}

async fn pull_until_done(
    endpoint: &FleetEndpoint,
    state: &ArcSwap<ConnectorState>,
    slice: &CurrentSlice,
    version: &watch::Sender<String>,
    shutdown: &CancellationToken,
) {
    let mut retry = Duration::from_millis(200);
    loop {
        match pull(endpoint, state, slice, version).await {
            Ok(()) => return,
            Err(error) => warn!(%error, retry_in = ?retry, "cannot pull the configuration"),
        }
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            () = shutdown.cancelled() => return,
        }
        retry = (retry * 2).min(MAX_RETRY);
    }
}

async fn follow_config(
    endpoint: FleetEndpoint,
    state: Arc<ArcSwap<ConnectorState>>,
    slice: CurrentSlice,
    version: watch::Sender<String>,
    mut notices: watch::Receiver<Option<sallyport_tunnel::wire::FleetNotice>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            changed = notices.changed() => {
                if changed.is_err() { return }
                let announced = notices.borrow_and_update().as_ref().map(|n| n.config_version.clone());
                if announced.is_none() || announced == slice.version() {
                    continue;
                }
            }
            () = tokio::time::sleep(CONFIG_POLL) => {}
            () = shutdown.cancelled() => return,
        }
        pull_until_done(&endpoint, &state, &slice, &version, &shutdown).await;
    }
}

async fn renew_certificate(
    endpoint: FleetEndpoint,
    state: Arc<ArcSwap<ConnectorState>>,
    credentials: Arc<ArcSwap<Credentials>>,
    store: DiskState,
    shutdown: CancellationToken,
) {
    let mut retry = Duration::from_secs(1);
    loop {
        let current = state.load_full();
        let wait = (current.renew_at - OffsetDateTime::now_utc())
            .try_into()
            .unwrap_or(Duration::ZERO);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
        let renewed = async {
            let renewed = register::renew(&endpoint, &current).await?;
            let new_credentials = renewed.credentials()?;
            store.save(&renewed)?;
            Ok::<_, RunError>((renewed, new_credentials))
        };
        match renewed.await {
            Ok((renewed, new_credentials)) => {
                info!(connector = %renewed.connector_id, not_after = %renewed.not_after, renew_at = %renewed.renew_at, "certificate renewed; new tunnels use it");
                credentials.store(Arc::new(new_credentials));
                state.store(Arc::new(renewed));
                retry = Duration::from_secs(1);
            }
            Err(error) => {
                warn!(%error, retry_in = ?retry, "cannot renew the certificate");
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    () = shutdown.cancelled() => return,
                }
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}
