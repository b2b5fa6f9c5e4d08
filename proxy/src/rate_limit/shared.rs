//! Apps' rate limits counted fleet-wide in Redis (`--limits-store`).
//!
//! Every bucket is a GCRA ("generic cell rate algorithm") theoretical arrival time in
//! one Redis key, `<prefix>:app:<app>` for an app and `<prefix>:app-client:<app>:<client>`
//! for one client of an app, each expiring once its bucket is full again. One Lua script
//! ([`SCRIPT`]) checks all the buckets of a request against Redis's own clock (`TIME`,
//! so replicas' clocks do not matter) and takes one request from each only when every
//! one has room: one atomic round trip per request, and a client over its limit does not
//! drain the app's bucket.
//!
//! When Redis fails or does not answer within [`OPERATION_TIMEOUT`], the store is down:
//! one warning, `sallyport_proxy_rate_limit_store_up` goes to 0, and requests are
//! limited by each replica's local buckets (counted in
//! `sallyport_proxy_rate_limit_store_fallbacks_total`) until a probe every
//! [`RETRY_EVERY`] finds it back.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;
use tracing::{info, warn};

/// How long one check may take before the request is limited locally instead.
pub const OPERATION_TIMEOUT: Duration = Duration::from_millis(250);

/// How long after a failure the store is tried again (by one request; the others meanwhile
/// use the local buckets).
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// The GCRA check of every bucket of a request, atomic.
///
/// `KEYS`: the buckets. `ARGV`: per bucket, the emission interval in microseconds (one
/// second over the rate) and the burst. Returns `{0, 0}` when every bucket had room (and
/// each has taken one request), else `{i, wait}`: the 1-based bucket with the longest
/// wait, in microseconds, and nothing taken.
pub const SCRIPT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local arrivals = {}
local worst, worst_wait = 0, 0
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local arrival = tat + interval
  local allowed_at = arrival - burst * interval
  if allowed_at > now and allowed_at - now > worst_wait then
    worst, worst_wait = i, allowed_at - now
  end
  arrivals[i] = arrival
end
if worst > 0 then return {worst, math.ceil(worst_wait)} end
for i = 1, #KEYS do
  local ttl = math.ceil((arrivals[i] - now) / 1000) + 1
  redis.call('SET', KEYS[i], string.format('%.0f', arrivals[i]), 'PX', ttl)
end
return {0, 0}
";

/// One bucket of a request: its key (without the prefix) and limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// The key under the prefix, e.g. `app:team-a/wiki`.
    pub key: String,
    /// Requests per second (0 counts as 1).
    pub requests_per_second: u32,
    /// Burst (at least the rate, at least 1).
    pub burst: u32,
}

/// What the store decided for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every bucket had room; each took the request.
    Allowed,
    /// The bucket at this index (of those given) is empty: a request fits in after
    /// `wait`. Nothing was taken.
    Limited {
        /// The index of the bucket.
        bucket: usize,
        /// How long until a request fits.
        wait: Duration,
    },
}

/// The limits store is unusable.
#[derive(Debug, thiserror::Error)]
pub enum SharedLimitsError {
    /// The URL is not a Redis URL.
    #[error(
        "--limits-store {url:?} is not a Redis URL (redis://host:port/db or rediss://…): {source}"
    )]
    Url {
        /// The URL, without a password.
        url: String,
        /// Why.
        source: redis::RedisError,
    },
    /// Redis failed.
    #[error("the limits store at {url} failed: {source}")]
    Redis {
        /// The URL, without a password.
        url: String,
        /// Why.
        source: redis::RedisError,
    },
    /// Redis did not answer in time.
    #[error("the limits store at {url} did not answer within {timeout:?}")]
    Timeout {
        /// The URL, without a password.
        url: String,
        /// How long it was given.
        timeout: Duration,
    },
    /// The store is down and not being probed now: the request is limited locally.
    #[error("the limits store at {url} is down")]
    Down {
        /// The URL, without a password.
        url: String,
    },
}

