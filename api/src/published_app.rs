//! `PublishedApp`: an internal web application published on an external HTTPS URL.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    DNS_SUBDOMAIN, DNS_SUBDOMAIN_MESSAGE, HEADER_NAME, ObjectName, ObjectReference,
    SecretKeyReference, matches, validated_string,
};
use crate::duration::Duration;

/// Publishes one internal web application on an external HTTPS URL through the proxy fleet.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sallyport.dev",
    version = "v1alpha1",
    kind = "PublishedApp",
    namespaced,
    status = "PublishedAppStatus",
    shortname = "papp",
    category = "sallyport",
    doc = "PublishedApp publishes one internal web application on an external HTTPS URL. The proxy fleet terminates TLS for the external URL, pre-authenticates users with OpenID Connect (or lets them pass through), enforces conditional access, and carries each request through a connector of the app's ConnectorGroup to the internal URL.",
    printcolumn(
        name = "URL",
        type_ = "string",
        json_path = ".status.url",
        description = "The external URL the app is published on"
    ),
    printcolumn(
        name = "PREAUTH",
        type_ = "string",
        json_path = ".spec.preAuthentication.type",
        description = "How users are pre-authenticated"
    ),
    printcolumn(
        name = "GROUP",
        type_ = "string",
        json_path = ".spec.connectorGroup.name",
        description = "The ConnectorGroup that carries the app's traffic"
    ),
    printcolumn(
        name = "READY",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the app is being served"
    ),
    printcolumn(
        name = "REASON",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why the app is or is not being served: Ready, NotAccepted, RefsNotResolved or NoConnectedConnectors (kubectl describe says more)"
    ),
    printcolumn(
        name = "AGE",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!has(self.backend) || !has(self.backend.tls) || self.internalUrl.startsWith('https://')")
    .message("backend.tls applies only when internalUrl uses https://")
    .field_path(".backend.tls"))]
#[serde(rename_all = "camelCase")]
pub struct PublishedAppSpec {
    /// The public URL users open, for example `https://wiki.apps.example.com/`. It must use
    /// https. A wildcard is allowed only as the whole left-most label of the host
    /// (`https://*.apps.example.com/`). A path prefix is allowed
    /// (`https://apps.example.com/wiki/`); when several apps match a request, the most
    /// specific host and the longest path prefix win.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.startsWith('https://')")
        .message("must start with https://: the proxy fleet terminates TLS for every published app"))]
    #[x_kube(validation = Rule::new(r"!self.contains('*') || self.matches(r'^https://\*\.[^*]*$')")
        .message("may hold one wildcard, only as the whole left-most label of the host, as in https://*.apps.example.com/"))]
    #[x_kube(validation = Rule::new(r"self.matches(r'^https?://(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+(:[0-9]{1,5})?(/[^?#\s]*)?$')")
        .message("must be https://HOST[:PORT][/PATH] with a lower-case DNS host name of two or more labels, and no user info, query or fragment"))]
    pub external_url: String,

    /// The URL of the application inside the private network, as the connector reaches
    /// it, for example `http://wiki.corp.internal:8080/`. The scheme is http or https; a
    /// path prefix is allowed and replaces the external path prefix.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new(r"self.matches(r'^https?://')")
        .message("must start with http:// or https://"))]
    #[x_kube(validation = Rule::new(r"!self.matches(r'^https?://') || (isURL(self) && url(self).getHostname() != '')")
        .message("must be an absolute URL with a host, such as http://wiki.corp.internal:8080/"))]
    #[x_kube(validation = Rule::new(r"!self.contains('?') && !self.contains('#') && !self.contains('*')")
        .message("must not hold a query, a fragment or a wildcard"))]
    pub internal_url: String,

    /// The ConnectorGroup whose connectors carry this app's traffic. Its namespace
    /// defaults to this app's namespace; the group must allow this app's namespace in
    /// `spec.allowedNamespaces`.
    pub connector_group: ObjectReference,

    /// How users are authenticated before a request reaches the app.
    #[serde(default)]
    pub pre_authentication: PreAuthentication,

    /// Who may use the app at all. Empty lists mean any user the identity provider
    /// authenticates. Ignored for passthrough apps.
    #[serde(default, skip_serializing_if = "Assignment::is_empty")]
    pub assignment: Assignment,

    /// Names of ConditionalAccessPolicies in this app's namespace that apply to this app,
    /// in addition to the policies whose assignments select it and the fleet-wide
    /// baseline policies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub conditional_access_policies: Vec<ObjectName>,

    /// The certificate served for the external host. Defaults to the fleet's default TLS
    /// Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ExternalTls>,

    /// The session cookie that keeps users signed in.
    #[serde(default)]
    pub session: SessionSettings,

    /// Identity passed on to the backend: claim headers and a signed assertion.
    #[serde(default)]
    pub identity: IdentitySettings,

    /// Translation of internal URLs to external ones in responses.
    #[serde(default)]
    pub translation: Translation,

    /// How the connector talks to the internal application.
    #[serde(default)]
    pub backend: Backend,

    /// When true, every request is answered with a maintenance page and nothing reaches
    /// the backend.
    #[serde(default)]
    pub maintenance_mode: bool,

    /// Requests per second this app accepts across the fleet; beyond it users get 429
    /// with Retry-After. Defaults to the fleet's per-app limit (500 requests/s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,

    /// Size limits of the requests this app accepts. Defaults to the fleet's limits
    /// (the proxies' `--max-request-body-size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<RequestLimits>,
}

