//! The fleet API connectors call on the tunnel listener (ALPN `h2` or `http/1.1`):
//! registration with a bootstrap token, certificate renewal and the group's configuration
//! slice, as `sallyport_tunnel::wire` describes them.
//!
//! | route | who | answers |
//! | --- | --- | --- |
//! | `POST` [`REGISTER_PATH`] | `Authorization: Bearer <token>`, no certificate | [`CertificateResponse`] |
//! | `POST` [`RENEW_PATH`] | client certificate of a connector not revoked | [`CertificateResponse`] |
//! | `GET` [`CONFIG_PATH`] | client certificate of a connector not revoked | the group's [`GroupSlice`], or 304 |
//!
//! Every error is a JSON [`ApiError`]: 400 malformed request or CSR, 401 missing or bad
//! token or certificate, 403 revoked connector or removed group, 404 unknown path, 405
//! wrong method, 413 too large, 500 the fleet's own failure, 503 (with `Retry-After`) a
//! group this proxy has not loaded yet. An unknown group is answered like a wrong token,
//! so an unauthenticated caller learns nothing about which groups exist.
//!
//! **A group not loaded yet.** The operator mints a group's token before the compiled
//! configuration holding the group reaches the proxies, so a connector started right
//! after its group may ask for a group this proxy does not know yet. Its token is then
//! checked without spending a use ([`Registry::check`]): a valid one gets 503
//! `GroupNotLoaded` with [`Retry-After`](RETRY_AFTER) (the connector retries), anything
//! else the 401 of a wrong token. Only a caller already holding the group's token learns
//! that the group exists.
//!
//! Registration checks the request and its CSR *before* spending a use of the token, so
//! a malformed request never costs a use.
//!
//! Every registration, renewal and refusal is an audit event (`sallyport.dev/audit/v1`,
//! `docs/siem.md`) emitted through the process's event pipeline
//! ([`sallyport_events::global`]: standard output and the SIEM sinks), with the actions
//! `connector.registered`, `connector.renewed` and `connector.refused`; it is also logged
//! at target [`AUDIT_TARGET`] with the fields `event`, `reason`, `group`, `connector` and
//! `client` (the peer address, when the listener put a [`ClientAddress`] in the request's
//! extensions).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{
    ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
    RETRY_AFTER as RETRY_AFTER_HEADER,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Body;
use sallyport_api::FleetConfig;
use sallyport_api::fleet_config::{ConnectorGroupConfig, GroupSlice};
use sallyport_api::registration::CONNECTOR_VERSION_HEADER;
use sallyport_events::{AuditEvent, ObjectRef, Outcome};
use sallyport_tunnel::ConnectorIdentity;
use sallyport_tunnel::body::{BoxError, TunnelBody, full};
use sallyport_tunnel::wire::{
    ApiError, CONFIG_PATH, CertificateResponse, REGISTER_PATH, RENEW_PATH, RegisterRequest,
    RenewRequest,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::{debug, error, info, warn};

use crate::issuer::{CheckedCsr, CsrError, IssuedCertificate, Issuer};
use crate::registry::{
    ConnectorRecord, RecordEvent, RegistrationError, Registry, VersionReport, split_group_id,
};

/// The largest request body accepted.
pub const MAX_BODY_LEN: usize = 64 * 1024;

/// The longest host name a connector may report.
pub const MAX_HOSTNAME_LEN: usize = 253;

/// The longest software version a connector may report.
pub const MAX_VERSION_LEN: usize = 64;

/// The longest group id (`namespace/name`) looked at.
pub const MAX_GROUP_ID_LEN: usize = 63 + 1 + 253;

/// The longest registration token looked at.
pub const MAX_TOKEN_LEN: usize = 1024;

/// The tracing target of registration, renewal and refusal events.
pub const AUDIT_TARGET: &str = "sallyport::audit";

/// The `Retry-After` (seconds) of a registration for a group this proxy has not loaded
/// yet: the compiled configuration usually follows the token within a second or two.
pub const RETRY_AFTER: u64 = 2;

/// The address of the caller; the listener puts it in the request's extensions so that
/// the audit events can name the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddress(pub SocketAddr);

/// The fleet API: the connector issuer, the registry and the current fleet
/// configuration, all shared with the rest of the proxy.
#[derive(Clone)]
pub struct FleetApi {
    issuer: Arc<ArcSwap<Issuer>>,
    registry: Arc<dyn Registry>,
    config: Arc<ArcSwap<FleetConfig>>,
    /// The versions each connector last reported to this replica and that were
    /// recorded: a report is written only when it changes.
    reported_versions: Arc<Mutex<HashMap<String, ReportedVersions>>>,
}

impl std::fmt::Debug for FleetApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetApi")
            .field("config_version", &self.config.load().version)
            .finish_non_exhaustive()
    }
}

/// The version a connector runs and the one its configuration wants, as last recorded.
type ReportedVersions = (String, Option<String>);

