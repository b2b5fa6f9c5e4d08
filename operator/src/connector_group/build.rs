//! The pure steps of the ConnectorGroup reconcile: the registration token Secret, the
//! connector Deployment with its state slots and least-privilege identity, and the
//! status, from the group and what exists.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe, Secret, SecretKeySelector,
    ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::{Resource, ResourceExt};
use sallyport_api::connector_group::ConnectorDeployment;
use sallyport_api::{Connector, ConnectorGroup};

use crate::conditions::Verdict;
use crate::managed::{group_labels, hardened_container, hardened_pod};

pub use sallyport_api::registration::{
    CA_KEY, CONNECTOR_VERSION_ANNOTATION, EXPIRES_AT_ANNOTATION, ISSUED_AT_ANNOTATION,
    MAX_USES_ANNOTATION, STATE_SECRET_TYPE, TOKEN_KEY, TOKEN_SECRET_TYPE, USES_ANNOTATION,
    state_secret_name, token_secret_name,
};

/// Where connectors reach the fleet: what the operator wires into connector Deployments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetEndpoint {
    /// `host:port` connectors dial.
    pub address: String,
    /// The host name the tunnel serving certificate is checked against (and sent as SNI).
    pub server_name: String,
}

/// The condition type of a ConnectorGroup.
pub const READY: &str = "Ready";

/// The name of the connector Deployment of `group`, and of its ServiceAccount, Role and
/// RoleBinding.
pub fn deployment_name(group: &str) -> String {
    format!("{group}-connector")
}

/// The verbs a connector pod holds on its group's state slots: read one, and claim,
/// renew, write and release it with merge patches that carry the resourceVersion they
/// read (optimistic concurrency without `update`). Never `list`, `create` or `delete`.
pub const STATE_SLOT_VERBS: [&str; 2] = ["get", "patch"];

/// The state slot Secrets of a group whose Deployment runs `replicas` connectors: one per
/// replica and one spare for the pod a rolling update adds (the Deployment surges by one).
pub fn state_slot_names(group: &str, replicas: i32) -> Vec<String> {
    let count = usize::try_from(replicas).unwrap_or(0) + 1;
    (0..count).map(|i| state_secret_name(group, i)).collect()
}

/// Whether the Secret `name`, labelled for `group`, is one of that group's state slots
/// (whatever the replica count): connectors renew their claims on them every few seconds,
/// which needs no reconcile.
pub fn is_state_slot(group: &str, name: &str) -> bool {
    let first = state_secret_name(group, 0);
    first
        .strip_suffix('0')
        .and_then(|prefix| name.strip_prefix(prefix))
        .is_some_and(|index| !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()))
}

/// State slot `name` of `group`: an empty Secret of type [`STATE_SECRET_TYPE`] a connector
/// pod claims and keeps its credentials in. Only metadata and type are applied, so the
/// connector's data and claim annotations are never overwritten.
pub fn state_slot(group: &ConnectorGroup, name: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: group.namespace(),
            labels: Some(group_labels(&group.name_any())),
            owner_references: Some(owner(group)),
            ..ObjectMeta::default()
        },
        type_: Some(STATE_SECRET_TYPE.to_owned()),
        ..Secret::default()
    }
}

/// The metadata of `group`'s connector ServiceAccount, Role and RoleBinding: named like
/// the Deployment, labelled and owned by the group.
fn connector_rbac_metadata(group: &ConnectorGroup) -> ObjectMeta {
    let name = group.name_any();
    ObjectMeta {
        name: Some(deployment_name(&name)),
        namespace: group.namespace(),
        labels: Some(group_labels(&name)),
        owner_references: Some(owner(group)),
        ..ObjectMeta::default()
    }
}

/// The ServiceAccount connector pods of `group` run as.
pub fn connector_service_account(group: &ConnectorGroup) -> ServiceAccount {
    ServiceAccount {
        metadata: connector_rbac_metadata(group),
        ..ServiceAccount::default()
    }
}

/// The Role of `group`'s connectors: [`STATE_SLOT_VERBS`] on exactly the Secrets `slots`,
/// by name. Nothing else: no other Secret, no listing, no creating.
pub fn connector_role(group: &ConnectorGroup, slots: &[String]) -> Role {
    Role {
        metadata: connector_rbac_metadata(group),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".to_owned()]),
            resource_names: Some(slots.to_vec()),
            verbs: STATE_SLOT_VERBS.iter().map(|v| (*v).to_owned()).collect(),
            ..PolicyRule::default()
        }]),
    }
}

