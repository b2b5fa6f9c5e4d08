//! The operator's least-privilege RBAC: exactly the verbs its controllers use, cluster-wide
//! where apps, groups and their Secrets live in any namespace, and only in its own
//! namespace for the Lease, the fleet's objects and the fleet configuration.
//!
//! Each ConnectorGroup with a Deployment gets a ServiceAccount, Role and RoleBinding of its
//! own (made by the operator, see `connector_group::build::connector_role`): get and patch
//! on its state slot Secrets by name, nothing else. The operator may grant that because
//! it holds get and patch on Secrets itself (Kubernetes refuses to let anyone grant what
//! it does not hold, and the operator has neither `bind` nor `escalate`).
//!
//! The proxy fleet's ServiceAccount `sallyport-proxy` (which the operator creates with
//! the fleet) gets its own, smaller set: read the fleet configuration and the Secrets
//! apps reference, count registration token uses, record Connectors, and keep its
//! replica Lease.
//!
//! `sallyport-operator rbac --namespace NS` prints these objects; the Helm chart renders
//! the same rules, and the e2e tests run the operator and the proxies under them.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The name of the operator's ServiceAccount, ClusterRole and Role.
pub const OPERATOR: &str = "sallyport-operator";

fn rule(api_group: &str, resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![api_group.to_owned()]),
        resources: Some(resources.iter().map(|r| (*r).to_owned()).collect()),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        ..PolicyRule::default()
    }
}

/// The cluster-wide rules: read the Sallyport API and write its status; manage Connector
/// finalizers and expiry; the registration token and state slot Secrets, connector
/// Deployments, and the connectors' ServiceAccounts, Roles and RoleBindings of
/// ConnectorGroups in any namespace; list connector pods (their versions and readiness
/// are a rollout's progress); read Secrets apps reference and namespace labels; publish
/// Events.
pub fn cluster_rules() -> Vec<PolicyRule> {
    vec![
        rule(
            "sallyport.dev",
            &[
                "publishedapps",
                "conditionalaccesspolicies",
                "connectorgroups",
                "connectors",
            ],
            &["get", "list", "watch"],
        ),
        rule(
            "sallyport.dev",
            &[
                "publishedapps/status",
                "conditionalaccesspolicies/status",
                "connectorgroups/status",
                "connectors/status",
            ],
            &["patch"],
        ),
        rule("sallyport.dev", &["connectors"], &["patch", "delete"]),
        rule(
            "",
            &["secrets"],
            &["get", "list", "watch", "create", "patch"],
        ),
        rule("", &["namespaces"], &["get", "list", "watch"]),
        rule("", &["pods"], &["list"]),
        rule(
            "apps",
            &["deployments"],
            &["get", "list", "watch", "create", "patch", "delete"],
        ),
        rule(
            "",
            &["serviceaccounts"],
            &["get", "list", "create", "patch", "delete"],
        ),
        rule(
            "rbac.authorization.k8s.io",
            &["roles", "rolebindings"],
            &["get", "list", "create", "patch", "delete"],
        ),
        rule("events.k8s.io", &["events"], &["create", "patch"]),
    ]
}

/// The rules in the operator's own namespace: the leader Lease, the fleet configuration
/// and revocation ConfigMaps, and the proxy fleet's Service and PodDisruptionBudget (its
/// ServiceAccount falls under the cluster-wide rules).
pub fn namespace_rules() -> Vec<PolicyRule> {
    vec![
        rule(
            "coordination.k8s.io",
            &["leases"],
            &["get", "create", "update"],
        ),
        rule("", &["configmaps"], &["get", "create", "patch"]),
        rule("", &["services"], &["get", "create", "patch"]),
        rule(
            "policy",
            &["poddisruptionbudgets"],
            &["get", "create", "patch"],
        ),
    ]
}

/// The name of the proxy fleet's ServiceAccount, ClusterRole and Role.
pub const PROXY: &str = "sallyport-proxy";

/// The proxy's cluster-wide rules: read the Secrets apps and ConnectorGroups reference
/// (TLS certificates, registration tokens) and count token uses; record the Connectors
/// that register.
pub fn proxy_cluster_rules() -> Vec<PolicyRule> {
    vec![
        rule("", &["secrets"], &["get", "list", "watch", "update"]),
        rule(
            "sallyport.dev",
            &["connectors"],
            &["get", "list", "watch", "create", "patch"],
        ),
        rule("sallyport.dev", &["connectors/status"], &["patch"]),
    ]
}

/// The proxy's rules in the fleet's namespace: the fleet configuration ConfigMap and the
/// replica Leases.
pub fn proxy_namespace_rules() -> Vec<PolicyRule> {
    vec![
        rule("", &["configmaps"], &["get", "list", "watch"]),
        rule(
            "coordination.k8s.io",
            &["leases"],
            &["get", "list", "create", "patch", "delete"],
        ),
    ]
}

/// The RBAC objects for an operator and its proxy fleet in `namespace`, as JSON
/// documents in apply order: the operator's ServiceAccount, ClusterRole,
/// ClusterRoleBinding, Role and RoleBinding, then the proxy's ClusterRole,
/// ClusterRoleBinding, Role and RoleBinding (its ServiceAccount comes with the fleet).
pub fn objects(namespace: &str) -> Result<Vec<serde_json::Value>, serde_json::Error> {
    let mut objects = vec![with_kind(
        "v1",
        "ServiceAccount",
        serde_json::to_value(ServiceAccount {
            metadata: named(OPERATOR, OPERATOR, Some(namespace)),
            ..ServiceAccount::default()
        })?,
    )];
    objects.extend(bound_roles(
        OPERATOR,
        namespace,
        cluster_rules(),
        namespace_rules(),
    )?);
    objects.extend(bound_roles(
        PROXY,
        namespace,
        proxy_cluster_rules(),
        proxy_namespace_rules(),
    )?);
    Ok(objects)
}

