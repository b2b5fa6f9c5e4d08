//! Risk detections at sign-in ([`sallyport_risk`]) wired into the proxy: the flags, the
//! state store they select, and the anonymizer list and GeoIP database followed as they
//! change.
//!
//! - `--risk-store redis://…` shares the state (users' last sign-ins, failure counters)
//!   across the fleet; without it each replica keeps its own in memory.
//! - `--risk-anonymizer-configmap NAME` (key `cidrs` of a ConfigMap in the fleet's
//!   namespace, watched) or `--risk-anonymizer-file PATH` (re-read when it changes) lists
//!   anonymizing networks, one CIDR a line.
//! - `--geoip-database PATH` is a MaxMind DB (GeoLite2/GeoIP2 City or Country), re-read
//!   when it changes.
//!
//! The sign-in flow ([`crate::auth`]) asks the engine before policy decides, counts
//! failed and denied sign-ins, and adds successful ones to the user's history; the
//! levels it finds travel in the session (see [`crate::access::Subject`]). Between
//! sign-ins, a session's user risk also follows the store: every request raises it to
//! the user's current level ([`sallyport_risk::RiskEngine::current_user_risk`], read in
//! the background at most every `--risk-user-refresh`), so failed sign-ins recorded by
//! any replica reach the user's existing sessions without a new sign-in.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Args;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use sallyport_api::conditional_access_policy::RiskLevel;
use sallyport_risk::{
    Anonymizers, DetectionSettings, GeoDatabase, MemoryStore, RedisStore, RiskEngine, RiskStore,
    StoreError, StoreSettings,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The ConfigMap key holding the anonymizer list.
pub const ANONYMIZER_KEY: &str = "cidrs";

/// How often the anonymizer file and the GeoIP database are checked for changes.
pub const FILE_POLL: Duration = Duration::from_secs(2);

/// Flags of risk detection (part of `sallyport-proxy run`).
#[derive(Debug, Clone, Args)]
pub struct RiskArgs {
    /// Where risk state lives (users' last sign-ins, failed sign-in counters): a Redis
    /// URL (`redis://[:password@]host:port[/db]`, `rediss://` for TLS) shared by every
    /// replica. Unset: each replica keeps its own in memory, so failures seen by one
    /// replica do not raise risk on another.
    #[arg(long, env = "SALLYPORT_RISK_STORE", value_name = "URL")]
    pub risk_store: Option<String>,

    /// The prefix of the risk state's Redis keys (fleets sharing a Redis need
    /// different ones).
    #[arg(
        long,
        env = "SALLYPORT_RISK_STORE_PREFIX",
        default_value = "sallyport:risk"
    )]
    pub risk_store_prefix: String,

    /// A ConfigMap in the fleet's namespace listing anonymizing networks (Tor exits, VPN
    /// and proxy egress) under key `cidrs`: one CIDR or address a line, `#` comments.
    /// Watched: edits apply without a restart.
    #[arg(long, env = "SALLYPORT_RISK_ANONYMIZER_CONFIGMAP", value_name = "NAME")]
    pub risk_anonymizer_configmap: Option<String>,

    /// Standalone mode: a file listing anonymizing networks, in the ConfigMap key's
    /// format; re-read when it changes.
    #[arg(long, env = "SALLYPORT_RISK_ANONYMIZER_FILE", value_name = "PATH")]
    pub risk_anonymizer_file: Option<PathBuf>,

    /// The sign-in risk of a sign-in from an anonymizing network: low, medium or high.
    #[arg(long, env = "SALLYPORT_RISK_ANONYMIZER_LEVEL", default_value = "medium", value_parser = level)]
    pub risk_anonymizer_level: RiskLevel,

    /// A MaxMind DB file (GeoLite2/GeoIP2 City, or Country) locating clients, for
    /// impossible travel and new countries; re-read when it changes. Unset: no
    /// locations.
    #[arg(long, env = "SALLYPORT_GEOIP_DATABASE", value_name = "PATH")]
    pub geoip_database: Option<PathBuf>,

    /// Impossible travel: the fastest plausible travel between two sign-ins, km/h.
    #[arg(long, env = "SALLYPORT_RISK_TRAVEL_MAX_KMH", default_value_t = 900.0)]
    pub risk_travel_max_kmh: f64,

    /// Impossible travel: distances below this many km never count (GeoIP is rough).
    #[arg(long, env = "SALLYPORT_RISK_TRAVEL_MIN_KM", default_value_t = 300.0)]
    pub risk_travel_min_km: f64,

    /// The sliding window failed and denied sign-ins are counted in.
    #[arg(long, env = "SALLYPORT_RISK_FAILURE_WINDOW", default_value = "15m", value_parser = sallyport_service::parse_duration)]
    pub risk_failure_window: Duration,

    /// Failed or denied sign-ins from one IP within the window that make sign-ins from
    /// it high risk (half as many: medium). 0 turns it off.
    #[arg(long, env = "SALLYPORT_RISK_IP_FAILURES", default_value_t = 10)]
    pub risk_ip_failures: u64,

    /// Distinct users failing from one IP within the window that make sign-ins from it
    /// high risk (password spray). 0 turns it off.
    #[arg(long, env = "SALLYPORT_RISK_SPRAY_USERS", default_value_t = 5)]
    pub risk_spray_users: u64,

    /// Failed or denied sign-ins of one user within the window that make the user high
    /// risk (half as many: medium). 0 turns it off.
    #[arg(long, env = "SALLYPORT_RISK_USER_FAILURES", default_value_t = 10)]
    pub risk_user_failures: u64,

    /// How often a signed-in user's current user risk is read from the risk store, so
    /// that failures recorded after their sign-in (by any replica sharing the store)
    /// raise the risk of their existing sessions. Read in the background: requests never
    /// wait for the store.
    #[arg(long, env = "SALLYPORT_RISK_USER_REFRESH", default_value = "5s", value_parser = sallyport_service::parse_duration)]
    pub risk_user_refresh: Duration,

    /// How many earlier sign-ins a user needs before a new country, network or platform
    /// counts as unfamiliar.
    #[arg(
        long,
        env = "SALLYPORT_RISK_UNFAMILIAR_MIN_HISTORY",
        default_value_t = 3
    )]
    pub risk_unfamiliar_min_history: usize,
}