/// Size limits of the requests an app accepts.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RequestLimits {
    /// The largest request body, in bytes, the app accepts; a larger one is answered
    /// 413 and only its first bytes (at most this many) reach the app. Overrides the
    /// proxies' `--max-request-body-size` for this app, up or down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_099_511_627_776_u64))]
    pub max_request_body_bytes: Option<u64>,
}

/// How users are authenticated before a request reaches the app.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.type == 'OIDC' || !has(self.oidc)")
    .message("oidc may be set only when type is OIDC")
    .field_path(".oidc"))]
#[serde(rename_all = "camelCase")]
pub struct PreAuthentication {
    /// `OIDC` signs users in with an OpenID Connect provider before any request reaches
    /// the app; `Passthrough` forwards requests without authentication.
    #[serde(rename = "type", default)]
    pub kind: PreAuthenticationType,

    /// The OpenID Connect provider and client for this app. Defaults to the fleet's
    /// default provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc: Option<OidcClient>,
}

impl Default for PreAuthentication {
    fn default() -> Self {
        Self {
            kind: PreAuthenticationType::Oidc,
            oidc: None,
        }
    }
}

/// How users are authenticated before a request reaches the app.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PreAuthenticationType {
    /// Users sign in with an OpenID Connect provider first.
    #[default]
    #[serde(rename = "OIDC")]
    Oidc,
    /// Requests are forwarded without authentication.
    Passthrough,
}

/// An OpenID Connect provider and the client registered there for an app.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OidcClient {
    /// The provider's issuer URL; discovery reads `<issuerUrl>/.well-known/openid-configuration`.
    /// It must use https, except for a provider on localhost during development.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new(r"(self.startsWith('https://') || self.matches(r'^http://(localhost|127\.0\.0\.1|\[::1\])([:/].*)?$')) && isURL(self) && url(self).getHostname() != ''")
        .message("must be an https:// URL of the provider's issuer (http:// is accepted only for localhost)"))]
    pub issuer_url: String,

    /// The client ID registered at the provider for this app.
    #[schemars(length(min = 1, max = 256))]
    pub client_id: String,

    /// The Secret key holding the client secret. Omit it for a public client, which
    /// relies on PKCE alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_ref: Option<SecretKeyReference>,

    /// Scopes to request; must include `openid`.
    #[serde(default = "default_scopes")]
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    #[x_kube(validation = Rule::new("'openid' in self").message("must include openid"))]
    pub scopes: Vec<OidcScope>,
}

fn default_scopes() -> Vec<OidcScope> {
    ["openid", "email", "profile"]
        .map(|scope| OidcScope(scope.to_owned()))
        .to_vec()
}

validated_string!(
    /// An OAuth 2.0 scope, such as `openid` or `groups`.
    OidcScope,
    max_length = 128,
    rules = [(
        r"self.matches(r'^[!#-\[\]-~]+$')",
        "must be a scope: printable characters without spaces, quotes or backslashes"
    )]
);

/// Who may use an app at all.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Assignment {
    /// User names (the provider's `preferred_username` or `email` claim) allowed to use
    /// the app.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024), inner(length(min = 1, max = 256)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub users: Vec<String>,

    /// Groups (the provider's `groups` claim) whose members may use the app.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024), inner(length(min = 1, max = 256)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub groups: Vec<String>,
}

impl Assignment {
    /// True when no user or group is named: any authenticated user may use the app.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.groups.is_empty()
    }
}

