//! The names both ends of the tunnel and of the fleet API agree on.
//!
//! **Tunnel.** A connector opens TLS to the fleet with its client certificate, SNI set to
//! the fleet's tunnel host name and ALPN [`TUNNEL_ALPN`]. The proxy then speaks HTTP/2
//! as the *client* on that connection:
//!
//! - Each user request becomes one stream whose URI is the app's **internal** URL
//!   (scheme, authority, path and query the backend should see) and whose
//!   [`APP_HEADER`] names the app (`namespace/name`). The connector serves it only when
//!   the app is in its group's configuration slice and the URI lies under that app's
//!   internal URL; anything else is refused with 403 and never reaches the network.
//! - [`REQUEST_ID_HEADER`] carries the proxy's request id; the connector logs it and
//!   passes it on to the backend.
//! - [`FLEET_NOTICE_PATH`] (`POST`, JSON [`FleetNotice`]) is the proxy telling the
//!   connector who it is, which replicas exist and the current configuration version;
//!   it is sent when the tunnel opens and whenever the configuration changes. The
//!   connector answers 200 with [`NoticeReply`].
//!
//! **Fleet API.** The same TLS endpoint with ALPN `h2` or `http/1.1` serves:
//!
//! - [`REGISTER_PATH`] (`POST`, JSON [`RegisterRequest`], `Authorization: Bearer
//!   <registration token>`, no client certificate needed) answers
//!   [`CertificateResponse`].
//! - [`RENEW_PATH`] (`POST`, JSON [`RenewRequest`], client certificate required) answers
//!   [`CertificateResponse`] for the same identity.
//! - [`CONFIG_PATH`] (`GET`, client certificate required) answers the group's slice of
//!   the fleet configuration (`sallyport_api::fleet_config::GroupSlice`), or 304 when
//!   the `If-None-Match` header holds its version.
//!
//! Errors of the fleet API are JSON [`ApiError`] bodies with a 4xx/5xx status.

use serde::{Deserialize, Serialize};

/// The ALPN protocol id of a tunnel connection.
pub const TUNNEL_ALPN: &[u8] = b"sallyport-tunnel/1";

/// The largest HTTP/2 frame payload either end of a tunnel accepts: 64 KiB less the
/// 9-byte frame header, so that a full DATA frame with its header is exactly 64 KiB of
/// TLS plaintext, four full 16 KiB records, written at once. A 64 KiB payload would
/// leave 9 bytes over: rustls takes at most 64 KiB per write (its default buffer
/// limit), so every frame cost an extra 31-byte record, write and receive.
pub const MAX_FRAME_SIZE: u32 = (64 << 10) - 9;

/// Request header naming the app (`namespace/name`) a tunneled request is for.
pub const APP_HEADER: &str = "sallyport-app";

/// Request header carrying the proxy's request id, passed to backends as is.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Tunnel control request: the proxy's notice to the connector.
pub const FLEET_NOTICE_PATH: &str = "/.sallyport/v1/fleet-notice";

/// Fleet API: register a new connector with a bootstrap token.
pub const REGISTER_PATH: &str = "/v1/connectors/register";

/// Fleet API: renew the calling connector's certificate.
pub const RENEW_PATH: &str = "/v1/connectors/renew";

/// Fleet API: the calling connector's group configuration slice.
pub const CONFIG_PATH: &str = "/v1/connectors/config";

/// What a proxy replica tells a connector on a tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FleetNotice {
    /// The replica at the other end of this tunnel.
    pub replica: String,
    /// Every proxy replica currently in the fleet, this one included: the connector keeps
    /// dialling until it holds tunnels to each.
    pub replicas: Vec<String>,
    /// The version of the connector's group slice this replica serves; when it differs
    /// from the connector's, the connector pulls [`CONFIG_PATH`].
    pub config_version: String,
}

/// The connector's answer to a [`FleetNotice`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NoticeReply {
    /// The connector's id, `namespace/name`.
    pub connector: String,
    /// The connector's software version.
    pub version: String,
    /// The configuration version the connector currently serves.
    pub config_version: String,
}

/// A registration: the CSR of a key pair the connector made itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterRequest {
    /// The ConnectorGroup, `namespace/name`, the token belongs to.
    pub group: String,
    /// A PEM PKCS#10 certificate signing request. Only its public key is used: the fleet
    /// decides the certificate's names, usages and lifetime.
    pub csr: String,
    /// The host the connector runs on, for `kubectl get connectors`.
    pub hostname: String,
    /// The connector's software version.
    pub version: String,
}

/// A renewal: a CSR for a new key pair, authenticated by the current certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RenewRequest {
    /// A PEM PKCS#10 certificate signing request.
    pub csr: String,
    /// The connector's software version.
    pub version: String,
}

/// A certificate the fleet issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateResponse {
    /// The connector's id, `namespace/name`.
    pub connector: String,
    /// PEM: the connector's certificate followed by the issuer's.
    pub certificate_chain: String,
    /// PEM: the fleet's root CA, which also signs the tunnel serving certificate.
    pub ca: String,
    /// When the certificate expires (RFC 3339).
    pub not_after: String,
    /// When the connector should ask for a new one (RFC 3339).
    pub renew_at: String,
}

/// The body of every fleet API error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    /// A stable, machine-readable reason, e.g. `TokenExpired`.
    pub reason: String,
    /// What went wrong and what to do, for humans.
    pub message: String,
}
