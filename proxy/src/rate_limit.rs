//! Per-app request rate limits: `spec.rateLimit` of a PublishedApp, or the fleet default
//! (500 requests per second, bursts of 1,000).
//!
//! The limit is the app's across the fleet. With a limits store (`--limits-store`, by
//! default the risk store's Redis), the fleet counts together ([`shared`]): each
//! request takes from the app's bucket in Redis (and, with `spec.rateLimit.perClientIp`,
//! from its client's), in one atomic round trip, so the fleet as a whole allows the
//! configured rate whatever the number of replicas. Without a store, or while it is
//! unreachable, each replica enforces its share: the rate and the burst divided by the
//! number of live replicas, rounded up, at least one. A request over the limit gets 429
//! with `Retry-After` and never reaches the app; requests are counted before sign-in, so
//! an app's limit also caps the sign-in work spent on it.
//!
//! The fast path: with a store, a replica first checks its own buckets of the whole
//! limit (the app's, and the client's when the app limits each client); a request they
//! refuse would be over the fleet's limit anyway (this replica alone has seen more than
//! the fleet may allow) and is refused without asking Redis, so a flood costs no round
//! trips. Allowed requests cost one round trip; the store never lets the fleet exceed
//! the limit, and local buckets can only refuse early what one replica alone exceeds.
//!
//! Each route's bucket ([`AppRateLimiter`]) is kept across configuration changes while
//! the app's limit and the replica count stay the same, so a new configuration does not
//! refill every bucket.
//!
//! An app may also limit each client (`spec.rateLimit.perClientIp`): one bucket per
//! client address ([`crate::protection::ClientRateLimiter`]; fleet-wide with a store),
//! checked before the app's bucket so that one client cannot empty it.

pub mod shared;

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sallyport_api::published_app::RateLimit;

use crate::protection::{ClientRateLimiter, client_key};

use self::shared::{Bucket, SharedLimits, Verdict};

/// Why a request is over its app's rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// Over the app's limit per client (`perClientIp`); a request fits after the wait.
    Client(Duration),
    /// Over the app's limit; a request fits after the wait.
    App(Duration),
}

/// One app's token bucket on this replica.
#[derive(Debug)]
pub struct AppRateLimiter {
    limit: RateLimit,
    replicas: usize,
    limiter: DefaultDirectRateLimiter,
    /// The whole limit, on this replica: the fast path in front of the shared buckets.
    whole: DefaultDirectRateLimiter,
    clients: Option<ClientRateLimiter>,
}

impl AppRateLimiter {
    /// The bucket for this replica's share of `limit` among `replicas` replicas.
    pub fn new(limit: &RateLimit, replicas: usize) -> Self {
        let (rate, burst) = share(limit, replicas);
        let quota = Quota::per_second(rate).allow_burst(burst);
        let (rate, burst) = share(limit, 1);
        let whole = Quota::per_second(rate).allow_burst(burst);
        Self {
            limit: limit.clone(),
            replicas,
            limiter: RateLimiter::direct(quota),
            whole: RateLimiter::direct(whole),
            clients: limit.per_client_ip.as_ref().map(ClientRateLimiter::new),
        }
    }

    /// Whether this bucket enforces `limit` among `replicas`, so it can be kept.
    pub fn enforces(&self, limit: &RateLimit, replicas: usize) -> bool {
        &self.limit == limit && self.replicas == replicas
    }

    /// Takes one request from `client`'s bucket for this app, when the app limits each
    /// client; when it is empty, how long until one fits.
    pub fn check_client(&self, client: std::net::IpAddr) -> Result<(), Duration> {
        match &self.clients {
            Some(clients) => clients.check(client),
            None => Ok(()),
        }
    }

