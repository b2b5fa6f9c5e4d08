//! The ConnectorGroup controller: the registration token Secret (minted, rotated at
//! `tokenTTL` or when used up), the connector Deployment when `spec.deployment` is set
//! (with its state slot Secrets and a ServiceAccount, Role and RoleBinding that reach
//! those slots alone), and status counted from the group's Connector objects.
//!
//! State slots are made once and never written again by the operator (their data and
//! claim annotations belong to the connectors); slots beyond a lowered replica count are
//! left as they are (the operator never deletes Secrets) but drop out of the Role, and go
//! with the group.

pub mod build;
pub mod version;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use sallyport_api::connector_group::RolloutPhase;
use sallyport_api::{Connector, ConnectorGroup, ConnectorGroupStatus};
use serde_json::json;
use tracing::{debug, info};

use self::build::{TokenPlan, deployment_name, token_secret_name};
use crate::conditions::{merge, transitions};
use crate::context::{Context, FIELD_MANAGER};
use crate::error::Error;
use crate::managed::{apply_if_changed, delete_orphans, group_selector};
use crate::pki::build::ROOT_CA;
use crate::reconcile::{publish, retry_after_failure, transition_event};

/// How often an unchanged group is looked at again.
pub const RESYNC: Duration = Duration::from_secs(300);

/// How often a group whose connectors are being replaced is looked at again.
pub const ROLLOUT_RESYNC: Duration = Duration::from_secs(3);

