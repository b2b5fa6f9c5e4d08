//! The Connector controller: sets the `Connected` condition from the tunnel entries the
//! proxy replicas keep in `status.tunnels` (removing entries no longer renewed), removes
//! connectors unseen for their group's `inactiveConnectorTTL`, and records every deleted
//! connector in the revocation list the fleet configuration carries, so its certificate
//! is refused from then on.
//!
//! Each proxy replica renews its entry on every Connector it holds a tunnel of (its
//! heartbeat, 20 s by default) and removes it when its last tunnel of the connector
//! closes. An entry whose `renewedAt` is older than `--tunnel-stale-after` (60 s by
//! default, three heartbeats) belongs to a replica that is gone without removing it (a
//! crash, a lost API server): it no longer counts and is removed. The reconcile comes
//! back when the next live entry would go stale, so that happens without any event.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use sallyport_api::connector::TunnelStatus;
use sallyport_api::{Connector, ConnectorGroup, Duration as KubeDuration};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{debug, info};

use crate::conditions::{Verdict, merge, transitions};
use crate::context::{Context, FIELD_MANAGER};
use crate::error::Error;
use crate::reconcile::{publish, retry_after_failure, transition_event};

/// The finalizer that makes sure a deleted connector is revoked.
pub const FINALIZER: &str = "sallyport.dev/revoke-connector";
/// The ConfigMap, in the operator's namespace, listing revoked connectors.
pub const REVOCATIONS: &str = "sallyport-revoked-connectors";
/// How long a connector may stay unseen when its group is gone (the API default).
const DEFAULT_INACTIVE_TTL: Duration = Duration::from_secs(240 * 3600);
/// The condition telling whether a connector holds tunnels to the fleet.
pub const CONNECTED: &str = "Connected";
/// The condition telling whether a connector runs the version its group wants.
pub const UP_TO_DATE: &str = "UpToDate";
/// How long a tunnel entry counts after its last renewal, by default: three of the
/// proxies' default heartbeats (20 s).
pub const DEFAULT_TUNNEL_STALE_AFTER: Duration = Duration::from_secs(60);

/// One revoked connector, as the revocation list records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocation {
    /// The connector's namespace.
    pub namespace: String,
    /// The connector's name (its id).
    pub name: String,
    /// Serial of its last certificate, hexadecimal, when known.
    pub serial: Option<String>,
    /// When that certificate expires; the entry can be dropped after it.
    pub not_after: Option<Timestamp>,
    /// When the connector was revoked.
    pub revoked_at: Timestamp,
}

impl Revocation {
    /// The revocation of `connector`, now.
    pub fn of(connector: &Connector, now: Timestamp) -> Self {
        let certificate = connector
            .status
            .as_ref()
            .and_then(|s| s.certificate.as_ref());
        Self {
            namespace: connector.namespace().unwrap_or_default(),
            name: connector.name_any(),
            serial: certificate.map(|c| c.serial.clone()),
            not_after: certificate.map(|c| c.not_after.0),
            revoked_at: now,
        }
    }

    /// The ConfigMap key of this entry: `<namespace>.<name>`.
    pub fn key(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }
}

/// When `connector` was last heard of: its `status.lastSeen`, else its creation.
pub fn last_seen(connector: &Connector) -> Option<Timestamp> {
    connector
        .status
        .as_ref()
        .and_then(|s| s.last_seen.as_ref())
        .or(connector.metadata.creation_timestamp.as_ref())
        .map(|t| t.0)
}

/// How long a connector last seen at `seen` may still stay unseen before it is removed;
/// `None` once it is due.
pub fn time_left(seen: Option<Timestamp>, ttl: Duration, now: Timestamp) -> Option<Duration> {
    let seen = seen?;
    let due = seen.checked_add(SignedDuration::try_from(ttl).ok()?).ok()?;
    now.duration_until(due)
        .try_into()
        .ok()
        .filter(|left: &Duration| !left.is_zero())
}

