//! Risk state in this replica's memory: the fallback without Redis. Bounded: at most
//! `max_keys` IPs, users with failures and users with history, the least recently
//! touched dropped first, and expired entries dropped as they are met.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;

use futures::future::BoxFuture;

use super::{Observation, RiskStore, SignInRecord, StoreError, StoreSettings, millis};

/// The most failures remembered per IP or user: counting beyond any sane threshold
/// spends memory for nothing.
const MAX_EVENTS_PER_KEY: usize = 10_000;

/// Per-replica risk state.
#[derive(Debug)]
pub struct MemoryStore {
    settings: StoreSettings,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Failure times per IP.
    ip_failures: Bounded<IpAddr, VecDeque<i64>>,
    /// Per IP: users who failed from it, with their last failure time.
    ip_users: Bounded<IpAddr, HashMap<String, i64>>,
    /// Failure times per user.
    user_failures: Bounded<String, VecDeque<i64>>,
    /// Last sign-ins per user, newest first.
    history: Bounded<String, VecDeque<SignInRecord>>,
}

/// A map whose entries remember when they were last touched, so that the oldest can go.
#[derive(Debug)]
struct Bounded<K, V> {
    entries: HashMap<K, (i64, V)>,
}

impl<K, V> Default for Bounded<K, V> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash + Clone, V: Default> Bounded<K, V> {
    #[cfg(test)]
    fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key).map(|(_, value)| value)
    }

    fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.entries.get_mut(key).map(|(_, value)| value)
    }

    /// The entry of `key`, made if needed, touched at `now`; when the map is full, the
    /// entries untouched since `stale_before` go first, then the least recently
    /// touched one.
    fn touch(&mut self, key: K, now: i64, stale_before: i64, max_keys: usize) -> &mut V {
        if !self.entries.contains_key(&key) && self.entries.len() >= max_keys.max(1) {
            self.entries
                .retain(|_, (touched, _)| *touched >= stale_before);
            if self.entries.len() >= max_keys.max(1)
                && let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (touched, _))| *touched)
                    .map(|(key, _)| key.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        let entry = self
            .entries
            .entry(key)
            .or_insert_with(|| (now, V::default()));
        entry.0 = now;
        &mut entry.1
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Drops the times before `since` (times are in order).
fn expire(times: &mut VecDeque<i64>, since: i64) {
    while times.front().is_some_and(|t| *t < since) {
        times.pop_front();
    }
}

impl MemoryStore {
    /// An empty store keeping what `settings` says.
    pub fn new(settings: StoreSettings) -> Self {
        Self {
            settings,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters that are still counters.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn observe_now(&self, user: &str, ip: IpAddr, now: i64) -> Observation {
        let since = now.saturating_sub(millis(self.settings.failure_window));
        let history_since = now.saturating_sub(millis(self.settings.history_ttl));
        let mut state = self.lock();
        let ip_failures = state.ip_failures.get_mut(&ip).map_or(0, |times| {
            expire(times, since);
            times.len()
        });
        let ip_failed_users = state.ip_users.get_mut(&ip).map_or(0, |users| {
            users.retain(|_, last| *last >= since);
            users.len()
        });
        let user_key = user.to_owned();
        let user_failures = state.user_failures.get_mut(&user_key).map_or(0, |times| {
            expire(times, since);
            times.len()
        });
        let history = state
            .history
            .entries
            .get(&user_key)
            .filter(|(touched, _)| *touched >= history_since)
            .map(|(_, records)| records.iter().cloned().collect())
            .unwrap_or_default();
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        Observation {
            history,
            ip_failures: count(ip_failures),
            ip_failed_users: count(ip_failed_users),
            user_failures: count(user_failures),
        }
    }

    fn record_failure_now(&self, user: Option<&str>, ip: IpAddr, now: i64) {
        let since = now.saturating_sub(millis(self.settings.failure_window));
        let max_keys = self.settings.max_keys;
        let mut state = self.lock();
        let times = state.ip_failures.touch(ip, now, since, max_keys);
        expire(times, since);
        if times.len() < MAX_EVENTS_PER_KEY {
            times.push_back(now);
        }
        if let Some(user) = user {
            let users = state.ip_users.touch(ip, now, since, max_keys);
            users.retain(|_, last| *last >= since);
            if users.len() < MAX_EVENTS_PER_KEY || users.contains_key(user) {
                users.insert(user.to_owned(), now);
            }
            let times = state
                .user_failures
                .touch(user.to_owned(), now, since, max_keys);
            expire(times, since);
            if times.len() < MAX_EVENTS_PER_KEY {
                times.push_back(now);
            }
        }
    }

    fn record_sign_in_now(&self, user: &str, record: &SignInRecord) {
        let since = record
            .at_ms
            .saturating_sub(millis(self.settings.history_ttl));
        let max_keys = self.settings.max_keys;
        let len = self.settings.history_len.max(1);
        let mut state = self.lock();
        let records = state
            .history
            .touch(user.to_owned(), record.at_ms, since, max_keys);
        records.push_front(record.clone());
        records.truncate(len);
    }
}

impl RiskStore for MemoryStore {
    fn observe<'a>(
        &'a self,
        user: &'a str,
        ip: IpAddr,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Observation, StoreError>> {
        let observation = self.observe_now(user, ip, now_ms);
        Box::pin(async move { Ok(observation) })
    }

    fn user_failures<'a>(
        &'a self,
        user: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let since = now_ms.saturating_sub(millis(self.settings.failure_window));
        let count = self
            .lock()
            .user_failures
            .get_mut(&user.to_owned())
            .map_or(0, |times| {
                expire(times, since);
                times.len()
            });
        let count = u64::try_from(count).unwrap_or(u64::MAX);
        Box::pin(async move { Ok(count) })
    }

    fn record_failure<'a>(
        &'a self,
        user: Option<&'a str>,
        ip: IpAddr,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.record_failure_now(user, ip, now_ms);
        Box::pin(async { Ok(()) })
    }

    fn record_sign_in<'a>(
        &'a self,
        user: &'a str,
        record: &'a SignInRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.record_sign_in_now(user, record);
        Box::pin(async { Ok(()) })
    }

    fn describe(&self) -> String {
        "memory (per replica)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const MINUTE: i64 = 60_000;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([203, 0, 113, last])
    }

    fn store() -> MemoryStore {
        MemoryStore::new(StoreSettings {
            failure_window: Duration::from_secs(600),
            history_len: 3,
            max_keys: 4,
            ..StoreSettings::default()
        })
    }

    fn record(at_ms: i64, last: u8) -> SignInRecord {
        SignInRecord {
            at_ms,
            ip: ip(last),
            network: "203.0.113.0/24".to_owned(),
            platform: None,
            place: None,
        }
    }

    #[test]
    fn failures_count_in_a_sliding_window() {
        let store = store();
        let t0 = 1_000 * MINUTE;
        store.record_failure_now(None, ip(1), t0);
        store.record_failure_now(Some("alice"), ip(1), t0 + MINUTE);
        store.record_failure_now(Some("bob"), ip(1), t0 + 2 * MINUTE);
        store.record_failure_now(Some("bob"), ip(2), t0 + 3 * MINUTE);
        let seen = store.observe_now("bob", ip(1), t0 + 4 * MINUTE);
        assert_eq!(
            (seen.ip_failures, seen.ip_failed_users, seen.user_failures),
            (3, 2, 2)
        );
        // Ten minutes after the first failure it has left the window; alice's too after
        // eleven.
        let later = store.observe_now("bob", ip(1), t0 + 11 * MINUTE + 1);
        assert_eq!(
            (
                later.ip_failures,
                later.ip_failed_users,
                later.user_failures
            ),
            (1, 1, 2)
        );
        let gone = store.observe_now("bob", ip(1), t0 + 30 * MINUTE);
        assert_eq!(
            (gone.ip_failures, gone.ip_failed_users, gone.user_failures),
            (0, 0, 0)
        );
    }

    #[test]
    fn history_keeps_the_last_sign_ins_newest_first() {
        let store = store();
        for (i, last) in [1u8, 2, 3, 4].into_iter().enumerate() {
            let at = i64::try_from(i).unwrap_or(0) * MINUTE;
            store.record_sign_in_now("alice", &record(at, last));
        }
        let seen = store.observe_now("alice", ip(9), 10 * MINUTE);
        let ips: Vec<IpAddr> = seen.history.iter().map(|r| r.ip).collect();
        assert_eq!(ips, vec![ip(4), ip(3), ip(2)]);
        assert!(store.observe_now("bob", ip(9), 0).history.is_empty());
    }

    #[test]
    fn the_store_stays_bounded() {
        let store = store();
        for n in 0..50u8 {
            store.record_failure_now(Some(&format!("user{n}")), ip(n), i64::from(n));
            store.record_sign_in_now(&format!("user{n}"), &record(i64::from(n), n));
        }
        let state = store.lock();
        assert!(state.ip_failures.len() <= 4);
        assert!(state.ip_users.len() <= 4);
        assert!(state.user_failures.len() <= 4);
        assert!(state.history.len() <= 4);
        assert!(
            state.history.get(&"user49".to_owned()).is_some(),
            "the newest stays"
        );
    }
}