/// Reconciles one ConnectorGroup.
pub async fn reconcile(group: Arc<ConnectorGroup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started("ConnectorGroup");
    let namespace = group.namespace().unwrap_or_default();
    let name = group.name_any();
    let reference = group.object_ref(&());
    let now = Timestamp::now();

    // The registration token.
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &namespace);
    let existing_secret = secrets.get_opt(&token_secret_name(&name)).await?;
    let mut minted = None;
    let (token, issued_at) = match build::plan_token(&group, existing_secret.as_ref(), now) {
        TokenPlan::Keep { token, issued_at } => (token, issued_at),
        TokenPlan::Mint(reason) => {
            minted = Some(reason);
            info!(%namespace, %name, reason, "minting a registration token");
            let event = Event {
                type_: EventType::Normal,
                reason: "RegistrationTokenMinted".to_owned(),
                note: Some(format!(
                    "new token in Secret {}: {reason}{}",
                    token_secret_name(&name),
                    if existing_secret.is_some() && group.spec.deployment.is_none() {
                        // Connectors outside the cluster are given the token by hand.
                        format!(
                            "; connectors that have not registered yet need it: kubectl get secret {} -n {namespace} -o jsonpath='{{.data.token}}' | base64 -d",
                            token_secret_name(&name)
                        )
                    } else {
                        String::new()
                    }
                )),
                action: "MintToken".to_owned(),
                secondary: None,
            };
            publish(&ctx, &reference, event).await;
            (build::new_token().map_err(Error::Random)?, now)
        }
    };
    // The fleet's root CA goes into the token Secret so connectors can verify the fleet
    // before they hold a certificate; the PKI loop makes it shortly after start.
    let fleet_ca = Api::<Secret>::namespaced(ctx.client.clone(), &ctx.config.operator_namespace)
        .get_opt(ROOT_CA)
        .await?
        .and_then(|root| root.data)
        .and_then(|mut data| data.remove("tls.crt"))
        .map(|pem| pem.0);
    let desired_secret = build::token_secret(&group, &token, issued_at, fleet_ca.as_deref());
    apply_if_changed(&secrets, desired_secret, existing_secret.as_ref()).await?;
    if let Some(reason) = minted {
        sallyport_events::audit(
            sallyport_events::AuditEvent::new(
                "connectorGroup.tokenIssued",
                sallyport_events::ObjectRef::namespaced("ConnectorGroup", &namespace, &name),
                sallyport_events::Outcome::Success,
            )
            .reason(if existing_secret.is_some() {
                "TokenRotated"
            } else {
                "TokenIssued"
            })
            .message(format!(
                "new registration token in Secret {}: {reason}",
                token_secret_name(&name)
            ))
            .detail("secret", token_secret_name(&name))
            .detail("issuedAt", issued_at.to_string()),
        );
    }

    // The connector Deployment with its state slots and identity, and nothing else
    // labelled for this group.
    let deployments = Api::<Deployment>::namespaced(ctx.client.clone(), &namespace);
    let accounts = Api::<ServiceAccount>::namespaced(ctx.client.clone(), &namespace);
    let roles = Api::<Role>::namespaced(ctx.client.clone(), &namespace);
    let bindings = Api::<RoleBinding>::namespaced(ctx.client.clone(), &namespace);
    let mut keep = Vec::new();
    let mut deployment = None;
    if let Some(spec) = &group.spec.deployment {
        let slots = build::state_slot_names(&name, spec.replicas);
        let existing_slots: Vec<Secret> = secrets
            .list(&ListParams::default().labels(&group_selector(&name)))
            .await?
            .items;
        for slot in &slots {
            let existing = existing_slots.iter().find(|s| s.name_any() == *slot);
            apply_if_changed(&secrets, build::state_slot(&group, slot), existing).await?;
        }
        let account = build::connector_service_account(&group);
        let existing = accounts.get_opt(&deployment_name(&name)).await?;
        apply_if_changed(&accounts, account, existing.as_ref()).await?;
        let role = build::connector_role(&group, &slots);
        let existing = roles.get_opt(&deployment_name(&name)).await?;
        apply_if_changed(&roles, role, existing.as_ref()).await?;
        let binding = build::connector_role_binding(&group);
        let existing = bindings.get_opt(&deployment_name(&name)).await?;
        apply_if_changed(&bindings, binding, existing.as_ref()).await?;

        let desired = build::connector_deployment(
            &group,
            spec,
            &ctx.config.connector_image,
            &ctx.config.fleet_endpoint(),
        );
        let existing = deployments.get_opt(&deployment_name(&name)).await?;
        apply_if_changed(&deployments, desired, existing.as_ref()).await?;
        keep.push(deployment_name(&name));
        deployment = existing;
    }
    delete_orphans(&deployments, &group_selector(&name), &keep).await?;
    delete_orphans(&bindings, &group_selector(&name), &keep).await?;
    delete_orphans(&roles, &group_selector(&name), &keep).await?;
    delete_orphans(&accounts, &group_selector(&name), &keep).await?;

    // Status, from the group's Connector objects.
    let connectors: Vec<Connector> = Api::<Connector>::namespaced(ctx.client.clone(), &namespace)
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter(|c| c.spec.connector_group == name)
        .collect();
    let (verdict, desired_connectors, connected_connectors) = build::assess(&group, &connectors);
    let target =
        version::target_version(group.spec.version.as_deref(), &ctx.config.connector_image);
    let (versions, (rollout, rollout_verdict)) = if group.spec.deployment.is_some() {
        let pods = Api::<Pod>::namespaced(ctx.client.clone(), &namespace)
            .list(&ListParams::default().labels(&build::connector_pod_selector(&name)))
            .await?
            .items;
        (
            version::pod_versions(&pods, &target),
            version::in_cluster_rollout(&target, desired_connectors, deployment.as_ref(), &pods),
        )
    } else {
        let versions = version::connector_versions(&connectors, &target, build::is_connected);
        let rollout = version::outside_rollout(&target, &versions);
        (versions, rollout)
    };
    let rolling = matches!(
        rollout.phase,
        RolloutPhase::Progressing | RolloutPhase::Halted
    );
    let current = group.status.clone().unwrap_or_default();
    let generation = group.metadata.generation;
    let verdicts = [verdict, rollout_verdict];
    let desired = ConnectorGroupStatus {
        observed_generation: generation,
        conditions: merge(&current.conditions, &verdicts, generation, now),
        desired_connectors,
        connected_connectors,
        registration_token_secret: Some(token_secret_name(&name)),
        versions,
        rollout: Some(rollout),
    };
    if desired != current {
        let patch = json!({"apiVersion": "sallyport.dev/v1alpha1", "kind": "ConnectorGroup", "status": desired});
        Api::<ConnectorGroup>::namespaced(ctx.client.clone(), &namespace)
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        info!(%namespace, %name, desired_connectors, connected_connectors, "status updated");
        for verdict in transitions(&current.conditions, &verdicts) {
            publish(
                &ctx,
                &reference,
                transition_event("ConnectorGroup", verdict),
            )
            .await;
        }
    } else {
        debug!(%namespace, %name, "status unchanged");
    }

    if fleet_ca.is_none() {
        debug!(%namespace, %name, "the fleet's root CA does not exist yet; looking again shortly");
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    if rolling {
        // Pod restarts and readiness move a rollout without changing the Deployment.
        return Ok(Action::requeue(ROLLOUT_RESYNC));
    }
    // Come back when the token expires, or at the resync interval.
    let until_expiry = build::expiry(&group, issued_at)
        .and_then(|expires| now.duration_until(expires).try_into().ok())
        .unwrap_or(RESYNC);
    Ok(Action::requeue(
        until_expiry.min(RESYNC) + Duration::from_millis(100),
    ))
}

