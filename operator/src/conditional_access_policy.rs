//! The ConditionalAccessPolicy controller: validates what admission cannot, counts the
//! apps a policy applies to, and reports it.

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use sallyport_api::conditional_access_policy::PolicyState;
use sallyport_api::{ConditionalAccessPolicy, ConditionalAccessPolicyStatus};
use serde_json::json;
use tracing::{debug, info};

use crate::compile::{INVALID_POLICY, check_policy};
use crate::conditions::{Verdict, merge, transitions};
use crate::context::{Context, FIELD_MANAGER};
use crate::error::Error;
use crate::policy_selection::{AppSelection, applied_policies};
use crate::reconcile::{publish, retry_after_failure, transition_event};

/// Condition types of a ConditionalAccessPolicy.
pub mod condition {
    /// The policy is valid.
    pub const ACCEPTED: &str = "Accepted";
    /// The policy is in force as its state says.
    pub const READY: &str = "Ready";
}

/// The status of `policy`: its conditions and how many apps it applies to, among `apps`.
pub fn assess(
    policy: &ConditionalAccessPolicy,
    apps: &[Arc<sallyport_api::PublishedApp>],
    operator_namespace: &str,
) -> (Vec<Verdict>, i32) {
    use condition::{ACCEPTED, READY};
    let selection = match AppSelection::new(policy, operator_namespace) {
        Ok(selection) => selection,
        Err(error) => {
            let message = error.to_string();
            return (
                vec![
                    Verdict::failed(ACCEPTED, "InvalidSelector", message.clone()),
                    Verdict::failed(READY, "NotAccepted", message),
                ],
                0,
            );
        }
    };
    let policies = std::slice::from_ref(policy);
    let matched = apps
        .iter()
        .filter(|app| {
            selection.selects(app)
                || !applied_policies(app, policies, operator_namespace)
                    .applied
                    .is_empty()
        })
        .count();
    let id = format!(
        "{}/{}",
        policy.namespace().unwrap_or_default(),
        policy.name_any()
    );
    if let Err(message) = check_policy(policy, &id) {
        let ready = format!(
            "{message}; the {matched} app(s) it applies to are not served until it is fixed"
        );
        return (
            vec![
                Verdict::failed(ACCEPTED, INVALID_POLICY, message),
                Verdict::failed(READY, "NotAccepted", ready),
            ],
            i32::try_from(matched).unwrap_or(i32::MAX),
        );
    }
    let scope = if selection.is_fleet_wide() {
        "every namespace (fleet-wide baseline)"
    } else {
        "its namespace"
    };
    let ready = match policy.spec.state {
        PolicyState::Enabled => Verdict::ok(
            READY,
            "Enforced",
            format!("enforced on {matched} app(s) of {scope}"),
        ),
        PolicyState::ReportOnly => Verdict::ok(
            READY,
            "ReportOnly",
            format!("evaluated and logged, not enforced, on {matched} app(s) of {scope}"),
        ),
        PolicyState::Disabled => Verdict::ok(READY, "Disabled", "disabled: applies to no app"),
    };
    (
        vec![
            Verdict::ok(ACCEPTED, "Accepted", "the policy is valid"),
            ready,
        ],
        i32::try_from(matched).unwrap_or(i32::MAX),
    )
}

/// Reconciles one policy: writes its status when, and only when, it changes.
pub async fn reconcile(
    policy: Arc<ConditionalAccessPolicy>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started("ConditionalAccessPolicy");
    ctx.apps.wait_until_ready().await.ok();
    let namespace = policy.namespace().unwrap_or_default();
    let name = policy.name_any();
    let (verdicts, matched_apps) =
        assess(&policy, &ctx.apps.state(), &ctx.config.operator_namespace);
    let current = policy.status.clone().unwrap_or_default();
    let generation = policy.metadata.generation;
    let desired = ConditionalAccessPolicyStatus {
        observed_generation: generation,
        conditions: merge(&current.conditions, &verdicts, generation, Timestamp::now()),
        matched_apps,
    };
    if desired == current {
        debug!(%namespace, %name, "status unchanged");
        return Ok(Action::await_change());
    }
    let patch = json!({
        "apiVersion": "sallyport.dev/v1alpha1",
        "kind": "ConditionalAccessPolicy",
        "status": desired,
    });
    Api::<ConditionalAccessPolicy>::namespaced(ctx.client.clone(), &namespace)
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    info!(%namespace, %name, matched_apps, "status updated");

    let reference = policy.object_ref(&());
    for verdict in transitions(&current.conditions, &verdicts) {
        publish(
            &ctx,
            &reference,
            transition_event("ConditionalAccessPolicy", verdict),
        )
        .await;
    }
    let accepted = verdicts.iter().all(|v| v.status);
    let newly_unmatched = current.conditions.is_empty() || current.matched_apps > 0;
    let in_force = policy.spec.state != PolicyState::Disabled;
    if accepted && in_force && matched_apps == 0 && newly_unmatched {
        publish(
            &ctx,
            &reference,
            no_matched_apps_event(&policy, &ctx.config.operator_namespace),
        )
        .await;
    }
    Ok(Action::await_change())
}

