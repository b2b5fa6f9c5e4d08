//! What every controller does the same way: retry after a failure, and publish Events.

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use tracing::warn;

use crate::conditions::Verdict;
use crate::context::Context;
use crate::error::Error;

/// How long a failed reconcile waits before it is retried.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// The error policy of every controller: count the failure, log it, retry soon.
pub fn retry_after_failure<K: ResourceExt>(
    kind: &'static str,
    object: &K,
    error: &Error,
    ctx: &Context,
) -> Action {
    ctx.metrics.reconcile_failed(kind, error.metric_label());
    warn!(
        kind,
        namespace = object.namespace().unwrap_or_default(),
        name = object.name_any(),
        reason = error.metric_label(),
        %error,
        "reconcile failed; retrying"
    );
    Action::requeue(RETRY_AFTER)
}

/// Publishes an Event on `regarding`; a failure is logged, never fatal to the reconcile.
pub async fn publish(ctx: &Context, regarding: &ObjectReference, event: Event) {
    if let Err(error) = ctx.recorder.publish(&event, regarding).await {
        warn!(
            namespace = regarding.namespace.as_deref().unwrap_or_default(),
            name = regarding.name.as_deref().unwrap_or_default(),
            reason = %event.reason,
            %error,
            "cannot publish Event"
        );
    }
}

/// The Event announcing that a condition reached `verdict`: Normal when it holds,
/// Warning when not.
pub fn transition_event(verdict: &Verdict) -> Event {
    Event {
        type_: if verdict.status {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: verdict.reason.to_owned(),
        note: Some(format!(
            "{} is {}: {}",
            verdict.type_, verdict.status, verdict.message
        )),
        action: "Reconcile".to_owned(),
        secondary: None,
    }
}