/// Which Connector changes concern their group's status (the count of registered and
/// connected connectors), so that the proxies' heartbeats on Connector status (every
/// 20 s per replica and connector) do not each reconcile the group: a Connector seen for
/// the first time, one whose `Connected` status flipped, and one being deleted.
#[derive(Debug, Default)]
pub struct ConnectorChanges {
    /// Whether each Connector (by uid) was connected when last seen.
    connected: Mutex<HashMap<String, bool>>,
}

impl ConnectorChanges {
    /// The group to reconcile for this version of `connector`, or `None` when nothing
    /// the group counts changed since its previous version.
    pub fn group_to_reconcile(&self, connector: &Connector) -> Option<ObjectRef<ConnectorGroup>> {
        let group = ObjectRef::new(&connector.spec.connector_group)
            .within(&connector.namespace().unwrap_or_default());
        let key = connector.metadata.uid.clone().unwrap_or_else(|| {
            format!(
                "{}/{}",
                connector.namespace().unwrap_or_default(),
                connector.name_any()
            )
        });
        let mut seen = self
            .connected
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if connector.metadata.deletion_timestamp.is_some() {
            seen.remove(&key);
            return Some(group);
        }
        let connected = build::is_connected(connector);
        (seen.insert(key, connected) != Some(connected)).then_some(group)
    }
}

/// Retries a failed reconcile after a short pause.
pub fn error_policy(group: Arc<ConnectorGroup>, error: &Error, ctx: Arc<Context>) -> Action {
    retry_after_failure("ConnectorGroup", group.as_ref(), error, &ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connector(uid: &str, connected: &str, deleting: bool, renewed: &str) -> Connector {
        let deletion = if deleting {
            ", deletionTimestamp: '2026-01-01T00:00:00Z'"
        } else {
            ""
        };
        let yaml = format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: Connector\nmetadata: {{name: c, namespace: ops, uid: {uid}{deletion}}}\nspec: {{connectorGroup: dc}}\nstatus:\n  tunnels: [{{proxy: a, since: '2026-01-01T00:00:00Z', renewedAt: '{renewed}'}}]\n  conditions: [{{type: Connected, status: '{connected}', reason: r, message: m, lastTransitionTime: '2026-01-01T00:00:00Z'}}]\n"
        );
        serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn heartbeats_do_not_reconcile_the_group_but_connectivity_changes_do() {
        let changes = ConnectorChanges::default();
        let group = Some(ObjectRef::<ConnectorGroup>::new("dc").within("ops"));
        let seen = |c: &Connector| changes.group_to_reconcile(c);
        assert_eq!(
            seen(&connector("u1", "False", false, "2026-01-01T00:00:00Z")),
            group
        );
        assert_eq!(
            seen(&connector("u1", "True", false, "2026-01-01T00:00:00Z")),
            group
        );
        // A heartbeat: only renewedAt moved.
        assert_eq!(
            seen(&connector("u1", "True", false, "2026-01-01T00:00:20Z")),
            None
        );
        assert_eq!(
            seen(&connector("u1", "False", false, "2026-01-01T00:00:20Z")),
            group
        );
        // Another connector is news; deletion always is.
        assert_eq!(
            seen(&connector("u2", "False", false, "2026-01-01T00:00:20Z")),
            group
        );
        assert_eq!(
            seen(&connector("u1", "False", true, "2026-01-01T00:00:20Z")),
            group
        );
        assert_eq!(
            seen(&connector("u1", "False", true, "2026-01-01T00:00:20Z")),
            group
        );
    }
}
