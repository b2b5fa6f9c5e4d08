//! Which ConditionalAccessPolicies apply to which PublishedApps.
//!
//! A policy selects apps of its own namespace by label selector or by name; a policy in
//! the operator's namespace is a fleet-wide baseline and selects apps of every namespace.
//! An app may also name policies of its own namespace in `spec.conditionalAccessPolicies`.
//! Disabled policies apply to nothing.

use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use sallyport_api::ConditionalAccessPolicy;
use sallyport_api::PublishedApp;
use sallyport_api::conditional_access_policy::PolicyState;

/// A policy's app selector is not a valid label selector.
#[derive(Debug, thiserror::Error)]
#[error("spec.assignments.apps.selector is not a valid label selector: {0}")]
pub struct InvalidSelector(#[from] kube::core::ParseExpressionError);

/// How a policy refers to apps, parsed once.
pub struct AppSelection<'a> {
    policy: &'a ConditionalAccessPolicy,
    selector: Option<Selector>,
    fleet_wide: bool,
}

impl<'a> AppSelection<'a> {
    /// The selection of `policy`; `operator_namespace` holds the fleet-wide baseline.
    pub fn new(
        policy: &'a ConditionalAccessPolicy,
        operator_namespace: &str,
    ) -> Result<Self, InvalidSelector> {
        let selector = policy
            .spec
            .assignments
            .apps
            .selector
            .clone()
            .map(Selector::try_from)
            .transpose()?;
        Ok(Self {
            policy,
            selector,
            fleet_wide: policy.namespace().as_deref() == Some(operator_namespace),
        })
    }

    /// Whether the policy is a fleet-wide baseline.
    pub fn is_fleet_wide(&self) -> bool {
        self.fleet_wide
    }

    /// Whether the policy applies to `app` through its assignments (not counting apps that
    /// name the policy themselves).
    pub fn selects(&self, app: &PublishedApp) -> bool {
        if self.policy.spec.state == PolicyState::Disabled {
            return false;
        }
        if !self.fleet_wide && app.namespace() != self.policy.namespace() {
            return false;
        }
        let by_selector = self
            .selector
            .as_ref()
            .is_some_and(|s| s.matches(app.labels()));
        let same_namespace = app.namespace() == self.policy.namespace();
        let by_name = same_namespace
            && self
                .policy
                .spec
                .assignments
                .apps
                .names
                .iter()
                .any(|n| n.as_str() == app.name_any());
        by_selector || by_name
    }
}

/// The policies applying to an app, and the names it lists that do not exist.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AppliedPolicies {
    /// Policy names, `namespace/name` for baselines from the operator's namespace; sorted.
    pub applied: Vec<String>,
    /// Names in `spec.conditionalAccessPolicies` with no policy in the app's namespace.
    pub missing: Vec<String>,
}

/// The policies among `policies` that apply to `app`. Policies with an invalid selector
/// are skipped here (their own status reports the error).
pub fn applied_policies(
    app: &PublishedApp,
    policies: &[ConditionalAccessPolicy],
    operator_namespace: &str,
) -> AppliedPolicies {
    let mut result = AppliedPolicies::default();
    for policy in policies {
        // A policy the app names applies even when its own selector is invalid: an app
        // must never be served without a policy it asked for.
        let named = policy.namespace() == app.namespace()
            && policy.spec.state != PolicyState::Disabled
            && app
                .spec
                .conditional_access_policies
                .iter()
                .any(|n| n.as_str() == policy.name_any());
        let selected = AppSelection::new(policy, operator_namespace).is_ok_and(|s| s.selects(app));
        if named || selected {
            let fleet_wide = policy.namespace().as_deref() == Some(operator_namespace);
            result
                .applied
                .push(if fleet_wide && policy.namespace() != app.namespace() {
                    format!(
                        "{}/{}",
                        policy.namespace().unwrap_or_default(),
                        policy.name_any()
                    )
                } else {
                    policy.name_any()
                });
        }
    }
    for name in &app.spec.conditional_access_policies {
        let exists = policies
            .iter()
            .any(|p| p.namespace() == app.namespace() && p.name_any() == name.as_str());
        if !exists {
            result.missing.push(name.to_string());
        }
    }
    result.applied.sort();
    result.applied.dedup();
    result
}