/// A tunnel entry that is no longer renewed.
#[derive(Debug, Clone, PartialEq)]
pub struct StaleEntry {
    /// The proxy replica that wrote it.
    pub proxy: String,
    /// Its last heartbeat (`renewedAt`, else `since`).
    pub heartbeat: Timestamp,
}

/// What a Connector's tunnel entries say at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Connectivity {
    /// The `Connected` condition.
    pub verdict: Verdict,
    /// The entries still renewed, as they are.
    pub live: Vec<TunnelStatus>,
    /// The entries no longer renewed: to remove.
    pub stale: Vec<StaleEntry>,
    /// When the first live entry goes stale unless renewed.
    pub next_deadline: Option<Timestamp>,
    /// The latest heartbeat of a live entry: the connector was seen then.
    pub freshest: Option<Timestamp>,
}

impl Connectivity {
    /// Whether some proxy replica holds a tunnel of the connector.
    pub fn connected(&self) -> bool {
        self.verdict.status
    }
}

/// The last heartbeat of `entry`: `renewedAt`, else `since`.
pub fn heartbeat(entry: &TunnelStatus) -> Timestamp {
    entry.renewed_at.as_ref().unwrap_or(&entry.since).0
}

/// Judges the tunnel entries of `connector` at `now`: those renewed within `stale_after`
/// count, the others are stale. `Connected` is True (`TunnelsUp`, naming the replicas)
/// with a live entry, else False: `Stale` when entries lapsed (also kept, once they are
/// removed, until a tunnel is up again), `NoTunnels` when the replicas removed them.
pub fn connectivity(connector: &Connector, stale_after: Duration, now: Timestamp) -> Connectivity {
    let status = connector.status.as_ref();
    let entries = status.map_or(&[][..], |s| s.tunnels.as_slice());
    let stale_after = SignedDuration::try_from(stale_after).unwrap_or(SignedDuration::MAX);
    let deadline = |entry: &TunnelStatus| heartbeat(entry).checked_add(stale_after).ok();
    let (live, lapsed): (Vec<&TunnelStatus>, Vec<&TunnelStatus>) = entries
        .iter()
        .partition(|entry| deadline(entry).is_none_or(|due| due > now));
    let names = |entries: &[&TunnelStatus]| {
        let mut names: Vec<&str> = entries.iter().map(|e| e.proxy.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names.join(", ")
    };
    let seconds = stale_after.as_secs();
    let verdict = if !live.is_empty() {
        Verdict::ok(
            CONNECTED,
            "TunnelsUp",
            format!("tunnels to proxy replica(s) {}", names(&live)),
        )
    } else if !lapsed.is_empty() {
        Verdict::failed(
            CONNECTED,
            "Stale",
            format!(
                "proxy replica(s) {} stopped renewing their tunnel entries for over {seconds}s (gone without removing them?); no proxy replica reports a tunnel",
                names(&lapsed)
            ),
        )
    } else {
        let previous = status
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONNECTED))
            .filter(|c| c.status == "False" && c.reason == "Stale");
        match previous {
            // The lapsed entries are gone now; say why the connector is disconnected.
            Some(previous) => Verdict::failed(CONNECTED, "Stale", previous.message.clone()),
            None => Verdict::failed(
                CONNECTED,
                "NoTunnels",
                "no proxy replica holds a tunnel of the connector",
            ),
        }
    };
    Connectivity {
        verdict,
        live: live.iter().map(|e| (*e).clone()).collect(),
        stale: lapsed
            .iter()
            .map(|e| StaleEntry {
                proxy: e.proxy.clone(),
                heartbeat: heartbeat(e),
            })
            .collect(),
        next_deadline: live.iter().filter_map(|e| deadline(e)).min(),
        freshest: live.iter().map(|e| heartbeat(e)).max(),
    }
}

/// Reconciles one Connector: expiry while it lives, revocation when it is deleted.
pub async fn reconcile(connector: Arc<Connector>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started("Connector");
    let namespace = connector.namespace().unwrap_or_default();
    let api = Api::<Connector>::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, connector, |event| async {
        match event {
            Finalizer::Apply(connector) => maintain(&connector, &ctx).await,
            Finalizer::Cleanup(connector) => revoke(&connector, &ctx).await,
        }
    })
    .await
    .map_err(|error| Error::Finalizer(Box::new(error)))
}

