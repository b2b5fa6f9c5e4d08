//! ConditionalAccessPolicies in the configuration: which an app's assessment sees, and
//! what the proxy evaluates.

use std::collections::{BTreeMap, BTreeSet};

use sallyport_api::ConditionalAccessPolicy;
use sallyport_api::fleet_config::{Policy, PolicyAssignments};
use sallyport_policy::{CompileError, PolicySet};

use super::{Problem, Skipped, check_duration};
use crate::policy_selection::AppSelection;

/// The ConditionalAccessPolicies of the inputs.
pub(super) struct Policies {
    /// Per namespace that has policies of its own: those and the baselines, which is what
    /// the PublishedApp dereference step lists for an app of that namespace.
    by_namespace: BTreeMap<String, Vec<ConditionalAccessPolicy>>,
    /// The baselines: the policies of the operator's namespace.
    baseline: Vec<ConditionalAccessPolicy>,
    /// Every policy by id: its configuration, or why it cannot be used.
    by_id: BTreeMap<String, Result<Policy, Problem>>,
}

impl Policies {
    /// Reads `policies` (whose ids are `ids`), reporting unusable ones in `skipped`.
    pub fn new(
        policies: &[ConditionalAccessPolicy],
        ids: &[String],
        operator_namespace: &str,
        skipped: &mut Vec<Skipped>,
    ) -> Self {
        let mut by_id = BTreeMap::new();
        let mut own: BTreeMap<String, Vec<ConditionalAccessPolicy>> = BTreeMap::new();
        for (policy, id) in policies.iter().zip(ids) {
            let config = policy_config(policy, id, operator_namespace);
            if let Err(problem) = &config {
                skipped.push(Skipped {
                    kind: "ConditionalAccessPolicy",
                    id: id.clone(),
                    reason: problem.reason,
                    message: problem.message.clone(),
                });
            }
            by_id.insert(id.clone(), config);
            let namespace = policy.metadata.namespace.clone().unwrap_or_default();
            own.entry(namespace).or_default().push(policy.clone());
        }
        let baseline = own.get(operator_namespace).cloned().unwrap_or_default();
        let by_namespace = own
            .into_iter()
            .map(|(namespace, mut list)| {
                if namespace != operator_namespace {
                    list.extend(baseline.iter().cloned());
                }
                (namespace, list)
            })
            .collect();
        Self {
            by_namespace,
            baseline,
            by_id,
        }
    }

    /// The policies that may apply to an app of `namespace`.
    pub fn candidates(&self, namespace: &str) -> &[ConditionalAccessPolicy] {
        self.by_namespace
            .get(namespace)
            .map_or(self.baseline.as_slice(), Vec::as_slice)
    }

    /// The policy `id`: its configuration or why it cannot be used; `None` when it is not
    /// among the inputs.
    pub fn get(&self, id: &str) -> Option<&Result<Policy, Problem>> {
        self.by_id.get(id)
    }

    /// The configurations of the policies `used`, sorted by id.
    pub fn configs(&self, used: &BTreeSet<&str>) -> Vec<Policy> {
        used.iter()
            .filter_map(|id| self.by_id.get(*id))
            .filter_map(|config| config.as_ref().ok().cloned())
            .collect()
    }
}

/// The policy as the proxy evaluates it, or why it cannot be used.
fn policy_config(
    policy: &ConditionalAccessPolicy,
    id: &str,
    operator_namespace: &str,
) -> Result<Policy, Problem> {
    let spec = &policy.spec;
    let mut problems = Vec::new();
    if let Err(error) = AppSelection::new(policy, operator_namespace) {
        problems.push(Problem::new(
            "InvalidSelector",
            format!("{error}; the policy applies to no app"),
        ));
    }
    let mut duration_ok = true;
    if let Some(frequency) = spec
        .session
        .as_ref()
        .and_then(|s| s.sign_in_frequency.as_ref())
    {
        duration_ok =
            check_duration("spec.session.signInFrequency", frequency, &mut problems).is_some();
    }
    let config = config_of(policy, id);
    // What admission's schema cannot check (IANA time zones, CIDRs), as the proxies
    // compile it; a bad duration is reported once, above.
    if duration_ok && let Err(problem) = engine_check(&config) {
        problems.push(problem);
    }
    match Problem::combine(problems) {
        Some(problem) => Err(problem),
        None => Ok(config),
    }
}

/// Whether the conditional access engine can evaluate `config`, as the proxies will
/// compile it; the problem names the field otherwise.
fn engine_check(config: &Policy) -> Result<(), Problem> {
    PolicySet::check(config).map_err(|error| match error {
        CompileError::Invalid { field, message, .. } => {
            Problem::new(INVALID_POLICY, format!("{field}: {message}"))
        }
    })
}

/// Why a policy the engine cannot evaluate is refused: the reason of its `Accepted`
/// condition and of its entry in the skipped objects.
pub const INVALID_POLICY: &str = "InvalidPolicy";

/// Whether the conditional access engine can evaluate `policy` (whose id is `id`); the
/// message names the field when it cannot. This is the check the compile step makes,
/// for the policy's status.
pub fn check_policy(policy: &ConditionalAccessPolicy, id: &str) -> Result<(), String> {
    engine_check(&config_of(policy, id)).map_err(|problem| problem.message)
}