    /// Takes one request from the bucket; when it is empty, how long until one fits.
    pub fn check(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Takes one request of `client` to `app` from the app's buckets: fleet-wide in
    /// `shared` when there is a store and it answers, else this replica's share.
    pub async fn check_request(
        &self,
        app: &str,
        client: IpAddr,
        shared: Option<&SharedLimits>,
    ) -> Result<(), Limited> {
        let Some(shared) = shared else {
            return self.check_locally(client);
        };
        // The fast path: what this replica alone sees over the whole limit is over the
        // fleet's too.
        self.check_client(client).map_err(Limited::Client)?;
        self.check_whole().map_err(Limited::App)?;
        let buckets = self.buckets(app, client);
        match shared.take(&buckets).await {
            Ok(Verdict::Allowed) => Ok(()),
            Ok(Verdict::Limited { bucket, wait }) => Err(
                if buckets
                    .get(bucket)
                    .is_some_and(|b| b.key.starts_with("app-client:"))
                {
                    Limited::Client(wait)
                } else {
                    Limited::App(wait)
                },
            ),
            Err(_) => {
                // The store is down (logged once per outage): this replica's share. The
                // client's own bucket was taken from above.
                crate::metrics::rate_limit_store_fallback();
                self.check().map_err(Limited::App)
            }
        }
    }

    /// This replica's buckets only: the client's, then the app's share.
    fn check_locally(&self, client: IpAddr) -> Result<(), Limited> {
        self.check_client(client).map_err(Limited::Client)?;
        self.check().map_err(Limited::App)
    }

    /// Takes one request from this replica's bucket of the whole limit.
    fn check_whole(&self) -> Result<(), Duration> {
        self.whole
            .check()
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// The fleet-wide buckets of a request of `client` to `app`: the client's (when the
    /// app limits each client) first, then the app's.
    pub fn buckets(&self, app: &str, client: IpAddr) -> Vec<Bucket> {
        let mut buckets = Vec::with_capacity(2);
        if let Some(per_client) = &self.limit.per_client_ip {
            buckets.push(Bucket {
                key: format!("app-client:{app}:{}", client_key(client)),
                requests_per_second: per_client.requests_per_second,
                burst: per_client.burst,
            });
        }
        buckets.push(Bucket {
            key: format!("app:{app}"),
            requests_per_second: self.limit.requests_per_second,
            burst: self.limit.burst,
        });
        buckets
    }

    /// This replica's share: requests per second and burst.
    pub fn share(&self) -> (u32, u32) {
        let (rate, burst) = share(&self.limit, self.replicas);
        (rate.get(), burst.get())
    }
}

/// `limit` divided among `replicas` (at least one), rounded up, at least one request.
fn share(limit: &RateLimit, replicas: usize) -> (NonZeroU32, NonZeroU32) {
    let replicas = u32::try_from(replicas.max(1)).unwrap_or(u32::MAX);
    let part = |total: u32| NonZeroU32::new(total.div_ceil(replicas)).unwrap_or(NonZeroU32::MIN);
    (part(limit.requests_per_second), part(limit.burst))
}

/// `Retry-After` seconds for a wait: rounded up, at least one.
pub fn retry_after_secs(wait: Duration) -> u32 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(requests_per_second: u32, burst: u32) -> RateLimit {
        RateLimit {
            requests_per_second,
            burst,
            per_client_ip: None,
        }
    }

    #[test]
    fn an_app_may_limit_each_client() {
        let client = |text: &str| -> std::net::IpAddr {
            text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
        };
        let mut per_client = limit(500, 1000);
        per_client.per_client_ip = Some(sallyport_api::published_app::ClientRateLimit {
            requests_per_second: 1,
            burst: 2,
        });
        // Per client, not shared among replicas.
        let bucket = AppRateLimiter::new(&per_client, 3);
        assert!(bucket.check_client(client("192.0.2.1")).is_ok());
        assert!(bucket.check_client(client("192.0.2.1")).is_ok());
        assert!(bucket.check_client(client("192.0.2.1")).is_err());
        assert!(bucket.check_client(client("192.0.2.2")).is_ok());
        // Without it, every client passes.
        let open = AppRateLimiter::new(&limit(500, 1000), 1);
        for _ in 0..10 {
            assert!(open.check_client(client("192.0.2.1")).is_ok());
        }
        assert!(
            !bucket.enforces(&limit(500, 1000), 3),
            "a new per-client limit gets new buckets"
        );
    }

    #[test]
    fn replicas_share_the_limit_rounding_up() {
        assert_eq!(
            AppRateLimiter::new(&limit(500, 1000), 1).share(),
            (500, 1000)
        );
        assert_eq!(
            AppRateLimiter::new(&limit(500, 1000), 3).share(),
            (167, 334)
        );
        assert_eq!(AppRateLimiter::new(&limit(1, 1), 4).share(), (1, 1));
        assert_eq!(AppRateLimiter::new(&limit(10, 20), 0).share(), (10, 20));
    }

    #[test]
    fn a_burst_passes_then_requests_wait() {
        let bucket = AppRateLimiter::new(&limit(1, 3), 1);
        for request in 0..3 {
            assert!(bucket.check().is_ok(), "request {request} of the burst");
        }
        let wait = bucket.check().err();
        assert!(
            wait.is_some_and(|w| w > Duration::ZERO && w <= Duration::from_secs(1)),
            "{wait:?}"
        );
    }

    #[test]
    fn buckets_are_kept_only_for_the_same_limit_and_replicas() {
        let bucket = AppRateLimiter::new(&limit(5, 10), 2);
        assert!(bucket.enforces(&limit(5, 10), 2));
        assert!(!bucket.enforces(&limit(5, 10), 3));
        assert!(!bucket.enforces(&limit(6, 10), 2));
    }

    #[test]
    fn requests_take_from_the_clients_bucket_then_the_apps() {
        let client: IpAddr = "2001:db8:1:2::7".parse().unwrap_or_else(|e| panic!("{e}"));
        let mut per_client = limit(10, 20);
        per_client.per_client_ip = Some(sallyport_api::published_app::ClientRateLimit {
            requests_per_second: 1,
            burst: 2,
        });
        let buckets = AppRateLimiter::new(&per_client, 3).buckets("team-a/wiki", client);
        let keys: Vec<&str> = buckets.iter().map(|b| b.key.as_str()).collect();
        assert_eq!(
            keys,
            ["app-client:team-a/wiki:2001:db8:1:2::", "app:team-a/wiki"],
            "IPv6 clients by their /64"
        );
        // The whole limit, not this replica's share: the store counts for the fleet.
        assert_eq!((buckets[1].requests_per_second, buckets[1].burst), (10, 20));
        assert_eq!((buckets[0].requests_per_second, buckets[0].burst), (1, 2));
        let open = AppRateLimiter::new(&limit(5, 5), 1).buckets("a/b", client);
        assert_eq!(open.len(), 1);
    }

    #[tokio::test]
    async fn without_a_store_or_with_it_down_the_replicas_share_applies() {
        let client: IpAddr = "192.0.2.1".parse().unwrap_or_else(|e| panic!("{e}"));
        // Two replicas share 4 requests a second: 2 each, bursts of 2.
        let bucket = AppRateLimiter::new(&limit(4, 4), 2);
        for _ in 0..2 {
            assert_eq!(bucket.check_request("a/b", client, None).await, Ok(()));
        }
        assert!(matches!(
            bucket.check_request("a/b", client, None).await,
            Err(Limited::App(_))
        ));
        // A store nobody answers at: the same share, not unlimited.
        let down =
            SharedLimits::new("redis://127.0.0.1:1/", "test").unwrap_or_else(|e| panic!("{e}"));
        let bucket = AppRateLimiter::new(&limit(4, 4), 2);
        for _ in 0..2 {
            assert_eq!(
                bucket.check_request("a/b", client, Some(&down)).await,
                Ok(())
            );
        }
        assert!(matches!(
            bucket.check_request("a/b", client, Some(&down)).await,
            Err(Limited::App(_))
        ));
        assert!(!down.is_up());
    }

    #[tokio::test]
    async fn the_fast_path_refuses_what_one_replica_sees_over_the_whole_limit() {
        let client: IpAddr = "192.0.2.1".parse().unwrap_or_else(|e| panic!("{e}"));
        let down =
            SharedLimits::new("redis://127.0.0.1:1/", "test").unwrap_or_else(|e| panic!("{e}"));
        // One replica of one: share and whole are the same 1-request burst; the second
        // request is refused by the whole-limit bucket before the store is asked.
        let bucket = AppRateLimiter::new(&limit(1, 1), 1);
        assert_eq!(
            bucket.check_request("a/b", client, Some(&down)).await,
            Ok(())
        );
        assert!(matches!(
            bucket.check_request("a/b", client, Some(&down)).await,
            Err(Limited::App(_))
        ));
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
