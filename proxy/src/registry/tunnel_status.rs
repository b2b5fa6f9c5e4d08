//! This replica's tunnels, reported on the `Connector` objects (cluster mode only).
//!
//! For every connector holding at least one routable tunnel to this replica, the
//! replica keeps one entry `{proxy: <replica>, since, renewedAt}` in the Connector's
//! `status.tunnels`, and refreshes `status.lastSeen` with it. `status.tunnels` is a
//! map-list keyed by `proxy` and every replica writes with server-side apply under a
//! field manager of its own ([`field_manager`]), so replicas never touch each other's
//! entries: applying without its entry removes exactly that entry.
//!
//! One task ([`report`]) does all the writing. It wakes when the set of connectors with
//! tunnels here changes, or when a write falls due, waits at least
//! [`ReportSettings::coalesce`] between passes (so a reconnect storm is written in
//! batches), and makes at most [`ReportSettings::max_writes_per_pass`] writes per pass,
//! [`ReportSettings::concurrency`] at a time: removals first, then new entries, then
//! heartbeats, oldest first. A failed write is logged and retried later; it never stops
//! the proxy. The operator judges the entries: one not renewed for its
//! `--tunnel-stale-after` no longer counts (a replica that crashed) and is removed.
//!
//! Each write also sets `lastSeen`, the field registration writes too; every write of a
//! replica carries it, so server-side apply never removes it when ownership moves between
//! replicas.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource};
use sallyport_api::Connector;
use sallyport_api::connector::TunnelStatus;
use sallyport_tunnel::pool::{TunnelInfo, TunnelPool};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often a replica renews its entries by default.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(20);

/// The least time between two passes of the writer.
pub const COALESCE: Duration = Duration::from_secs(1);

/// The most writes of one pass: with [`COALESCE`], about as many per second.
pub const MAX_WRITES_PER_PASS: usize = 50;

/// How many writes are in flight at once.
pub const CONCURRENCY: usize = 4;

/// How long a failed write waits at most before it is tried again.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// The start of every replica's field manager.
pub const FIELD_MANAGER_PREFIX: &str = "sallyport-proxy/";

/// The longest field manager the API server accepts.
const MAX_FIELD_MANAGER_LEN: usize = 128;

/// The field manager of `replica`'s tunnel entries: `sallyport-proxy/<replica>`, cut
/// to the 128 characters the API server allows.
pub fn field_manager(replica: &str) -> String {
    let mut manager = format!("{FIELD_MANAGER_PREFIX}{replica}");
    if manager.len() > MAX_FIELD_MANAGER_LEN {
        let mut end = MAX_FIELD_MANAGER_LEN;
        while !manager.is_char_boundary(end) {
            end -= 1;
        }
        manager.truncate(end);
    }
    manager
}

/// How the writer behaves.
#[derive(Debug, Clone)]
pub struct ReportSettings {
    /// This replica's name: the `proxy` of its entries.
    pub replica: String,
    /// How often an entry (and `lastSeen`) is renewed while its tunnels stay up.
    pub heartbeat: Duration,
    /// The least time between two passes: changes within it are written together.
    pub coalesce: Duration,
    /// The most writes of one pass; the rest wait for the next.
    pub max_writes_per_pass: usize,
    /// How many writes are in flight at once.
    pub concurrency: usize,
}

impl ReportSettings {
    /// The defaults for `replica`, renewing every `heartbeat`.
    pub fn new(replica: impl Into<String>, heartbeat: Duration) -> Self {
        Self {
            replica: replica.into(),
            heartbeat,
            coalesce: COALESCE,
            max_writes_per_pass: MAX_WRITES_PER_PASS,
            concurrency: CONCURRENCY,
        }
    }

    fn retry_delay(&self) -> Duration {
        self.heartbeat.min(MAX_RETRY_DELAY)
    }
}

