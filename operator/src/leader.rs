//! Leader election over a `coordination.k8s.io/v1` Lease, so that two or more operator
//! replicas are safe: only the replica holding the Lease runs the controllers.
//!
//! The protocol is client-go's, which every Kubernetes controller manager uses:
//!
//! - Every write carries the `resourceVersion` the candidate read, so when two candidates
//!   race for a free Lease the apiserver accepts one write and rejects the other with
//!   409 Conflict: two candidates cannot both win.
//! - A candidate judges a Lease expired from its *own* monotonic clock: the holder's claim
//!   is valid until `leaseDurationSeconds` after this candidate last saw the Lease change.
//!   Clocks of different nodes are never compared.
//! - The leader renews every [`LeaseTiming::retry_period`]; when no renewal has succeeded
//!   for [`LeaseTiming::renew_deadline`] (shorter than the lease duration) it gives up
//!   leadership ([`Leadership::lost`]) before any other candidate may take the Lease over.
//! - On graceful shutdown the leader clears `holderIdentity` ([`Leadership::release`]) so
//!   another replica takes over at its next attempt instead of waiting for expiry.
//!
//! The renewal task lives as long as the [`Leadership`]: dropping it stops renewing
//! without releasing, and the Lease then expires.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, error, info, warn};

use crate::context::FIELD_MANAGER;

/// The Lease the operator replicas contend for, in the operator's namespace.
pub const OPERATOR_LEASE_NAME: &str = "sallyport-operator";

/// How long a claim lasts, how long the leader tries to renew, and how often candidates
/// try.
///
/// The defaults are client-go's (15 s, 10 s, 2 s). The leader gives up after
/// `renew_deadline` without a successful renewal; the others take over no earlier than
/// `lease_duration` after they last saw the Lease change. `renew_deadline <
/// lease_duration` is what keeps the two from overlapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    /// How long a holder's claim stays valid after the others last saw it renewed; written
    /// as the Lease's `leaseDurationSeconds`, so a whole number of seconds, at least 1.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives leadership up; shorter
    /// than `lease_duration`.
    pub renew_deadline: Duration,
    /// The interval between attempts: the leader's renewals and the others' attempts to
    /// acquire; shorter than `renew_deadline`.
    pub retry_period: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl LeaseTiming {
    /// Checks that the timings can work together: whole-second lease duration, and
    /// `retry_period < renew_deadline < lease_duration`.
    pub fn validate(&self) -> Result<(), LeaderError> {
        let invalid = |reason: String| Err(LeaderError::Timing { reason });
        if self.lease_duration.subsec_nanos() != 0
            || self.lease_duration.as_secs() == 0
            || self.lease_duration.as_secs() > i32::MAX as u64
        {
            return invalid(format!(
                "lease duration {:?} is not a whole number of seconds of at least 1 s",
                self.lease_duration
            ));
        }
        if self.renew_deadline >= self.lease_duration {
            return invalid(format!(
                "renew deadline {:?} is not shorter than the lease duration {:?}",
                self.renew_deadline, self.lease_duration
            ));
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return invalid(format!(
                "retry period {:?} is not between zero and the renew deadline {:?}",
                self.retry_period, self.renew_deadline
            ));
        }
        Ok(())
    }

    fn lease_duration_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }
}

/// Leader election failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The [`LeaseTiming`] cannot work.
    #[error("invalid leader election timing: {reason}")]
    Timing {
        /// What is wrong with it.
        reason: String,
    },
    /// The holder identity is empty.
    #[error("the leader election identity is empty")]
    EmptyIdentity,
    /// A call to the apiserver about the Lease failed.
    #[error("cannot {action} Lease {namespace}/{name}: {source}")]
    Api {
        /// What was being done: `read`, `create`, `update`.
        action: &'static str,
        /// The Lease's namespace.
        namespace: String,
        /// The Lease's name.
        name: String,
        /// The client's error.
        source: Box<kube::Error>,
    },
    /// Every attempt to release the Lease met a concurrent write (409 Conflict).
    #[error(
        "cannot release Lease {namespace}/{name}: it changed under each of {attempts} attempts"
    )]
    ReleaseConflict {
        /// The Lease's namespace.
        namespace: String,
        /// The Lease's name.
        name: String,
        /// How many attempts were made.
        attempts: usize,
    },
    /// Releasing the Lease did not finish in time; the other replicas take over once it
    /// expires.
    #[error("releasing Lease {namespace}/{name} did not finish within {after:?}")]
    ReleaseTimedOut {
        /// The Lease's namespace.
        namespace: String,
        /// The Lease's name.
        name: String,
        /// How long it was given.
        after: Duration,
    },
}

