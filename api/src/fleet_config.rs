//! The compiled fleet configuration: everything a proxy replica needs to serve, and from
//! which each connector pulls its group's slice, without reading a single CRD.
//!
//! The operator compiles the `PublishedApp`, `ConnectorGroup`, `ConditionalAccessPolicy`
//! and `Connector` objects into one [`FleetConfig`]; every proxy replica watches it and
//! swaps it in atomically. The configuration holds only *references* to Secrets
//! (namespace, name, key), never secret material. The one exception is public: the CA
//! certificates apps name in `backend.tls.caSecretRef`, which the operator reads, checks
//! and copies into [`FleetConfig::backend_cas`] (certificates only, never keys), so that
//! each connector receives them inlined in its group's slice ([`BackendTls::ca_pem`]).
//!
//! Compatibility rules:
//!
//! - Field names are camelCase and stable. Unknown fields are ignored on reading (no
//!   `deny_unknown_fields`), so an older proxy keeps working when a newer operator adds
//!   fields; every field added later carries a serde default, so a newer proxy reads an
//!   older configuration.
//! - [`SCHEMA_VERSION`] changes only for a change an older reader would misread (a
//!   renamed or re-purposed field). A reader refuses a schema version above the one it
//!   knows and keeps serving its last configuration.
//! - [`FleetConfig::version`] is a SHA-256 of the canonical content, computed by the
//!   writer: an unchanged cluster compiles to the same version. Readers take it as given;
//!   a reader that does not know a newer field could not recompute it.
//!
//! Leaf settings (cookie, identity headers, translation, rate limit, policy conditions
//! and grants, certificate and registration policies) reuse the CRD types of this crate,
//! so they read exactly as in the objects users write.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::conditional_access_policy::{
    Conditions, Grant, IncludeExclude, PolicySessionControls, PolicyState,
};
use crate::connector_group::{CertificatePolicy, Registration};
use crate::duration::Duration;
use crate::published_app::{
    Assignment, IdentitySettings, PreAuthenticationType, RateLimit, SessionSettings, Translation,
};

/// The schema version this crate writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// The key of the stored object's `binaryData` that holds the gzip-compressed JSON
/// configuration (see [`FleetConfig::to_gzip_json`]).
pub const STORAGE_KEY: &str = "fleet-config.json.gz";

/// The annotation on the stored object that carries [`FleetConfig::version`], so that
/// watchers can tell a new configuration without decompressing it.
pub const VERSION_ANNOTATION: &str = "sallyport.dev/fleet-config-version";

/// The annotation on the stored object that carries [`FleetConfig::schema_version`].
pub const SCHEMA_VERSION_ANNOTATION: &str = "sallyport.dev/fleet-config-schema-version";

/// The largest decompressed configuration [`FleetConfig::from_gzip_json`] accepts:
/// a guard against a compressed object that expands without bound.
pub const MAX_DECODED_SIZE: u64 = 64 * 1024 * 1024;

/// A fleet configuration could not be hashed, encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FleetConfigError {
    /// Serializing the configuration as JSON failed.
    #[error("cannot serialize the fleet configuration as JSON: {0}")]
    Serialize(#[source] serde_json::Error),
    /// Compressing or decompressing failed.
    #[error("cannot {action} the fleet configuration: {source}")]
    Gzip {
        /// `compress` or `decompress`.
        action: &'static str,
        /// The I/O error of the gzip stream.
        source: std::io::Error,
    },
    /// The decompressed configuration is larger than [`MAX_DECODED_SIZE`].
    #[error("the fleet configuration decompresses to more than {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The bytes are not a fleet configuration.
    #[error("the fleet configuration is not valid JSON of the expected shape: {0}")]
    Parse(#[source] serde_json::Error),
    /// The configuration was written with a schema this reader does not know.
    #[error(
        "the fleet configuration has schemaVersion {found}; this build reads up to {supported}"
    )]
    UnsupportedSchemaVersion {
        /// The configuration's schema version.
        found: u32,
        /// The highest schema version this build reads.
        supported: u32,
    },
}

