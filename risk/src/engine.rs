//! The detections with their inputs: the anonymizer list and GeoIP database (swapped in
//! as they change) and the state store.

use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use sallyport_api::conditional_access_policy::ClientPlatform;
use tracing::warn;

use crate::anonymizers::Anonymizers;
use crate::detect::{Assessment, DetectionSettings, detect, network_of};
use crate::geo::GeoDatabase;
use crate::store::{Observation, RiskStore, SignInRecord};

/// A sign-in as risk detection sees it.
#[derive(Debug, Clone)]
pub struct SignInAttempt<'a> {
    /// The user name (`preferred_username`, else `email`), as policy sees it.
    pub user: &'a str,
    /// The client IP.
    pub ip: IpAddr,
    /// The client platform from the User-Agent.
    pub platform: Option<ClientPlatform>,
    /// When, in Unix milliseconds.
    pub now_ms: i64,
}

/// Risk detection: assesses sign-ins and remembers failures and sign-ins.
///
/// The store failing never fails a sign-in: the detections that need it are skipped for
/// that sign-in, with a warning.
#[derive(Debug)]
pub struct RiskEngine {
    settings: DetectionSettings,
    store: Arc<dyn RiskStore>,
    anonymizers: ArcSwap<Anonymizers>,
    geo: ArcSwapOption<GeoDatabase>,
}

impl RiskEngine {
    /// Detection with `settings` over `store`, with no anonymizer list and no GeoIP
    /// database yet.
    pub fn new(settings: DetectionSettings, store: Arc<dyn RiskStore>) -> Self {
        Self {
            settings,
            store,
            anonymizers: ArcSwap::from_pointee(Anonymizers::default()),
            geo: ArcSwapOption::empty(),
        }
    }

    /// The detection settings.
    pub fn settings(&self) -> &DetectionSettings {
        &self.settings
    }

    /// The state store.
    pub fn store(&self) -> &Arc<dyn RiskStore> {
        &self.store
    }

    /// Swaps in a new anonymizer list.
    pub fn set_anonymizers(&self, anonymizers: Anonymizers) {
        self.anonymizers.store(Arc::new(anonymizers));
    }

    /// The anonymizer list in use.
    pub fn anonymizers(&self) -> Arc<Anonymizers> {
        self.anonymizers.load_full()
    }

    /// Swaps in a GeoIP database (`None`: no locations, so no impossible travel and no
    /// new countries).
    pub fn set_geo(&self, geo: Option<GeoDatabase>) {
        self.geo.store(geo.map(Arc::new));
    }

    /// Assesses `attempt`: one round trip to the store.
    pub async fn assess(&self, attempt: &SignInAttempt<'_>) -> Assessment {
        let ip = attempt.ip.to_canonical();
        let place = self.geo.load().as_ref().and_then(|geo| geo.place(ip));
        let anonymizer = self.anonymizers.load().matching(ip);
        let observed = match self.store.observe(attempt.user, ip, attempt.now_ms).await {
            Ok(observed) => observed,
            Err(error) => {
                warn!(%error, user = attempt.user, client_ip = %ip, "risk state unavailable: this sign-in is assessed without history and failure counts");
                Observation::default()
            }
        };
        let detections = detect(
            &self.settings,
            attempt,
            place.as_ref(),
            anonymizer,
            &observed,
        );
        let record = SignInRecord {
            at_ms: attempt.now_ms,
            ip,
            network: network_of(ip).to_string(),
            platform: attempt.platform,
            place,
        };
        Assessment::new(detections, record)
    }

    /// Counts a failed or denied sign-in from `ip` (of `user`, when known).
    pub async fn record_failure(&self, user: Option<&str>, ip: IpAddr, now_ms: i64) {
        let ip = ip.to_canonical();
        if let Err(error) = self.store.record_failure(user, ip, now_ms).await {
            warn!(%error, user, client_ip = %ip, "cannot count a failed sign-in in the risk state");
        }
    }

    /// Adds the sign-in `assessed` of `user` to their history.
    pub async fn record_sign_in(&self, user: &str, assessed: &Assessment) {
        if let Err(error) = self.store.record_sign_in(user, &assessed.record).await {
            warn!(%error, user, client_ip = %assessed.record.ip, "cannot add a sign-in to the user's risk history");
        }
    }
}