impl LeaderError {
    /// Whether trying again later may succeed: network trouble, apiserver overload or
    /// errors, conflicts. Bad requests, missing permissions or a missing namespace are not
    /// retried: they need a person to fix them.
    pub fn is_retryable(&self) -> bool {
        match self {
            LeaderError::Api { source, .. } => match source.as_ref() {
                kube::Error::Api(status) => {
                    status.code == 409 || status.code == 429 || status.code >= 500
                }
                _ => true,
            },
            LeaderError::Timing { .. }
            | LeaderError::EmptyIdentity
            | LeaderError::ReleaseConflict { .. }
            | LeaderError::ReleaseTimedOut { .. } => false,
        }
    }
}

/// What a candidate knows about who leads, for readiness and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaderStatus {
    /// Not known yet: the Lease has not been read, or it is free or expired and being
    /// contended.
    Unsettled,
    /// Another replica holds the Lease.
    Following {
        /// The holder's identity.
        leader: String,
    },
    /// This replica holds the Lease.
    Leading,
    /// This replica led and stopped leading: it released the Lease or lost it.
    Ended,
}

impl fmt::Display for LeaderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaderStatus::Unsettled => f.write_str("unsettled"),
            LeaderStatus::Following { leader } => write!(f, "following {leader}"),
            LeaderStatus::Leading => f.write_str("leading"),
            LeaderStatus::Ended => f.write_str("ended"),
        }
    }
}

/// Parses a duration given on the command line: a whole number followed by `ms`, `s` or
/// `m` (`500ms`, `15s`, `1m`). For clap's `value_parser`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 15s or 1m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(number)),
        "s" => Ok(Duration::from_secs(number)),
        "m" => number
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{text:?} is too long")),
        _ => Err(format!(
            "{text:?} has no unit: write it like 500ms, 15s or 1m"
        )),
    }
}

