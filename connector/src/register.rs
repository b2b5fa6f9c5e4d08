//! The connector's client of the fleet API: registration with a bootstrap token,
//! certificate renewal and the group's configuration slice.
//!
//! Every call opens its own TLS connection to the fleet, trusting only the fleet's root
//! CA, offering ALPN `h2` and `http/1.1` and speaking whichever the fleet picked. The
//! key pair (ECDSA P-256) is made here; only its CSR leaves the machine. Every answer is
//! checked before it is believed: the certificate must carry our public key and the
//! identity we asked for, and must chain to the fleet's root as a client certificate.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, ETAG, HOST, IF_NONE_MATCH};
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sallyport_api::GroupSlice;
use sallyport_tunnel::ConnectorIdentity;
use sallyport_tunnel::tls::{self, API_ALPN, Credentials, TlsError};
use sallyport_tunnel::wire::{
    ApiError, CONFIG_PATH, CertificateResponse, REGISTER_PATH, RENEW_PATH, RegisterRequest,
    RenewRequest,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::state::ConnectorState;

/// How long one call to the fleet may take, connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest answer read from the fleet.
pub const MAX_ANSWER_LEN: usize = 16 * 1024 * 1024;

/// This connector's software version, as it reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where the fleet API is and how to recognise it.
#[derive(Debug, Clone)]
pub struct FleetEndpoint {
    /// `host:port` to dial.
    pub address: String,
    /// The name the fleet's serving certificate must carry (SNI).
    pub server_name: String,
    /// The fleet's root CA: the only root trusted.
    pub ca: Vec<CertificateDer<'static>>,
}

/// A call to the fleet failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The key pair or CSR could not be made.
    #[error("cannot make a key pair and CSR: {0}")]
    Key(String),
    /// The TLS settings could not be built.
    #[error("cannot set up TLS to the fleet: {0}")]
    Tls(#[from] TlsError),
    /// The server name is not a DNS name or IP address.
    #[error("the fleet server name {name:?} is not a valid DNS name or IP address")]
    ServerName {
        /// The name given.
        name: String,
    },
    /// The fleet could not be reached, or the TLS handshake failed.
    #[error("cannot connect to the fleet at {address}: {source}")]
    Connect {
        /// `host:port`.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP exchange failed (including a client certificate the fleet refused).
    #[error("the {action} request to the fleet at {address} failed: {reason}")]
    Http {
        /// `registration`, `renewal` or `configuration`.
        action: &'static str,
        /// `host:port`.
        address: String,
        /// Why.
        reason: String,
    },
    /// The fleet did not answer in time.
    #[error("the fleet at {address} did not answer the {action} within {timeout:?}")]
    Timeout {
        /// `registration`, `renewal` or `configuration`.
        action: &'static str,
        /// `host:port`.
        address: String,
        /// The limit.
        timeout: Duration,
    },
    /// The fleet refused the call.
    #[error("the fleet refused the {action}: {reason}: {message}")]
    Refused {
        /// `registration`, `renewal` or `configuration`.
        action: &'static str,
        /// The HTTP status.
        status: u16,
        /// The fleet's stable reason, e.g. `TokenExpired`.
        reason: String,
        /// The fleet's explanation.
        message: String,
    },
    /// The fleet's answer is not what was asked for.
    #[error("the fleet's answer to the {action} is unusable: {reason}")]
    BadAnswer {
        /// `registration`, `renewal` or `configuration`.
        action: &'static str,
        /// Why.
        reason: String,
    },
    /// The saved state cannot be used to authenticate.
    #[error("the connector state of {connector} is unusable: {reason}")]
    State {
        /// The connector id.
        connector: String,
        /// Why.
        reason: String,
    },
}

impl RegisterError {
    /// The fleet's reason when it refused the call, e.g. `ConnectorRevoked`.
    pub fn refusal_reason(&self) -> Option<&str> {
        match self {
            Self::Refused { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

const REGISTRATION: &str = "registration";
const RENEWAL: &str = "renewal";
const CONFIGURATION: &str = "configuration";

/// An answer of the fleet.
struct Answer {
    status: StatusCode,
    etag: Option<String>,
    body: Bytes,
}

/// A new key pair and the PEM CSR for it.
fn key_and_csr(common_name: &str) -> Result<(KeyPair, String), RegisterError> {
    let key = KeyPair::generate().map_err(|e| RegisterError::Key(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| RegisterError::Key(e.to_string()))?;
    Ok((key, csr))
}

/// Registers with the group `group_id` (`namespace/name`) using its bootstrap `token`.
pub async fn register(
    endpoint: &FleetEndpoint,
    group_id: &str,
    token: &str,
    hostname: &str,
) -> Result<ConnectorState, RegisterError> {
    let (key, csr) = key_and_csr(hostname)?;
    let body = RegisterRequest {
        group: group_id.to_owned(),
        csr,
        hostname: hostname.to_owned(),
        version: VERSION.to_owned(),
    };
    let authorization =
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| RegisterError::Refused {
            action: REGISTRATION,
            status: 0,
            reason: "TokenInvalid".to_owned(),
            message: "the token holds characters that cannot be sent in a header".to_owned(),
        })?;
    let answer = call(
        endpoint,
        None,
        REGISTRATION,
        Method::POST,
        REGISTER_PATH,
        vec![(AUTHORIZATION, authorization)],
        Some(&body),
    )
    .await?;
    let response: CertificateResponse = success(REGISTRATION, &answer)?;
    let state = check_certificate(REGISTRATION, endpoint, &key, group_id, None, response)?;
    debug!(connector = %state.connector_id, group = %group_id, "registered with the fleet");
    Ok(state)
}

/// Asks for a new certificate (for a new key pair) with the current one.
pub async fn renew(
    endpoint: &FleetEndpoint,
    state: &ConnectorState,
) -> Result<ConnectorState, RegisterError> {
    let credentials = credentials(state)?;
    let (key, csr) = key_and_csr(&state.connector_id)?;
    let body = RenewRequest {
        csr,
        version: VERSION.to_owned(),
    };
    let answer = call(
        endpoint,
        Some(&credentials),
        RENEWAL,
        Method::POST,
        RENEW_PATH,
        vec![],
        Some(&body),
    )
    .await?;
    let response: CertificateResponse = success(RENEWAL, &answer)?;
    let renewed = check_certificate(
        RENEWAL,
        endpoint,
        &key,
        &state.group_id,
        Some(&state.connector_id),
        response,
    )?;
    debug!(connector = %renewed.connector_id, not_after = %renewed.not_after, "certificate renewed");
    Ok(renewed)
}

/// The group's configuration slice; `None` when it is still `known_version`.
pub async fn fetch_config(
    endpoint: &FleetEndpoint,
    state: &ConnectorState,
    known_version: Option<&str>,
) -> Result<Option<GroupSlice>, RegisterError> {
    let credentials = credentials(state)?;
    let mut headers = vec![];
    if let Some(version) = known_version
        && let Ok(value) = HeaderValue::from_str(&format!("\"{version}\""))
    {
        headers.push((IF_NONE_MATCH, value));
    }
    let answer = call(
        endpoint,
        Some(&credentials),
        CONFIGURATION,
        Method::GET,
        CONFIG_PATH,
        headers,
        None::<&()>,
    )
    .await?;
    if answer.status == StatusCode::NOT_MODIFIED {
        return Ok(None);
    }
    let slice: GroupSlice = success(CONFIGURATION, &answer)?;
    let bad = |reason: String| RegisterError::BadAnswer {
        action: CONFIGURATION,
        reason,
    };
    if slice.group.id != state.group_id {
        return Err(bad(format!(
            "it is the slice of group {}, not {}",
            slice.group.id, state.group_id
        )));
    }
    if let Some(etag) = &answer.etag
        && etag.trim_matches('"') != slice.version
    {
        return Err(bad(format!(
            "its ETag {etag} is not its version {}",
            slice.version
        )));
    }
    Ok(Some(slice))
}

fn credentials(state: &ConnectorState) -> Result<Credentials, RegisterError> {
    state.credentials().map_err(|e| RegisterError::State {
        connector: state.connector_id.clone(),
        reason: e.to_string(),
    })
}

/// The body of a 200 answer, or the fleet's refusal.
fn success<T: DeserializeOwned>(action: &'static str, answer: &Answer) -> Result<T, RegisterError> {
    if answer.status != StatusCode::OK {
        let (reason, message) = match serde_json::from_slice::<ApiError>(&answer.body) {
            Ok(error) => (error.reason, error.message),
            Err(_) => (
                answer
                    .status
                    .canonical_reason()
                    .unwrap_or("Unknown")
                    .replace(' ', ""),
                String::from_utf8_lossy(&answer.body)
                    .chars()
                    .take(200)
                    .collect(),
            ),
        };
        return Err(RegisterError::Refused {
            action,
            status: answer.status.as_u16(),
            reason,
            message,
        });
    }
    serde_json::from_slice(&answer.body).map_err(|e| RegisterError::BadAnswer {
        action,
        reason: format!("not the expected JSON: {e}"),
    })
}

/// Checks an issued certificate and makes the state from it: our public key, the group
/// asked for (and the connector, on renewal), a chain to the fleet's root.
fn check_certificate(
    action: &'static str,
    endpoint: &FleetEndpoint,
    key: &KeyPair,
    group_id: &str,
    connector_id: Option<&str>,
    response: CertificateResponse,
) -> Result<ConnectorState, RegisterError> {
    let bad = |reason: String| RegisterError::BadAnswer { action, reason };
    let chain =
        tls::certificates_from_pem("issued certificate", response.certificate_chain.as_bytes())
            .map_err(|e| bad(e.to_string()))?;
    tls::certificates_from_pem("fleet root CA", response.ca.as_bytes())
        .map_err(|e| bad(e.to_string()))?;
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(bad("the chain is empty".to_owned()));
    };
    let (_, certificate) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(e.to_string()))?;
    if certificate.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(bad("the certificate is not for our public key".to_owned()));
    }
    let identity = ConnectorIdentity::from_certificate_der(leaf).map_err(|e| bad(e.to_string()))?;
    if identity.group_id() != group_id {
        return Err(bad(format!(
            "the certificate is for group {}, not {group_id}",
            identity.group_id()
        )));
    }
    if identity.connector_id() != response.connector {
        return Err(bad(format!(
            "the certificate is for {}, the answer names {}",
            identity.connector_id(),
            response.connector
        )));
    }
    if let Some(expected) = connector_id
        && identity.connector_id() != expected
    {
        return Err(bad(format!(
            "the renewed certificate is for {}, not {expected}",
            identity.connector_id()
        )));
    }
    verify_client_chain(&endpoint.ca, leaf, intermediates).map_err(|e| {
        bad(format!(
            "the certificate does not chain to the fleet's root CA: {e}"
        ))
    })?;
    let time = |field: &str, text: &str| {
        OffsetDateTime::parse(text, &Rfc3339)
            .map_err(|e| bad(format!("{field} {text:?} is not an RFC 3339 time: {e}")))
    };
    Ok(ConnectorState {
        connector_id: identity.connector_id(),
        group_id: identity.group_id(),
        chain_pem: response.certificate_chain,
        key_pem: key.serialize_pem(),
        ca_pem: response.ca,
        not_after: time("notAfter", &response.not_after)?,
        renew_at: time("renewAt", &response.renew_at)?,
    })
}

/// Verifies `leaf` as a TLS client certificate under `roots`, as the fleet will.
fn verify_client_chain(
    roots: &[CertificateDer<'static>],
    leaf: &CertificateDer<'static>,
    intermediates: &[CertificateDer<'static>],
) -> Result<(), String> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).map_err(|e| e.to_string())?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), tls::provider())
        .build()
        .map_err(|e| e.to_string())?;
    verifier
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// One request to the fleet on a connection of its own.
async fn call<T: Serialize>(
    endpoint: &FleetEndpoint,
    credentials: Option<&Credentials>,
    action: &'static str,
    method: Method,
    path: &str,
    headers: Vec<(http::HeaderName, HeaderValue)>,
    body: Option<&T>,
) -> Result<Answer, RegisterError> {
    let exchange = exchange(endpoint, credentials, action, method, path, headers, body);
    tokio::time::timeout(CALL_TIMEOUT, exchange)
        .await
        .map_err(|_| RegisterError::Timeout {
            action,
            address: endpoint.address.clone(),
            timeout: CALL_TIMEOUT,
        })?
}

async fn exchange<T: Serialize>(
    endpoint: &FleetEndpoint,
    credentials: Option<&Credentials>,
    action: &'static str,
    method: Method,
    path: &str,
    headers: Vec<(http::HeaderName, HeaderValue)>,
    body: Option<&T>,
) -> Result<Answer, RegisterError> {
    let http = |reason: String| RegisterError::Http {
        action,
        address: endpoint.address.clone(),
        reason,
    };
    let connect = |source: std::io::Error| RegisterError::Connect {
        address: endpoint.address.clone(),
        source,
    };
    let config = tls::connector_client_config(credentials, &endpoint.ca, &API_ALPN)?;
    let server_name = ServerName::try_from(endpoint.server_name.clone()).map_err(|_| {
        RegisterError::ServerName {
            name: endpoint.server_name.clone(),
        }
    })?;
    let tcp = TcpStream::connect(&endpoint.address)
        .await
        .map_err(connect)?;
    let stream = TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(connect)?;
    let http2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());

    let payload = match body {
        Some(body) => Bytes::from(serde_json::to_vec(body).map_err(|e| http(e.to_string()))?),
        None => Bytes::new(),
    };
    let uri = if http2 {
        format!("https://{}{path}", endpoint.server_name)
    } else {
        path.to_owned()
    };
    let mut builder = Request::builder().method(method).uri(uri);
    if !http2 {
        builder = builder.header(HOST, endpoint.server_name.as_str());
    }
    if body.is_some() {
        builder = builder.header(CONTENT_TYPE, "application/json");
    }
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    let request = builder
        .body(Full::new(payload))
        .map_err(|e| http(e.to_string()))?;

    let io = TokioIo::new(stream);
    let response = if http2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| http(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%error, "fleet API connection ended");
            }
        });
        sender.send_request(request).await
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| http(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%error, "fleet API connection ended");
            }
        });
        sender.send_request(request).await
    }
    .map_err(|e| http(e.to_string()))?;

    let status = response.status();
    let etag = response
        .headers()
        .get(ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = Limited::new(response.into_body(), MAX_ANSWER_LEN)
        .collect()
        .await
        .map_err(|e| http(format!("cannot read the answer: {e}")))?
        .to_bytes();
    Ok(Answer { status, etag, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrs_are_for_fresh_p256_keys() {
        let (key, csr) = key_and_csr("vm-1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(key.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let (other, _) = key_and_csr("vm-1").unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(key.serialize_der(), other.serialize_der());
    }

    #[test]
    fn refusals_carry_the_fleets_reason() {
        let answer = Answer {
            status: StatusCode::UNAUTHORIZED,
            etag: None,
            body: Bytes::from_static(br#"{"reason":"TokenExpired","message":"ask for a new one"}"#),
        };
        let error = success::<CertificateResponse>(REGISTRATION, &answer)
            .err()
            .unwrap_or_else(|| panic!("accepted"));
        assert_eq!(error.refusal_reason(), Some("TokenExpired"));
        assert_eq!(
            error.to_string(),
            "the fleet refused the registration: TokenExpired: ask for a new one"
        );
        let plain = Answer {
            status: StatusCode::BAD_GATEWAY,
            etag: None,
            body: Bytes::from_static(b"upstream down"),
        };
        let error = success::<CertificateResponse>(RENEWAL, &plain)
            .err()
            .unwrap_or_else(|| panic!("accepted"));
        assert_eq!(
            error.to_string(),
            "the fleet refused the renewal: BadGateway: upstream down"
        );
    }
}