/// A Connector object, by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnectorKey {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl std::fmt::Display for ConnectorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The connectors holding routable tunnels among `tunnels`, each with when its oldest
/// one began.
pub fn held(tunnels: &[TunnelInfo]) -> BTreeMap<ConnectorKey, SystemTime> {
    let mut held = BTreeMap::new();
    for tunnel in tunnels {
        let key = ConnectorKey {
            namespace: tunnel.identity.namespace().to_owned(),
            name: tunnel.identity.name().to_owned(),
        };
        held.entry(key)
            .and_modify(|since: &mut SystemTime| *since = (*since).min(tunnel.since))
            .or_insert(tunnel.since);
    }
    held
}

fn held_keys(tunnels: &[TunnelInfo]) -> BTreeSet<ConnectorKey> {
    held(tunnels).into_keys().collect()
}

/// One write to a Connector's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Write (or renew) this replica's entry.
    Entry {
        /// The Connector.
        key: ConnectorKey,
        /// Since when this replica has held a tunnel of it.
        since: SystemTime,
    },
    /// Remove this replica's entry: its last tunnel here closed.
    Remove {
        /// The Connector.
        key: ConnectorKey,
    },
}

impl Write {
    /// The Connector written.
    pub fn key(&self) -> &ConnectorKey {
        match self {
            Self::Entry { key, .. } | Self::Remove { key } => key,
        }
    }
}

/// What this replica has written for a connector.
#[derive(Debug, Clone, Copy)]
struct Written {
    since: SystemTime,
    renewed: Instant,
}

/// What the writer has written and what it must retry: decides the writes of a pass.
#[derive(Debug, Default)]
pub struct Ledger {
    written: HashMap<ConnectorKey, Written>,
    retry_at: HashMap<ConnectorKey, Instant>,
}

impl Ledger {
    /// The writes due at `now` for the connectors `held` here, at most `max`: removals
    /// first, then new entries, then renewals of entries older than `heartbeat`, oldest
    /// first. A write that failed waits until its retry time.
    pub fn due(
        &self,
        held: &BTreeMap<ConnectorKey, SystemTime>,
        now: Instant,
        heartbeat: Duration,
        max: usize,
    ) -> Vec<Write> {
        let waiting = |key: &ConnectorKey| self.retry_at.get(key).is_some_and(|at| *at > now);
        let mut removals: Vec<Write> = self
            .written
            .keys()
            .filter(|key| !held.contains_key(*key) && !waiting(key))
            .map(|key| Write::Remove { key: key.clone() })
            .collect();
        removals.sort_by(|a, b| a.key().cmp(b.key()));
        let mut new = Vec::new();
        let mut renewals = Vec::new();
        for (key, since) in held {
            if waiting(key) {
                continue;
            }
            match self.written.get(key) {
                None => new.push(Write::Entry {
                    key: key.clone(),
                    since: *since,
                }),
                Some(written) if now >= written.renewed + heartbeat => renewals.push((
                    written.renewed,
                    Write::Entry {
                        key: key.clone(),
                        // Held without a break since it was first written: keep that.
                        since: written.since,
                    },
                )),
                Some(_) => {}
            }
        }
        renewals.sort_by_key(|(renewed, _)| *renewed);
        removals
            .into_iter()
            .chain(new)
            .chain(renewals.into_iter().map(|(_, write)| write))
            .take(max)
            .collect()
    }

    /// When the next write falls due for the connectors `held` here (a renewal or a
    /// retry), or `None` when none will without a change of tunnels.
    pub fn next_due(
        &self,
        held: &BTreeMap<ConnectorKey, SystemTime>,
        heartbeat: Duration,
    ) -> Option<Instant> {
        let now = Instant::now();
        held.keys()
            .chain(self.written.keys().filter(|key| !held.contains_key(*key)))
            .map(
                |key| match (self.retry_at.get(key), self.written.get(key)) {
                    (Some(retry), _) => *retry,
                    (None, Some(written)) if held.contains_key(key) => written.renewed + heartbeat,
                    // A new entry or a removal.
                    (None, _) => now,
                },
            )
            .min()
    }

    /// Forgets the retries of connectors that need no write any more (their tunnels
    /// closed before their entry was first written).
    pub fn forget_settled(&mut self, held: &BTreeMap<ConnectorKey, SystemTime>) {
        let written = &self.written;
        self.retry_at
            .retain(|key, _| held.contains_key(key) || written.contains_key(key));
    }