/// The compiled configuration of the whole fleet.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FleetConfig {
    /// The schema of this document; see [`SCHEMA_VERSION`].
    pub schema_version: u32,

    /// Lower-case hex SHA-256 of the canonical JSON of everything else in this document:
    /// equal content, equal version.
    pub version: String,

    /// The routes of every accepted PublishedApp, most specific first: exact hosts before
    /// wildcard hosts, then longer path prefixes, then host, port and app id. The first
    /// route whose host, port and path prefix match a request serves it.
    #[serde(default)]
    pub routes: Vec<Route>,

    /// The ConditionalAccessPolicies at least one route applies, sorted by id.
    #[serde(default)]
    pub policies: Vec<Policy>,

    /// Every ConnectorGroup, sorted by id; including groups no route uses yet, since
    /// their connectors register and connect all the same.
    #[serde(default)]
    pub connector_groups: Vec<ConnectorGroupConfig>,

    /// Ids (`namespace/name` of the Connector object) of revoked connectors: their
    /// tunnels are closed and their certificates refused. Sorted, without duplicates.
    #[serde(default)]
    pub revoked_connectors: Vec<String>,

    /// The CA certificates of every `backend.tls.caSecretRef` a route names, once per
    /// Secret key, sorted by reference. Public data: [`FleetConfig::group_slice`] inlines
    /// each into the slice of the groups whose apps use it. Empty in configurations
    /// compiled without reading Secrets (`sallyport-operator compile`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_cas: Vec<BackendCaBundle>,
}

/// What the version hash covers: everything but the version itself, in a fixed order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FleetContent<'a> {
    schema_version: u32,
    routes: &'a [Route],
    policies: &'a [Policy],
    connector_groups: &'a [ConnectorGroupConfig],
    revoked_connectors: &'a [String],
    // Left out when empty, so a configuration without backend CAs keeps the version it
    // had before the field existed.
    #[serde(skip_serializing_if = "<[BackendCaBundle]>::is_empty")]
    backend_cas: &'a [BackendCaBundle],
}

impl FleetConfig {
    /// A configuration of the current [`SCHEMA_VERSION`] holding these parts as given
    /// (the caller sorts them), with its content-derived version.
    pub fn new(
        routes: Vec<Route>,
        policies: Vec<Policy>,
        connector_groups: Vec<ConnectorGroupConfig>,
        revoked_connectors: Vec<String>,
    ) -> Result<Self, FleetConfigError> {
        let mut config = Self {
            schema_version: SCHEMA_VERSION,
            version: String::new(),
            routes,
            policies,
            connector_groups,
            revoked_connectors,
            backend_cas: Vec::new(),
        };
        config.version = config.content_version()?;
        Ok(config)
    }

    /// This configuration with `backend_cas` (the caller sorts them by reference and
    /// lists each once) and its version recomputed.
    pub fn with_backend_cas(
        mut self,
        backend_cas: Vec<BackendCaBundle>,
    ) -> Result<Self, FleetConfigError> {
        self.backend_cas = backend_cas;
        self.version = self.content_version()?;
        Ok(self)
    }

    /// The CA certificates (PEM) of the backend CA Secret key `reference`, if the
    /// configuration carries them.
    pub fn backend_ca(&self, reference: &SecretKeyRef) -> Option<&str> {
        self.backend_cas
            .iter()
            .find(|bundle| bundle.secret_ref == *reference)
            .map(|bundle| bundle.pem.as_str())
    }

    /// The version this configuration's content hashes to: lower-case hex SHA-256 of the
    /// compact JSON of every field but `version`.
    pub fn content_version(&self) -> Result<String, FleetConfigError> {
        sha256_json(&FleetContent {
            schema_version: self.schema_version,
            routes: &self.routes,
            policies: &self.policies,
            connector_groups: &self.connector_groups,
            revoked_connectors: &self.revoked_connectors,
            backend_cas: &self.backend_cas,
        })
    }

