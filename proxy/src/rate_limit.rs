//! Per-app request rate limits: `spec.rateLimit` of a PublishedApp, or the fleet default
//! (500 requests per second, bursts of 1,000).
//!
//! The limit is the app's across the fleet. Until replicas share their counts through a
//! store, each replica enforces its share: the rate and the burst divided by the number
//! of live replicas, rounded up, at least one. A request over the limit gets 429 with
//! `Retry-After` and never reaches the app; requests are counted before sign-in, so an
//! app's limit also caps the sign-in work spent on it.
//!
//! Each route's bucket ([`AppRateLimiter`]) is kept across configuration changes while
//! the app's limit and the replica count stay the same, so a new configuration does not
//! refill every bucket.
//!
//! An app may also limit each client (`spec.rateLimit.perClientIp`): one bucket per
//! client address ([`crate::protection::ClientRateLimiter`]), enforced by each replica on
//! its own, checked before the app's bucket so that one client cannot empty it.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sallyport_api::published_app::RateLimit;

use crate::protection::ClientRateLimiter;

/// One app's token bucket on this replica.
#[derive(Debug)]
pub struct AppRateLimiter {
    limit: RateLimit,
    replicas: usize,
    limiter: DefaultDirectRateLimiter,
    clients: Option<ClientRateLimiter>,
}

impl AppRateLimiter {
    /// The bucket for this replica's share of `limit` among `replicas` replicas.
    pub fn new(limit: &RateLimit, replicas: usize) -> Self {
        let (rate, burst) = share(limit, replicas);
        let quota = Quota::per_second(rate).allow_burst(burst);
        Self {
            limit: limit.clone(),
            replicas,
            limiter: RateLimiter::direct(quota),
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
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