fn named(app: &str, name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespace.map(str::to_owned),
        labels: Some([("app.kubernetes.io/name".to_owned(), app.to_owned())].into()),
        ..ObjectMeta::default()
    }
}

/// A ClusterRole and Role named `account`, bound to the ServiceAccount `account` of
/// `namespace`.
fn bound_roles(
    account: &str,
    namespace: &str,
    cluster: Vec<PolicyRule>,
    namespaced: Vec<PolicyRule>,
) -> Result<Vec<serde_json::Value>, serde_json::Error> {
    let subject = Subject {
        kind: "ServiceAccount".to_owned(),
        name: account.to_owned(),
        namespace: Some(namespace.to_owned()),
        api_group: None,
    };
    let role_ref = |kind: &str| RoleRef {
        api_group: "rbac.authorization.k8s.io".to_owned(),
        kind: kind.to_owned(),
        name: account.to_owned(),
    };
    let binding_name = format!("{account}-{namespace}");
    Ok(vec![
        with_kind(
            "rbac.authorization.k8s.io/v1",
            "ClusterRole",
            serde_json::to_value(ClusterRole {
                metadata: named(account, account, None),
                rules: Some(cluster),
                ..ClusterRole::default()
            })?,
        ),
        with_kind(
            "rbac.authorization.k8s.io/v1",
            "ClusterRoleBinding",
            serde_json::to_value(ClusterRoleBinding {
                metadata: named(account, &binding_name, None),
                role_ref: role_ref("ClusterRole"),
                subjects: Some(vec![subject.clone()]),
            })?,
        ),
        with_kind(
            "rbac.authorization.k8s.io/v1",
            "Role",
            serde_json::to_value(Role {
                metadata: named(account, account, Some(namespace)),
                rules: Some(namespaced),
            })?,
        ),
        with_kind(
            "rbac.authorization.k8s.io/v1",
            "RoleBinding",
            serde_json::to_value(RoleBinding {
                metadata: named(account, account, Some(namespace)),
                role_ref: role_ref("Role"),
                subjects: Some(vec![subject]),
            })?,
        ),
    ])
}

fn with_kind(api_version: &str, kind: &str, mut object: serde_json::Value) -> serde_json::Value {
    if let Some(map) = object.as_object_mut() {
        map.insert("apiVersion".to_owned(), api_version.into());
        map.insert("kind".to_owned(), kind.into());
    }
    object
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_rule_grants_wildcards_or_escalation() {
        // RBAC objects only as Roles and RoleBindings (the connectors' own), never
        // cluster-wide ones.
        let all = [
            cluster_rules(),
            namespace_rules(),
            proxy_cluster_rules(),
            proxy_namespace_rules(),
        ];
        for rule in all.iter().flatten() {
            assert!(
                !rule
                    .verbs
                    .iter()
                    .any(|v| v == "*" || v == "escalate" || v == "bind" || v == "impersonate"),
                "{rule:?}"
            );
            assert!(
                !rule.resources.iter().flatten().any(|r| r == "*"),
                "{rule:?}"
            );
            assert!(
                !rule.api_groups.iter().flatten().any(|g| g == "*"),
                "{rule:?}"
            );
            if rule
                .api_groups
                .iter()
                .flatten()
                .any(|g| g == "rbac.authorization.k8s.io")
            {
                assert_eq!(
                    rule.resources.as_deref(),
                    Some(&["roles".to_owned(), "rolebindings".to_owned()][..])
                );
            }
        }
    }

    #[test]
    fn the_operator_holds_what_it_grants_connectors() {
        // Kubernetes lets the operator create the connectors' Roles and RoleBindings only
        // when it holds every verb they grant (it has neither bind nor escalate).
        let cluster = cluster_rules();
        for verb in crate::connector_group::build::STATE_SLOT_VERBS {
            assert!(
                cluster.iter().any(|r| {
                    r.api_groups.iter().flatten().any(|g| g.is_empty())
                        && r.resources.iter().flatten().any(|x| x == "secrets")
                        && r.verbs.iter().any(|v| v == verb)
                        && r.resource_names.is_none()
                }),
                "the operator lacks {verb} on secrets"
            );
        }
    }

    #[test]
    fn secrets_are_never_deleted_and_leases_are_namespaced() {
        let cluster = cluster_rules();
        let secrets = cluster
            .iter()
            .find(|r| r.resources.iter().flatten().any(|x| x == "secrets"));
        assert!(secrets.is_some_and(|r| !r.verbs.iter().any(|v| v == "delete")));
        assert!(!cluster.iter().any(|r| {
            r.resources
                .iter()
                .flatten()
                .any(|x| x == "leases" || x == "configmaps")
        }));
    }

    #[test]
    fn the_objects_bind_the_service_account() {
        let objects = objects("platform").unwrap_or_default();
        let kinds: Vec<_> = objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(
            kinds,
            [
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding"
            ]
        );
        assert_eq!(objects[2]["subjects"][0]["namespace"], "platform");
        assert_eq!(
            objects[2]["metadata"]["name"],
            "sallyport-operator-platform"
        );
        assert_eq!(objects[6]["subjects"][0]["name"], "sallyport-proxy");
        assert_eq!(objects[8]["roleRef"]["name"], "sallyport-proxy");
    }
}