    /// Records that `write` succeeded at `now`.
    pub fn succeeded(&mut self, write: &Write, now: Instant) {
        self.retry_at.remove(write.key());
        match write {
            Write::Entry { key, since } => {
                self.written.insert(
                    key.clone(),
                    Written {
                        since: *since,
                        renewed: now,
                    },
                );
            }
            Write::Remove { key } => {
                self.written.remove(key);
            }
        }
    }

    /// Records that `write` failed at `now`: it is tried again after `retry_after`.
    pub fn failed(&mut self, write: &Write, now: Instant, retry_after: Duration) {
        self.retry_at.insert(write.key().clone(), now + retry_after);
    }

    /// Every connector this replica has an entry on.
    pub fn written(&self) -> BTreeSet<ConnectorKey> {
        self.written.keys().cloned().collect()
    }
}

/// The server-side apply body of `write` by `replica` at `now`.
pub fn apply_body(write: &Write, replica: &str, now: Timestamp) -> Value {
    let mut status = json!({ "lastSeen": Time(now) });
    if let (Write::Entry { since, .. }, Some(fields)) = (write, status.as_object_mut()) {
        let since = Timestamp::try_from(*since).unwrap_or(now);
        let entry = TunnelStatus {
            proxy: replica.to_owned(),
            since: Time(since),
            renewed_at: Some(Time(now)),
        };
        fields.insert("tunnels".to_owned(), json!([entry]));
    }
    json!({
        "apiVersion": Connector::api_version(&()),
        "kind": Connector::kind(&()),
        "status": status,
    })
}

/// Why one write failed.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot write the tunnel entry of proxy replica {replica} on Connector {connector}: {source}"
)]
pub struct WriteError {
    /// The Connector.
    pub connector: ConnectorKey,
    /// This replica.
    pub replica: String,
    /// The API's error.
    #[source]
    pub source: kube::Error,
}

async fn apply(
    client: &Client,
    write: &Write,
    replica: &str,
    manager: &str,
) -> Result<(), WriteError> {
    let key = write.key();
    let api = Api::<Connector>::namespaced(client.clone(), &key.namespace);
    let body = apply_body(write, replica, Timestamp::now());
    let applied = api
        .patch_status(
            &key.name,
            &PatchParams::apply(manager).force(),
            &Patch::Apply(&body),
        )
        .await;
    match applied {
        Ok(_) => Ok(()),
        // Nothing left to remove an entry from.
        Err(kube::Error::Api(status))
            if status.code == 404 && matches!(write, Write::Remove { .. }) =>
        {
            Ok(())
        }
        Err(source) => Err(WriteError {
            connector: key.clone(),
            replica: replica.to_owned(),
            source,
        }),
    }
}

/// Runs `writes` (at most `concurrency` at once) and records their outcome in `ledger`.
async fn run_writes(
    client: &Client,
    settings: &ReportSettings,
    manager: &str,
    ledger: &mut Ledger,
    writes: Vec<Write>,
) {
    if writes.is_empty() {
        return;
    }
    let total = writes.len();
    let outcomes: Vec<(Write, Result<(), WriteError>)> = futures::stream::iter(writes)
        .map(|write| async move {
            let outcome = apply(client, &write, &settings.replica, manager).await;
            (write, outcome)
        })
        .buffer_unordered(settings.concurrency.max(1))
        .collect()
        .await;
    let now = Instant::now();
    let mut failed = 0usize;
    let mut first_error = None;
    for (write, outcome) in outcomes {
        match outcome {
            Ok(()) => {
                debug!(connector = %write.key(), replica = %settings.replica, removed = matches!(write, Write::Remove { .. }), "tunnel entry written");
                ledger.succeeded(&write, now);
            }
            Err(error) => {
                debug!(%error, "tunnel entry not written");
                failed += 1;
                first_error.get_or_insert(error);
                ledger.failed(&write, now, settings.retry_delay());
            }
        }
    }
    if let Some(error) = first_error {
        warn!(
            failed,
            writes = total,
            connector = %error.connector,
            replica = %settings.replica,
            error = %error.source,
            retry_in = ?settings.retry_delay(),
            "cannot report tunnels on Connector status; retrying"
        );
    }
}