/// Which route a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Register,
    Renew,
    Config,
}

impl Route {
    fn of(path: &str) -> Option<Self> {
        match path {
            REGISTER_PATH => Some(Self::Register),
            RENEW_PATH => Some(Self::Renew),
            CONFIG_PATH => Some(Self::Config),
            _ => None,
        }
    }

    fn method(self) -> Method {
        match self {
            Self::Register | Self::Renew => Method::POST,
            Self::Config => Method::GET,
        }
    }

    /// What the caller asked for, in the `request` detail of a refusal's audit event.
    fn request(self) -> &'static str {
        match self {
            Self::Register => "register",
            Self::Renew => "renew",
            Self::Config => "config",
        }
    }

    /// The audit event name.
    fn event(self) -> &'static str {
        match self {
            Self::Register => "connector.register",
            Self::Renew => "connector.renew",
            Self::Config => "connector.config",
        }
    }
}

/// Who a request is about, for the audit events.
#[derive(Debug, Default)]
struct Audit {
    client: Option<String>,
    group: Option<String>,
    connector: Option<String>,
}

impl Audit {
    fn identify(&mut self, identity: &ConnectorIdentity) {
        self.group = Some(identity.group_id());
        self.connector = Some(identity.connector_id());
    }

    /// Emits the audit event of `refusal` of a `route` request.
    fn refused(&self, route: Route, outcome: Outcome, refusal: &Refusal) {
        let object = match (&self.connector, &self.group) {
            (Some(connector), _) => ObjectRef::from_id("Connector", connector),
            (None, Some(group)) => ObjectRef::from_id("ConnectorGroup", group),
            (None, None) => ObjectRef::from_id("Connector", ""),
        };
        sallyport_events::audit(
            AuditEvent::new("connector.refused", object, outcome)
                .reason(refusal.reason.clone())
                .message(refusal.detail.as_deref().unwrap_or(&refusal.message))
                .source_address(self.client.as_deref())
                .detail("request", route.request())
                .detail("status", refusal.status.as_u16())
                .detail("group", self.group.as_deref())
                .detail("connector", self.connector.as_deref())
                .detail("retryAfterSeconds", refusal.retry_after),
        );
    }
}

/// A refused request: what the caller is told, and what only the log says.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    reason: String,
    message: String,
    detail: Option<String>,
    /// Seconds after which the caller may try again (`Retry-After`).
    retry_after: Option<u64>,
}

impl Refusal {
    fn new(status: StatusCode, reason: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.to_owned(),
            message: message.into(),
            detail: None,
            retry_after: None,
        }
    }

    /// A valid token for a group this proxy's configuration does not hold yet.
    fn group_not_loaded(group: &str) -> Self {
        let mut refusal = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "GroupNotLoaded",
            format!(
                "the fleet has not loaded group {group} yet (its configuration is on the way); \
                 retry in {RETRY_AFTER} s"
            ),
        );
        refusal.retry_after = Some(RETRY_AFTER);
        refusal
    }

    fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "MalformedRequest", message)
    }

    fn internal(reason: &str, detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            reason,
            "the fleet failed to handle the request; try again shortly",
        )
        .detail(detail)
    }

    fn certificate_required() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "CertificateRequired",
            "this call needs the connector's client certificate; register first",
        )
    }

    fn revoked(connector: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "ConnectorRevoked",
            format!("connector {connector} was revoked; register it again with the group's token"),
        )
    }

    fn group_gone(group: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "GroupNotFound",
            format!("ConnectorGroup {group} no longer exists; register with another group's token"),
        )
    }

    fn from_csr(error: &CsrError) -> Self {
        if !error.is_client_error() {
            return Self::internal(error.reason(), error.to_string());
        }
        let status = match error {
            CsrError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        Self::new(status, error.reason(), error.to_string())
    }

    fn from_registry(error: &RegistrationError) -> Self {
        let status = match error {
            RegistrationError::TokenInvalid { .. }
            | RegistrationError::TokenExpired { .. }
            | RegistrationError::TokenUsedUp { .. } => StatusCode::UNAUTHORIZED,
            RegistrationError::ConnectorNotFound { .. } => StatusCode::FORBIDDEN,
            RegistrationError::Backend { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, error.reason(), error.public_message()).detail(error.to_string())
    }

    fn into_response(self) -> Response<TunnelBody> {
        let body = ApiError {
            reason: self.reason,
            message: self.message,
        };
        let mut response = json_response(self.status, &body);
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER_HEADER, HeaderValue::from(seconds));
        }
        response
    }
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response<TunnelBody> {
    match serde_json::to_vec(value) {
        Ok(json) => {
            let mut response = Response::new(full(json));
            *response.status_mut() = status;
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(e) => {
            error!(error = %e, "cannot serialize a fleet API answer");
            let mut response = Response::new(full(
                r#"{"reason":"Internal","message":"the fleet could not write its answer"}"#,
            ));
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
    }
}

fn rfc3339(t: OffsetDateTime) -> Result<String, Refusal> {
    t.format(&Rfc3339)
        .map_err(|e| Refusal::internal("Internal", format!("cannot format {t}: {e}")))
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && token.len() <= MAX_TOKEN_LEN)
        .then_some(token)
}

/// Whether an `If-None-Match` header names `version`.
fn matches_version(headers: &HeaderMap, version: &str) -> bool {
    headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.trim_start_matches("W/").trim_matches('"') == version)
}