/// The policy as the proxy evaluates it.
fn config_of(policy: &ConditionalAccessPolicy, id: &str) -> Policy {
    let spec = &policy.spec;
    Policy {
        id: id.to_owned(),
        state: spec.state,
        assignments: PolicyAssignments {
            users: spec.assignments.users.clone(),
            groups: spec.assignments.groups.clone(),
        },
        conditions: spec.conditions.clone(),
        grant: spec.grant.clone(),
        session: spec.session.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{self, GROUP_DC};
    use super::super::{FleetDefaults, compile};
    use super::*;

    fn policy(conditions: &str) -> ConditionalAccessPolicy {
        let yaml = format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: ConditionalAccessPolicy\nmetadata: {{name: office-hours, namespace: team-a}}\nspec:\n  assignments: {{apps: {{selector: {{}}}}, users: {{include: ['*']}}}}\n  conditions: {conditions}\n  grant: {{block: true}}\n"
        );
        serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    fn read(policy: &ConditionalAccessPolicy) -> (Policies, Vec<Skipped>) {
        let mut skipped = Vec::new();
        let policies = Policies::new(
            std::slice::from_ref(policy),
            &["team-a/office-hours".to_owned()],
            "sallyport-system",
            &mut skipped,
        );
        (policies, skipped)
    }

    #[test]
    fn a_time_zone_the_engine_does_not_know_is_refused_naming_the_field() {
        // `Mars/Olympus` passes the CRD's pattern, but is no IANA time zone.
        let bad =
            policy("{times: [{days: [Mon], from: '08:00', to: '18:00', timeZone: Mars/Olympus}]}");
        let (policies, skipped) = read(&bad);
        let problem = match policies.get("team-a/office-hours") {
            Some(Err(problem)) => problem.clone(),
            other => panic!("expected a problem, got {other:?}"),
        };
        assert_eq!(problem.reason, INVALID_POLICY);
        assert!(
            problem
                .message
                .starts_with("spec.conditions.times[0].timeZone: \"Mars/Olympus\""),
            "{}",
            problem.message
        );
        assert_eq!(skipped.len(), 1);
        assert_eq!(
            (skipped[0].kind, skipped[0].id.as_str(), skipped[0].reason),
            (
                "ConditionalAccessPolicy",
                "team-a/office-hours",
                INVALID_POLICY
            )
        );
        assert_eq!(
            check_policy(&bad, "team-a/office-hours"),
            Err(problem.message)
        );

        let good =
            policy("{times: [{days: [Mon], from: '08:00', to: '18:00', timeZone: Europe/Berlin}]}");
        let (policies, skipped) = read(&good);
        assert!(matches!(policies.get("team-a/office-hours"), Some(Ok(_))));
        assert_eq!(skipped, []);
        assert_eq!(check_policy(&good, "team-a/office-hours"), Ok(()));
    }

    #[test]
    fn a_location_that_is_no_cidr_is_refused() {
        // Admission refuses it; a manifest on disk may still hold it.
        let bad = policy("{locations: {include: [Any], exclude: [10.0.0.0/33]}}");
        let message = check_policy(&bad, "team-a/office-hours").err();
        assert!(
            message
                .as_deref()
                .is_some_and(|m| m.starts_with("spec.conditions.locations.exclude[0]: ")),
            "{message:?}"
        );
    }

    #[test]
    fn a_bad_duration_is_reported_once() {
        let mut bad = policy("{}");
        bad.spec.session = serde_yaml::from_str("{signInFrequency: 8 hours}").ok();
        assert!(bad.spec.session.is_some());
        let (policies, _) = read(&bad);
        let Some(Err(problem)) = policies.get("team-a/office-hours") else {
            panic!("expected a problem")
        };
        assert_eq!(problem.reason, "InvalidField");
        assert_eq!(problem.message.matches("signInFrequency").count(), 1);
    }

    #[test]
    fn an_app_is_not_served_without_its_refused_policy() {
        let mut manifests = fixtures::manifests(&[
            GROUP_DC,
            "
apiVersion: sallyport.dev/v1alpha1
kind: PublishedApp
metadata: {name: wiki, namespace: team-a}
spec:
  externalUrl: https://wiki.example.com/
  internalUrl: http://wiki.corp.internal/
  connectorGroup: {name: dc}
  preAuthentication: {type: Passthrough}
  tls: {secretName: wiki-tls}
",
        ]);
        manifests.policies.push(policy(
            "{times: [{from: '08:00', to: '18:00', timeZone: Mars/Olympus}]}",
        ));
        let defaults = FleetDefaults::default();
        let compiled = compile(&manifests.inputs("sallyport-system", &defaults, &[]))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(compiled.config.routes.is_empty());
        assert!(compiled.config.policies.is_empty());
        let reasons: Vec<(&str, &str)> = compiled
            .skipped
            .iter()
            .map(|s| (s.id.as_str(), s.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                ("team-a/office-hours", INVALID_POLICY),
                ("team-a/wiki", "PolicyInvalid")
            ]
        );
    }
}