/// Keeps this replica's entries in the Connectors' `status.tunnels` in line with the
/// tunnels in `pool` until `stop`; then removes every entry it wrote and returns.
/// Cancel `stop` once the pool is closed (the tunnels are gone) and bound the wait.
pub async fn report(
    client: Client,
    pool: TunnelPool,
    settings: ReportSettings,
    stop: CancellationToken,
) {
    let manager = field_manager(&settings.replica);
    info!(replica = %settings.replica, heartbeat = ?settings.heartbeat, field_manager = %manager, "reporting tunnels on Connector status");
    let mut ledger = Ledger::default();
    let mut observed = BTreeSet::new();
    let mut last_pass: Option<Instant> = None;
    loop {
        let wake = ledger.next_due(&held(&pool.snapshot()), settings.heartbeat);
        let until_due = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = pool.wait_for(|tunnels| held_keys(tunnels) != observed) => {}
            () = until_due => {}
            () = stop.cancelled() => break,
        }
        if let Some(last) = last_pass {
            tokio::select! {
                () = tokio::time::sleep_until(last + settings.coalesce) => {}
                () = stop.cancelled() => break,
            }
        }
        let now = Instant::now();
        last_pass = Some(now);
        let held = held(&pool.snapshot());
        observed = held.keys().cloned().collect();
        ledger.forget_settled(&held);
        let writes = ledger.due(&held, now, settings.heartbeat, settings.max_writes_per_pass);
        run_writes(&client, &settings, &manager, &mut ledger, writes).await;
    }
    // Stopping: the tunnels are closed, so every entry goes.
    let removals: Vec<Write> = ledger
        .written()
        .into_iter()
        .map(|key| Write::Remove { key })
        .collect();
    let count = removals.len();
    run_writes(&client, &settings, &manager, &mut ledger, removals).await;
    info!(replica = %settings.replica, entries = count, left = ledger.written().len(), "removed this replica's tunnel entries");
}

#[cfg(test)]
mod tests {
    use sallyport_tunnel::ConnectorIdentity;

    use super::*;

    fn key(name: &str) -> ConnectorKey {
        ConnectorKey {
            namespace: "infra".to_owned(),
            name: name.to_owned(),
        }
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
    }

    fn tunnel(id: u64, name: &str, since: SystemTime) -> TunnelInfo {
        TunnelInfo {
            id,
            identity: ConnectorIdentity::new("infra", "east", name)
                .unwrap_or_else(|e| panic!("identity: {e}")),
            replica: "proxy-a".to_owned(),
            since,
            outstanding: 0,
            bulk: 0,
            connector_version: String::new(),
            config_version: String::new(),
        }
    }

    const HEARTBEAT: Duration = Duration::from_secs(20);

    #[test]
    fn each_connector_counts_once_from_its_oldest_tunnel() {
        let held = held(&[
            tunnel(1, "c1", at(10)),
            tunnel(2, "c1", at(5)),
            tunnel(3, "c2", at(7)),
        ]);
        assert_eq!(
            held.into_iter().collect::<Vec<_>>(),
            [(key("c1"), at(5)), (key("c2"), at(7))]
        );
    }