/// The Warning that an enforced or report-only `policy` applies to no app: it names what
/// the policy's `spec.assignments.apps` asks for.
pub fn no_matched_apps_event(policy: &ConditionalAccessPolicy, operator_namespace: &str) -> Event {
    let apps = &policy.spec.assignments.apps;
    let mut asks = Vec::new();
    if let Some(selector) = &apps.selector {
        asks.push(format!(
            "selector {}",
            serde_json::to_string(selector).unwrap_or_default()
        ));
    }
    if !apps.names.is_empty() {
        let names: Vec<&str> = apps.names.iter().map(|n| n.as_str()).collect();
        asks.push(format!("names {}", names.join(", ")));
    }
    let namespace = policy.namespace().unwrap_or_default();
    let scope = if namespace == operator_namespace {
        "of any namespace (a fleet-wide baseline)".to_owned()
    } else {
        format!("of namespace {namespace}")
    };
    let asks = if asks.is_empty() {
        "nothing".to_owned()
    } else {
        // A large selector must not push the note past an Event's limit.
        crate::reconcile::shorten(&asks.join(" and "), 400).into_owned()
    };
    let fix =
        crate::remedies::remedy("ConditionalAccessPolicy", NO_MATCHED_APPS).unwrap_or_default();
    Event {
        type_: EventType::Warning,
        reason: NO_MATCHED_APPS.to_owned(),
        note: Some(format!(
            "the policy applies to no PublishedApp: spec.assignments.apps ({asks}) matches no app {scope} and no app names it in spec.conditionalAccessPolicies. Fix: {fix}."
        )),
        action: "Reconcile".to_owned(),
        secondary: None,
    }
}

/// The reason of the Warning that a policy applies to no app.
pub const NO_MATCHED_APPS: &str = "NoMatchedApps";

/// Retries a failed reconcile after a short pause.
pub fn error_policy(
    policy: Arc<ConditionalAccessPolicy>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    retry_after_failure("ConditionalAccessPolicy", policy.as_ref(), error, &ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sallyport_api::PublishedApp;

    fn app(namespace: &str, name: &str, labels: &str) -> Arc<PublishedApp> {
        let yaml = format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: PublishedApp\nmetadata: {{name: {name}, namespace: {namespace}, labels: {labels}}}\nspec: {{externalUrl: 'https://{name}.example.com/', internalUrl: 'http://x.corp/', connectorGroup: {{name: dc}}}}\n"
        );
        Arc::new(serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}")))
    }

    fn policy(namespace: &str, state: &str, apps: &str) -> ConditionalAccessPolicy {
        let yaml = format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: ConditionalAccessPolicy\nmetadata: {{name: p, namespace: {namespace}}}\nspec:\n  state: {state}\n  assignments: {{apps: {apps}, users: {{include: ['*']}}}}\n  grant: {{block: true}}\n"
        );
        serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    fn apps() -> Vec<Arc<PublishedApp>> {
        vec![
            app("team-a", "wiki", "{tier: internal}"),
            app("team-a", "blog", "{tier: public}"),
            app("team-b", "crm", "{tier: internal}"),
        ]
    }

    #[test]
    fn counts_the_apps_of_its_namespace_it_selects() {
        let (verdicts, matched) = assess(
            &policy(
                "team-a",
                "Enabled",
                "{selector: {matchLabels: {tier: internal}}}",
            ),
            &apps(),
            "sallyport-system",
        );
        assert_eq!(matched, 1);
        assert_eq!(verdicts[1].reason, "Enforced");
    }

    #[test]
    fn a_baseline_counts_apps_of_every_namespace() {
        let (verdicts, matched) = assess(
            &policy("sallyport-system", "ReportOnly", "{selector: {}}"),
            &apps(),
            "sallyport-system",
        );
        assert_eq!(matched, 3);
        assert_eq!(verdicts[1].reason, "ReportOnly");
        assert!(verdicts[1].message.contains("fleet-wide"));
    }

    #[test]
    fn a_disabled_policy_matches_nothing() {
        let (_, matched) = assess(
            &policy("team-a", "Disabled", "{selector: {}}"),
            &apps(),
            "sallyport-system",
        );
        assert_eq!(matched, 0);
    }

    #[test]
    fn a_policy_the_engine_cannot_evaluate_is_not_accepted() {
        let mut invalid = policy("team-a", "Enabled", "{selector: {}}");
        invalid.spec.conditions =
            serde_yaml::from_str("{times: [{from: '08:00', to: '18:00', timeZone: Mars/Olympus}]}")
                .unwrap_or_else(|e| panic!("{e}"));
        let (verdicts, matched) = assess(&invalid, &apps(), "sallyport-system");
        assert_eq!(
            (verdicts[0].status, verdicts[0].reason),
            (false, "InvalidPolicy")
        );
        assert!(
            verdicts[0]
                .message
                .starts_with("spec.conditions.times[0].timeZone: "),
            "{}",
            verdicts[0].message
        );
        assert_eq!(
            (verdicts[1].status, verdicts[1].reason),
            (false, "NotAccepted")
        );
        assert_eq!(matched, 2);
    }

    #[test]
    fn an_invalid_selector_is_not_accepted() {
        let (verdicts, _) = assess(
            &policy(
                "team-a",
                "Enabled",
                "{selector: {matchExpressions: [{key: tier, operator: Sometimes, values: [x]}]}}",
            ),
            &apps(),
            "sallyport-system",
        );
        assert_eq!(
            (verdicts[0].status, verdicts[0].reason),
            (false, "InvalidSelector")
        );
    }
}