fn level(text: &str) -> Result<RiskLevel, String> {
    crate::access::risk_level(text).ok_or_else(|| format!("{text:?}: expected low, medium or high"))
}

/// Risk detection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RiskSetupError {
    /// The store URL is unusable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Both an anonymizer ConfigMap and a file were given.
    #[error("--risk-anonymizer-configmap and --risk-anonymizer-file exclude each other")]
    TwoAnonymizerSources,
    /// An anonymizer ConfigMap needs the cluster.
    #[error(
        "--risk-anonymizer-configmap needs the cluster; in standalone mode use --risk-anonymizer-file"
    )]
    NoCluster,
}

impl RiskArgs {
    /// The detection settings the flags give.
    pub fn detection_settings(&self) -> DetectionSettings {
        DetectionSettings {
            anonymizer_level: self.risk_anonymizer_level,
            travel_max_kmh: self.risk_travel_max_kmh,
            travel_min_km: self.risk_travel_min_km,
            ip_failures: self.risk_ip_failures,
            spray_users: self.risk_spray_users,
            user_failures: self.risk_user_failures,
            unfamiliar_min_history: self.risk_unfamiliar_min_history,
            ..DetectionSettings::default()
        }
    }

    /// The store the flags select.
    pub fn store(&self) -> Result<Arc<dyn RiskStore>, RiskSetupError> {
        let settings = StoreSettings {
            failure_window: self.risk_failure_window,
            key_prefix: self.risk_store_prefix.clone(),
            ..StoreSettings::default()
        };
        Ok(match &self.risk_store {
            Some(url) => Arc::new(RedisStore::new(url, settings)?),
            None => Arc::new(MemoryStore::new(settings)),
        })
    }
}