    /// The route of the app `app_id` (`namespace/name`), if it is served.
    pub fn route(&self, app_id: &str) -> Option<&Route> {
        self.routes.iter().find(|route| route.app == app_id)
    }

    /// The policy `policy_id` (`namespace/name`), if a route applies it.
    pub fn policy(&self, policy_id: &str) -> Option<&Policy> {
        self.policies.iter().find(|policy| policy.id == policy_id)
    }

    /// What the connectors of group `group_id` (`namespace/name`) need: the group's
    /// settings and, for each of its routes, the app id, internal URL and backend
    /// settings, with the app's backend CA certificates inlined
    /// ([`BackendTls::ca_pem`]) when the configuration carries them. Nothing about
    /// other groups, users or policies. `None` when the configuration has no such group.
    pub fn group_slice(&self, group_id: &str) -> Result<Option<GroupSlice>, FleetConfigError> {
        let Some(group) = self.connector_groups.iter().find(|g| g.id == group_id) else {
            return Ok(None);
        };
        let cas: std::collections::HashMap<&SecretKeyRef, &str> = self
            .backend_cas
            .iter()
            .map(|bundle| (&bundle.secret_ref, bundle.pem.as_str()))
            .collect();
        let mut apps: Vec<SliceApp> = self
            .routes
            .iter()
            .filter(|route| route.connector_group == group_id)
            .map(|route| {
                let mut backend = route.backend.clone();
                if let Some(tls) = backend.tls.as_mut()
                    && let Some(reference) = &tls.ca_secret_ref
                {
                    tls.ca_pem = cas.get(reference).map(|pem| (*pem).to_owned());
                }
                SliceApp {
                    app: route.app.clone(),
                    internal_url: route.internal_url.clone(),
                    backend,
                }
            })
            .collect();
        apps.sort_by(|a, b| a.app.cmp(&b.app));
        let mut slice = GroupSlice {
            schema_version: self.schema_version,
            version: String::new(),
            group: group.clone(),
            apps,
        };
        slice.version = slice.content_version()?;
        Ok(Some(slice))
    }

    /// The configuration as the stored object holds it: compact JSON, gzip-compressed.
    pub fn to_gzip_json(&self) -> Result<Vec<u8>, FleetConfigError> {
        let json = serde_json::to_vec(self).map_err(FleetConfigError::Serialize)?;
        let gzip = |source| FleetConfigError::Gzip {
            action: "compress",
            source,
        };
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(&json).map_err(gzip)?;
        encoder.finish().map_err(gzip)
    }

    /// Reads a configuration written by [`FleetConfig::to_gzip_json`]. Refuses input
    /// that decompresses to more than [`MAX_DECODED_SIZE`] bytes and schema versions
    /// above [`SCHEMA_VERSION`].
    pub fn from_gzip_json(bytes: &[u8]) -> Result<Self, FleetConfigError> {
        Self::from_json(&gunzip(bytes, MAX_DECODED_SIZE)?)
    }

    /// Reads a configuration from JSON, refusing schema versions above
    /// [`SCHEMA_VERSION`].
    pub fn from_json(json: &[u8]) -> Result<Self, FleetConfigError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Schema {
            schema_version: u32,
        }
        let schema: Schema = serde_json::from_slice(json).map_err(FleetConfigError::Parse)?;
        if schema.schema_version > SCHEMA_VERSION {
            return Err(FleetConfigError::UnsupportedSchemaVersion {
                found: schema.schema_version,
                supported: SCHEMA_VERSION,
            });
        }
        serde_json::from_slice(json).map_err(FleetConfigError::Parse)
    }
}