/// The identity this process claims the Lease with: `$POD_NAME` (set by the Helm chart
/// from the downward API), else `<hostname>-<pid>`, unique per process on a machine.
pub fn default_identity() -> String {
    if let Some(pod) = std::env::var("POD_NAME").ok().filter(|p| !p.is_empty()) {
        return pod;
    }
    let host = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Who may hold the Lease, as one candidate judges it at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Claim {
    /// This candidate holds it: renew.
    Ours,
    /// Another candidate holds it and its claim is valid for `expires_in` more.
    Other {
        holder: String,
        expires_in: Duration,
    },
    /// Nobody holds it, or the holder let it expire (`previous`): acquire.
    Free { previous: Option<String> },
}

/// Judges the Lease held by `holder` with `lease_duration`, first seen in this state at
/// `observed_since` (this candidate's clock), from `identity`'s point of view at `now`.
fn judge(
    holder: Option<&str>,
    identity: &str,
    observed_since: Instant,
    lease_duration: Duration,
    now: Instant,
) -> Claim {
    match holder.filter(|h| !h.is_empty()) {
        None => Claim::Free { previous: None },
        Some(h) if h == identity => Claim::Ours,
        Some(h) => {
            let expiry = observed_since + lease_duration;
            if now >= expiry {
                Claim::Free {
                    previous: Some(h.to_owned()),
                }
            } else {
                Claim::Other {
                    holder: h.to_owned(),
                    expires_in: expiry - now,
                }
            }
        }
    }
}

/// The leader's renewal schedule: when to try next, and when to give up.
#[derive(Debug, Clone, Copy)]
struct RenewalClock {
    /// When the last successful renewal (or the acquisition) was *sent*: conservative,
    /// since the others saw it no earlier.
    last_renewal: Instant,
    /// When the last attempt, successful or not, was sent.
    last_attempt: Instant,
}

impl RenewalClock {
    fn new(acquired: Instant) -> Self {
        Self {
            last_renewal: acquired,
            last_attempt: acquired,
        }
    }

    /// The renewal deadline: no successful renewal by then means leadership is lost.
    fn deadline(&self, timing: &LeaseTiming) -> Instant {
        self.last_renewal + timing.renew_deadline
    }

    /// Whether the renewal deadline has passed at `now`.
    fn overdue(&self, timing: &LeaseTiming, now: Instant) -> bool {
        now >= self.deadline(timing)
    }

    /// When the next attempt is due: a retry period after the last one, but no later than
    /// the deadline (so a lost leadership is noticed on time).
    fn next_attempt(&self, timing: &LeaseTiming) -> Instant {
        (self.last_attempt + timing.retry_period).min(self.deadline(timing))
    }

    /// Whether an attempt is due at `now`.
    fn renew_due(&self, timing: &LeaseTiming, now: Instant) -> bool {
        now >= self.next_attempt(timing)
    }
}

/// What this candidate last saw of the Lease, and since when (its own clock).
#[derive(Debug, Clone)]
struct Observation {
    resource_version: Option<String>,
    since: Instant,
}

/// One try at acquiring or renewing.
#[derive(Debug)]
enum Attempt {
    /// This candidate holds the Lease now; `acquired` if it did not before.
    Leading { acquired: bool },
    /// Another candidate holds it.
    HeldBy { holder: String },
    /// Another candidate wrote first (409 Conflict); try again.
    Contended,
}

/// Shared between the [`LeaderElection`] and its [`Leadership`].
struct Candidate {
    api: Api<Lease>,
    namespace: String,
    lease_name: String,
    identity: String,
    timing: LeaseTiming,
    observed: Mutex<Option<Observation>>,
    status: watch::Sender<LeaderStatus>,
}

impl Candidate {
    fn api_error(&self, action: &'static str, source: kube::Error) -> LeaderError {
        LeaderError::Api {
            action,
            namespace: self.namespace.clone(),
            name: self.lease_name.clone(),
            source: Box::new(source),
        }
    }

    /// Records `lease` as seen at `now` (resetting the expiry clock when it changed) and
    /// judges it.
    fn observe(&self, lease: &Lease, now: Instant) -> Claim {
        let resource_version = lease.resource_version();
        let since = {
            let mut observed = self.observed.lock().unwrap_or_else(PoisonError::into_inner);
            match observed.as_ref() {
                Some(seen) if seen.resource_version == resource_version => seen.since,
                _ => {
                    *observed = Some(Observation {
                        resource_version,
                        since: now,
                    });
                    now
                }
            }
        };
        let spec = lease.spec.as_ref();
        let lease_duration = spec
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .filter(|s| *s > 0)
            .map_or(self.timing.lease_duration, Duration::from_secs);
        judge(
            spec.and_then(|s| s.holder_identity.as_deref()),
            &self.identity,
            since,
            lease_duration,
            now,
        )
    }

    /// Records this candidate's own successful write, sent at `sent`.
    fn wrote(&self, lease: &Lease, sent: Instant) {
        let mut observed = self.observed.lock().unwrap_or_else(PoisonError::into_inner);
        *observed = Some(Observation {
            resource_version: lease.resource_version(),
            since: sent,
        });
    }

    /// Publishes `status`, logging nothing; returns whether it changed.
    fn publish(&self, status: LeaderStatus) -> bool {
        self.status.send_if_modified(|current| {
            if *current == status {
                false
            } else {
                *current = status;
                true
            }
        })
    }

    /// Reads the Lease and, if it is ours, free or expired, writes our claim with the
    /// `resourceVersion` read (creating the Lease if it is absent).
    async fn try_acquire_or_renew(&self) -> Result<Attempt, LeaderError> {
        let sent = Instant::now();
        let now = MicroTime(Timestamp::now());
        let Some(current) = self
            .api
            .get_opt(&self.lease_name)
            .await
            .map_err(|e| self.api_error("read", e))?
        else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.lease_name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.timing.lease_duration_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&post_params(), &lease).await {
                Ok(created) => {
                    self.wrote(&created, sent);
                    Ok(Attempt::Leading { acquired: true })
                }
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Contended),
                Err(e) => Err(self.api_error("create", e)),
            };
        };

        // Judged from when the read returned: the latest instant this state was seen.
        let claim = self.observe(&current, Instant::now());
        let spec = current.spec.clone().unwrap_or_default();
        let (spec, acquired) = match claim {
            Claim::Other { holder, expires_in } => {
                debug!(
                    lease = %self.lease_name,
                    %holder,
                    expires_in_ms = expires_in.as_millis() as u64,
                    "Lease held by another replica"
                );
                return Ok(Attempt::HeldBy { holder });
            }
            Claim::Ours => (
                LeaseSpec {
                    renew_time: Some(now),
                    lease_duration_seconds: Some(self.timing.lease_duration_seconds()),
                    ..spec
                },
                false,
            ),
            Claim::Free { previous } => {
                if let Some(previous) = &previous {
                    info!(
                        lease = %self.lease_name,
                        previous_holder = %previous,
                        "Lease expired; trying to take it over"
                    );
                }
                (
                    LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(self.timing.lease_duration_seconds()),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + 1),
                        ..spec
                    },
                    true,
                )
            }
        };
        let claimed = Lease {
            metadata: current.metadata,
            spec: Some(spec),
        };
        match self
            .api
            .replace(&self.lease_name, &post_params(), &claimed)
            .await
        {
            Ok(written) => {
                self.wrote(&written, sent);
                Ok(Attempt::Leading { acquired })
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::Contended),
            Err(e) => Err(self.api_error("update", e)),
        }
    }

    /// Clears `holderIdentity` if this candidate still holds the Lease, so the others
    /// take over at their next attempt. Retries conflicts with a fresh read.
    async fn release(&self) -> Result<(), LeaderError> {
        const ATTEMPTS: usize = 3;
        for _ in 0..ATTEMPTS {
            let Some(current) = self
                .api
                .get_opt(&self.lease_name)
                .await
                .map_err(|e| self.api_error("read", e))?
            else {
                return Ok(());
            };
            let spec = current.spec.clone().unwrap_or_default();
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                debug!(lease = %self.lease_name, "Lease no longer ours; nothing to release");
                return Ok(());
            }
            let released = Lease {
                metadata: current.metadata,
                spec: Some(LeaseSpec {
                    holder_identity: None,
                    acquire_time: None,
                    renew_time: Some(MicroTime(Timestamp::now())),
                    lease_duration_seconds: Some(1),
                    ..spec
                }),
            };
            match self
                .api
                .replace(&self.lease_name, &post_params(), &released)
                .await
            {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(e) => return Err(self.api_error("update", e)),
            }
        }
        Err(LeaderError::ReleaseConflict {
            namespace: self.namespace.clone(),
            name: self.lease_name.clone(),
            attempts: ATTEMPTS,
        })
    }
}

fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    }
}

/// `period` stretched by up to 20 % at random, so candidates do not retry in lock-step.
fn jittered(period: Duration) -> Duration {
    let fraction = getrandom::u32().map_or(0.0, |r| f64::from(r) / f64::from(u32::MAX));
    period.mul_f64(1.0 + 0.2 * fraction)
}

/// One replica's candidacy for a Lease.
///
/// ```no_run
/// # async fn example(client: kube::Client) -> Result<(), sallyport_operator::leader::LeaderError> {
/// use sallyport_operator::leader::{LeaderElection, LeaseTiming, default_identity};
///
/// let election = LeaderElection::new(
///     client,
///     "sallyport-system",
///     "sallyport-operator",
///     default_identity(),
///     LeaseTiming::default(),
/// )?;
/// let leadership = election.acquire().await?;
/// tokio::select! {
///     () = leadership.lost() => std::process::exit(1),
///     () = async { /* run the controllers */ } => {}
/// }
/// leadership.release().await?;
/// # Ok(())
/// # }
/// ```
pub struct LeaderElection {
    candidate: Arc<Candidate>,
}

impl fmt::Debug for LeaderElection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaderElection")
            .field("namespace", &self.candidate.namespace)
            .field("lease", &self.candidate.lease_name)
            .field("identity", &self.candidate.identity)
            .field("timing", &self.candidate.timing)
            .finish()
    }
}