/// Whether the store answers, as the last checks found.
#[derive(Debug, Default)]
struct Health {
    /// Since when it has not (`None`: it answers).
    down_since: Option<Instant>,
    /// When one request may try it again.
    retry_at: Option<Instant>,
    /// A request is trying it now.
    probing: bool,
}

/// The fleet-wide buckets in Redis.
pub struct SharedLimits {
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
    url: String,
    prefix: String,
    health: Mutex<Health>,
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// `url` with any password replaced by `***`.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme + 3 => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// The `ARGV` pair of a bucket: emission interval in microseconds and burst.
pub fn script_args(bucket: &Bucket) -> (String, u32) {
    let rate = bucket.requests_per_second.max(1);
    let burst = bucket.burst.max(rate).max(1);
    (format!("{:.3}", 1_000_000.0 / f64::from(rate)), burst)
}

impl SharedLimits {
    /// Buckets at `url` (`redis://[:password@]host:port[/db]`, `rediss://` for TLS)
    /// under the key prefix `prefix`; nothing is connected yet.
    pub fn new(url: &str, prefix: &str) -> Result<Self, SharedLimitsError> {
        let client = redis::Client::open(url).map_err(|source| SharedLimitsError::Url {
            url: redacted(url),
            source,
        })?;
        Ok(Self {
            client,
            connection: OnceCell::new(),
            url: redacted(url),
            prefix: prefix.to_owned(),
            health: Mutex::new(Health::default()),
        })
    }

    /// Where the buckets are, for logs: the URL without a password.
    pub fn describe(&self) -> &str {
        &self.url
    }

    /// Whether the last check found the store answering.
    pub fn is_up(&self) -> bool {
        self.lock().down_since.is_none()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether this request may ask the store: it is up, or down and due for a probe
    /// that nobody else is making.
    fn may_ask(&self, now: Instant) -> bool {
        let mut health = self.lock();
        if health.down_since.is_none() {
            return true;
        }
        if !health.probing && health.retry_at.is_none_or(|at| now >= at) {
            health.probing = true;
            return true;
        }
        false
    }

    fn answered(&self) {
        let mut health = self.lock();
        if let Some(since) = health.down_since.take() {
            info!(store = %self.url, down_for = ?since.elapsed(), "the limits store answers again: apps' rate limits are counted fleet-wide again");
        }
        health.retry_at = None;
        health.probing = false;
        crate::metrics::rate_limit_store_up(true);
    }

    fn failed(&self, error: &SharedLimitsError) {
        let now = Instant::now();
        let mut health = self.lock();
        if health.down_since.is_none() {
            warn!(store = %self.url, %error, "the limits store is unreachable: each replica limits apps with its own share until it is back");
            health.down_since = Some(now);
        }
        health.retry_at = Some(now + RETRY_EVERY);
        health.probing = false;
        crate::metrics::rate_limit_store_up(false);
    }

    async fn connection(&self) -> Result<ConnectionManager, SharedLimitsError> {
        let connection = self
            .connection
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(OPERATION_TIMEOUT)
                    .set_response_timeout(OPERATION_TIMEOUT)
                    .set_number_of_retries(0);
                ConnectionManager::new_with_config(self.client.clone(), config)
                    .await
                    .map_err(|source| SharedLimitsError::Redis {
                        url: self.url.clone(),
                        source,
                    })
            })
            .await?;
        Ok(connection.clone())
    }