/// The decompressed `bytes`, refusing more than `limit` bytes of output.
fn gunzip(bytes: &[u8], limit: u64) -> Result<Vec<u8>, FleetConfigError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|source| FleetConfigError::Gzip {
            action: "decompress",
            source,
        })?;
    if out.len() as u64 > limit {
        return Err(FleetConfigError::TooLarge { limit });
    }
    Ok(out)
}

/// Lower-case hex SHA-256 of the compact JSON of `value`.
fn sha256_json(value: &impl Serialize) -> Result<String, FleetConfigError> {
    let mut hasher = Sha256::new();
    serde_json::to_writer(&mut hasher, value).map_err(FleetConfigError::Serialize)?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// One accepted PublishedApp: where it is published and how its requests are handled.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// The app's id: `namespace/name` of the PublishedApp.
    pub app: String,

    /// The lower-case external host; a wildcard host (`*.apps.example.com`) matches
    /// exactly one left-most label.
    pub host: String,

    /// The TCP port users connect to.
    pub port: u16,

    /// The path prefix, starting and ending with `/`.
    pub path_prefix: String,

    /// The canonical external URL, `https://host[:port]/prefix/`.
    pub url: String,

    /// The app's URL inside the private network, as its connectors reach it.
    pub internal_url: String,

    /// Id (`namespace/name`) of the ConnectorGroup that carries the app's traffic.
    pub connector_group: String,

    /// How users are authenticated before a request reaches the app.
    pub pre_authentication: PreAuthentication,

    /// Who may use the app at all; empty lists mean any authenticated user. Ignored for
    /// passthrough apps.
    #[serde(default, skip_serializing_if = "Assignment::is_empty")]
    pub assignment: Assignment,

    /// Ids (`namespace/name`) of the ConditionalAccessPolicies that apply, sorted; each is
    /// in [`FleetConfig::policies`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,

    /// The certificate served for the host.
    pub tls: RouteTls,

    /// The session cookie.
    #[serde(default)]
    pub session: SessionSettings,

    /// Identity headers and the signed assertion passed on to the backend.
    #[serde(default)]
    pub identity: IdentitySettings,

    /// Translation of internal URLs to external ones in responses.
    #[serde(default)]
    pub translation: Translation,

    /// How the connector talks to the internal application.
    pub backend: Backend,

    /// When true, every request gets the maintenance page and nothing reaches the backend.
    #[serde(default)]
    pub maintenance_mode: bool,

    /// The fleet-wide request rate limit of the app (the app's own, or the fleet default),
    /// with its limit per client address, if any.
    pub rate_limit: RateLimit,

    /// The largest request body in bytes the app accepts (`spec.limits`); absent, the
    /// proxies' `--max-request-body-size` applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_body_bytes: Option<u64>,
}

/// How users of a route are authenticated.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PreAuthentication {
    /// `OIDC` or `Passthrough`.
    #[serde(rename = "type")]
    pub kind: PreAuthenticationType,

    /// The provider and client, resolved from the app or the fleet default; set exactly
    /// when the type is `OIDC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc: Option<OidcClient>,
}

/// An OpenID Connect provider and client, with the client secret by reference only.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OidcClient {
    /// The provider's issuer URL.
    pub issuer_url: String,

    /// The client ID registered at the provider.
    pub client_id: String,

    /// Scopes to request.
    pub scopes: Vec<String>,

    /// Where the client secret is kept; absent for a public client (PKCE only). The
    /// proxy reads the Secret itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_ref: Option<SecretKeyRef>,
}

/// The certificate of a route's host.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RouteTls {
    /// The `kubernetes.io/tls` Secret: the app's own or the fleet default.
    pub secret_ref: SecretRef,
}

/// How the connector talks to an internal application.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    /// How long to wait for the backend's response headers, for example `85s`.
    pub timeout: Duration,

    /// Whether WebSocket upgrades are passed through.
    pub websockets: bool,

    /// How an https backend is verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BackendTls>,
}