/// The certificate served for an app's external host.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalTls {
    /// Name of a `kubernetes.io/tls` Secret in the app's namespace whose certificate is
    /// valid for the external host.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(matches("self", DNS_SUBDOMAIN)).message(DNS_SUBDOMAIN_MESSAGE))]
    pub secret_name: String,
}

/// The session cookie that keeps users signed in.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SessionSettings {
    /// Attributes of the encrypted session cookie.
    #[serde(default)]
    pub cookie: CookieSettings,
}

/// Attributes of the encrypted session cookie.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("self.sameSite != 'None' || self.secure")
    .message("sameSite None requires secure: true, or browsers drop the cookie")
    .field_path(".sameSite"))]
#[serde(rename_all = "camelCase")]
pub struct CookieSettings {
    /// Hide the cookie from scripts (the `HttpOnly` attribute). Keep it on unless the app
    /// truly needs scripts to see it.
    #[serde(default = "yes")]
    pub http_only: bool,

    /// Send the cookie over HTTPS only (the `Secure` attribute).
    #[serde(default = "yes")]
    pub secure: bool,

    /// Keep the cookie across browser restarts (until the session expires) instead of
    /// dropping it when the browser closes.
    #[serde(default)]
    pub persistent: bool,

    /// The cookie's `SameSite` attribute: `Strict`, `Lax` or `None`.
    #[serde(default)]
    pub same_site: SameSite,
}

impl Default for CookieSettings {
    fn default() -> Self {
        Self {
            http_only: true,
            secure: true,
            persistent: false,
            same_site: SameSite::Lax,
        }
    }
}

fn yes() -> bool {
    true
}

/// The `SameSite` attribute of a cookie.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SameSite {
    /// Sent only with same-site requests.
    Strict,
    /// Sent with same-site requests and top-level navigations from other sites.
    #[default]
    Lax,
    /// Sent with every request; requires `secure`.
    None,
}

/// Identity passed on to the backend.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IdentitySettings {
    /// Request headers set from the user's claims. Any header of these names sent by the
    /// client is removed first, so clients cannot spoof them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".to_owned()]))]
    #[x_kube(validation = Rule::new("self.all(a, self.exists_one(b, a.name.lowerAscii() == b.name.lowerAscii()))")
        .message("header names must be unique (case-insensitively)"))]
    pub headers: Vec<IdentityHeader>,

    /// A short-lived signed assertion (a JWT) of the user's identity, for backends that
    /// verify it instead of trusting headers.
    #[serde(default)]
    pub signed_assertion: SignedAssertion,
}

/// Headers that must never be set from claims: they carry routing, framing or credentials.
const RESERVED_HEADERS: &str = "['host', 'cookie', 'authorization', 'proxy-authorization', 'content-length', 'content-type', 'transfer-encoding', 'connection', 'upgrade', 'te', 'trailer', 'keep-alive', 'forwarded', 'x-forwarded-for', 'x-forwarded-host', 'x-forwarded-proto']";

/// One request header set from a claim of the signed-in user.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct IdentityHeader {
    /// The header name, for example `X-Remote-User`.
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new(matches("self", HEADER_NAME))
        .message("must be an HTTP header name: letters, digits and '-'"))]
    #[x_kube(validation = Rule::new(format!("!(self.lowerAscii() in {RESERVED_HEADERS})"))
        .message("must not be a header that carries routing, framing or credentials (Host, Cookie, Authorization, Content-*, Transfer-Encoding, Connection, Forwarded, X-Forwarded-*)"))]
    pub name: String,

    /// The ID-token claim whose value fills the header, for example `preferred_username`,
    /// `email` or `groups` (lists are joined with commas).
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new(r"self.matches(r'^[A-Za-z0-9_:.\-]+$')")
        .message("must be a claim name: letters, digits, '_', ':', '.' and '-'"))]
    pub claim: String,
}

/// A short-lived signed assertion of the user's identity.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SignedAssertion {
    /// Whether the assertion is added to each request.
    #[serde(default = "yes")]
    pub enabled: bool,

    /// The request header that carries the assertion.
    #[serde(default = "default_assertion_header")]
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new(matches("self", HEADER_NAME))
        .message("must be an HTTP header name: letters, digits and '-'"))]
    pub header: String,

    /// How long each assertion is valid, for example `5m`.
    #[serde(default = "default_assertion_lifetime")]
    pub lifetime: Duration,
}

