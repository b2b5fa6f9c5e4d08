//! What risk detection remembers between sign-ins: each user's last sign-ins and the
//! failed sign-in counters, per replica ([`MemoryStore`]) or fleet-wide in Redis
//! ([`RedisStore`]).

mod memory;
mod redis;

use std::net::IpAddr;
use std::time::Duration;

use futures::future::BoxFuture;
use sallyport_api::conditional_access_policy::ClientPlatform;
use serde::{Deserialize, Serialize};

use crate::geo::Place;

pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;

/// One successful sign-in, as the user's history keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignInRecord {
    /// When, in Unix milliseconds.
    pub at_ms: i64,
    /// The client IP.
    pub ip: IpAddr,
    /// The client's network (see [`crate::network_of`]), e.g. `203.0.113.0/24`.
    pub network: String,
    /// The client platform from the User-Agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<ClientPlatform>,
    /// Where the GeoIP database placed the client, if configured and known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub place: Option<Place>,
}

/// What the store knows about a user and a client IP at a sign-in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    /// The user's last successful sign-ins, newest first.
    pub history: Vec<SignInRecord>,
    /// Failed or denied sign-ins from the client IP within the failure window.
    pub ip_failures: u64,
    /// Distinct users with failed or denied sign-ins from the client IP within the window.
    pub ip_failed_users: u64,
    /// Failed or denied sign-ins of the user within the window.
    pub user_failures: u64,
}

/// How much a store keeps, and for how long.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// The sliding window failures are counted in.
    pub failure_window: Duration,
    /// How many of a user's last sign-ins are kept.
    pub history_len: usize,
    /// How long a user's history is kept after their last sign-in.
    pub history_ttl: Duration,
    /// Redis: the prefix of every key (`sallyport:risk` by default), so that fleets can
    /// share a Redis.
    pub key_prefix: String,
    /// Memory: the most users, IPs and users-with-failures kept (each); the least
    /// recently touched go first.
    pub max_keys: usize,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            failure_window: Duration::from_secs(15 * 60),
            history_len: 20,
            history_ttl: Duration::from_secs(90 * 24 * 3600),
            key_prefix: "sallyport:risk".to_owned(),
            max_keys: 100_000,
        }
    }
}

/// The store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis failed or could not be reached.
    #[error("the risk store at {url} failed: {source}")]
    Redis {
        /// The Redis URL, without a password.
        url: String,
        /// Why.
        source: ::redis::RedisError,
    },
    /// Redis did not answer in time.
    #[error("the risk store at {url} did not answer within {timeout:?}")]
    Timeout {
        /// The Redis URL, without a password.
        url: String,
        /// How long it was given.
        timeout: Duration,
    },
    /// The URL is not a Redis URL.
    #[error(
        "--risk-store {url:?} is not a Redis URL (redis://host:port/db or rediss://…): {source}"
    )]
    Url {
        /// The URL as given.
        url: String,
        /// Why.
        source: ::redis::RedisError,
    },
}

/// Where risk state lives. Every method is one round trip to the store.
pub trait RiskStore: Send + Sync + std::fmt::Debug {
    /// What the store knows about `user` and `ip` at `now_ms` (Unix milliseconds):
    /// history and failure counts in the window. Expired counts are dropped on the way.
    fn observe<'a>(
        &'a self,
        user: &'a str,
        ip: IpAddr,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<Observation, StoreError>>;

    /// Counts a failed or denied sign-in from `ip`, of `user` when known.
    fn record_failure<'a>(
        &'a self,
        user: Option<&'a str>,
        ip: IpAddr,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Failed or denied sign-ins of `user` within the failure window at `now_ms`: what
    /// the user risk of their sessions follows between sign-ins.
    fn user_failures<'a>(
        &'a self,
        user: &'a str,
        now_ms: i64,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// Adds a successful sign-in to `user`'s history (keeping the last few).
    fn record_sign_in<'a>(
        &'a self,
        user: &'a str,
        record: &'a SignInRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Where the state is, for logs: `memory` or the Redis URL without a password.
    fn describe(&self) -> String;
}

/// Milliseconds of `duration`, saturating.
pub(crate) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