/// How the connector verifies an https backend.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackendTls {
    /// Where the app's PEM CA bundle is kept; absent: the connector's system trust store
    /// (plus its `--backend-ca-file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,

    /// The CA certificates of `ca_secret_ref` (PEM, certificates only), the only roots
    /// the backend's certificate is verified against. Set in group slices only
    /// ([`FleetConfig::group_slice`] copies it from [`FleetConfig::backend_cas`]);
    /// absent in the fleet configuration's routes, and in slices of configurations
    /// compiled without reading Secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,

    /// The name verified against the backend's certificate; absent: the internal URL's
    /// host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,

    /// Skip verification of the backend's certificate.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// The CA certificates of one backend CA Secret key, as the operator read and checked
/// them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BackendCaBundle {
    /// The Secret key they were read from.
    pub secret_ref: SecretKeyRef,
    /// The certificates, PEM: `CERTIFICATE` blocks only, re-encoded from their DER.
    pub pem: String,
}

/// A Secret, by namespace and name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// The Secret's namespace.
    pub namespace: String,
    /// The Secret's name.
    pub name: String,
}

/// One key of a Secret, by namespace, name and key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's namespace.
    pub namespace: String,
    /// The Secret's name.
    pub name: String,
    /// The key within the Secret's data.
    pub key: String,
}

/// A ConditionalAccessPolicy as the proxy evaluates it. Which apps it applies to is
/// already resolved into [`Route::policies`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// The policy's id: `namespace/name` of the ConditionalAccessPolicy.
    pub id: String,

    /// `Enabled` or `ReportOnly` (disabled policies apply to no route).
    pub state: PolicyState,

    /// The users and groups the policy applies to.
    pub assignments: PolicyAssignments,

    /// Further conditions a sign-in must meet for the policy to apply.
    #[serde(default, skip_serializing_if = "Conditions::is_empty")]
    pub conditions: Conditions,

    /// What a sign-in the policy applies to must satisfy.
    #[serde(default)]
    pub grant: Grant,

    /// Session controls for sign-ins the policy applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<PolicySessionControls>,
}

/// The users and groups a policy applies to.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyAssignments {
    /// Users included and excluded; `"*"` includes every user.
    #[serde(default, skip_serializing_if = "IncludeExclude::is_empty")]
    pub users: IncludeExclude,

    /// Groups (the `groups` claim) included and excluded.
    #[serde(default, skip_serializing_if = "IncludeExclude::is_empty")]
    pub groups: IncludeExclude,
}

/// A ConnectorGroup as proxies and its connectors need it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorGroupConfig {
    /// The group's id: `namespace/name` of the ConnectorGroup.
    pub id: String,

    /// Lifetime and renewal age of the client certificates issued to its connectors.
    pub certificate: CertificatePolicy,

    /// How its connectors register.
    pub registration: Registration,

    /// How long a Connector of the group may stay unseen before it is removed.
    #[serde(rename = "inactiveConnectorTTL")]
    pub inactive_connector_ttl: Duration,

    /// The connector version the group should run (its `spec.version`, or the
    /// operator's release). A connector running another one logs that it should be
    /// upgraded and the fleet records both versions in its Connector status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connector_version: Option<String>,
}

/// What the connectors of one group pull: their group and its apps' backends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupSlice {
    /// The schema of this document; see [`SCHEMA_VERSION`].
    pub schema_version: u32,

    /// Lower-case hex SHA-256 of the rest of this slice: it changes only when this
    /// group's part of the fleet configuration does.
    pub version: String,

    /// The group's settings.
    pub group: ConnectorGroupConfig,

    /// The group's apps, sorted by id.
    #[serde(default)]
    pub apps: Vec<SliceApp>,
}

/// What the slice hash covers.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SliceContent<'a> {
    schema_version: u32,
    group: &'a ConnectorGroupConfig,
    apps: &'a [SliceApp],
}

impl GroupSlice {
    /// The version this slice's content hashes to.
    pub fn content_version(&self) -> Result<String, FleetConfigError> {
        sha256_json(&SliceContent {
            schema_version: self.schema_version,
            group: &self.group,
            apps: &self.apps,
        })
    }
}

