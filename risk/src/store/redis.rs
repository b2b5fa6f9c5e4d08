//! Risk state in Redis, shared by every replica of the fleet.
//!
//! Keys (all under the prefix, each with a TTL so that nothing outlives its use):
//!
//! - `<prefix>:ipf:<ip>`: sorted set of failure ids scored by time (failures per IP);
//! - `<prefix>:ipu:<ip>`: sorted set of users scored by their last failure from the IP;
//! - `<prefix>:uf:<user>`: sorted set of failure ids scored by time (failures per user);
//! - `<prefix>:h:<user>`: list of the user's last sign-ins (JSON), newest first.
//!
//! Each operation is one atomic pipeline (`MULTI`/`EXEC`), one round trip. The
//! connection is made on first use and remade after errors, so a proxy starts (and
//! signs users in, without the shared state) while Redis is down.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

use super::{Observation, RiskStore, SignInRecord, StoreError, StoreSettings, millis};

/// How long one round trip (or the first connection) may take before the sign-in goes
/// on without the shared state.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(2);

/// The most failures kept per key: counting beyond any sane threshold spends memory for
/// nothing.
const MAX_EVENTS_PER_KEY: isize = 10_000;

/// Fleet-wide risk state in Redis.
pub struct RedisStore {
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
    settings: StoreSettings,
    url: String,
    /// Makes failure ids unique: this process's random nonce and a counter.
    nonce: u64,
    counter: AtomicU64,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("prefix", &self.settings.key_prefix)
            .finish()
    }
}

/// `url` with any password replaced by `***`.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme + 3 => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl RedisStore {
    /// A store at `url` (`redis://[:password@]host:port[/db]`, `rediss://` for TLS);
    /// nothing is connected yet.
    pub fn new(url: &str, settings: StoreSettings) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|source| StoreError::Url {
            url: redacted(url),
            source,
        })?;
        use std::hash::{BuildHasher as _, Hasher as _};
        let nonce = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Ok(Self {
            client,
            connection: OnceCell::new(),
            settings,
            url: redacted(url),
            nonce,
            counter: AtomicU64::new(0),
        })
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}:{kind}:{id}", self.settings.key_prefix)
    }

    fn error(&self, source: redis::RedisError) -> StoreError {
        StoreError::Redis {
            url: self.url.clone(),
            source,
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let connection = self
            .connection
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(OPERATION_TIMEOUT)
                    .set_response_timeout(OPERATION_TIMEOUT)
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(self.client.clone(), config)
                    .await
                    .map_err(|source| self.error(source))
            })
            .await?;
        Ok(connection.clone())
    }

    /// Runs `pipeline` atomically, within [`OPERATION_TIMEOUT`].
    async fn run<T: redis::FromRedisValue>(
        &self,
        pipeline: &redis::Pipeline,
    ) -> Result<T, StoreError> {
        let work = async {
            let mut connection = self.connection().await?;
            pipeline
                .query_async::<T>(&mut connection)
                .await
                .map_err(|source| self.error(source))
        };
        tokio::time::timeout(OPERATION_TIMEOUT * 2, work)
            .await
            .map_err(|_| StoreError::Timeout {
                url: self.url.clone(),
                timeout: OPERATION_TIMEOUT * 2,
            })?
    }

    fn failure_id(&self, now_ms: i64) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{now_ms}:{:x}:{n}", self.nonce)
    }
}

impl RiskStore for RedisStore {
    fn observe<'a>(
        &'a self,
        user: &'a str,
        ip: IpAddr,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Observation, StoreError>> {
        Box::pin(async move {
            let since = now_ms.saturating_sub(millis(self.settings.failure_window));
            let before = format!("({since}");
            let ip = ip.to_canonical().to_string();
            let mut pipeline = redis::pipe();
            pipeline.atomic();
            for key in [
                self.key("ipf", &ip),
                self.key("ipu", &ip),
                self.key("uf", user),
            ] {
                pipeline
                    .zrembyscore(&key, "-inf", &before)
                    .ignore()
                    .zcard(&key);
            }
            let last = isize::try_from(self.settings.history_len.max(1)).unwrap_or(1) - 1;
            pipeline.lrange(self.key("h", user), 0, last);
            let (ip_failures, ip_failed_users, user_failures, history): (
                u64,
                u64,
                u64,
                Vec<String>,
            ) = self.run(&pipeline).await?;
            let history = history
                .iter()
                .filter_map(|json| serde_json::from_str::<SignInRecord>(json).ok())
                .collect();
            Ok(Observation {
                history,
                ip_failures,
                ip_failed_users,
                user_failures,
            })
        })
    }

    fn user_failures<'a>(
        &'a self,
        user: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let since = now_ms.saturating_sub(millis(self.settings.failure_window));
            // Counted, not trimmed: a read-only look that any replica may take often.
            let mut pipeline = redis::pipe();
            pipeline.zcount(self.key("uf", user), format!("({since}"), "+inf");
            let (count,): (u64,) = self.run(&pipeline).await?;
            Ok(count)
        })
    }

    fn record_failure<'a>(
        &'a self,
        user: Option<&'a str>,
        ip: IpAddr,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let window = millis(self.settings.failure_window);
            let since = now_ms.saturating_sub(window);
            let before = format!("({since}");
            let ip = ip.to_canonical().to_string();
            let mut pipeline = redis::pipe();
            pipeline.atomic();
            let mut add = |key: String, member: String| {
                pipeline
                    .zadd(&key, member, now_ms)
                    .ignore()
                    .zrembyscore(&key, "-inf", &before)
                    .ignore()
                    .zremrangebyrank(&key, 0, -(MAX_EVENTS_PER_KEY + 1))
                    .ignore()
                    .pexpire(&key, window)
                    .ignore();
            };
            add(self.key("ipf", &ip), self.failure_id(now_ms));
            if let Some(user) = user {
                add(self.key("ipu", &ip), user.to_owned());
                add(self.key("uf", user), self.failure_id(now_ms));
            }
            self.run::<()>(&pipeline).await
        })
    }

    fn record_sign_in<'a>(
        &'a self,
        user: &'a str,
        record: &'a SignInRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            // A record always serialises (strings, numbers, an address).
            let json = serde_json::to_string(record).unwrap_or_default();
            let key = self.key("h", user);
            let last = isize::try_from(self.settings.history_len.max(1)).unwrap_or(1) - 1;
            let mut pipeline = redis::pipe();
            pipeline
                .atomic()
                .lpush(&key, json)
                .ignore()
                .ltrim(&key, 0, last)
                .ignore()
                .pexpire(&key, millis(self.settings.history_ttl))
                .ignore();
            self.run::<()>(&pipeline).await
        })
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redacted("redis://:s3cret@cache:6379/2"),
            "redis://***@cache:6379/2"
        );
        assert_eq!(redacted("redis://cache:6379"), "redis://cache:6379");
    }

    #[test]
    fn a_bad_url_is_refused() {
        let error = RedisStore::new("http://cache", StoreSettings::default())
            .err()
            .unwrap_or_else(|| panic!("http:// is no Redis URL"));
        assert!(error.to_string().contains("--risk-store"), "{error}");
    }
}