impl LeaderElection {
    /// A candidate `identity` for the Lease `namespace/lease_name`. Nothing is sent to the
    /// apiserver until [`acquire`](Self::acquire).
    ///
    /// `identity` must be unique among the candidates ([`default_identity`] is): two
    /// candidates with one identity would both believe they hold the Lease.
    pub fn new(
        client: Client,
        namespace: &str,
        lease_name: &str,
        identity: impl Into<String>,
        timing: LeaseTiming,
    ) -> Result<Self, LeaderError> {
        timing.validate()?;
        let identity = identity.into();
        if identity.is_empty() {
            return Err(LeaderError::EmptyIdentity);
        }
        let (status, _) = watch::channel(LeaderStatus::Unsettled);
        Ok(Self {
            candidate: Arc::new(Candidate {
                api: Api::namespaced(client, namespace),
                namespace: namespace.to_owned(),
                lease_name: lease_name.to_owned(),
                identity,
                timing,
                observed: Mutex::new(None),
                status,
            }),
        })
    }

    /// The identity this candidate claims the Lease with.
    pub fn identity(&self) -> &str {
        &self.candidate.identity
    }

    /// Follows what this candidate knows about who leads, from now on (also after
    /// [`acquire`](Self::acquire) returned).
    pub fn status(&self) -> watch::Receiver<LeaderStatus> {
        self.candidate.status.subscribe()
    }

    /// Waits until this replica leads, trying every retry period (with jitter). Transient
    /// apiserver errors are logged and retried; the error is returned only when retrying
    /// cannot help (missing permissions, missing namespace, invalid request).
    ///
    /// Cancel it by dropping the future (for example in `tokio::select!` against the
    /// shutdown signal). If that happens just as the Lease was written, the Lease stays
    /// held until it expires.
    pub async fn acquire(&self) -> Result<Leadership, LeaderError> {
        let candidate = &self.candidate;
        info!(
            namespace = %candidate.namespace,
            lease = %candidate.lease_name,
            identity = %candidate.identity,
            "waiting for leadership"
        );
        loop {
            let sent = Instant::now();
            match candidate.try_acquire_or_renew().await {
                Ok(Attempt::Leading { acquired }) => {
                    candidate.publish(LeaderStatus::Leading);
                    info!(
                        namespace = %candidate.namespace,
                        lease = %candidate.lease_name,
                        identity = %candidate.identity,
                        acquired,
                        "became leader"
                    );
                    return Ok(Leadership::start(candidate.clone(), sent));
                }
                Ok(Attempt::HeldBy { holder }) => {
                    if candidate.publish(LeaderStatus::Following {
                        leader: holder.clone(),
                    }) {
                        info!(
                            namespace = %candidate.namespace,
                            lease = %candidate.lease_name,
                            leader = %holder,
                            "another replica leads; standing by"
                        );
                    }
                }
                Ok(Attempt::Contended) => {
                    debug!(lease = %candidate.lease_name, "another candidate wrote the Lease first");
                }
                Err(error) if error.is_retryable() => {
                    warn!(%error, "leader election attempt failed; retrying");
                }
                Err(error) => return Err(error),
            }
            tokio::time::sleep(jittered(candidate.timing.retry_period)).await;
        }
    }
}

/// This replica leads until [`lost`](Self::lost) resolves, [`release`](Self::release) is
/// called, or it is dropped (which stops renewing and lets the Lease expire).
pub struct Leadership {
    candidate: Arc<Candidate>,
    lost: CancellationToken,
    stop_renewing: DropGuard,
    renewal: JoinHandle<()>,
}

impl fmt::Debug for Leadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leadership")
            .field("lease", &self.candidate.lease_name)
            .field("identity", &self.candidate.identity)
            .field("lost", &self.lost.is_cancelled())
            .finish()
    }
}