/// One app as its connectors need it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SliceApp {
    /// The app's id, `namespace/name`, as the proxy names it on each tunneled request.
    pub app: String,

    /// The app's URL inside the private network.
    pub internal_url: String,

    /// How to talk to it.
    pub backend: Backend,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> Backend {
        Backend {
            timeout: Duration::from_static("85s"),
            websockets: true,
            tls: None,
        }
    }

    fn route(app: &str, group: &str) -> Route {
        Route {
            app: app.to_owned(),
            host: format!("{}.apps.example.com", app.replace('/', "-")),
            port: 443,
            path_prefix: "/".to_owned(),
            url: format!("https://{}.apps.example.com/", app.replace('/', "-")),
            internal_url: format!("http://{}.corp.internal/", app.replace('/', "-")),
            connector_group: group.to_owned(),
            pre_authentication: PreAuthentication {
                kind: PreAuthenticationType::Passthrough,
                oidc: None,
            },
            assignment: Assignment::default(),
            policies: vec![],
            tls: RouteTls {
                secret_ref: SecretRef {
                    namespace: "sallyport-system".to_owned(),
                    name: "wildcard-tls".to_owned(),
                },
            },
            session: SessionSettings::default(),
            identity: IdentitySettings::default(),
            translation: Translation::default(),
            backend: backend(),
            maintenance_mode: false,
            rate_limit: RateLimit {
                requests_per_second: 500,
                burst: 1000,
                per_client_ip: None,
            },
            max_request_body_bytes: None,
        }
    }

    fn group(id: &str) -> ConnectorGroupConfig {
        ConnectorGroupConfig {
            id: id.to_owned(),
            certificate: CertificatePolicy::default(),
            registration: Registration::default(),
            inactive_connector_ttl: Duration::from_static("240h"),
            connector_version: None,
        }
    }

    fn config(routes: Vec<Route>) -> FleetConfig {
        FleetConfig::new(
            routes,
            vec![],
            vec![group("infra/east"), group("infra/west")],
            vec![],
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_version_is_the_hash_of_the_content() {
        let a = config(vec![route("team-a/wiki", "infra/east")]);
        let b = config(vec![route("team-a/wiki", "infra/east")]);
        assert_eq!(a.version, b.version);
        assert_eq!(a.version.len(), 64);
        assert!(a.version.bytes().all(|b| b.is_ascii_hexdigit()));
        let mut changed = route("team-a/wiki", "infra/east");
        changed.maintenance_mode = true;
        assert_ne!(config(vec![changed]).version, a.version);
    }

    #[test]
    fn a_slice_holds_only_its_groups_apps() {
        let fleet = config(vec![
            route("team-a/wiki", "infra/east"),
            route("team-b/crm", "infra/west"),
            route("team-a/chat", "infra/east"),
        ]);
        let slice = fleet
            .group_slice("infra/east")
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("infra/east has a slice"));
        let apps: Vec<&str> = slice.apps.iter().map(|a| a.app.as_str()).collect();
        assert_eq!(apps, ["team-a/chat", "team-a/wiki"]);
        assert_eq!(slice.group.id, "infra/east");
        let json = serde_json::to_string(&slice).unwrap_or_default();
        assert!(
            !json.contains("crm") && !json.contains("infra/west"),
            "{json}"
        );

        // Another group's change leaves this slice's version alone.
        let other = config(vec![
            route("team-a/wiki", "infra/east"),
            route("team-a/chat", "infra/east"),
        ]);
        let again = other.group_slice("infra/east").ok().flatten();
        assert_eq!(again.map(|s| s.version), Some(slice.version));
        assert!(matches!(fleet.group_slice("infra/none"), Ok(None)));
    }

    #[test]
    fn a_slice_inlines_the_backend_cas_of_its_own_apps_only() {
        let ca_ref = |name: &str| SecretKeyRef {
            namespace: "team-a".to_owned(),
            name: name.to_owned(),
            key: "ca.crt".to_owned(),
        };
        let mut wiki = route("team-a/wiki", "infra/east");
        wiki.internal_url = "https://wiki.corp.internal/".to_owned();
        wiki.backend.tls = Some(BackendTls {
            ca_secret_ref: Some(ca_ref("corp-ca")),
            ca_pem: None,
            server_name: None,
            insecure_skip_verify: false,
        });
        let crm = route("team-b/crm", "infra/west");
        let plain = config(vec![wiki, crm]);
        assert_eq!(
            plain
                .clone()
                .with_backend_cas(vec![])
                .map(|c| c.version)
                .ok(),
            Some(plain.version.clone()),
            "no backend CAs, the version of a configuration without the field"
        );
        let bundle = |pem: &str| BackendCaBundle {
            secret_ref: ca_ref("corp-ca"),
            pem: pem.to_owned(),
        };
        let with_ca = plain
            .clone()
            .with_backend_cas(vec![bundle("CA ONE")])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(with_ca.version, plain.version);
        assert_eq!(with_ca.backend_ca(&ca_ref("corp-ca")), Some("CA ONE"));
        assert_eq!(with_ca.backend_ca(&ca_ref("other")), None);
        // The route keeps the reference only; the slice carries the certificates.
        assert_eq!(
            with_ca
                .route("team-a/wiki")
                .and_then(|r| r.backend.tls.clone())
                .and_then(|t| t.ca_pem),
            None
        );
        let slice = |config: &FleetConfig, group: &str| {
            config
                .group_slice(group)
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|| panic!("{group} has a slice"))
        };
        let east = slice(&with_ca, "infra/east");
        let tls = east.apps[0].backend.tls.clone();
        assert_eq!(tls.and_then(|t| t.ca_pem).as_deref(), Some("CA ONE"));
        let west = slice(&with_ca, "infra/west");
        let json = serde_json::to_string(&west).unwrap_or_default();
        assert!(!json.contains("CA ONE"), "{json}");

        // A changed CA changes the slice of the group using it, not the other's.
        let rotated = plain
            .with_backend_cas(vec![bundle("CA TWO")])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(slice(&rotated, "infra/east").version, east.version);
        assert_eq!(slice(&rotated, "infra/west").version, west.version);
        let back = FleetConfig::from_json(&serde_json::to_vec(&rotated).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, rotated);
    }

    #[test]
    fn gzip_round_trip_and_limits() {
        let fleet = config(vec![route("team-a/wiki", "infra/east")]);
        let bytes = fleet.to_gzip_json().unwrap_or_else(|e| panic!("{e}"));
        let back = FleetConfig::from_gzip_json(&bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, fleet);
        // No timestamp in the gzip header: equal content, equal bytes.
        assert_eq!(fleet.to_gzip_json().ok(), Some(bytes.clone()));
        assert!(matches!(
            gunzip(&bytes, 100),
            Err(FleetConfigError::TooLarge { limit: 100 })
        ));

        let future = br#"{"schemaVersion": 99, "version": "x"}"#;
        assert!(matches!(
            FleetConfig::from_json(future),
            Err(FleetConfigError::UnsupportedSchemaVersion { found: 99, .. })
        ));
        assert!(FleetConfig::from_gzip_json(b"not gzip").is_err());
    }

    #[test]
    fn unknown_fields_are_ignored_so_old_readers_survive_new_writers() {
        let fleet = config(vec![route("team-a/wiki", "infra/east")]);
        let mut value = serde_json::to_value(&fleet).unwrap_or_default();
        value["someFutureField"] = serde_json::json!({"a": 1});
        value["routes"][0]["anotherFutureField"] = serde_json::json!(true);
        let json = serde_json::to_vec(&value).unwrap_or_default();
        let back = FleetConfig::from_json(&json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, fleet);
    }
}
