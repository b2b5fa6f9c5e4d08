//! The pure steps of the ConnectorGroup reconcile: the registration token Secret, the
//! connector Deployment and the status, from the group and what exists.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, PodSpec, PodTemplateSpec, Secret,
    SecretKeySelector, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::{Resource, ResourceExt};
use sallyport_api::connector_group::ConnectorDeployment;
use sallyport_api::{Connector, ConnectorGroup};

use crate::conditions::Verdict;
use crate::managed::{group_labels, hardened_container, hardened_pod};

pub use sallyport_api::registration::{
    CA_KEY, EXPIRES_AT_ANNOTATION, ISSUED_AT_ANNOTATION, MAX_USES_ANNOTATION, TOKEN_KEY,
    TOKEN_SECRET_TYPE, USES_ANNOTATION, token_secret_name,
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

/// The name of the connector Deployment of `group`.
pub fn deployment_name(group: &str) -> String {
    format!("{group}-connector")
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

/// The connector Deployment of `group`: a hardened pod (non-root, read-only root
/// filesystem, no capabilities, RuntimeDefault seccomp) that registers with the group's
/// token.
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
    let image = spec
        .image
        .clone()
        .filter(|i| !i.is_empty())
        .unwrap_or_else(|| default_image.to_owned());
    let env = |name: &str, value: String| EnvVar {
        name: name.to_owned(),
        value: Some(value),
        value_from: None,
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
            env("SALLYPORT_STATE_DIR", "/var/lib/sallyport".to_owned()),
        ]),
        resources: spec.resources.clone(),
        security_context: Some(hardened_container()),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "state".to_owned(),
                mount_path: "/var/lib/sallyport".to_owned(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tmp".to_owned(),
                mount_path: "/tmp".to_owned(),
                ..VolumeMount::default()
            },
        ]),
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
            selector: LabelSelector {
                match_labels: Some(labels),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(all_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(hardened_pod()),
                    node_selector: Some(spec.node_selector.clone()).filter(|s| !s.is_empty()),
                    tolerations: Some(spec.tolerations.clone()).filter(|t| !t.is_empty()),
                    affinity: spec.affinity.clone(),
                    volumes: Some(vec![empty_dir("state"), empty_dir("tmp")]),
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
        assert_eq!(pod.automount_service_account_token, Some(false));
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