/// The RoleBinding giving `group`'s connector ServiceAccount its Role.
pub fn connector_role_binding(group: &ConnectorGroup) -> RoleBinding {
    let name = deployment_name(&group.name_any());
    RoleBinding {
        metadata: connector_rbac_metadata(group),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name,
            namespace: group.namespace(),
            api_group: None,
        }]),
    }
}

/// What to do with the registration token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenPlan {
    /// Keep the current token, which expires at `expires_at`.
    Keep {
        /// The token.
        token: String,
        /// When it was minted.
        issued_at: Timestamp,
    },
    /// Mint a new token, for the reason given.
    Mint(&'static str),
}

fn annotation_time(secret: &Secret, key: &str) -> Option<Timestamp> {
    secret.annotations().get(key)?.parse().ok()
}

/// Whether the existing token Secret can stay: it must hold a token, be within the
/// group's `tokenTTL` of its minting, and have uses left.
pub fn plan_token(group: &ConnectorGroup, existing: Option<&Secret>, now: Timestamp) -> TokenPlan {
    let Some(secret) = existing else {
        return TokenPlan::Mint("no token yet");
    };
    let token = secret
        .data
        .as_ref()
        .and_then(|d| d.get(TOKEN_KEY))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .filter(|t| !t.is_empty());
    let (Some(token), Some(issued_at)) = (token, annotation_time(secret, ISSUED_AT_ANNOTATION))
    else {
        return TokenPlan::Mint("the token Secret is incomplete");
    };
    let Some(expires_at) = expiry(group, issued_at) else {
        return TokenPlan::Mint("tokenTTL is invalid");
    };
    if expires_at <= now {
        return TokenPlan::Mint("the token expired");
    }
    let max_uses = group.spec.registration.max_uses;
    let uses: i32 = secret
        .annotations()
        .get(USES_ANNOTATION)
        .and_then(|u| u.parse().ok())
        .unwrap_or(0);
    if max_uses > 0 && uses >= max_uses {
        return TokenPlan::Mint("the token reached maxUses");
    }
    TokenPlan::Keep { token, issued_at }
}

/// When a token minted at `issued_at` expires under the group's current `tokenTTL`.
pub fn expiry(group: &ConnectorGroup, issued_at: Timestamp) -> Option<Timestamp> {
    let ttl = group.spec.registration.token_ttl.to_std().ok()?;
    issued_at
        .checked_add(SignedDuration::try_from(ttl).ok()?)
        .ok()
}

/// A new random token: 32 bytes from the operating system, base64url.
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

fn owner(
    group: &ConnectorGroup,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
    group.controller_owner_ref(&()).into_iter().collect()
}

/// The registration token Secret of `group` holding `token` and, once the fleet's root
/// CA exists, its certificate `fleet_ca` (so connectors can verify the fleet).
pub fn token_secret(
    group: &ConnectorGroup,
    token: &str,
    issued_at: Timestamp,
    fleet_ca: Option<&[u8]>,
) -> Secret {
    let name = group.name_any();
    let expires_at = expiry(group, issued_at)
        .map(|t| t.to_string())
        .unwrap_or_default();
    Secret {
        metadata: ObjectMeta {
            name: Some(token_secret_name(&name)),
            namespace: group.namespace(),
            labels: Some(group_labels(&name)),
            annotations: Some(BTreeMap::from([
                (ISSUED_AT_ANNOTATION.to_owned(), issued_at.to_string()),
                (EXPIRES_AT_ANNOTATION.to_owned(), expires_at),
                (
                    MAX_USES_ANNOTATION.to_owned(),
                    group.spec.registration.max_uses.to_string(),
                ),
            ])),
            owner_references: Some(owner(group)),
            ..ObjectMeta::default()
        },
        type_: Some(TOKEN_SECRET_TYPE.to_owned()),
        data: Some(
            [
                Some((TOKEN_KEY.to_owned(), ByteString(token.as_bytes().to_vec()))),
                Some((
                    "connectorGroup".to_owned(),
                    ByteString(
                        format!("{}/{name}", group.namespace().unwrap_or_default()).into_bytes(),
                    ),
                )),
                fleet_ca.map(|ca| (CA_KEY.to_owned(), ByteString(ca.to_vec()))),
            ]
            .into_iter()
            .flatten()
            .collect(),
        ),
        ..Secret::default()
    }
}