impl Leadership {
    fn start(candidate: Arc<Candidate>, acquired: Instant) -> Self {
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        let renewal = tokio::spawn(keep_renewing(
            candidate.clone(),
            acquired,
            stop.clone(),
            lost.clone(),
        ));
        Self {
            candidate,
            lost,
            stop_renewing: stop.drop_guard(),
            renewal,
        }
    }

    /// Resolves when leadership is lost: no renewal succeeded within the renew deadline,
    /// or another replica holds the Lease. The caller must stop reconciling at once
    /// (exiting the process is simplest): another replica may lead soon.
    pub async fn lost(&self) {
        self.lost.cancelled().await;
    }

    /// Whether leadership is already lost.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Stops renewing and clears the Lease's holder so another replica takes over at once.
    /// Bounded by the renew deadline; on error the Lease simply expires.
    pub async fn release(self) -> Result<(), LeaderError> {
        let Leadership {
            candidate,
            lost,
            stop_renewing,
            renewal,
        } = self;
        stop_renewing.disarm().cancel();
        if let Err(error) = renewal.await {
            warn!(%error, "Lease renewal task ended abnormally");
        }
        candidate.publish(LeaderStatus::Ended);
        if lost.is_cancelled() {
            return Ok(());
        }
        let after = candidate.timing.renew_deadline;
        match tokio::time::timeout(after, candidate.release()).await {
            Ok(Ok(())) => {
                info!(
                    namespace = %candidate.namespace,
                    lease = %candidate.lease_name,
                    identity = %candidate.identity,
                    "released leadership"
                );
                Ok(())
            }
            Ok(Err(error)) => Err(error),
            Err(_) => Err(LeaderError::ReleaseTimedOut {
                namespace: candidate.namespace.clone(),
                name: candidate.lease_name.clone(),
                after,
            }),
        }
    }
}