/// Whether a change of `policy` can change what applies to `app`: the policy applies to
/// it now, or the app's status still lists it (it applied before the change). These are
/// exactly the apps a policy change must re-reconcile.
pub fn change_affects(
    policy: &ConditionalAccessPolicy,
    app: &PublishedApp,
    operator_namespace: &str,
) -> bool {
    let applies_now = !applied_policies(app, std::slice::from_ref(policy), operator_namespace)
        .applied
        .is_empty();
    let listed_name = if policy.namespace() == app.namespace() {
        policy.name_any()
    } else {
        format!(
            "{}/{}",
            policy.namespace().unwrap_or_default(),
            policy.name_any()
        )
    };
    let applied_before = app
        .status
        .as_ref()
        .is_some_and(|s| s.applied_policies.contains(&listed_name));
    applies_now || applied_before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(yaml: &str) -> PublishedApp {
        serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    fn policy(yaml: &str) -> ConditionalAccessPolicy {
        serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    const WIKI: &str = r#"
apiVersion: sallyport.dev/v1alpha1
kind: PublishedApp
metadata: {name: wiki, namespace: team-a, labels: {tier: internal}}
spec:
  externalUrl: https://wiki.apps.example.com/
  internalUrl: http://wiki.corp.internal/
  connectorGroup: {name: dc}
  conditionalAccessPolicies: [named-one, missing-one]
"#;

    fn policies() -> Vec<ConditionalAccessPolicy> {
        let template = |name: &str, namespace: &str, state: &str, apps: &str| {
            policy(&format!(
                "apiVersion: sallyport.dev/v1alpha1\nkind: ConditionalAccessPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  state: {state}\n  assignments: {{apps: {apps}, users: {{include: ['*']}}}}\n  grant: {{block: true}}\n"
            ))
        };
        vec![
            template(
                "by-label",
                "team-a",
                "Enabled",
                "{selector: {matchLabels: {tier: internal}}}",
            ),
            template(
                "other-label",
                "team-a",
                "Enabled",
                "{selector: {matchLabels: {tier: public}}}",
            ),
            template("by-name", "team-a", "ReportOnly", "{names: [wiki]}"),
            template("disabled", "team-a", "Disabled", "{selector: {}}"),
            template("other-namespace", "team-b", "Enabled", "{selector: {}}"),
            template(
                "named-one",
                "team-a",
                "Enabled",
                "{names: [something-else]}",
            ),
            template("baseline", "sallyport-system", "Enabled", "{selector: {}}"),
            template(
                "baseline-other",
                "sallyport-system",
                "Enabled",
                "{selector: {matchExpressions: [{key: tier, operator: NotIn, values: [internal]}]}}",
            ),
        ]
    }

    #[test]
    fn an_app_gets_its_namespaces_matching_policies_the_named_ones_and_the_baseline() {
        let applied = applied_policies(&app(WIKI), &policies(), "sallyport-system");
        assert_eq!(
            applied.applied,
            [
                "by-label",
                "by-name",
                "named-one",
                "sallyport-system/baseline"
            ]
        );
        assert_eq!(applied.missing, ["missing-one"]);
    }

    #[test]
    fn a_policy_change_affects_the_apps_it_selects_now_or_selected_before() {
        let all = policies();
        let by_label = all
            .iter()
            .find(|p| p.name_any() == "by-label")
            .cloned()
            .unwrap_or_else(|| panic!("fixture"));
        let other_label = all
            .iter()
            .find(|p| p.name_any() == "other-label")
            .cloned()
            .unwrap_or_else(|| panic!("fixture"));
        let baseline = all
            .iter()
            .find(|p| p.name_any() == "baseline")
            .cloned()
            .unwrap_or_else(|| panic!("fixture"));
        let wiki = app(WIKI);
        assert!(change_affects(&by_label, &wiki, "sallyport-system"));
        assert!(!change_affects(&other_label, &wiki, "sallyport-system"));
        assert!(change_affects(&baseline, &wiki, "sallyport-system"));

        // Deselected by the change, but its status still lists the policy: affected.
        let mut listed = app(WIKI);
        listed.status = Some(sallyport_api::PublishedAppStatus {
            applied_policies: vec!["other-label".into()],
            ..Default::default()
        });
        assert!(change_affects(&other_label, &listed, "sallyport-system"));
        // Another namespace's app never is, unless the policy is a baseline.
        let mut elsewhere = app(WIKI);
        elsewhere.metadata.namespace = Some("team-b".into());
        elsewhere.spec.conditional_access_policies.clear();
        assert!(!change_affects(&by_label, &elsewhere, "sallyport-system"));
    }

    #[test]
    fn a_named_policy_applies_even_with_an_invalid_selector() {
        let mut broken = policies();
        if let Some(named) = broken.iter_mut().find(|p| p.name_any() == "named-one") {
            named.spec.assignments.apps.selector = serde_yaml::from_str(
                "{matchExpressions: [{key: tier, operator: Near, values: [x]}]}",
            )
            .ok();
        }
        let applied = applied_policies(&app(WIKI), &broken, "sallyport-system");
        assert!(
            applied.applied.contains(&"named-one".to_owned()),
            "{applied:?}"
        );
    }

    #[test]
    fn a_policy_outside_the_operator_namespace_never_reaches_other_namespaces() {
        let mut other = app(WIKI);
        other.metadata.namespace = Some("team-b".into());
        other.spec.conditional_access_policies.clear();
        let applied = applied_policies(&other, &policies(), "sallyport-system");
        assert_eq!(
            applied.applied,
            ["other-namespace", "sallyport-system/baseline"]
        );
    }
}
