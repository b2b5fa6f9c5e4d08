//! `ConnectorGroup`: the connectors of one private network, and how they register.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;

/// A set of connectors in one private network that carry the traffic of the apps assigned
/// to it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sallyport.dev",
    version = "v1alpha1",
    kind = "ConnectorGroup",
    namespaced,
    status = "ConnectorGroupStatus",
    shortname = "cg",
    category = "sallyport",
    doc = "ConnectorGroup is a set of connectors in one private network. Connectors make only outbound mutual-TLS connections to the proxy fleet and carry the requests of the PublishedApps assigned to the group. With spec.deployment set, the operator runs the connectors in this cluster; otherwise they run elsewhere and register with the group's bootstrap token.",
    printcolumn(
        name = "DESIRED",
        type_ = "integer",
        json_path = ".status.desiredConnectors",
        description = "Connectors the group should have"
    ),
    printcolumn(
        name = "CONNECTED",
        type_ = "integer",
        json_path = ".status.connectedConnectors",
        description = "Connectors holding tunnels to the fleet"
    ),
    printcolumn(
        name = "READY",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the group can carry traffic"
    ),
    printcolumn(
        name = "VERSION",
        type_ = "string",
        json_path = ".status.rollout.targetVersion",
        description = "The connector version the group should run"
    ),
    printcolumn(
        name = "UP-TO-DATE",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"UpToDate\")].reason",
        description = "Whether every connector runs that version, or why not"
    ),
    printcolumn(
        name = "AGE",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorGroupSpec {
    /// The connector version this group should run, for example `0.2.0`. Defaults to
    /// the version of the operator's release (the tag of its `--connector-image`). When
    /// it changes, connectors in this cluster roll one at a time, each new one connected
    /// and ready before the next old one drains; connectors outside the cluster learn it
    /// from their configuration, report it in their Connector status, and are upgraded
    /// by whoever runs them (docs/connector-install.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new(r"self.matches(r'^[A-Za-z0-9_][A-Za-z0-9_.-]*$')").message("must be a version usable as an image tag: letters, digits, '_', '.' and '-', not starting with '.' or '-' (for example 0.2.0)"))]
    pub version: Option<String>,

    /// Runs the group's connectors as a Deployment in this cluster. Omit it when the
    /// connectors run outside this cluster (on VMs, as a systemd unit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<ConnectorDeployment>,

    /// How connectors register with the fleet.
    #[serde(default)]
    pub registration: Registration,

    /// Lifetime of the client certificates issued to this group's connectors.
    #[serde(default)]
    pub certificate: CertificatePolicy,

    /// Connector objects of this group not seen for this long are removed, for example
    /// `240h`.
    #[serde(
        rename = "inactiveConnectorTTL",
        default = "default_inactive_connector_ttl"
    )]
    pub inactive_connector_ttl: Duration,

    /// Which namespaces' PublishedApps may use this group.
    #[serde(default)]
    pub allowed_namespaces: AllowedNamespaces,
}

fn default_inactive_connector_ttl() -> Duration {
    Duration::from_static("240h")
}

/// The in-cluster Deployment that runs a group's connectors.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorDeployment {
    /// How many connectors to run. Two or more keep the group up while one restarts;
    /// three is the recommended size.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,

    /// The connector image. Without a tag or digest (for example a mirror,
    /// `registry.corp.example/sallyport-connector`) the group's version is its tag; with
    /// one it is used as it is and its tag is the version. Defaults to the repository of
    /// the operator's own release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new(r"self.matches(r'^[^\s]+$')").message("must be an image reference without spaces"))]
    pub image: Option<String>,

    /// Compute resources of each connector container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Node labels the connector pods must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations of the connector pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Scheduling constraints of the connector pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
}

fn default_replicas() -> i32 {
    2
}

/// How connectors register with the fleet.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    /// Lifetime of the bootstrap registration token Secret the operator mints for the
    /// group; a new token replaces it when it expires. For example `24h`.
    #[serde(rename = "tokenTTL", default = "default_token_ttl")]
    pub token_ttl: Duration,

    /// How many connectors may register with one token; 0 means unlimited within its
    /// lifetime.
    #[serde(default)]
    #[schemars(range(min = 0, max = 10000))]
    pub max_uses: i32,
}

