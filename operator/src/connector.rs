//! The Connector controller: removes connectors unseen for their group's
//! `inactiveConnectorTTL`, and records every deleted connector in the revocation list the
//! fleet configuration carries, so its certificate is refused from then on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use sallyport_api::{Connector, ConnectorGroup, Duration as KubeDuration};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::info;

use crate::context::Context;
use crate::error::Error;
use crate::reconcile::{publish, retry_after_failure};

/// The finalizer that makes sure a deleted connector is revoked.
pub const FINALIZER: &str = "sallyport.dev/revoke-connector";
/// The ConfigMap, in the operator's namespace, listing revoked connectors.
pub const REVOCATIONS: &str = "sallyport-revoked-connectors";
/// How long a connector may stay unseen when its group is gone (the API default).
const DEFAULT_INACTIVE_TTL: Duration = Duration::from_secs(240 * 3600);

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

/// How long `connector` may still stay unseen before it is removed; `None` once it is due.
pub fn time_left(connector: &Connector, ttl: Duration, now: Timestamp) -> Option<Duration> {
    let seen = last_seen(connector)?;
    let due = seen.checked_add(SignedDuration::try_from(ttl).ok()?).ok()?;
    now.duration_until(due)
        .try_into()
        .ok()
        .filter(|left: &Duration| !left.is_zero())
}

/// Reconciles one Connector: expiry while it lives, revocation when it is deleted.
pub async fn reconcile(connector: Arc<Connector>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started("Connector");
    let namespace = connector.namespace().unwrap_or_default();
    let api = Api::<Connector>::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, connector, |event| async {
        match event {
            Finalizer::Apply(connector) => expire_if_inactive(&connector, &ctx).await,
            Finalizer::Cleanup(connector) => revoke(&connector, &ctx).await,
        }
    })
    .await
    .map_err(|error| Error::Finalizer(Box::new(error)))
}

async fn expire_if_inactive(connector: &Connector, ctx: &Context) -> Result<Action, Error> {
    let namespace = connector.namespace().unwrap_or_default();
    let group = Api::<ConnectorGroup>::namespaced(ctx.client.clone(), &namespace)
        .get_opt(&connector.spec.connector_group)
        .await?;
    let ttl = group
        .as_ref()
        .and_then(|g| KubeDuration::to_std(&g.spec.inactive_connector_ttl).ok())
        .unwrap_or(DEFAULT_INACTIVE_TTL);
    if let Some(left) = time_left(connector, ttl, Timestamp::now()) {
        return Ok(Action::requeue(left + Duration::from_millis(100)));
    }
    let name = connector.name_any();
    info!(%namespace, %name, ?ttl, "removing a connector unseen for its group's inactiveConnectorTTL");
    Api::<Connector>::namespaced(ctx.client.clone(), &namespace)
        .delete(&name, &DeleteParams::default())
        .await?;
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
    Ok(Action::await_change())
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
            time_left(&seen, day, at("2026-01-02T12:00:00Z")),
            Some(Duration::from_secs(43200))
        );
        assert_eq!(time_left(&seen, day, at("2026-01-03T00:00:00Z")), None);
        // Never seen: counted from its creation.
        let never = connector("{}");
        assert_eq!(
            time_left(&never, day, at("2026-01-01T23:00:00Z")),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(time_left(&never, day, at("2026-01-02T00:00:01Z")), None);
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
