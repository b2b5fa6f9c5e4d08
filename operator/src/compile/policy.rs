//! ConditionalAccessPolicies in the configuration: which an app's assessment sees, and
//! what the proxy evaluates.

use std::collections::{BTreeMap, BTreeSet};

use sallyport_api::ConditionalAccessPolicy;
use sallyport_api::fleet_config::{Policy, PolicyAssignments};

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
    if let Some(frequency) = spec
        .session
        .as_ref()
        .and_then(|s| s.sign_in_frequency.as_ref())
    {
        check_duration("spec.session.signInFrequency", frequency, &mut problems);
    }
    match Problem::combine(problems) {
        Some(problem) => Err(problem),
        None => Ok(Policy {
            id: id.to_owned(),
            state: spec.state,
            assignments: PolicyAssignments {
                users: spec.assignments.users.clone(),
                groups: spec.assignments.groups.clone(),
            },
            conditions: spec.conditions.clone(),
            grant: spec.grant.clone(),
            session: spec.session.clone(),
        }),
    }
}