impl Default for Registration {
    fn default() -> Self {
        Self {
            token_ttl: default_token_ttl(),
            max_uses: 0,
        }
    }
}

fn default_token_ttl() -> Duration {
    Duration::from_static("24h")
}

/// Lifetime of the client certificates issued to a group's connectors.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("duration(self.validity) >= duration('1h')")
    .message("validity must be at least 1h")
    .field_path(".validity"))]
#[x_kube(validation = Rule::new("duration(self.renewAfter) < duration(self.validity)")
    .message("renewAfter must be shorter than validity, so connectors renew before their certificate expires")
    .field_path(".renewAfter"))]
#[serde(rename_all = "camelCase")]
pub struct CertificatePolicy {
    /// How long an issued certificate is valid, for example `8760h`.
    #[serde(default = "default_validity")]
    pub validity: Duration,

    /// A connector asks for a new certificate once its current one is older than this,
    /// for example `4320h`. Must be shorter than `validity`.
    #[serde(default = "default_renew_after")]
    pub renew_after: Duration,
}

impl Default for CertificatePolicy {
    fn default() -> Self {
        Self {
            validity: default_validity(),
            renew_after: default_renew_after(),
        }
    }
}

fn default_validity() -> Duration {
    Duration::from_static("8760h")
}

fn default_renew_after() -> Duration {
    Duration::from_static("4320h")
}

/// Which namespaces' PublishedApps may use a group.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = Rule::new("self.from == 'Selector' ? has(self.selector) : !has(self.selector)")
    .message("selector must be set when from is Selector, and only then")
    .field_path(".selector"))]
#[serde(rename_all = "camelCase")]
pub struct AllowedNamespaces {
    /// `Same`: only the group's own namespace; `All`: every namespace; `Selector`:
    /// namespaces whose labels match `selector`.
    #[serde(default)]
    pub from: NamespacesFrom,

    /// The namespace label selector, required when `from` is `Selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// Which namespaces may use a group.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NamespacesFrom {
    /// Only the group's own namespace.
    #[default]
    Same,
    /// Every namespace.
    All,
    /// Namespaces whose labels match the selector.
    Selector,
}

/// The observed state of a ConnectorGroup.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorGroupStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready` and related conditions, with a reason and a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// Connectors the group should have: the Deployment's replicas, or the registered
    /// connectors when they run outside the cluster.
    #[serde(default)]
    pub desired_connectors: i32,

    /// Connectors currently holding tunnels to the fleet.
    #[serde(default)]
    pub connected_connectors: i32,

    /// Name of the Secret holding the current bootstrap registration token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_token_secret: Option<String>,

    /// The connector versions running in the group, newest rollout first: in this
    /// cluster counted from the connector pods, outside it from the versions the
    /// connectors report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versions: Vec<VersionCount>,

    /// Progress of the move to the group's target version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// How many of a group's connectors run one version.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VersionCount {
    /// The connector version.
    pub version: String,

    /// Connectors running it.
    pub connectors: i32,

    /// Of those, the ones ready to carry traffic (in this cluster: pods passing their
    /// readiness probe; outside it: connectors holding tunnels).
    pub ready: i32,
}

/// Where a group's move to its target version stands.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The version the group should run: `spec.version`, or the operator's release.
    pub target_version: String,

    /// Connectors already running the target version.
    pub updated_connectors: i32,

    /// Connectors the group should have when the rollout is done.
    pub desired_connectors: i32,

    /// `Complete`: every connector runs the target version. `Progressing`: connectors in
    /// this cluster are being replaced one at a time. `Halted`: a new connector did not
    /// become ready, so no old one is replaced until the version or image is fixed.
    /// `Waiting`: connectors outside this cluster still run another version and wait for
    /// whoever runs them to upgrade them.
    pub phase: RolloutPhase,

    /// What is happening, in a sentence, with the reason of a halt.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// The phase of a connector rollout.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RolloutPhase {
    /// Every connector runs the target version.
    #[default]
    Complete,
    /// Connectors in this cluster are being replaced one at a time.
    Progressing,
    /// A new connector failed to become ready; the old ones keep serving.
    Halted,
    /// Connectors outside the cluster wait to be upgraded by whoever runs them.
    Waiting,
}