/// The risk engine the flags describe, with its anonymizer list and GeoIP database
/// followed until `stopped`. `cluster` is the client and fleet namespace in a cluster.
pub fn start(
    args: &RiskArgs,
    cluster: Option<(kube::Client, String)>,
    stopped: &CancellationToken,
) -> Result<Arc<RiskEngine>, RiskSetupError> {
    let engine = Arc::new(
        RiskEngine::new(args.detection_settings(), args.store()?)
            .with_user_risk_refresh(args.risk_user_refresh),
    );
    match (&args.risk_anonymizer_configmap, &args.risk_anonymizer_file) {
        (Some(_), Some(_)) => return Err(RiskSetupError::TwoAnonymizerSources),
        (Some(name), None) => {
            let (client, namespace) = cluster.ok_or(RiskSetupError::NoCluster)?;
            tokio::spawn(follow_anonymizer_config_map(
                engine.clone(),
                client,
                namespace,
                name.clone(),
                stopped.clone(),
            ));
        }
        (None, Some(path)) => {
            let target = engine.clone();
            tokio::spawn(follow_file(path.clone(), stopped.clone(), move |path| {
                let origin = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
                let list = Anonymizers::parse(&origin, &text).map_err(|e| e.to_string())?;
                info!(file = %origin, networks = list.len(), "anonymizer list loaded");
                target.set_anonymizers(list);
                Ok(())
            }));
        }
        (None, None) => {}
    }
    if let Some(path) = &args.geoip_database {
        let target = engine.clone();
        tokio::spawn(follow_file(path.clone(), stopped.clone(), move |path| {
            let geo = GeoDatabase::open(path).map_err(|e| e.to_string())?;
            info!(file = %path.display(), database_type = geo.database_type(), "GeoIP database loaded");
            target.set_geo(Some(geo));
            Ok(())
        }));
    }
    info!(
        store = %engine.store().describe(),
        anonymizers = ?args.risk_anonymizer_configmap.as_ref().map(|n| format!("ConfigMap {n}")).or_else(|| args.risk_anonymizer_file.as_ref().map(|p| p.display().to_string())),
        geoip = ?args.geoip_database,
        "risk detection on"
    );
    Ok(engine)
}

