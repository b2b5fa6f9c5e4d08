//! ConnectorGroups in the configuration: their settings, checked.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sallyport_api::ConnectorGroup;
use sallyport_api::connector_group::ConnectorGroupSpec;
use sallyport_api::fleet_config::ConnectorGroupConfig;

use super::{Problem, Skipped, check_duration};

/// One ConnectorGroup of the inputs.
pub(super) struct Group {
    /// The group as the PublishedApp assessment reads it: name, namespace and
    /// `allowedNamespaces` only, so that handing a copy to each app stays cheap.
    pub lookup: ConnectorGroup,
    /// Its configuration, or why it is left out.
    pub config: Result<ConnectorGroupConfig, Problem>,
}

/// The ConnectorGroups of the inputs, by id.
pub(super) struct Groups {
    by_id: BTreeMap<String, Group>,
}

impl Groups {
    /// Reads `groups` (whose ids are `ids`), reporting invalid ones in `skipped`.
    pub fn new(
        groups: &[ConnectorGroup],
        ids: &[String],
        default_version: Option<&str>,
        skipped: &mut Vec<Skipped>,
    ) -> Self {
        let mut by_id = BTreeMap::new();
        for (group, id) in groups.iter().zip(ids) {
            let config = group_config(group, id, default_version);
            if let Err(problem) = &config {
                skipped.push(Skipped {
                    kind: "ConnectorGroup",
                    id: id.clone(),
                    reason: problem.reason,
                    message: problem.message.clone(),
                });
            }
            let lookup = ConnectorGroup {
                metadata: ObjectMeta {
                    name: group.metadata.name.clone(),
                    namespace: group.metadata.namespace.clone(),
                    ..ObjectMeta::default()
                },
                spec: ConnectorGroupSpec {
                    deployment: None,
                    ..group.spec.clone()
                },
                status: None,
            };
            by_id.insert(id.clone(), Group { lookup, config });
        }
        Self { by_id }
    }

    /// The group `id` (`namespace/name`), if it is among the inputs.
    pub fn get(&self, id: &str) -> Option<&Group> {
        self.by_id.get(id)
    }

    /// The configuration of every valid group, sorted by id.
    pub fn configs(&self) -> Vec<ConnectorGroupConfig> {
        self.by_id
            .values()
            .filter_map(|group| group.config.as_ref().ok().cloned())
            .collect()
    }
}

/// The configuration of `group`, or why its settings cannot be used.
fn group_config(
    group: &ConnectorGroup,
    id: &str,
    default_version: Option<&str>,
) -> Result<ConnectorGroupConfig, Problem> {
    let spec = &group.spec;
    let mut problems = Vec::new();
    let validity = check_duration(
        "spec.certificate.validity",
        &spec.certificate.validity,
        &mut problems,
    );
    let renew_after = check_duration(
        "spec.certificate.renewAfter",
        &spec.certificate.renew_after,
        &mut problems,
    );
    check_duration(
        "spec.registration.tokenTTL",
        &spec.registration.token_ttl,
        &mut problems,
    );
    check_duration(
        "spec.inactiveConnectorTTL",
        &spec.inactive_connector_ttl,
        &mut problems,
    );
    if let (Some(validity), Some(renew_after)) = (validity, renew_after)
        && renew_after >= validity
    {
        problems.push(Problem::new(
            "InvalidField",
            "spec.certificate.renewAfter must be shorter than spec.certificate.validity",
        ));
    }
    if spec.registration.max_uses < 0 {
        problems.push(Problem::new(
            "InvalidField",
            "spec.registration.maxUses must not be negative",
        ));
    }
    match Problem::combine(problems) {
        Some(problem) => Err(problem),
        None => Ok(ConnectorGroupConfig {
            id: id.to_owned(),
            certificate: spec.certificate.clone(),
            registration: spec.registration.clone(),
            inactive_connector_ttl: spec.inactive_connector_ttl.clone(),
            connector_version: spec
                .version
                .as_deref()
                .filter(|v| !v.is_empty())
                .or(default_version)
                .map(str::to_owned),
        }),
    }
}
