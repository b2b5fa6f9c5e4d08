//! `Connector`: one registered connector, created by the system at registration.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{DNS_SUBDOMAIN, DNS_SUBDOMAIN_MESSAGE, matches};

/// One connector registered with the fleet. Deleting it revokes the connector.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sallyport.dev",
    version = "v1alpha1",
    kind = "Connector",
    namespaced,
    status = "ConnectorStatus",
    shortname = "conn",
    category = "sallyport",
    doc = "Connector is one connector registered with the proxy fleet, created by the system when the connector registers. Deleting it revokes the connector: its tunnels are closed and its certificate is refused until it registers again. Connectors unseen for their group's inactiveConnectorTTL are removed.",
    printcolumn(
        name = "GROUP",
        type_ = "string",
        json_path = ".spec.connectorGroup",
        description = "The ConnectorGroup the connector belongs to"
    ),
    printcolumn(
        name = "CONNECTED",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Connected\")].status",
        description = "Whether the connector holds tunnels to the fleet"
    ),
    printcolumn(
        name = "VERSION",
        type_ = "string",
        json_path = ".status.version",
        description = "The connector's version"
    ),
    printcolumn(
        name = "CERT-EXPIRES",
        // A string, not a date: kubectl prints dates as ages, and a future one as <invalid>.
        type_ = "string",
        json_path = ".status.certificate.notAfter",
        description = "When the connector's certificate expires (RFC 3339)"
    ),
    printcolumn(
        name = "LAST-SEEN",
        type_ = "date",
        json_path = ".status.lastSeen",
        description = "When the fleet last heard from the connector"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorSpec {
    /// The ConnectorGroup, in this namespace, that the connector registered with.
    /// Immutable: register the connector again to move it.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(matches("self", DNS_SUBDOMAIN)).message(DNS_SUBDOMAIN_MESSAGE))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("is immutable: register the connector again to move it to another group"))]
    pub connector_group: String,
}

/// The observed state of a Connector.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorStatus {
    /// Host name the connector reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,

    /// Version of the connector software, as the connector last reported it (at
    /// registration, renewal, and each time it pulls its configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,

    /// The version its group wants it to run, as the connector last learned it from its
    /// configuration. When it differs from `version`, the connector should be upgraded
    /// (the operator does it for connectors it runs; see the `UpToDate` condition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_version: Option<String>,

    /// The client certificate currently issued to the connector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<ConnectorCertificate>,

    /// When the fleet last heard from the connector: its registration or renewal, or a
    /// proxy replica holding a tunnel of it (refreshed with every heartbeat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,

    /// The tunnels the connector holds, one entry per proxy replica that holds at least
    /// one. Each replica writes and removes only its own entry (server-side apply, field
    /// manager `sallyport-proxy/<replica>`); the operator removes entries whose replica
    /// stopped renewing them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["proxy"]))]
    pub tunnels: Vec<TunnelStatus>,

    /// `Connected`: True (`TunnelsUp`) while some proxy replica renews a tunnel entry,
    /// False when none holds a tunnel (`NoTunnels`) or the last entries lapsed without
    /// being removed (`Stale`, e.g. a replica that crashed). `UpToDate`: True
    /// (`DesiredVersion`) when `version` is `desiredVersion`, False (`UpdateAvailable`)
    /// when the group wants another one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A client certificate issued to a connector.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorCertificate {
    /// Serial number, hexadecimal.
    pub serial: String,

    /// When the certificate was issued.
    pub issued_at: Time,

    /// When the certificate expires.
    pub not_after: Time,
}

/// A tunnel between a connector and one proxy replica.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TunnelStatus {
    /// The proxy replica at the other end.
    pub proxy: String,

    /// Since when the replica has held a tunnel of the connector.
    pub since: Time,

    /// When the replica last confirmed that it still holds the tunnel (its heartbeat,
    /// every 20 s by default). An entry not renewed for the operator's
    /// `--tunnel-stale-after` (60 s by default) no longer counts and is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_at: Option<Time>,
}