impl Default for SignedAssertion {
    fn default() -> Self {
        Self {
            enabled: true,
            header: default_assertion_header(),
            lifetime: default_assertion_lifetime(),
        }
    }
}

fn default_assertion_header() -> String {
    "X-Sallyport-Assertion".to_owned()
}

fn default_assertion_lifetime() -> Duration {
    Duration::from_static("5m")
}

/// Translation of internal URLs to external ones in responses.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Translation {
    /// Rewrite internal URLs in response headers such as `Location` and `Refresh`.
    #[serde(default = "yes")]
    pub headers: bool,

    /// Rewrite the domain and path of cookies the backend sets.
    #[serde(default = "yes")]
    pub cookies: bool,

    /// Rewrite internal URLs in HTML bodies (links, forms, scripts' sources).
    #[serde(default)]
    pub body: bool,
}

impl Default for Translation {
    fn default() -> Self {
        Self {
            headers: true,
            cookies: true,
            body: false,
        }
    }
}

/// How the connector talks to the internal application.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    /// How long to wait for the backend's response headers, for example `85s`.
    #[serde(default = "default_backend_timeout")]
    pub timeout: Duration,

    /// Whether WebSocket upgrades are passed through.
    #[serde(default = "yes")]
    pub websockets: bool,

    /// TLS settings for an https internal URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<BackendTls>,
}

impl Default for Backend {
    fn default() -> Self {
        Self {
            timeout: default_backend_timeout(),
            websockets: true,
            tls: None,
        }
    }
}

fn default_backend_timeout() -> Duration {
    Duration::from_static("85s")
}

/// How the connector verifies an https backend.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[x_kube(validation = Rule::new("!(self.insecureSkipVerify && has(self.caSecretRef))")
    .message("insecureSkipVerify and caSecretRef are mutually exclusive: a CA is pointless when verification is off")
    .field_path(".insecureSkipVerify"))]
#[serde(rename_all = "camelCase")]
pub struct BackendTls {
    /// The Secret key holding the PEM CA bundle that signed the backend's certificate.
    /// Defaults to the connector's system trust store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyReference>,

    /// The name to verify the backend's certificate against. Defaults to the internal
    /// URL's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new(matches("self", DNS_SUBDOMAIN))
        .message("must be a lower-case DNS name"))]
    pub server_name: Option<String>,

    /// Skip verification of the backend's certificate. Never use this in production.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// A fleet-wide request rate limit for one app.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("self.burst >= self.requestsPerSecond")
    .message("burst must be at least requestsPerSecond")
    .field_path(".burst"))]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Sustained requests per second.
    #[serde(default = "default_requests_per_second")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub requests_per_second: u32,

    /// Requests allowed in a burst above the sustained rate.
    #[serde(default = "default_burst")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub burst: u32,

    /// A limit for each client address on this app, besides the app's whole limit and
    /// the proxies' limit per client across every app (`--client-requests-per-second`).
    /// Enforced by each proxy replica on its own (not shared among replicas). A client
    /// is its address (IPv6: its /64 network), as seen through trusted proxies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_client_ip: Option<ClientRateLimit>,
}

/// A request rate limit for each client address.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("self.burst >= self.requestsPerSecond")
    .message("burst must be at least requestsPerSecond")
    .field_path(".burst"))]
#[serde(rename_all = "camelCase")]
pub struct ClientRateLimit {
    /// Sustained requests per second one client may send.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub requests_per_second: u32,

    /// Requests one client may send in a burst above the sustained rate.
    #[schemars(range(min = 1, max = 10_000_000))]
    pub burst: u32,
}

fn default_requests_per_second() -> u32 {
    500
}

fn default_burst() -> u32 {
    1000
}

/// The observed state of a PublishedApp.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PublishedAppStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The external URL the app is served on, once accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,

    /// `Accepted`, `ResolvedRefs` and `Ready`, with reasons such as
    /// `ConnectorGroupNotFound`, `NamespaceNotAllowed`, `TLSSecretInvalid` or `HostConflict`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// Readiness of the app's ConnectorGroup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connector_group: Option<ConnectorGroupReadiness>,

    /// Names of the ConditionalAccessPolicies that apply to this app.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied_policies: Vec<String>,
}

/// Readiness of the ConnectorGroup an app uses.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorGroupReadiness {
    /// True when at least one connector of the group is connected.
    pub ready: bool,

    /// How many connectors of the group are connected.
    pub connected_connectors: i32,
}