/// The label selector of `group`'s connector pods (the Deployment's own selector).
pub fn connector_pod_selector(group: &str) -> String {
    format!("app.kubernetes.io/name=sallyport-connector,app.kubernetes.io/instance={group}")
}

/// The port a connector pod serves `/metrics` on (container port `metrics`), for a
/// PodMonitor or scrape annotations to find.
pub const CONNECTOR_METRICS_PORT: i32 = 9090;

/// How long a new connector pod must stay ready before the rollout replaces the next old
/// one (`minReadySeconds`): a version that connects and then fails is caught first.
pub const MIN_READY_SECONDS: i32 = 5;

/// How long a rollout may go without progress before the Deployment reports
/// `ProgressDeadlineExceeded` (the operator reports a halt sooner when a new pod crash
/// loops or cannot pull its image).
pub const PROGRESS_DEADLINE_SECONDS: i32 = 300;

/// How long a stopping connector pod may drain before it is killed: the connector's
/// default `--drain-timeout` (30 s) and a margin.
pub const TERMINATION_GRACE_SECONDS: i64 = 45;

/// The connector Deployment of `group`: a hardened pod (non-root, read-only root
/// filesystem, no capabilities, RuntimeDefault seccomp) that registers with the group's
/// token and keeps its state in one of the group's state slots, as the group's
/// ServiceAccount (whose token is mounted for that alone). It runs the group's target
/// version (see [`super::version`]) and rolls one pod at a time (surge one, none
/// unavailable), a new pod counting only once its readiness probe (`/readyz`: tunnels to
/// every proxy replica) has passed for [`MIN_READY_SECONDS`], so one spare slot is
/// enough and the group never has fewer ready connectors than it asks for.
pub fn connector_deployment(
    group: &ConnectorGroup,
    spec: &ConnectorDeployment,
    default_image: &str,
    fleet: &FleetEndpoint,
) -> Deployment {
    let name = group.name_any();
    let labels = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "sallyport-connector".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), name.clone()),
    ]);
    let mut all_labels = group_labels(&name);
    all_labels.extend(labels.clone());
    let target = super::version::target_version(group.spec.version.as_deref(), default_image);
    let (image, version) =
        super::version::deployment_image(spec.image.as_deref(), default_image, &target);
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("metrics".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    };
    let env = |name: &str, value: String| EnvVar {
        name: name.to_owned(),
        value: Some(value),
        value_from: None,
    };
    let pod_field = |name: &str, path: &str| EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    };
    let container = Container {
        name: "connector".to_owned(),
        image: Some(image),
        args: Some(vec!["run".to_owned()]),
        env: Some(vec![
            env(
                "SALLYPORT_CONNECTOR_GROUP",
                format!("{}/{name}", group.namespace().unwrap_or_default()),
            ),
            EnvVar {
                name: "SALLYPORT_REGISTRATION_TOKEN".to_owned(),
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: token_secret_name(&name),
                        key: TOKEN_KEY.to_owned(),
                        optional: Some(false),
                    }),
                    ..EnvVarSource::default()
                }),
            },
            env("SALLYPORT_FLEET_ADDRESS", fleet.address.clone()),
            env("SALLYPORT_FLEET_SERVER_NAME", fleet.server_name.clone()),
            EnvVar {
                name: "SALLYPORT_FLEET_CA".to_owned(),
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: token_secret_name(&name),
                        key: CA_KEY.to_owned(),
                        optional: Some(false),
                    }),
                    ..EnvVarSource::default()
                }),
            },
            env(
                "SALLYPORT_STATE_SECRETS",
                state_slot_names(&name, spec.replicas).join(","),
            ),
            env(
                "SALLYPORT_METRICS_ADDRESS",
                format!("0.0.0.0:{CONNECTOR_METRICS_PORT}"),
            ),
            pod_field("POD_NAME", "metadata.name"),
            pod_field("POD_NAMESPACE", "metadata.namespace"),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".to_owned()),
            container_port: CONNECTOR_METRICS_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(probe("/readyz", 2, 2)),
        liveness_probe: Some(probe("/livez", 10, 3)),
        resources: spec.resources.clone(),
        security_context: Some(hardened_container()),
        volume_mounts: Some(vec![VolumeMount {
            name: "tmp".to_owned(),
            mount_path: "/tmp".to_owned(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    let empty_dir = |name: &str| Volume {
        name: name.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    };
    Deployment {
        metadata: ObjectMeta {
            name: Some(deployment_name(&name)),
            namespace: group.namespace(),
            labels: Some(all_labels.clone()),
            owner_references: Some(owner(group)),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            min_ready_seconds: Some(MIN_READY_SECONDS),
            progress_deadline_seconds: Some(PROGRESS_DEADLINE_SECONDS),
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            selector: LabelSelector {
                match_labels: Some(labels),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(all_labels),
                    annotations: Some(BTreeMap::from([(
                        CONNECTOR_VERSION_ANNOTATION.to_owned(),
                        version,
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
                    // The token serves the state slots alone: its Role allows nothing else.
                    service_account_name: Some(deployment_name(&name)),
                    automount_service_account_token: Some(true),
                    enable_service_links: Some(false),
                    security_context: Some(hardened_pod()),
                    node_selector: Some(spec.node_selector.clone()).filter(|s| !s.is_empty()),
                    tolerations: Some(spec.tolerations.clone()).filter(|t| !t.is_empty()),
                    affinity: spec.affinity.clone(),
                    volumes: Some(vec![empty_dir("tmp")]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// Whether a Connector reports a connected tunnel.
pub fn is_connected(connector: &Connector) -> bool {
    connector.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Connected" && c.status == "True")
    })
}

/// The group's Ready condition and its desired and connected connector counts.
pub fn assess(group: &ConnectorGroup, connectors: &[Connector]) -> (Verdict, i32, i32) {
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let connected = count(connectors.iter().filter(|c| is_connected(c)).count());
    let desired = match &group.spec.deployment {
        Some(deployment) => deployment.replicas,
        None => count(connectors.len()),
    };
    let verdict = if connected > 0 {
        Verdict::ok(
            READY,
            "Connected",
            format!("{connected} of {desired} connector(s) connected"),
        )
    } else if connectors.is_empty() {
        Verdict::failed(
            READY,
            "NoConnectedConnectors",
            format!(
                "no connector has registered yet; they register with the token in Secret {}",
                token_secret_name(&group.name_any())
            ),
        )
    } else {
        Verdict::failed(
            READY,
            "NoConnectedConnectors",
            format!(
                "none of the {} registered connector(s) is connected",
                connectors.len()
            ),
        )
    };
    (verdict, desired, connected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(spec: &str) -> ConnectorGroup {
        let yaml = format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: ConnectorGroup\nmetadata: {{name: dc, namespace: ops, uid: u-1}}\nspec: {spec}\n"
        );
        serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_token_is_kept_until_its_ttl_or_max_uses_run_out() {
        let group = group("{registration: {tokenTTL: 1h, maxUses: 2}}");
        assert_eq!(
            plan_token(&group, None, at("2026-01-01T00:00:00Z")),
            TokenPlan::Mint("no token yet")
        );

        let issued = at("2026-01-01T00:00:00Z");
        let mut secret = token_secret(&group, "abc", issued, None);
        let keep = TokenPlan::Keep {
            token: "abc".into(),
            issued_at: issued,
        };
        assert_eq!(
            plan_token(&group, Some(&secret), at("2026-01-01T00:59:00Z")),
            keep
        );
        assert_eq!(
            plan_token(&group, Some(&secret), at("2026-01-01T01:00:00Z")),
            TokenPlan::Mint("the token expired")
        );

        secret
            .annotations_mut()
            .insert(USES_ANNOTATION.into(), "2".into());
        assert_eq!(
            plan_token(&group, Some(&secret), at("2026-01-01T00:10:00Z")),
            TokenPlan::Mint("the token reached maxUses")
        );
    }

    #[test]
    fn a_shorter_ttl_applies_to_the_current_token() {
        let issued = at("2026-01-01T00:00:00Z");
        let secret = token_secret(
            &group("{registration: {tokenTTL: 24h}}"),
            "abc",
            issued,
            None,
        );
        let shorter = group("{registration: {tokenTTL: 1h}}");
        assert_eq!(
            plan_token(&shorter, Some(&secret), at("2026-01-01T02:00:00Z")),
            TokenPlan::Mint("the token expired")
        );
    }

    #[test]
    fn tokens_are_random_and_long() {
        let (a, b) = (
            new_token().unwrap_or_default(),
            new_token().unwrap_or_default(),
        );
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
    }

    #[test]
    fn the_token_secret_is_owned_labelled_and_annotated() {
        let secret = token_secret(
            &group("{registration: {tokenTTL: 2h, maxUses: 3}}"),
            "abc",
            at("2026-01-01T00:00:00Z"),
            Some(b"CA PEM"),
        );
        assert_eq!(secret.name_any(), "dc-registration");
        assert_eq!(secret.type_.as_deref(), Some(TOKEN_SECRET_TYPE));
        let data = secret.data.clone().unwrap_or_default();
        assert_eq!(
            data.get(CA_KEY).map(|v| v.0.as_slice()),
            Some(&b"CA PEM"[..])
        );
        assert_eq!(
            data.get(TOKEN_KEY).map(|v| v.0.as_slice()),
            Some(&b"abc"[..])
        );
        assert_eq!(
            secret
                .annotations()
                .get(EXPIRES_AT_ANNOTATION)
                .map(String::as_str),
            Some("2026-01-01T02:00:00Z")
        );
        assert_eq!(
            secret
                .annotations()
                .get(MAX_USES_ANNOTATION)
                .map(String::as_str),
            Some("3")
        );
        assert_eq!(
            secret
                .owner_references()
                .first()
                .map(|o| (o.kind.as_str(), o.controller)),
            Some(("ConnectorGroup", Some(true)))
        );
        assert_eq!(
            secret
                .labels()
                .get("sallyport.dev/connector-group")
                .map(String::as_str),
            Some("dc")
        );
    }

    #[test]
    fn the_deployment_runs_the_target_version_and_waits_for_readiness() {
        let fleet = FleetEndpoint {
            address: "tunnel.example.com:443".to_owned(),
            server_name: "tunnel.example.com".to_owned(),
        };
        let rolled = |spec_yaml: &str| {
            let group = group(spec_yaml);
            let Some(spec) = group.spec.deployment.clone() else {
                panic!("no deployment")
            };
            let deployment =
                connector_deployment(&group, &spec, "ghcr.io/s/connector:0.1.0", &fleet);
            let Some(spec) = deployment.spec else {
                panic!("no spec")
            };
            let template = spec.template;
            let version = template
                .metadata
                .and_then(|m| m.annotations)
                .and_then(|a| a.get(CONNECTOR_VERSION_ANNOTATION).cloned());
            let Some(pod) = template.spec else {
                panic!("no pod spec")
            };
            let container = pod.containers.first().cloned().unwrap_or_default();
            (
                spec.strategy,
                spec.min_ready_seconds,
                pod.termination_grace_period_seconds,
                container,
                version,
            )
        };

        let (strategy, min_ready, grace, container, version) =
            rolled("{deployment: {replicas: 3}}");
        assert_eq!(
            container.image.as_deref(),
            Some("ghcr.io/s/connector:0.1.0")
        );
        assert_eq!(version.as_deref(), Some("0.1.0"));
        let rolling = strategy.and_then(|s| s.rolling_update).unwrap_or_default();
        assert_eq!(
            (rolling.max_surge, rolling.max_unavailable),
            (Some(IntOrString::Int(1)), Some(IntOrString::Int(0)))
        );
        assert_eq!(min_ready, Some(MIN_READY_SECONDS));
        assert_eq!(grace, Some(TERMINATION_GRACE_SECONDS));
        let readiness = container
            .readiness_probe
            .and_then(|p| p.http_get)
            .unwrap_or_default();
        assert_eq!(
            (readiness.path.as_deref(), readiness.port),
            (Some("/readyz"), IntOrString::String("metrics".to_owned()))
        );

        let (_, _, _, container, version) = rolled("{version: 0.2.0, deployment: {replicas: 3}}");
        assert_eq!(
            container.image.as_deref(),
            Some("ghcr.io/s/connector:0.2.0")
        );
        assert_eq!(version.as_deref(), Some("0.2.0"));
        let (_, _, _, container, version) = rolled(
            "{version: 0.2.0, deployment: {replicas: 3, image: mirror.corp:5000/connector}}",
        );
        assert_eq!(
            container.image.as_deref(),
            Some("mirror.corp:5000/connector:0.2.0")
        );
        assert_eq!(version.as_deref(), Some("0.2.0"));
    }

    #[test]
    fn the_connector_pod_is_hardened() {
        let group = group("{deployment: {replicas: 3, nodeSelector: {zone: a}}}");
        let Some(spec) = group.spec.deployment.clone() else {
            panic!("no deployment")
        };
        let deployment = connector_deployment(
            &group,
            &spec,
            "example/connector:1",
            &FleetEndpoint {
                address: "tunnel.example.com:443".to_owned(),
                server_name: "tunnel.example.com".to_owned(),
            },
        );
        let Some(deployment_spec) = deployment.spec else {
            panic!("no spec")
        };
        assert_eq!(deployment_spec.replicas, Some(3));
        let Some(pod) = deployment_spec.template.spec else {
            panic!("no pod spec")
        };
        // The ServiceAccount token is mounted for the state slots, which its Role alone
        // allows.
        assert_eq!(pod.service_account_name.as_deref(), Some("dc-connector"));
        assert_eq!(pod.automount_service_account_token, Some(true));
        let volumes: Vec<_> = pod
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(volumes, ["tmp"], "no state on an emptyDir");
        let rolling = deployment_spec
            .strategy
            .as_ref()
            .and_then(|s| s.rolling_update.clone());
        assert_eq!(
            rolling.map(|r| (r.max_surge, r.max_unavailable)),
            Some((Some(IntOrString::Int(1)), Some(IntOrString::Int(0)))),
            "one surge pod: one spare slot"
        );
        assert_eq!(
            pod.node_selector
                .and_then(|s| s.get("zone").cloned())
                .as_deref(),
            Some("a")
        );
        let pod_security = pod.security_context.unwrap_or_default();
        assert_eq!(
            (pod_security.run_as_non_root, pod_security.run_as_user),
            (Some(true), Some(65532))
        );
        let container = &pod.containers[0];
        assert_eq!(container.image.as_deref(), Some("example/connector:1"));
        let security = container.security_context.clone().unwrap_or_default();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(
            security.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_owned()])
        );
        assert_eq!(
            security.seccomp_profile.map(|p| p.type_).as_deref(),
            Some("RuntimeDefault")
        );
        let token = container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "SALLYPORT_REGISTRATION_TOKEN");
        let secret_ref = token
            .and_then(|e| e.value_from.clone())
            .and_then(|v| v.secret_key_ref);
        assert_eq!(
            secret_ref.map(|r| (r.name, r.key)),
            Some(("dc-registration".to_owned(), "token".to_owned()))
        );
        let env = |name: &str| {
            let var = container.env.iter().flatten().find(|e| e.name == name);
            let literal = var.and_then(|e| e.value.clone());
            let from_secret = var
                .and_then(|e| e.value_from.clone())
                .and_then(|v| v.secret_key_ref)
                .map(|r| format!("{}:{}", r.name, r.key));
            literal.or(from_secret)
        };
        assert_eq!(
            env("SALLYPORT_FLEET_ADDRESS").as_deref(),
            Some("tunnel.example.com:443")
        );
        assert_eq!(
            env("SALLYPORT_FLEET_SERVER_NAME").as_deref(),
            Some("tunnel.example.com")
        );
        assert_eq!(
            env("SALLYPORT_FLEET_CA").as_deref(),
            Some("dc-registration:ca.crt")
        );
        assert_eq!(
            env("SALLYPORT_STATE_SECRETS").as_deref(),
            Some(
                "dc-connector-state-0,dc-connector-state-1,dc-connector-state-2,dc-connector-state-3"
            )
        );
        assert_eq!(env("SALLYPORT_STATE_DIR"), None);
        assert_eq!(
            env("SALLYPORT_METRICS_ADDRESS").as_deref(),
            Some("0.0.0.0:9090")
        );
        let ports: Vec<_> = container
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref(), p.container_port))
            .collect();
        assert_eq!(ports, [(Some("metrics"), 9090)]);
        let field = |name: &str| {
            container
                .env
                .iter()
                .flatten()
                .find(|e| e.name == name)
                .and_then(|e| e.value_from.clone())
                .and_then(|v| v.field_ref)
                .map(|f| f.field_path)
        };
        assert_eq!(field("POD_NAME").as_deref(), Some("metadata.name"));
        assert_eq!(
            field("POD_NAMESPACE").as_deref(),
            Some("metadata.namespace")
        );
    }

    #[test]
    fn state_slots_are_one_per_replica_and_a_spare_empty_and_owned() {
        assert_eq!(
            state_slot_names("dc", 2),
            [
                "dc-connector-state-0",
                "dc-connector-state-1",
                "dc-connector-state-2"
            ]
        );
        assert_eq!(state_slot_names("dc", 0), ["dc-connector-state-0"]);
        assert_eq!(state_slot_names("dc", -1), ["dc-connector-state-0"]);

        let slot = state_slot(
            &group("{deployment: {replicas: 1}}"),
            "dc-connector-state-1",
        );
        assert_eq!(slot.type_.as_deref(), Some("sallyport.dev/connector-state"));
        assert_eq!(slot.namespace().as_deref(), Some("ops"));
        assert_eq!(slot.data, None, "the operator never writes a slot's data");
        assert_eq!(slot.string_data, None);
        assert!(
            slot.annotations().is_empty(),
            "the claim annotations are the connector's"
        );
        assert_eq!(
            slot.labels()
                .get("sallyport.dev/connector-group")
                .map(String::as_str),
            Some("dc")
        );
        assert_eq!(
            slot.owner_references()
                .first()
                .map(|o| (o.kind.as_str(), o.controller)),
            Some(("ConnectorGroup", Some(true)))
        );
    }

    #[test]
    fn slots_are_told_apart_from_other_group_secrets() {
        assert!(is_state_slot("dc", "dc-connector-state-0"));
        assert!(is_state_slot("dc", "dc-connector-state-17"));
        assert!(!is_state_slot("dc", "dc-registration"));
        assert!(!is_state_slot("dc", "dc-connector-state-"));
        assert!(!is_state_slot("dc", "dc-connector-state-1x"));
        assert!(!is_state_slot("d", "dc-connector-state-0"));
        assert!(!is_state_slot(
            "dc-connector-state-0",
            "dc-connector-state-0-registration"
        ));
    }

    #[test]
    fn the_connector_role_reaches_exactly_its_slots() {
        let group = group("{deployment: {replicas: 1}}");
        let slots = state_slot_names("dc", 1);
        let role = connector_role(&group, &slots);
        assert_eq!(role.name_any(), "dc-connector");
        let rules = role.rules.clone().unwrap_or_default();
        assert_eq!(rules.len(), 1, "{rules:?}");
        let rule = &rules[0];
        assert_eq!(rule.api_groups.as_deref(), Some(&[String::new()][..]));
        assert_eq!(rule.resources.as_deref(), Some(&["secrets".to_owned()][..]));
        assert_eq!(
            rule.resource_names.as_deref(),
            Some(
                &[
                    "dc-connector-state-0".to_owned(),
                    "dc-connector-state-1".to_owned()
                ][..]
            )
        );
        assert_eq!(rule.verbs, ["get", "patch"]);

        let binding = connector_role_binding(&group);
        assert_eq!(
            (
                binding.role_ref.kind.as_str(),
                binding.role_ref.name.as_str()
            ),
            ("Role", "dc-connector")
        );
        let subject = binding.subjects.unwrap_or_default();
        assert_eq!(
            subject
                .iter()
                .map(|s| (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()))
                .collect::<Vec<_>>(),
            [("ServiceAccount", "dc-connector", Some("ops"))]
        );
        let account = connector_service_account(&group);
        assert_eq!(account.name_any(), "dc-connector");
        assert!(!account.owner_references().is_empty());
    }

    #[test]
    fn readiness_counts_connected_connectors() {
        let connector = |connected: &str| -> Connector {
            serde_yaml::from_str(&format!(
                "apiVersion: sallyport.dev/v1alpha1\nkind: Connector\nmetadata: {{name: c, namespace: ops}}\nspec: {{connectorGroup: dc}}\nstatus: {{conditions: [{{type: Connected, status: '{connected}', reason: r, message: m, lastTransitionTime: '2026-01-01T00:00:00Z'}}]}}\n"
            ))
            .unwrap_or_else(|e| panic!("{e}"))
        };
        let external = group("{}");
        assert_eq!(assess(&external, &[]).0.reason, "NoConnectedConnectors");
        let (verdict, desired, connected) =
            assess(&external, &[connector("True"), connector("False")]);
        assert_eq!((verdict.status, desired, connected), (true, 2, 1));
        let (_, desired, _) = assess(&group("{deployment: {replicas: 3}}"), &[]);
        assert_eq!(desired, 3);
    }
}
