//! The detections with their inputs: the anonymizer list and GeoIP database (swapped in
//! as they change) and the state store.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use sallyport_api::conditional_access_policy::{ClientPlatform, RiskLevel};
use tracing::{debug, warn};

use crate::anonymizers::Anonymizers;
use crate::detect::{Assessment, DetectionSettings, detect, network_of, user_risk_of};
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
    user_risks: UserRiskCache,
}

/// The most users whose current risk is kept ([`RiskEngine::current_user_risk`]); past
/// it, the entries older than the refresh interval go, then all of them.
const MAX_CACHED_USERS: usize = 100_000;

/// The default of [`RiskEngine::with_user_risk_refresh`].
pub const DEFAULT_USER_RISK_REFRESH: Duration = Duration::from_secs(5);

/// Each signed-in user's current user risk as last read from the store, and when.
#[derive(Debug)]
struct UserRiskCache {
    refresh: Duration,
    users: Mutex<HashMap<String, CachedUserRisk>>,
}

#[derive(Debug, Clone, Copy)]
struct CachedUserRisk {
    /// `None` until the first read came back (or the last one failed).
    level: Option<RiskLevel>,
    read_at: Instant,
    reading: bool,
    /// Failures were recorded here since the last read started: read again at once.
    stale: bool,
}

impl UserRiskCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CachedUserRisk>> {
        // A panic while holding the lock leaves entries that are still entries.
        self.users.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached level of `user`, and whether the caller should read it again (at most
    /// one read per user in flight, at most one per refresh interval).
    fn get(&self, user: &str, now: Instant) -> (Option<RiskLevel>, bool) {
        let mut users = self.lock();
        if let Some(entry) = users.get_mut(user) {
            let stale = entry.stale || now.saturating_duration_since(entry.read_at) >= self.refresh;
            let read = stale && !entry.reading;
            if read {
                entry.reading = true;
                entry.stale = false;
            }
            return (entry.level, read);
        }
        if users.len() >= MAX_CACHED_USERS {
            let refresh = self.refresh;
            users.retain(|_, entry| now.saturating_duration_since(entry.read_at) < refresh);
            if users.len() >= MAX_CACHED_USERS {
                users.clear();
            }
        }
        users.insert(
            user.to_owned(),
            CachedUserRisk {
                level: None,
                read_at: now,
                reading: true,
                stale: false,
            },
        );
        (None, true)
    }

    /// Keeps what a read found (`None` after a failed read: the sign-in's level counts).
    fn set(&self, user: &str, level: Option<RiskLevel>, now: Instant) {
        let mut users = self.lock();
        let entry = users.entry(user.to_owned()).or_insert(CachedUserRisk {
            level,
            read_at: now,
            reading: false,
            stale: false,
        });
        entry.level = level;
        entry.read_at = now;
        entry.reading = false;
    }

    /// Makes `user`'s next look read the store at once.
    fn invalidate(&self, user: &str) {
        if let Some(entry) = self.lock().get_mut(user) {
            entry.stale = true;
        }
    }
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
            user_risks: UserRiskCache {
                refresh: DEFAULT_USER_RISK_REFRESH,
                users: Mutex::new(HashMap::new()),
            },
        }
    }

    /// The same engine reading a signed-in user's current risk from the store at most
    /// every `refresh` ([`RiskEngine::current_user_risk`]).
    pub fn with_user_risk_refresh(mut self, refresh: Duration) -> Self {
        self.user_risks.refresh = refresh;
        self
    }

    /// How often a signed-in user's current risk is read from the store.
    pub fn user_risk_refresh(&self) -> Duration {
        self.user_risks.refresh
    }

    /// `user`'s user risk as the store knows it now (the `bruteForce` detection over
    /// the failures counted since their sign-in, by any replica sharing the store), for
    /// the user's existing sessions between sign-ins.
    ///
    /// Never waits for the store: the answer is the level last read (`None` before the
    /// first read has come back, or when the last read failed), and when it is older
    /// than the refresh interval a read starts in the background (one per user at a
    /// time), so a session's user risk follows the store within about one refresh
    /// interval and one round trip. Outside a Tokio runtime nothing is read.
    pub fn current_user_risk(self: &Arc<Self>, user: &str) -> Option<RiskLevel> {
        let now = Instant::now();
        let (level, read) = self.user_risks.get(user, now);
        if read {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let engine = Arc::clone(self);
                    let user = user.to_owned();
                    runtime.spawn(async move { engine.read_user_risk(&user).await });
                }
                Err(_) => self.user_risks.set(user, level, now),
            }
        }
        level
    }

    /// Reads `user`'s failures from the store and keeps the user risk they make.
    async fn read_user_risk(&self, user: &str) {
        let now_ms = now_ms();
        let level = match self.store.user_failures(user, now_ms).await {
            Ok(failures) => {
                let level = user_risk_of(&self.settings, failures);
                debug!(user, failures, ?level, "user risk read from the risk state");
                level
            }
            Err(error) => {
                warn!(%error, user, "risk state unavailable: the user's sessions keep the user risk of their sign-in");
                None
            }
        };
        self.user_risks.set(user, level, Instant::now());
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
        if let Some(user) = user {
            // This replica's sessions of the user see it at their next request.
            self.user_risks.invalidate(user);
        }
    }

    /// Adds the sign-in `assessed` of `user` to their history.
    pub async fn record_sign_in(&self, user: &str, assessed: &Assessment) {
        if let Err(error) = self.store.record_sign_in(user, &assessed.record).await {
            warn!(%error, user, client_ip = %assessed.record.ip, "cannot add a sign-in to the user's risk history");
        }
    }
}