/// The `Connected` condition and the tunnel entries, then expiry.
async fn maintain(connector: &Connector, ctx: &Context) -> Result<Action, Error> {
    let now = Timestamp::now();
    let connectivity = connectivity(connector, ctx.config.tunnel_stale_after, now);
    remove_stale_entries(connector, &connectivity, ctx).await?;
    let verdicts: Vec<Verdict> = std::iter::once(connectivity.verdict.clone())
        .chain(up_to_date(connector))
        .collect();
    write_conditions(connector, &verdicts, ctx, now).await?;
    // Back when the first live entry would lapse unless renewed (a crashed replica).
    let until_stale = connectivity
        .next_deadline
        .and_then(|due| now.duration_until(due).try_into().ok())
        .map(|left: Duration| left + Duration::from_millis(500));
    Ok(
        match expire_if_inactive(connector, &connectivity, ctx).await? {
            Some(left) => Action::requeue(until_stale.map_or(left, |stale| stale.min(left))),
            None => Action::await_change(),
        },
    )
}

/// Removes the entries no proxy replica renews any more, with a merge patch that holds
/// only if the Connector did not change since it was read (409 otherwise: a newer
/// version is on its way to the next reconcile).
async fn remove_stale_entries(
    connector: &Connector,
    connectivity: &Connectivity,
    ctx: &Context,
) -> Result<(), Error> {
    if connectivity.stale.is_empty() {
        return Ok(());
    }
    let namespace = connector.namespace().unwrap_or_default();
    let name = connector.name_any();
    let patch = json!({
        "metadata": {"resourceVersion": connector.resource_version()},
        "status": {"tunnels": connectivity.live},
    });
    let removed = Api::<Connector>::namespaced(ctx.client.clone(), &namespace)
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await;
    let replicas: Vec<&str> = connectivity
        .stale
        .iter()
        .map(|e| e.proxy.as_str())
        .collect();
    match removed {
        Ok(_) => {
            info!(%namespace, %name, ?replicas, "removed tunnel entries no proxy replica renews any more");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            debug!(%namespace, %name, ?replicas, "the Connector changed meanwhile; stale tunnel entries are removed on its next reconcile");
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

/// The `UpToDate` condition of a connector that reported both the version it runs and
/// the one its configuration asks for (`None` until it has).
pub fn up_to_date(connector: &Connector) -> Option<Verdict> {
    let status = connector.status.as_ref()?;
    let (running, desired) = (
        status.version.as_deref()?,
        status.desired_version.as_deref()?,
    );
    Some(if running == desired {
        Verdict::ok(
            UP_TO_DATE,
            "DesiredVersion",
            format!("runs {desired}, the version its group wants"),
        )
    } else {
        Verdict::failed(
            UP_TO_DATE,
            "UpdateAvailable",
            format!(
                "runs {running}; its group {} wants {desired}",
                connector.spec.connector_group
            ),
        )
    })
}

/// Writes the `Connected` (and `UpToDate`) conditions when they changed, with an Event
/// when an existing condition changes status or reason.
async fn write_conditions(
    connector: &Connector,
    verdicts: &[Verdict],
    ctx: &Context,
    now: Timestamp,
) -> Result<(), Error> {
    let existing: &[Condition] = connector
        .status
        .as_ref()
        .map_or(&[], |s| s.conditions.as_slice());
    let conditions = merge(existing, verdicts, None, now);
    if conditions == existing {
        return Ok(());
    }
    let namespace = connector.namespace().unwrap_or_default();
    let name = connector.name_any();
    let patch = json!({
        "apiVersion": Connector::api_version(&()),
        "kind": Connector::kind(&()),
        "status": {"conditions": conditions},
    });
    Api::<Connector>::namespaced(ctx.client.clone(), &namespace)
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    for verdict in transitions(existing, verdicts) {
        info!(%namespace, %name, condition = verdict.type_, status = verdict.status, reason = verdict.reason, message = %verdict.message, "condition updated");
        // A new connector's first conditions are no news.
        if existing.iter().any(|c| c.type_ == verdict.type_) {
            publish(
                ctx,
                &connector.object_ref(&()),
                transition_event("Connector", verdict),
            )
            .await;
        }
    }
    Ok(())
}

/// Deletes `connector` when unseen for its group's `inactiveConnectorTTL` (`None`);
/// otherwise how long it may still stay unseen.
async fn expire_if_inactive(
    connector: &Connector,
    connectivity: &Connectivity,
    ctx: &Context,
) -> Result<Option<Duration>, Error> {
    let namespace = connector.namespace().unwrap_or_default();
    let group = Api::<ConnectorGroup>::namespaced(ctx.client.clone(), &namespace)
        .get_opt(&connector.spec.connector_group)
        .await?;
    let ttl = group
        .as_ref()
        .and_then(|g| KubeDuration::to_std(&g.spec.inactive_connector_ttl).ok())
        .unwrap_or(DEFAULT_INACTIVE_TTL);
    let seen = last_seen(connector).max(connectivity.freshest);
    if let Some(left) = time_left(seen, ttl, Timestamp::now()) {
        return Ok(Some(left + Duration::from_millis(100)));
    }
    if connectivity.connected() {
        // A connected connector is seen, whatever its lastSeen says.
        return Ok(Some(ttl));
    }
    let name = connector.name_any();
    info!(%namespace, %name, ?ttl, "removing a connector unseen for its group's inactiveConnectorTTL");
    Api::<Connector>::namespaced(ctx.client.clone(), &namespace)
        .delete(&name, &DeleteParams::default())
        .await?;
    sallyport_events::audit(
        sallyport_events::AuditEvent::new(
            "connector.deleted",
            sallyport_events::ObjectRef::namespaced("Connector", &namespace, &name),
            sallyport_events::Outcome::Success,
        )
        .reason("ConnectorExpired")
        .message(format!(
            "removed Connector {namespace}/{name}: unseen for more than its group's inactiveConnectorTTL"
        ))
        .detail("group", &connector.spec.connector_group)
        .detail("inactiveConnectorTTLSeconds", ttl.as_secs()),
    );
    if let Some(group) = group {
        let event = Event {
            type_: EventType::Normal,
            reason: "ConnectorExpired".to_owned(),
            note: Some(format!(
                "removed Connector {name}: unseen for more than inactiveConnectorTTL"
            )),
            action: "RemoveConnector".to_owned(),
            secondary: Some(connector.object_ref(&())),
        };
        publish(ctx, &group.object_ref(&()), event).await;
    }
    Ok(None)
}

/// Adds `connector` to the revocation list and drops entries whose certificates expired.
async fn revoke(connector: &Connector, ctx: &Context) -> Result<Action, Error> {
    let now = Timestamp::now();
    let revocation = Revocation::of(connector, now);
    let api = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ctx.config.operator_namespace);
    let existing = match api.get_opt(REVOCATIONS).await? {
        Some(existing) => existing,
        None => {
            let empty = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(REVOCATIONS.to_owned()),
                    ..ObjectMeta::default()
                },
                ..ConfigMap::default()
            };
            match api.create(&PostParams::default(), &empty).await {
                Ok(created) => created,
                Err(kube::Error::Api(status)) if status.code == 409 => api.get(REVOCATIONS).await?,
                Err(error) => return Err(error.into()),
            }
        }
    };
    let mut changes: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (key, value) in existing.data.iter().flatten() {
        let expired = serde_json::from_str::<Revocation>(value)
            .is_ok_and(|r| r.not_after.is_some_and(|t| t < now));
        if expired {
            changes.insert(key.clone(), None);
        }
    }
    let entry = serde_json::to_string(&revocation).map_err(|source| Error::Serialize {
        what: "a revocation",
        source,
    })?;
    changes.insert(revocation.key(), Some(entry));
    api.patch(
        REVOCATIONS,
        &PatchParams::default(),
        &Patch::Merge(&json!({ "data": changes })),
    )
    .await?;
    info!(namespace = %revocation.namespace, name = %revocation.name, serial = ?revocation.serial, "connector revoked");
    sallyport_events::audit(
        sallyport_events::AuditEvent::new(
            "connector.revoked",
            sallyport_events::ObjectRef::namespaced(
                "Connector",
                &revocation.namespace,
                &revocation.name,
            ),
            sallyport_events::Outcome::Success,
        )
        .reason("ConnectorDeleted")
        .message(format!(
            "Connector {}/{} was deleted: its certificate is revoked and its tunnels are closed",
            revocation.namespace, revocation.name
        ))
        .detail("group", &connector.spec.connector_group)
        .detail("serial", &revocation.serial)
        .detail("notAfter", revocation.not_after)
        .detail("revocations", REVOCATIONS),
    );
    Ok(Action::await_change())
}