    /// Takes one request from each of `buckets`, all or none, in one round trip. An
    /// error (the store down, failing or slow) means the caller limits locally; the
    /// first one of an outage is logged.
    pub async fn take(&self, buckets: &[Bucket]) -> Result<Verdict, SharedLimitsError> {
        if buckets.is_empty() {
            return Ok(Verdict::Allowed);
        }
        if !self.may_ask(Instant::now()) {
            return Err(SharedLimitsError::Down {
                url: self.url.clone(),
            });
        }
        let work = async {
            let mut connection = self.connection().await?;
            // EVAL with the script's text (Redis keeps it compiled by its digest): no
            // script cache to lose when Redis restarts, and about a kilobyte a request.
            let mut eval = redis::cmd("EVAL");
            eval.arg(SCRIPT).arg(buckets.len());
            for bucket in buckets {
                eval.arg(format!("{}:{}", self.prefix, bucket.key));
            }
            for bucket in buckets {
                let (interval, burst) = script_args(bucket);
                eval.arg(interval).arg(burst);
            }
            eval.query_async::<(u64, u64)>(&mut connection)
                .await
                .map_err(|source| SharedLimitsError::Redis {
                    url: self.url.clone(),
                    source,
                })
        };
        let answer = match tokio::time::timeout(OPERATION_TIMEOUT, work).await {
            Ok(answer) => answer,
            Err(_) => Err(SharedLimitsError::Timeout {
                url: self.url.clone(),
                timeout: OPERATION_TIMEOUT,
            }),
        };
        match answer {
            Ok((0, _)) => {
                self.answered();
                Ok(Verdict::Allowed)
            }
            Ok((index, wait_us)) => {
                self.answered();
                Ok(Verdict::Limited {
                    bucket: usize::try_from(index - 1).unwrap_or(0),
                    wait: Duration::from_micros(wait_us.max(1)),
                })
            }
            Err(error) => {
                self.failed(&error);
                Err(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_passwords_kept_out_of_logs() {
        assert!(matches!(
            SharedLimits::new("http://cache", "p"),
            Err(SharedLimitsError::Url { .. })
        ));
        let limits = SharedLimits::new("redis://:secret@cache:6379/0", "p")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(limits.describe(), "redis://***@cache:6379/0");
        assert!(!format!("{limits:?}").contains("secret"));
    }

    #[test]
    fn buckets_become_intervals_and_bursts() {
        let bucket = |requests_per_second, burst| Bucket {
            key: "app:a/b".to_owned(),
            requests_per_second,
            burst,
        };
        assert_eq!(
            script_args(&bucket(500, 1000)),
            ("2000.000".to_owned(), 1000)
        );
        assert_eq!(script_args(&bucket(3, 1)), ("333333.333".to_owned(), 3));
        assert_eq!(script_args(&bucket(0, 0)), ("1000000.000".to_owned(), 1));
    }

    #[tokio::test]
    async fn a_store_that_is_down_is_probed_by_one_request_at_a_time() {
        // Nothing listens on port 1 of the loopback: connections are refused at once.
        let limits =
            SharedLimits::new("redis://127.0.0.1:1/", "test").unwrap_or_else(|e| panic!("{e}"));
        let bucket = Bucket {
            key: "app:a/b".to_owned(),
            requests_per_second: 1,
            burst: 1,
        };
        assert!(limits.is_up(), "up until a check fails");
        let first = limits.take(std::slice::from_ref(&bucket)).await;
        assert!(
            matches!(
                first,
                Err(SharedLimitsError::Redis { .. } | SharedLimitsError::Timeout { .. })
            ),
            "{first:?}"
        );
        assert!(!limits.is_up());
        // Until the retry is due, no request waits on the store.
        let next = limits.take(std::slice::from_ref(&bucket)).await;
        assert!(
            matches!(next, Err(SharedLimitsError::Down { .. })),
            "{next:?}"
        );
        let now = Instant::now();
        assert!(!limits.may_ask(now));
        assert!(limits.may_ask(now + RETRY_EVERY), "one probe when due");
        assert!(!limits.may_ask(now + RETRY_EVERY), "and only one");
        assert!(limits.take(&[]).await.is_ok(), "no buckets: nothing to ask");
    }
}