/// Unix milliseconds now.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, StoreSettings};

    fn engine(refresh: Duration) -> Arc<RiskEngine> {
        let settings = DetectionSettings {
            user_failures: 4,
            ..DetectionSettings::default()
        };
        Arc::new(
            RiskEngine::new(
                settings,
                Arc::new(MemoryStore::new(StoreSettings::default())),
            )
            .with_user_risk_refresh(refresh),
        )
    }

    async fn settled(engine: &Arc<RiskEngine>, user: &str) -> Option<RiskLevel> {
        for _ in 0..200 {
            let reading = engine
                .user_risks
                .lock()
                .get(user)
                .is_some_and(|entry| entry.reading);
            if !reading {
                return engine.user_risks.lock().get(user).and_then(|e| e.level);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the read of {user}'s risk never came back");
    }

    #[tokio::test]
    async fn a_users_risk_follows_failures_recorded_after_sign_in() {
        let engine = engine(Duration::from_secs(3600));
        let ip = IpAddr::from([203, 0, 113, 9]);
        assert_eq!(engine.current_user_risk("alice"), None, "not read yet");
        assert_eq!(settled(&engine, "alice").await, None);
        for _ in 0..2 {
            engine.record_failure(Some("alice"), ip, now_ms()).await;
        }
        // Recorded here: the cached level is read again at once, despite the hour.
        let _ = engine.current_user_risk("alice");
        assert_eq!(settled(&engine, "alice").await, Some(RiskLevel::Medium));
        assert_eq!(engine.current_user_risk("alice"), Some(RiskLevel::Medium));
        for _ in 0..2 {
            engine.record_failure(Some("alice"), ip, now_ms()).await;
        }
        let _ = engine.current_user_risk("alice");
        assert_eq!(settled(&engine, "alice").await, Some(RiskLevel::High));
        assert_eq!(
            engine.current_user_risk("bob"),
            None,
            "others are untouched"
        );
    }

    #[tokio::test]
    async fn failures_recorded_elsewhere_are_read_after_the_refresh_interval() {
        let engine = engine(Duration::from_millis(200));
        let ip = IpAddr::from([203, 0, 113, 9]);
        let _ = engine.current_user_risk("alice");
        assert_eq!(settled(&engine, "alice").await, None);
        // Straight into the store, as another replica sharing it would.
        for _ in 0..4 {
            engine
                .store()
                .record_failure(Some("alice"), ip, now_ms())
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(
            engine.current_user_risk("alice"),
            None,
            "cached until stale"
        );
        let mut level = None;
        for _ in 0..100 {
            level = engine.current_user_risk("alice");
            if level.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(level, Some(RiskLevel::High));
    }

    #[test]
    fn the_cache_stays_bounded() {
        let cache = UserRiskCache {
            refresh: Duration::from_secs(60),
            users: Mutex::new(HashMap::new()),
        };
        let now = Instant::now();
        for n in 0..MAX_CACHED_USERS + 10 {
            let _ = cache.get(&format!("user{n}"), now);
        }
        assert!(cache.lock().len() <= MAX_CACHED_USERS);
        // One read per user in flight.
        assert_eq!(cache.get("someone", now), (None, true));
        assert_eq!(cache.get("someone", now), (None, false));
        cache.set("someone", Some(RiskLevel::Low), now);
        assert_eq!(cache.get("someone", now), (Some(RiskLevel::Low), false));
    }
}