    #[test]
    fn new_entries_then_renewals_at_the_heartbeat_then_removal() {
        let start = Instant::now();
        let mut ledger = Ledger::default();
        let mut held = BTreeMap::from([(key("c1"), at(5))]);
        let writes = ledger.due(&held, start, HEARTBEAT, 50);
        assert_eq!(
            writes,
            [Write::Entry {
                key: key("c1"),
                since: at(5)
            }]
        );
        ledger.succeeded(&writes[0], start);
        assert!(
            ledger
                .due(&held, start + HEARTBEAT / 2, HEARTBEAT, 50)
                .is_empty()
        );
        assert_eq!(ledger.next_due(&held, HEARTBEAT), Some(start + HEARTBEAT));

        // The oldest tunnel was replaced by a newer one in between: `since` stays.
        held.insert(key("c1"), at(9));
        let renewal = ledger.due(&held, start + HEARTBEAT, HEARTBEAT, 50);
        assert_eq!(
            renewal,
            [Write::Entry {
                key: key("c1"),
                since: at(5)
            }]
        );

        held.clear();
        let removal = ledger.due(&held, start + HEARTBEAT / 2, HEARTBEAT, 50);
        assert_eq!(removal, [Write::Remove { key: key("c1") }]);
        ledger.succeeded(&removal[0], start + HEARTBEAT / 2);
        assert!(ledger.written().is_empty());
        assert_eq!(ledger.next_due(&held, HEARTBEAT), None);
    }

    #[test]
    fn a_pass_is_bounded_with_removals_first_and_oldest_renewals_next() {
        let start = Instant::now();
        let mut ledger = Ledger::default();
        for (name, written) in [("gone", 0), ("old", 1), ("older", 0), ("fresh", 30)] {
            let write = Write::Entry {
                key: key(name),
                since: at(0),
            };
            ledger.succeeded(&write, start + Duration::from_secs(written));
        }
        let held = BTreeMap::from([
            (key("old"), at(0)),
            (key("older"), at(0)),
            (key("fresh"), at(0)),
            (key("new"), at(0)),
        ]);
        let now = start + HEARTBEAT + Duration::from_secs(2);
        let all = ledger.due(&held, now, HEARTBEAT, 50);
        let names: Vec<(&str, bool)> = all
            .iter()
            .map(|w| (w.key().name.as_str(), matches!(w, Write::Remove { .. })))
            .collect();
        assert_eq!(
            names,
            [
                ("gone", true),
                ("new", false),
                ("older", false),
                ("old", false)
            ]
        );
        assert_eq!(ledger.due(&held, now, HEARTBEAT, 2).len(), 2);
    }

    #[test]
    fn a_failed_write_waits_for_its_retry() {
        let start = Instant::now();
        let mut ledger = Ledger::default();
        let held = BTreeMap::from([(key("c1"), at(0))]);
        let write = Write::Entry {
            key: key("c1"),
            since: at(0),
        };
        ledger.failed(&write, start, Duration::from_secs(5));
        assert!(
            ledger
                .due(&held, start + Duration::from_secs(1), HEARTBEAT, 50)
                .is_empty()
        );
        assert_eq!(
            ledger.next_due(&held, HEARTBEAT),
            Some(start + Duration::from_secs(5))
        );
        assert_eq!(
            ledger.due(&held, start + Duration::from_secs(5), HEARTBEAT, 50),
            [write]
        );
    }

    #[test]
    fn the_apply_body_holds_this_replica_s_entry_or_none() {
        let now = Timestamp::from_second(1_800_000_100).unwrap_or_else(|e| panic!("{e}"));
        let entry = Write::Entry {
            key: key("c1"),
            since: at(0),
        };
        assert_eq!(
            apply_body(&entry, "proxy-a", now),
            json!({
                "apiVersion": "sallyport.dev/v1alpha1",
                "kind": "Connector",
                "status": {
                    "lastSeen": "2027-01-15T08:01:40Z",
                    "tunnels": [{
                        "proxy": "proxy-a",
                        "since": "2027-01-15T08:00:00Z",
                        "renewedAt": "2027-01-15T08:01:40Z",
                    }],
                },
            })
        );
        let removal = Write::Remove { key: key("c1") };
        assert_eq!(
            apply_body(&removal, "proxy-a", now)["status"],
            json!({"lastSeen": "2027-01-15T08:01:40Z"})
        );
    }

    #[test]
    fn field_managers_name_the_replica_within_the_limit() {
        assert_eq!(field_manager("proxy-a"), "sallyport-proxy/proxy-a");
        let long = field_manager(&"é".repeat(100));
        assert!(long.len() <= 128 && long.starts_with(FIELD_MANAGER_PREFIX));
    }
}
