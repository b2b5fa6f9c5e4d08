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

/// The longest `note` the events.k8s.io API accepts, in bytes.
pub const EVENT_NOTE_LIMIT: usize = 1024;

/// Reasons of False conditions that report work in progress, published as Normal Events.
pub const PROGRESS_REASONS: [&str; 1] = ["RollingOut"];

/// The Event announcing that a condition of an object of `kind` reached `verdict`:
/// Normal when it holds or reports progress ([`PROGRESS_REASONS`]), Warning when not,
/// the Warning ending with what to do about it ([`crate::remedies::remedy`]). A message
/// too long for an Event is shortened, never the remedy.
pub fn transition_event(kind: &str, verdict: &Verdict) -> Event {
    // A condition that is False while work goes as planned is no warning.
    let warning = !verdict.status && !PROGRESS_REASONS.contains(&verdict.reason);
    let remedy = (!verdict.status)
        .then(|| crate::remedies::remedy(kind, verdict.reason))
        .flatten()
        .map(|fix| format!(". Fix: {fix}."))
        .unwrap_or_default();
    let head = format!("{} is {}: ", verdict.type_, verdict.status);
    let room = EVENT_NOTE_LIMIT.saturating_sub(head.len() + remedy.len());
    Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: verdict.reason.to_owned(),
        note: Some(format!(
            "{head}{}{remedy}",
            shorten(verdict.message.trim_end_matches('.'), room)
        )),
        action: "Reconcile".to_owned(),
        secondary: None,
    }
}

/// `text` cut to at most `limit` bytes on a character boundary, ending in `...` when cut.
pub(crate) fn shorten(text: &str, limit: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= limit {
        return text.into();
    }
    let mut end = limit.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end]).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_condition_is_a_warning_that_says_what_to_do() {
        let verdict = Verdict::failed(
            "ResolvedRefs",
            "TLSSecretNotFound",
            "TLS Secret team-a/wiki-tls does not exist",
        );
        let event = transition_event("PublishedApp", &verdict);
        assert_eq!(event.type_, EventType::Warning);
        assert_eq!(event.reason, "TLSSecretNotFound");
        let note = event.note.unwrap_or_default();
        assert!(
            note.starts_with(
                "ResolvedRefs is false: TLS Secret team-a/wiki-tls does not exist. Fix: create it"
            ) && note.contains("spec.tls.secretName"),
            "{note}"
        );

        let ready = transition_event(
            "PublishedApp",
            &Verdict::ok("Ready", "Ready", "1 connected connector(s)"),
        );
        assert_eq!(ready.type_, EventType::Normal);
        assert_eq!(
            ready.note.as_deref(),
            Some("Ready is true: 1 connected connector(s)")
        );
    }

    #[test]
    fn a_long_message_is_shortened_to_fit_an_event_keeping_the_remedy() {
        let message = "ConditionalAccessPolicy team-a/p\u{e9}: bad; ".repeat(60);
        let verdict = Verdict::failed("ResolvedRefs", "PolicyInvalid", message);
        let note = transition_event("PublishedApp", &verdict)
            .note
            .unwrap_or_default();
        assert!(note.len() <= EVENT_NOTE_LIMIT, "{} bytes", note.len());
        assert!(note.contains("... Fix: fix the policy"), "{note}");
    }
}