/// Reads a JSON body of at most [`MAX_BODY_LEN`] bytes.
async fn read_json<T, B>(request: Request<B>) -> Result<T, Refusal>
where
    T: DeserializeOwned,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLarge",
            format!("the request body is larger than {MAX_BODY_LEN} bytes"),
        )
    };
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY_LEN as u64) {
        return Err(too_large());
    }
    let body = Limited::new(request.into_body(), MAX_BODY_LEN)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                too_large()
            } else {
                Refusal::malformed(format!("cannot read the request body: {e}"))
            }
        })?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| Refusal::malformed(format!("the request body is not the expected JSON: {e}")))
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), Refusal> {
    if value.is_empty() || value.len() > max || value.chars().any(char::is_control) {
        return Err(Refusal::malformed(format!(
            "{field} must be 1 to {max} printable characters"
        )));
    }
    Ok(())
}

impl FleetApi {
    /// The API over `issuer`, `registry` and the live fleet configuration `config`.
    pub fn new(
        issuer: Arc<ArcSwap<Issuer>>,
        registry: Arc<dyn Registry>,
        config: Arc<ArcSwap<FleetConfig>>,
    ) -> Self {
        Self {
            issuer,
            registry,
            config,
            reported_versions: Arc::default(),
        }
    }

    /// Answers one fleet API request. `peer` is the identity of the verified client
    /// certificate, if the caller presented one.
    pub async fn handle<B>(
        &self,
        request: Request<B>,
        peer: Option<ConnectorIdentity>,
    ) -> Response<TunnelBody>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let mut audit = Audit {
            client: request
                .extensions()
                .get::<ClientAddress>()
                .map(|address| address.0.to_string()),
            ..Audit::default()
        };
        if let Some(identity) = &peer {
            audit.identify(identity);
        }
        let Some(route) = Route::of(request.uri().path()) else {
            return Refusal::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("the fleet API has no {}", request.uri().path()),
            )
            .into_response();
        };
        if request.method() != route.method() {
            let mut response = Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!(
                    "{} takes {}, not {}",
                    request.uri().path(),
                    route.method(),
                    request.method()
                ),
            )
            .into_response();
            if let Ok(allow) = HeaderValue::from_str(route.method().as_str()) {
                response.headers_mut().insert(ALLOW, allow);
            }
            return response;
        }
        let result = match route {
            Route::Register => self.register(request, &mut audit).await,
            Route::Renew => self.renew(request, peer, &mut audit).await,
            Route::Config => self.config_slice(&request, peer, &mut audit),
        };
        result.unwrap_or_else(|refusal| {
            let Audit {
                client,
                group,
                connector,
            } = &audit;
            if refusal.retry_after.is_some() {
                info!(
                    target: AUDIT_TARGET,
                    event = route.event(),
                    outcome = "deferred",
                    reason = %refusal.reason,
                    group = group.as_deref(),
                    connector = connector.as_deref(),
                    client = client.as_deref(),
                    retry_after = refusal.retry_after,
                    detail = refusal.detail.as_deref().unwrap_or(&refusal.message),
                    "fleet API request deferred"
                );
                audit.refused(route, Outcome::Deferred, &refusal);
            } else if refusal.status.is_server_error() {
                error!(
                    target: AUDIT_TARGET,
                    event = route.event(),
                    outcome = "failed",
                    reason = %refusal.reason,
                    group = group.as_deref(),
                    connector = connector.as_deref(),
                    client = client.as_deref(),
                    detail = refusal.detail.as_deref().unwrap_or(&refusal.message),
                    "fleet API request failed"
                );
                audit.refused(route, Outcome::Failed, &refusal);
            } else {
                warn!(
                    target: AUDIT_TARGET,
                    event = route.event(),
                    outcome = "refused",
                    reason = %refusal.reason,
                    group = group.as_deref(),
                    connector = connector.as_deref(),
                    client = client.as_deref(),
                    detail = refusal.detail.as_deref().unwrap_or(&refusal.message),
                    "fleet API request refused"
                );
                audit.refused(route, Outcome::Refused, &refusal);
            }
            refusal.into_response()
        })
    }

    async fn register<B>(
        &self,
        request: Request<B>,
        audit: &mut Audit,
    ) -> Result<Response<TunnelBody>, Refusal>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let token = bearer_token(request.headers())
            .map(str::to_owned)
            .ok_or_else(|| {
                Refusal::new(
                    StatusCode::UNAUTHORIZED,
                    "TokenMissing",
                    "send the group's registration token as Authorization: Bearer <token>",
                )
            })?;
        let body: RegisterRequest = read_json(request).await?;
        check_text("group", &body.group, MAX_GROUP_ID_LEN)?;
        audit.group = Some(body.group.clone());
        check_text("hostname", &body.hostname, MAX_HOSTNAME_LEN)?;
        check_text("version", &body.version, MAX_VERSION_LEN)?;
        let csr = Issuer::check(&body.csr).map_err(|e| Refusal::from_csr(&e))?;

        let config = self.config.load_full();
        let unknown_group = |detail: &str| {
            Refusal::from_registry(&RegistrationError::TokenInvalid {
                group: body.group.clone(),
                detail: detail.to_owned(),
            })
        };
        let Some(group) = config.connector_groups.iter().find(|g| g.id == body.group) else {
            return Err(self.group_not_in_configuration(&body.group, &token).await);
        };
        let Some((namespace, group_name)) = split_group_id(&group.id) else {
            return Err(unknown_group("the group id is not namespace/name"));
        };
        self.registry
            .redeem(&group.id, &token)
            .await
            .map_err(|e| Refusal::from_registry(&e))?;

        let name = self.registry.new_connector_name(&body.hostname);
        let identity = ConnectorIdentity::new(namespace, group_name, &name).map_err(|e| {
            Refusal::internal("Internal", format!("cannot name the connector: {e}"))
        })?;
        audit.identify(&identity);
        let (issued, response) = self
            .issue(
                &csr,
                &identity,
                group,
                RecordEvent::Registered,
                Some(&body.hostname),
                &body.version,
            )
            .await?;
        info!(
            target: AUDIT_TARGET,
            event = Route::Register.event(),
            outcome = "registered",
            group = %identity.group_id(),
            connector = %identity.connector_id(),
            client = audit.client.as_deref(),
            hostname = %body.hostname,
            version = %body.version,
            key = %csr.key_kind(),
            serial = %issued.serial_hex,
            not_after = %response.not_after,
            "connector registered"
        );
        sallyport_events::audit(
            AuditEvent::new(
                "connector.registered",
                ObjectRef::from_id("Connector", &identity.connector_id()),
                Outcome::Success,
            )
            .message(format!(
                "connector {} registered in group {} with the group's token",
                identity.connector_id(),
                identity.group_id()
            ))
            .source_address(audit.client.as_deref())
            .detail("group", identity.group_id())
            .detail("hostname", &body.hostname)
            .detail("version", &body.version)
            .detail("key", csr.key_kind().to_string())
            .detail("serial", &issued.serial_hex)
            .detail("notAfter", &response.not_after),
        );
        Ok(json_response(StatusCode::OK, &response))
    }

    async fn renew<B>(
        &self,
        request: Request<B>,
        peer: Option<ConnectorIdentity>,
        audit: &mut Audit,
    ) -> Result<Response<TunnelBody>, Refusal>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let identity = peer.ok_or_else(Refusal::certificate_required)?;
        let config = self.config.load_full();
        let group = self.authorize(&config, &identity)?;
        let body: RenewRequest = read_json(request).await?;
        check_text("version", &body.version, MAX_VERSION_LEN)?;
        let csr = Issuer::check(&body.csr).map_err(|e| Refusal::from_csr(&e))?;
        let (issued, response) = self
            .issue(
                &csr,
                &identity,
                group,
                RecordEvent::Renewed,
                None,
                &body.version,
            )
            .await?;
        info!(
            target: AUDIT_TARGET,
            event = Route::Renew.event(),
            outcome = "renewed",
            group = %identity.group_id(),
            connector = %identity.connector_id(),
            client = audit.client.as_deref(),
            version = %body.version,
            key = %csr.key_kind(),
            serial = %issued.serial_hex,
            not_after = %response.not_after,
            "connector certificate renewed"
        );
        sallyport_events::audit(
            AuditEvent::new(
                "connector.renewed",
                ObjectRef::from_id("Connector", &identity.connector_id()),
                Outcome::Success,
            )
            .message(format!(
                "connector {} renewed its certificate",
                identity.connector_id()
            ))
            .source_address(audit.client.as_deref())
            .detail("group", identity.group_id())
            .detail("version", &body.version)
            .detail("key", csr.key_kind().to_string())
            .detail("serial", &issued.serial_hex)
            .detail("notAfter", &response.not_after),
        );
        Ok(json_response(StatusCode::OK, &response))
    }

    /// The answer to a registration for `group_id`, which this proxy's configuration does
    /// not hold: 503 with `Retry-After` when `token` is valid for the group (checked without
    /// spending a use), else the 401 of a wrong token.
    async fn group_not_in_configuration(&self, group_id: &str, token: &str) -> Refusal {
        let unknown = |detail: String| {
            Refusal::from_registry(&RegistrationError::TokenInvalid {
                group: group_id.to_owned(),
                detail,
            })
        };
        if split_group_id(group_id).is_none() {
            return unknown("the group id is not namespace/name".to_owned());
        }
        match self.registry.check(group_id, token).await {
            Ok(()) => Refusal::group_not_loaded(group_id).detail(format!(
                "the token is valid but group {group_id} is not in fleet configuration {}",
                self.config.load().version
            )),
            Err(error @ RegistrationError::Backend { .. }) => Refusal::from_registry(&error),
            Err(error) => unknown(format!(
                "the group is not in the fleet configuration ({error})"
            )),
        }
    }

    fn config_slice<B>(
        &self,
        request: &Request<B>,
        peer: Option<ConnectorIdentity>,
        audit: &mut Audit,
    ) -> Result<Response<TunnelBody>, Refusal> {
        let identity = peer.ok_or_else(Refusal::certificate_required)?;
        let config = self.config.load_full();
        self.authorize(&config, &identity)?;
        let group_id = identity.group_id();
        let slice: GroupSlice = config
            .group_slice(&group_id)
            .map_err(|e| Refusal::internal("Internal", e.to_string()))?
            .ok_or_else(|| Refusal::group_gone(&group_id))?;
        let etag = HeaderValue::from_str(&format!("\"{}\"", slice.version))
            .map_err(|e| Refusal::internal("Internal", format!("slice version: {e}")))?;
        let unchanged = matches_version(request.headers(), &slice.version);
        self.record_reported_version(request, &identity, slice.group.connector_version.clone());
        debug!(
            event = Route::Config.event(),
            group = %group_id,
            connector = audit.connector.as_deref(),
            client = audit.client.as_deref(),
            version = %slice.version,
            unchanged,
            "configuration slice served"
        );
        let mut response = if unchanged {
            let mut response = Response::new(sallyport_tunnel::body::empty());
            *response.status_mut() = StatusCode::NOT_MODIFIED;
            response
        } else {
            json_response(StatusCode::OK, &slice)
        };
        response.headers_mut().insert(ETAG, etag);
        Ok(response)
    }

    /// Records, in the background, the version a connector pulling its configuration
    /// reports in [`CONNECTOR_VERSION_HEADER`] and the one `desired` by that
    /// configuration, when they differ from what this replica last recorded. A missing
    /// or malformed header (an older connector) records nothing.
    fn record_reported_version<B>(
        &self,
        request: &Request<B>,
        identity: &ConnectorIdentity,
        desired: Option<String>,
    ) {
        let Some(version) = request
            .headers()
            .get(CONNECTOR_VERSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| check_text("version", v, MAX_VERSION_LEN).is_ok())
        else {
            return;
        };
        let connector = identity.connector_id();
        let report = (version.to_owned(), desired.clone());
        {
            let mut reported = self
                .reported_versions
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if reported.get(&connector) == Some(&report) {
                return;
            }
            reported.insert(connector.clone(), report.clone());
        }
        let registry = self.registry.clone();
        let reported = self.reported_versions.clone();
        let report = VersionReport {
            identity: identity.clone(),
            version: version.to_owned(),
            desired_version: desired,
        };
        tokio::spawn(async move {
            match registry.report_version(report).await {
                Ok(()) => {
                    debug!(%connector, "connector version recorded");
                }
                Err(error) => {
                    // Forget it, so the next pull tries again.
                    reported
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&connector);
                    warn!(%connector, %error, "cannot record the connector's version");
                }
            }
        });
    }

    /// The group of a connector presenting its certificate, unless it is revoked or its
    /// group is gone.
    fn authorize<'c>(
        &self,
        config: &'c FleetConfig,
        identity: &ConnectorIdentity,
    ) -> Result<&'c ConnectorGroupConfig, Refusal> {
        let connector = identity.connector_id();
        if config.revoked_connectors.contains(&connector) {
            return Err(Refusal::revoked(&connector));
        }
        let group_id = identity.group_id();
        config
            .connector_groups
            .iter()
            .find(|g| g.id == group_id)
            .ok_or_else(|| Refusal::group_gone(&group_id))
    }

    /// Signs a certificate for `identity` under its group's policy, and the answer.
    /// Signs `csr` for `identity` under its group's certificate policy and records the
    /// connector with the new certificate (`event`: a registration or a renewal).
    async fn issue(
        &self,
        csr: &CheckedCsr,
        identity: &ConnectorIdentity,
        group: &ConnectorGroupConfig,
        event: RecordEvent,
        hostname: Option<&str>,
        version: &str,
    ) -> Result<(IssuedCertificate, CertificateResponse), Refusal> {
        let issuer = self.issuer.load_full();
        let issued = issuer
            .sign_checked(csr, identity, &group.certificate, OffsetDateTime::now_utc())
            .map_err(|e| Refusal::from_csr(&e))?;
        let response = CertificateResponse {
            connector: identity.connector_id(),
            certificate_chain: issued.chain_pem.clone(),
            ca: issuer.root_ca_pem().to_owned(),
            not_after: rfc3339(issued.not_after)?,
            renew_at: rfc3339(issued.renew_at)?,
        };
        self.registry
            .record(ConnectorRecord {
                event,
                identity: identity.clone(),
                hostname: hostname.map(str::to_owned),
                version: version.to_owned(),
                serial_hex: issued.serial_hex.clone(),
                issued_at: issued.issued_at,
                not_after: issued.not_after,
            })
            .await
            .map_err(|e| Refusal::from_registry(&e))?;
        Ok((issued, response))
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::Full;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    use sallyport_api::Duration;
    use sallyport_api::connector_group::{CertificatePolicy, Registration};

    use super::*;
    use crate::registry::{MemoryRegistry, StaticToken};

    fn ok<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
        result.unwrap_or_else(|e| panic!("{e}"))
    }

    fn test_issuer() -> Issuer {
        let ca = |name: &str, path: u8| {
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
            params.not_after = OffsetDateTime::now_utc() + time::Duration::days(365);
            params
        };
        let root_key = ok(KeyPair::generate());
        let root_params = ca("root", 1);
        let root = ok(root_params.self_signed(&root_key));
        let root_issuer = rcgen::Issuer::new(root_params, root_key);
        let key = ok(KeyPair::generate());
        let issuer = ok(ca("issuer", 0).signed_by(&key, &root_issuer));
        ok(Issuer::from_pem(
            &issuer.pem(),
            &key.serialize_pem(),
            &root.pem(),
        ))
    }

    fn group(id: &str) -> ConnectorGroupConfig {
        ConnectorGroupConfig {
            id: id.to_owned(),
            certificate: CertificatePolicy::default(),
            registration: Registration::default(),
            inactive_connector_ttl: ok(Duration::parse("240h")),
            connector_version: None,
        }
    }

    fn api(revoked: Vec<String>) -> (FleetApi, Arc<MemoryRegistry>) {
        let registry = Arc::new(MemoryRegistry::new(vec![StaticToken {
            group_id: "infra/east".to_owned(),
            token: "east-token".to_owned(),
            expires_at: None,
            max_uses: 0,
        }]));
        let config = ok(FleetConfig::new(
            vec![],
            vec![],
            vec![group("infra/east")],
            revoked,
        ));
        let api = FleetApi::new(
            Arc::new(ArcSwap::from_pointee(test_issuer())),
            registry.clone(),
            Arc::new(ArcSwap::from_pointee(config)),
        );
        (api, registry)
    }

    fn request(
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Request<Full<Bytes>> {
        let mut builder = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        ok(builder.body(Full::new(Bytes::from(body.to_owned()))))
    }

    async fn answer(
        api: &FleetApi,
        request: Request<Full<Bytes>>,
        peer: Option<ConnectorIdentity>,
    ) -> (StatusCode, HeaderMap, Vec<u8>) {
        let response = api.handle(request, peer).await;
        let status = response.status();
        let headers = response.headers().clone();
        let body = ok(response.into_body().collect().await).to_bytes().to_vec();
        (status, headers, body)
    }

    fn reason(body: &[u8]) -> String {
        ok(serde_json::from_slice::<ApiError>(body)).reason
    }

    fn peer(name: &str) -> Option<ConnectorIdentity> {
        Some(ok(ConnectorIdentity::new("infra", "east", name)))
    }

    fn register_body(group: &str, csr: &str) -> String {
        ok(serde_json::to_string(&RegisterRequest {
            group: group.to_owned(),
            csr: csr.to_owned(),
            hostname: "vm-1".to_owned(),
            version: "0.1.0".to_owned(),
        }))
    }

    fn csr() -> String {
        let key = ok(KeyPair::generate());
        ok(ok(CertificateParams::default().serialize_request(&key)).pem())
    }

    #[tokio::test]
    async fn unknown_paths_and_methods() {
        let (api, _) = api(vec![]);
        let (status, _, body) = answer(&api, request(Method::GET, "/nope", &[], ""), None).await;
        assert_eq!(
            (status, reason(&body).as_str()),
            (StatusCode::NOT_FOUND, "NotFound")
        );
        let (status, headers, body) =
            answer(&api, request(Method::GET, REGISTER_PATH, &[], ""), None).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(reason(&body), "MethodNotAllowed");
        assert_eq!(
            headers.get(ALLOW).and_then(|v| v.to_str().ok()),
            Some("POST")
        );
    }

    #[tokio::test]
    async fn registration_needs_a_token_and_a_well_formed_request() {
        let (api, registry) = api(vec![]);
        let bearer = [("authorization", "Bearer east-token")];
        type Case<'a> = (Vec<(&'a str, &'a str)>, String, StatusCode, &'a str);
        let cases: Vec<Case<'_>> = vec![
            (
                vec![],
                register_body("infra/east", &csr()),
                StatusCode::UNAUTHORIZED,
                "TokenMissing",
            ),
            (
                vec![("authorization", "Basic east-token")],
                register_body("infra/east", &csr()),
                StatusCode::UNAUTHORIZED,
                "TokenMissing",
            ),
            (
                bearer.to_vec(),
                "{not json".to_owned(),
                StatusCode::BAD_REQUEST,
                "MalformedRequest",
            ),
            (
                bearer.to_vec(),
                "x".repeat(MAX_BODY_LEN + 1),
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestTooLarge",
            ),
            (
                bearer.to_vec(),
                register_body("infra/east", "garbage"),
                StatusCode::BAD_REQUEST,
                "CsrMalformed",
            ),
            (
                vec![("authorization", "Bearer wrong")],
                register_body("infra/east", &csr()),
                StatusCode::UNAUTHORIZED,
                "TokenInvalid",
            ),
            (
                bearer.to_vec(),
                register_body("infra/west", &csr()),
                StatusCode::UNAUTHORIZED,
                "TokenInvalid",
            ),
        ];
        for (headers, body, status, expected) in cases {
            let (got, _, answer) = answer(
                &api,
                request(Method::POST, REGISTER_PATH, &headers, &body),
                None,
            )
            .await;
            assert_eq!(
                (got, reason(&answer).as_str()),
                (status, expected),
                "{headers:?}"
            );
        }
        assert_eq!(
            registry.uses("infra/east"),
            0,
            "no refused request spends a use"
        );

        let (status, _, body) = answer(
            &api,
            request(
                Method::POST,
                REGISTER_PATH,
                &bearer,
                &register_body("infra/east", &csr()),
            ),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let response: CertificateResponse = ok(serde_json::from_slice(&body));
        assert!(response.connector.starts_with("infra/vm-1-"));
        assert_eq!(registry.uses("infra/east"), 1);
        assert!(registry.record_of(&response.connector).is_some());
    }

    #[tokio::test]
    async fn a_valid_token_for_a_group_not_loaded_yet_is_told_to_retry() {
        let registry = Arc::new(MemoryRegistry::new(vec![StaticToken {
            group_id: "infra/new".to_owned(),
            token: "new-token".to_owned(),
            expires_at: None,
            max_uses: 1,
        }]));
        let config = Arc::new(ArcSwap::from_pointee(ok(FleetConfig::new(
            vec![],
            vec![],
            vec![group("infra/east")],
            vec![],
        ))));
        let api = FleetApi::new(
            Arc::new(ArcSwap::from_pointee(test_issuer())),
            registry.clone(),
            config.clone(),
        );
        let register = |group: &str, token: &str| {
            let bearer = format!("Bearer {token}");
            request(
                Method::POST,
                REGISTER_PATH,
                &[("authorization", bearer.as_str())],
                &register_body(group, &csr()),
            )
        };

        // The token is valid, the group not loaded: come back, and no use is spent.
        for _ in 0..2 {
            let (status, headers, body) =
                answer(&api, register("infra/new", "new-token"), None).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            let error: ApiError = ok(serde_json::from_slice(&body));
            assert_eq!(error.reason, "GroupNotLoaded");
            assert!(
                error
                    .message
                    .contains("the fleet has not loaded group infra/new yet"),
                "{}",
                error.message
            );
            assert_eq!(
                headers
                    .get(RETRY_AFTER_HEADER)
                    .and_then(|v| v.to_str().ok()),
                Some("2")
            );
        }
        assert_eq!(registry.uses("infra/new"), 0);

        // Anyone without the token learns nothing: the answer of an unknown group.
        let (status, headers, wrong) = answer(&api, register("infra/new", "guess"), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(headers.get(RETRY_AFTER_HEADER).is_none());
        let (_, _, unknown) = answer(&api, register("infra/none", "guess"), None).await;
        assert_eq!(wrong, unknown);
        assert_eq!(reason(&wrong), "TokenInvalid");
        let (status, _, body) = answer(&api, register("not-a-group", "new-token"), None).await;
        assert_eq!(
            (status, reason(&body).as_str()),
            (StatusCode::UNAUTHORIZED, "TokenInvalid")
        );

        // Once the configuration holds the group, the same token registers.
        config.store(Arc::new(ok(FleetConfig::new(
            vec![],
            vec![],
            vec![group("infra/east"), group("infra/new")],
            vec![],
        ))));
        let (status, _, body) = answer(&api, register("infra/new", "new-token"), None).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        assert_eq!(registry.uses("infra/new"), 1);
    }

    #[tokio::test]
    async fn a_configuration_pull_records_the_reported_and_wanted_versions() {
        let registry = Arc::new(MemoryRegistry::new(vec![]));
        let mut wanting = group("infra/east");
        wanting.connector_version = Some("0.2.0".to_owned());
        let config = ok(FleetConfig::new(vec![], vec![], vec![wanting], vec![]));
        let api = FleetApi::new(
            Arc::new(ArcSwap::from_pointee(test_issuer())),
            registry.clone(),
            Arc::new(ArcSwap::from_pointee(config)),
        );
        let get = |headers: &[(&str, &str)]| request(Method::GET, CONFIG_PATH, headers, "");
        let recorded = async |expected: Option<&str>| {
            for _ in 0..100 {
                let version = registry.version_of("infra/vm-1-abcde");
                if version.as_ref().map(|v| v.version.as_str()) == expected {
                    return version;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            registry.version_of("infra/vm-1-abcde")
        };

        // An older connector sends no version: nothing is recorded; an overlong one
        // neither.
        let (status, _, _) = answer(&api, get(&[]), peer("vm-1-abcde")).await;
        assert_eq!(status, StatusCode::OK);
        let _ = answer(
            &api,
            get(&[(CONNECTOR_VERSION_HEADER, &"9".repeat(MAX_VERSION_LEN + 1))]),
            peer("vm-1-abcde"),
        )
        .await;
        assert_eq!(recorded(None).await, None);

        let (status, _, _) = answer(
            &api,
            get(&[(CONNECTOR_VERSION_HEADER, "0.1.0")]),
            peer("vm-1-abcde"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let report = recorded(Some("0.1.0")).await;
        assert_eq!(
            report.map(|r| (r.version, r.desired_version)),
            Some(("0.1.0".to_owned(), Some("0.2.0".to_owned())))
        );
        // After an upgrade, the next pull records the new version.
        let _ = answer(
            &api,
            get(&[(CONNECTOR_VERSION_HEADER, "0.2.0")]),
            peer("vm-1-abcde"),
        )
        .await;
        assert_eq!(
            recorded(Some("0.2.0")).await.map(|r| r.version),
            Some("0.2.0".to_owned())
        );
    }

    #[tokio::test]
    async fn renewal_and_configuration_need_a_connector_not_revoked() {
        let (api, _) = api(vec!["infra/gone".to_owned()]);
        let renew = || {
            let body = ok(serde_json::to_string(&RenewRequest {
                csr: csr(),
                version: "0.1.0".to_owned(),
            }));
            request(Method::POST, RENEW_PATH, &[], &body)
        };
        let (status, _, body) = answer(&api, renew(), None).await;
        assert_eq!(
            (status, reason(&body).as_str()),
            (StatusCode::UNAUTHORIZED, "CertificateRequired")
        );
        let (status, _, body) = answer(&api, renew(), peer("gone")).await;
        assert_eq!(
            (status, reason(&body).as_str()),
            (StatusCode::FORBIDDEN, "ConnectorRevoked")
        );
        let elsewhere = Some(ok(ConnectorIdentity::new("infra", "west", "a")));
        let (status, _, body) = answer(&api, renew(), elsewhere).await;
        assert_eq!(
            (status, reason(&body).as_str()),
            (StatusCode::FORBIDDEN, "GroupNotFound")
        );
        let (status, _, _) = answer(&api, renew(), peer("vm-1-abcde")).await;
        assert_eq!(status, StatusCode::OK);

        let get = |headers: &[(&str, &str)]| request(Method::GET, CONFIG_PATH, headers, "");
        let (status, _, body) = answer(&api, get(&[]), None).await;
        assert_eq!(
            (status, reason(&body).as_str()),
            (StatusCode::UNAUTHORIZED, "CertificateRequired")
        );
        let (status, _, body) = answer(&api, get(&[]), peer("gone")).await;
        assert_eq!(
            (status, reason(&body).as_str()),
            (StatusCode::FORBIDDEN, "ConnectorRevoked")
        );
        let (status, headers, body) = answer(&api, get(&[]), peer("vm-1-abcde")).await;
        assert_eq!(status, StatusCode::OK);
        let slice: GroupSlice = ok(serde_json::from_slice(&body));
        assert_eq!(slice.group.id, "infra/east");
        let etag = headers
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert_eq!(etag, format!("\"{}\"", slice.version));
        let (status, headers, body) =
            answer(&api, get(&[("if-none-match", &etag)]), peer("vm-1-abcde")).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        assert!(body.is_empty());
        assert_eq!(
            headers.get(ETAG).and_then(|v| v.to_str().ok()),
            Some(etag.as_str())
        );
        let (status, _, _) = answer(
            &api,
            get(&[("if-none-match", "\"older\"")]),
            peer("vm-1-abcde"),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }

    #[test]
    fn bearer_tokens_and_etags_parse() {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_static("bearer  abc "));
        assert_eq!(bearer_token(&headers), Some("abc"));
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer_token(&headers), None);
        headers.insert(IF_NONE_MATCH, HeaderValue::from_static("\"a\", W/\"b\""));
        assert!(matches_version(&headers, "b"));
        assert!(!matches_version(&headers, "c"));
        headers.insert(IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(matches_version(&headers, "c"));
    }
}