/// Retries a failed reconcile after a short pause.
pub fn error_policy(connector: Arc<Connector>, error: &Error, ctx: Arc<Context>) -> Action {
    retry_after_failure("Connector", connector.as_ref(), error, &ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connector(status: &str) -> Connector {
        let yaml = format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: Connector\nmetadata: {{name: c1, namespace: ops, creationTimestamp: '2026-01-01T00:00:00Z'}}\nspec: {{connectorGroup: dc}}\nstatus: {status}\n"
        );
        serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_connector_is_due_once_unseen_for_the_ttl() {
        let seen = connector("{lastSeen: '2026-01-02T00:00:00Z'}");
        let day = Duration::from_secs(86400);
        assert_eq!(
            time_left(last_seen(&seen), day, at("2026-01-02T12:00:00Z")),
            Some(Duration::from_secs(43200))
        );
        assert_eq!(
            time_left(last_seen(&seen), day, at("2026-01-03T00:00:00Z")),
            None
        );
        // Never seen: counted from its creation.
        let never = connector("{}");
        assert_eq!(
            time_left(last_seen(&never), day, at("2026-01-01T23:00:00Z")),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            time_left(last_seen(&never), day, at("2026-01-02T00:00:01Z")),
            None
        );
    }

    const STALE_AFTER: Duration = Duration::from_secs(60);

    fn judged(status: &str, now: &str) -> Connectivity {
        connectivity(&connector(status), STALE_AFTER, at(now))
    }

    #[test]
    fn fresh_entries_make_a_connector_connected() {
        let fresh = judged(
            "{tunnels: [{proxy: b, since: '2026-01-01T00:00:00Z', renewedAt: '2026-01-01T01:00:10Z'}, {proxy: a, since: '2026-01-01T00:00:00Z', renewedAt: '2026-01-01T01:00:00Z'}]}",
            "2026-01-01T01:00:30Z",
        );
        assert_eq!(
            fresh.verdict,
            Verdict::ok(CONNECTED, "TunnelsUp", "tunnels to proxy replica(s) a, b")
        );
        assert!(fresh.connected() && fresh.stale.is_empty());
        assert_eq!(fresh.live.len(), 2);
        // Back when a's entry would lapse; seen at b's heartbeat.
        assert_eq!(fresh.next_deadline, Some(at("2026-01-01T01:01:00Z")));
        assert_eq!(fresh.freshest, Some(at("2026-01-01T01:00:10Z")));
    }

    #[test]
    fn an_entry_without_renewal_counts_from_its_start() {
        let young = judged(
            "{tunnels: [{proxy: a, since: '2026-01-01T01:00:00Z'}]}",
            "2026-01-01T01:00:59Z",
        );
        assert!(young.connected());
        let old = judged(
            "{tunnels: [{proxy: a, since: '2026-01-01T01:00:00Z'}]}",
            "2026-01-01T01:01:00Z",
        );
        assert!(!old.connected());
    }

    #[test]
    fn stale_entries_do_not_count_and_are_removed() {
        let stale = judged(
            "{tunnels: [{proxy: a, since: '2026-01-01T00:00:00Z', renewedAt: '2026-01-01T01:00:00Z'}]}",
            "2026-01-01T01:01:00Z",
        );
        assert!(!stale.connected());
        assert_eq!(stale.verdict.reason, "Stale");
        assert!(
            stale.verdict.message.contains("proxy replica(s) a "),
            "{}",
            stale.verdict.message
        );
        assert_eq!(
            stale.stale,
            [StaleEntry {
                proxy: "a".to_owned(),
                heartbeat: at("2026-01-01T01:00:00Z")
            }]
        );
        assert!(stale.live.is_empty());
        assert_eq!((stale.next_deadline, stale.freshest), (None, None));
    }

    #[test]
    fn mixed_replicas_keep_the_live_entries_only() {
        let mixed = judged(
            "{tunnels: [{proxy: crashed, since: '2026-01-01T00:00:00Z', renewedAt: '2026-01-01T00:30:00Z'}, {proxy: alive, since: '2026-01-01T00:00:00Z', renewedAt: '2026-01-01T01:00:20Z'}]}",
            "2026-01-01T01:00:30Z",
        );
        assert_eq!(
            mixed.verdict,
            Verdict::ok(CONNECTED, "TunnelsUp", "tunnels to proxy replica(s) alive")
        );
        assert_eq!(
            mixed
                .live
                .iter()
                .map(|e| e.proxy.as_str())
                .collect::<Vec<_>>(),
            ["alive"]
        );
        assert_eq!(
            mixed
                .stale
                .iter()
                .map(|e| e.proxy.as_str())
                .collect::<Vec<_>>(),
            ["crashed"]
        );
    }

    #[test]
    fn without_entries_a_connector_has_no_tunnels_unless_they_lapsed() {
        let none = judged("{}", "2026-01-01T01:00:00Z");
        assert_eq!(
            none.verdict,
            Verdict::failed(
                CONNECTED,
                "NoTunnels",
                "no proxy replica holds a tunnel of the connector"
            )
        );
        assert_eq!((none.next_deadline, none.freshest), (None, None));
        // Cleanly removed after being connected: NoTunnels.
        let removed = judged(
            "{conditions: [{type: Connected, status: 'True', reason: TunnelsUp, message: m, lastTransitionTime: '2026-01-01T00:00:00Z'}]}",
            "2026-01-01T01:00:00Z",
        );
        assert_eq!(removed.verdict.reason, "NoTunnels");
        // Lapsed and then removed by the operator: still Stale, with the same message.
        let lapsed = judged(
            "{conditions: [{type: Connected, status: 'False', reason: Stale, message: 'proxy replica(s) a stopped', lastTransitionTime: '2026-01-01T00:00:00Z'}]}",
            "2026-01-01T01:00:00Z",
        );
        assert_eq!(
            lapsed.verdict,
            Verdict::failed(CONNECTED, "Stale", "proxy replica(s) a stopped")
        );
    }

    #[test]
    fn a_connected_connector_is_seen_at_its_freshest_heartbeat() {
        let seen = connector(
            "{lastSeen: '2026-01-01T00:00:00Z', tunnels: [{proxy: a, since: '2026-01-01T00:00:00Z', renewedAt: '2026-01-02T00:00:00Z'}]}",
        );
        let now = at("2026-01-02T00:00:30Z");
        let freshest = connectivity(&seen, STALE_AFTER, now).freshest;
        let day = Duration::from_secs(86400);
        assert_eq!(time_left(last_seen(&seen), day, now), None);
        assert_eq!(
            time_left(last_seen(&seen).max(freshest), day, now),
            Some(Duration::from_secs(86370))
        );
    }

    #[test]
    fn a_revocation_records_the_certificate() {
        let revoked = connector(
            "{certificate: {serial: 0a1b, issuedAt: '2026-01-01T00:00:00Z', notAfter: '2027-01-01T00:00:00Z'}}",
        );
        let revocation = Revocation::of(&revoked, at("2026-06-01T00:00:00Z"));
        assert_eq!(revocation.key(), "ops.c1");
        assert_eq!(revocation.serial.as_deref(), Some("0a1b"));
        assert_eq!(revocation.not_after, Some(at("2027-01-01T00:00:00Z")));
    }
}