/// Calls `load` with `path` now and whenever its modification time or size changes,
/// until `stopped`; a failed load keeps what was loaded before.
async fn follow_file(
    path: PathBuf,
    stopped: CancellationToken,
    load: impl Fn(&Path) -> Result<(), String> + Send + 'static,
) {
    let mut seen: Option<(SystemTime, u64)> = None;
    loop {
        match std::fs::metadata(&path) {
            Ok(metadata) => {
                let stamp = (
                    metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    metadata.len(),
                );
                if seen != Some(stamp) {
                    seen = Some(stamp);
                    if let Err(error) = load(&path) {
                        warn!(file = %path.display(), %error, "cannot load a risk detection file; keeping the last one");
                    }
                }
            }
            Err(error) => {
                warn!(file = %path.display(), %error, "cannot stat a risk detection file")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(FILE_POLL) => {}
            () = stopped.cancelled() => return,
        }
    }
}

/// Follows the anonymizer ConfigMap `name` in `namespace`: each version's key `cidrs`
/// replaces the list; a version that does not parse is skipped, a deleted ConfigMap
/// empties it.
async fn follow_anonymizer_config_map(
    engine: Arc<RiskEngine>,
    client: kube::Client,
    namespace: String,
    name: String,
    stopped: CancellationToken,
) {
    let origin = format!("ConfigMap {namespace}/{name} key {ANONYMIZER_KEY}");
    let api = Api::<ConfigMap>::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            () = stopped.cancelled() => return,
        };
        match event {
            Some(Ok(Event::Apply(config_map) | Event::InitApply(config_map))) => {
                let text = config_map
                    .data
                    .as_ref()
                    .and_then(|data| data.get(ANONYMIZER_KEY))
                    .map_or("", String::as_str);
                match Anonymizers::parse(&origin, text) {
                    Ok(list) => {
                        info!(config_map = %origin, networks = list.len(), "anonymizer list loaded");
                        engine.set_anonymizers(list);
                    }
                    Err(error) => warn!(%error, "keeping the last anonymizer list"),
                }
            }
            Some(Ok(Event::Delete(_))) => {
                warn!(config_map = %origin, "the anonymizer ConfigMap was deleted: no anonymizing networks are known now");
                engine.set_anonymizers(Anonymizers::default());
            }
            Some(Ok(Event::Init | Event::InitDone)) => {}
            Some(Err(error)) => {
                warn!(config_map = %origin, %error, "watching the anonymizer ConfigMap failed; retrying")
            }
            None => return,
        }
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        risk: RiskArgs,
    }

    #[test]
    fn flags_have_sane_defaults_and_parse() {
        let defaults = Cli::try_parse_from(["proxy"]).unwrap_or_else(|e| panic!("{e}"));
        let settings = defaults.risk.detection_settings();
        assert_eq!(settings.anonymizer_level, RiskLevel::Medium);
        assert_eq!(
            (
                settings.ip_failures,
                settings.spray_users,
                settings.user_failures
            ),
            (10, 5, 10)
        );
        assert_eq!(defaults.risk.risk_failure_window, Duration::from_secs(900));
        assert!(defaults.risk.risk_store.is_none());
        assert_eq!(defaults.risk.risk_user_refresh, Duration::from_secs(5));
        let given = Cli::try_parse_from([
            "proxy",
            "--risk-anonymizer-level",
            "HIGH",
            "--risk-ip-failures",
            "4",
            "--risk-failure-window",
            "5m",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(given.risk.risk_anonymizer_level, RiskLevel::High);
        assert_eq!(given.risk.detection_settings().ip_failures, 4);
        assert!(Cli::try_parse_from(["proxy", "--risk-anonymizer-level", "severe"]).is_err());
    }

    #[tokio::test]
    async fn a_bad_store_url_and_two_anonymizer_sources_are_refused() {
        let stopped = CancellationToken::new();
        let bad = Cli::try_parse_from(["proxy", "--risk-store", "http://cache"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            start(&bad.risk, None, &stopped),
            Err(RiskSetupError::Store(_))
        ));
        let both = Cli::try_parse_from([
            "proxy",
            "--risk-anonymizer-configmap",
            "x",
            "--risk-anonymizer-file",
            "/x",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            start(&both.risk, None, &stopped),
            Err(RiskSetupError::TwoAnonymizerSources)
        ));
        let no_cluster = Cli::try_parse_from(["proxy", "--risk-anonymizer-configmap", "x"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            start(&no_cluster.risk, None, &stopped),
            Err(RiskSetupError::NoCluster)
        ));
    }

    #[tokio::test]
    async fn an_anonymizer_file_is_followed() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("anonymizers.txt");
        std::fs::write(&path, "# none yet\n").unwrap_or_else(|e| panic!("{e}"));
        let cli = Cli::try_parse_from([
            "proxy",
            "--risk-anonymizer-file",
            path.to_str().unwrap_or_default(),
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let stopped = CancellationToken::new();
        let engine = start(&cli.risk, None, &stopped).unwrap_or_else(|e| panic!("{e}"));
        let ip: std::net::IpAddr = "203.0.113.7".parse().unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(engine.anonymizers().matching(ip).is_none());
        std::fs::write(&path, "203.0.113.0/24 # a VPN\n").unwrap_or_else(|e| panic!("{e}"));
        let mut found = false;
        for _ in 0..100 {
            if engine.anonymizers().matching(ip).is_some() {
                found = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(found, "the rewritten file was not picked up");
        // A broken rewrite keeps the last good list.
        std::fs::write(&path, "203.0.113.0/24\nnonsense and more\n")
            .unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(FILE_POLL * 2).await;
        assert!(engine.anonymizers().matching(ip).is_some());
        stopped.cancel();
    }
}