/// Renews every retry period until `stop`, or until the renewal deadline passes or
/// another replica holds the Lease (then cancels `lost`).
async fn keep_renewing(
    candidate: Arc<Candidate>,
    acquired: Instant,
    stop: CancellationToken,
    lost: CancellationToken,
) {
    let timing = candidate.timing;
    let mut clock = RenewalClock::new(acquired);
    let lose = |reason: &str| {
        candidate.publish(LeaderStatus::Ended);
        error!(
            namespace = %candidate.namespace,
            lease = %candidate.lease_name,
            identity = %candidate.identity,
            reason,
            "lost leadership"
        );
        lost.cancel();
    };
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(clock.next_attempt(&timing)) => {}
        }
        let sent = Instant::now();
        if clock.overdue(&timing, sent) {
            lose("no renewal succeeded within the renew deadline");
            return;
        }
        if !clock.renew_due(&timing, sent) {
            continue;
        }
        clock.last_attempt = sent;
        let budget = clock.deadline(&timing).saturating_duration_since(sent);
        let outcome = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            outcome = tokio::time::timeout(budget, candidate.try_acquire_or_renew()) => outcome,
        };
        match outcome {
            Ok(Ok(Attempt::Leading { .. })) => {
                clock.last_renewal = sent;
                debug!(lease = %candidate.lease_name, "renewed the Lease");
            }
            Ok(Ok(Attempt::HeldBy { holder })) => {
                lose(&format!("the Lease is held by {holder}"));
                return;
            }
            Ok(Ok(Attempt::Contended)) => {
                debug!(lease = %candidate.lease_name, "Lease changed while renewing; retrying");
            }
            Ok(Err(error)) => warn!(%error, "cannot renew the Lease; retrying"),
            Err(_) => warn!(
                lease = %candidate.lease_name,
                "renewing the Lease timed out at the renew deadline"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "operator-a";
    const OTHER: &str = "operator-b";

    fn timing() -> LeaseTiming {
        LeaseTiming::default()
    }

    #[test]
    fn a_lease_without_a_holder_is_free() {
        let now = Instant::now();
        for holder in [None, Some("")] {
            assert_eq!(
                judge(holder, ME, now, Duration::from_secs(15), now),
                Claim::Free { previous: None }
            );
        }
    }

    #[test]
    fn our_own_lease_is_ours_even_when_expired() {
        let since = Instant::now();
        let later = since + Duration::from_secs(60);
        assert_eq!(
            judge(Some(ME), ME, since, Duration::from_secs(15), later),
            Claim::Ours
        );
    }

    #[test]
    fn another_holder_is_valid_until_the_lease_duration_after_we_saw_it_change() {
        let since = Instant::now();
        let duration = Duration::from_secs(15);
        assert_eq!(
            judge(
                Some(OTHER),
                ME,
                since,
                duration,
                since + Duration::from_secs(5)
            ),
            Claim::Other {
                holder: OTHER.into(),
                expires_in: Duration::from_secs(10)
            }
        );
        assert_eq!(
            judge(Some(OTHER), ME, since, duration, since + duration),
            Claim::Free {
                previous: Some(OTHER.into())
            }
        );
    }

    #[test]
    fn renewals_are_due_every_retry_period_and_never_after_the_deadline() {
        let timing = timing();
        let acquired = Instant::now();
        let mut clock = RenewalClock::new(acquired);
        assert!(!clock.renew_due(&timing, acquired + Duration::from_secs(1)));
        assert!(clock.renew_due(&timing, acquired + timing.retry_period));
        // Failed attempts push the next attempt but not the deadline.
        clock.last_attempt = acquired + Duration::from_secs(9);
        assert_eq!(
            clock.next_attempt(&timing),
            acquired + timing.renew_deadline
        );
        assert!(!clock.overdue(&timing, acquired + Duration::from_millis(9_999)));
        assert!(clock.overdue(&timing, acquired + timing.renew_deadline));
        // A success moves the deadline.
        clock.last_renewal = acquired + Duration::from_secs(9);
        assert!(!clock.overdue(&timing, acquired + timing.renew_deadline));
    }

    #[test]
    fn the_leader_gives_up_before_the_others_may_take_over() {
        let timing = timing();
        assert!(timing.validate().is_ok());
        let renewed = Instant::now();
        let clock = RenewalClock::new(renewed);
        // The others saw the renewal no earlier than it was sent.
        let takeover = judge(Some(ME), OTHER, renewed, timing.lease_duration, {
            clock.deadline(&timing)
        });
        assert!(matches!(takeover, Claim::Other { .. }), "{takeover:?}");
    }

    #[test]
    fn unworkable_timings_are_rejected() {
        let base = timing();
        for bad in [
            LeaseTiming {
                lease_duration: Duration::from_millis(1500),
                ..base
            },
            LeaseTiming {
                lease_duration: Duration::ZERO,
                ..base
            },
            LeaseTiming {
                renew_deadline: base.lease_duration,
                ..base
            },
            LeaseTiming {
                retry_period: base.renew_deadline,
                ..base
            },
            LeaseTiming {
                retry_period: Duration::ZERO,
                ..base
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(LeaderError::Timing { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn only_transient_api_errors_are_retried() {
        let api = |code: u16| LeaderError::Api {
            action: "read",
            namespace: "ns".into(),
            name: "lease".into(),
            source: Box::new(kube::Error::Api(Box::new(
                kube::core::Status::failure("x", "y").with_code(code),
            ))),
        };
        assert!(api(409).is_retryable());
        assert!(api(429).is_retryable());
        assert!(api(503).is_retryable());
        assert!(!api(403).is_retryable());
        assert!(!api(404).is_retryable());
    }

    #[test]
    fn the_identity_prefers_the_pod_name() {
        // Only reads the environment: POD_NAME is not set by `cargo test`.
        if std::env::var_os("POD_NAME").is_none() {
            let identity = default_identity();
            assert!(
                identity.ends_with(&format!("-{}", std::process::id())),
                "{identity}"
            );
        }
    }

    #[test]
    fn durations_parse_with_their_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        for bad in ["15", "s", "1.5s", "-1s", "10h", ""] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let period = Duration::from_secs(2);
        for _ in 0..100 {
            let j = jittered(period);
            assert!(j >= period && j <= period.mul_f64(1.2), "{j:?}");
        }
    }
}
