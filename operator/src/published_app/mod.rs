//! The PublishedApp controller: dereference -> validate -> (build -> apply: with the fleet
//! configuration) -> status.

pub mod backend_ca;
pub mod dereference;
pub mod routes;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use sallyport_api::{PublishedApp, PublishedAppStatus};
use serde_json::json;
use tracing::{debug, info};

use crate::conditions::{merge, transitions};
use crate::context::{Context, FIELD_MANAGER};
use crate::error::Error;
use crate::reconcile::{publish, retry_after_failure, transition_event};

/// How often an unchanged app is looked at again, to catch changes the operator does not
/// watch (a TLS certificate nearing expiry, a namespace's labels).
pub const RESYNC: Duration = Duration::from_secs(300);

/// Reconciles one PublishedApp: resolves its references, concludes its conditions, and
/// writes its status and Events when, and only when, they change.
pub async fn reconcile(app: Arc<PublishedApp>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started("PublishedApp");
    let namespace = app.namespace().unwrap_or_default();
    let name = app.name_any();
    let (references, applied) = dereference::dereference(&app, &ctx).await?;
    let assessment = validate::assess(&app, &references);

    let current = app.status.clone().unwrap_or_default();
    let generation = app.metadata.generation;
    let desired = PublishedAppStatus {
        observed_generation: generation,
        url: assessment.url.clone(),
        conditions: merge(
            &current.conditions,
            &assessment.verdicts,
            generation,
            Timestamp::now(),
        ),
        connector_group: assessment.group.clone(),
        applied_policies: applied.applied,
    };
    if desired == current {
        debug!(%namespace, %name, "status unchanged");
        return Ok(Action::requeue(RESYNC));
    }

    let patch = json!({
        "apiVersion": "sallyport.dev/v1alpha1",
        "kind": "PublishedApp",
        "status": desired,
    });
    Api::<PublishedApp>::namespaced(ctx.client.clone(), &namespace)
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    info!(
        %namespace, %name,
        ready = assessment.verdicts.iter().any(|v| v.type_ == validate::condition::READY && v.status),
        "status updated"
    );

    let reference = app.object_ref(&());
    for verdict in transitions(&current.conditions, &assessment.verdicts) {
        publish(&ctx, &reference, transition_event("PublishedApp", verdict)).await;
    }
    Ok(Action::requeue(RESYNC))
}

/// Retries a failed reconcile after a short pause.
pub fn error_policy(app: Arc<PublishedApp>, error: &Error, ctx: Arc<Context>) -> Action {
    retry_after_failure("PublishedApp", app.as_ref(), error, &ctx)
}
