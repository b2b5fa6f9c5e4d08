//! The connector's client of the fleet API: registration with a bootstrap token,
//! certificate renewal and the group's configuration slice.
//!
//! Every call opens its own TLS connection to the fleet, trusting only the fleet's root
//! CA, offering ALPN `h2` and `http/1.1` and speaking whichever the fleet picked. The
//! key pair (ECDSA P-256) is made here; only its CSR leaves the machine. Every answer is
//! checked before it is believed: the certificate must carry our public key and the
//! identity we asked for, and must chain to the fleet's root as a client certificate.
//!
//! [`register_with_retry`] retries what may pass later, with bounded exponential backoff
//! and jitter for a bounded total time ([`RetryPolicy`]): the fleet unreachable, failing
//! (5xx, 429) or not having loaded the group yet (503 `GroupNotLoaded` with `Retry-After`:
//! the operator mints a group's token before the proxies receive the group). A refusal of
//! the request itself (400, 401, 403, ...), an unusable answer or a fleet certificate that
//! is not trusted ends it at once.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, ETAG, HOST, IF_NONE_MATCH, RETRY_AFTER};
use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sallyport_api::GroupSlice;
use sallyport_api::registration::CONNECTOR_VERSION_HEADER;
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
use tracing::{debug, info, warn};

use crate::state::ConnectorState;

/// How long one call to the fleet may take, connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest answer read from the fleet.
pub const MAX_ANSWER_LEN: usize = 16 * 1024 * 1024;

/// This connector's software version, as it reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The longest `Retry-After` honoured; a longer one is taken as this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How [`register_with_retry`] retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The longest time spent, from the first attempt; no attempt starts later.
    pub total: Duration,
    /// The pause after the first failure; it doubles after each one.
    pub first: Duration,
    /// The longest pause.
    pub max: Duration,
}

impl RetryPolicy {
    /// Retries for at most `total`: pauses from 500 ms doubling to 15 s.
    pub fn for_total(total: Duration) -> Self {
        Self {
            total,
            first: Duration::from_millis(500),
            max: Duration::from_secs(15),
        }
    }

    /// The pause before attempt `attempt + 1` after `attempt` failures: the doubled
    /// pause, capped, with jitter (between half and all of it), and never shorter than
    /// the fleet's `Retry-After`.
    fn pause(&self, attempt: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let doubled = self
            .first
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
            .min(self.max);
        let jittered = doubled.mul_f64(jitter.clamp(0.5, 1.0));
        retry_after
            .map(|asked| asked.min(MAX_RETRY_AFTER))
            .map_or(jittered, |asked| jittered.max(asked))
    }
}

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
        /// How long the fleet asked to wait before trying again (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// Retrying did not succeed within the allowed time.
    #[error(
        "the {action} did not succeed in {attempts} attempt(s) over {elapsed:?} \
         (allowed: {allowed:?}); the last failure: {last}"
    )]
    GaveUp {
        /// `registration`.
        action: &'static str,
        /// How many attempts were made.
        attempts: u32,
        /// How long they took.
        elapsed: Duration,
        /// The time allowed.
        allowed: Duration,
        /// The last attempt's failure.
        last: Box<RegisterError>,
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
            Self::GaveUp { last, .. } => last.refusal_reason(),
            _ => None,
        }
    }

    /// Whether trying again later may succeed: the fleet could not be reached, did not
    /// answer in time, broke off the exchange, or answered 5xx or 429. Not a refusal of
    /// the request itself (4xx), an unusable answer, local setup, or a TLS handshake
    /// the fleet's certificate failed (retrying would not make it trusted).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { source, .. } => !is_tls_failure(source),
            Self::Timeout { .. } | Self::Http { .. } => true,
            Self::Refused { status, .. } => *status >= 500 || *status == 429,
            Self::Key(_)
            | Self::Tls(_)
            | Self::ServerName { .. }
            | Self::BadAnswer { .. }
            | Self::State { .. }
            | Self::GaveUp { .. } => false,
        }
    }

    /// How long the fleet asked to wait before trying again.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Whether a connection failure is the TLS handshake failing (rustls's error inside),
/// rather than the network.
fn is_tls_failure(error: &std::io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
}

/// Calls `attempt` until it succeeds, fails for good ([`RegisterError::is_transient`]
/// false) or `policy.total` has passed, pausing as [`RetryPolicy`] says and logging each
/// failed attempt.
pub async fn retry<T, F, Fut>(
    action: &'static str,
    policy: RetryPolicy,
    mut attempt: F,
) -> Result<T, RegisterError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RegisterError>>,
{
    let started = tokio::time::Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let error = match attempt().await {
            Ok(value) => {
                if attempts > 1 {
                    info!(action, attempts, elapsed = ?started.elapsed(), "succeeded after retrying");
                }
                return Ok(value);
            }
            Err(error) => error,
        };
        if !error.is_transient() {
            return Err(error);
        }
        let elapsed = started.elapsed();
        let pause = policy.pause(
            attempts,
            error.retry_after(),
            rand::rng().random_range(0.5..=1.0),
        );
        if elapsed + pause > policy.total {
            warn!(action, attempts, ?elapsed, allowed = ?policy.total, %error, "giving up");
            return Err(RegisterError::GaveUp {
                action,
                attempts,
                elapsed,
                allowed: policy.total,
                last: Box::new(error),
            });
        }
        warn!(
            action,
            attempt = attempts,
            %error,
            retry_in = ?pause,
            retry_after = ?error.retry_after(),
            remaining = ?policy.total.saturating_sub(elapsed),
            "attempt failed; retrying"
        );
        tokio::time::sleep(pause).await;
    }
}

const REGISTRATION: &str = "registration";
const RENEWAL: &str = "renewal";
const CONFIGURATION: &str = "configuration";

/// An answer of the fleet.
struct Answer {
    status: StatusCode,
    etag: Option<String>,
    retry_after: Option<Duration>,
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
            retry_after: None,
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

/// [`register`], retried as `policy` says while the failure may pass (the fleet not
/// reachable yet, or not having loaded the group yet); each attempt makes a new key pair.
pub async fn register_with_retry(
    endpoint: &FleetEndpoint,
    group_id: &str,
    token: &str,
    hostname: &str,
    policy: RetryPolicy,
) -> Result<ConnectorState, RegisterError> {
    retry(REGISTRATION, policy, || {
        register(endpoint, group_id, token, hostname)
    })
    .await
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
    let mut headers = vec![(
        HeaderName::from_static(CONNECTOR_VERSION_HEADER),
        HeaderValue::from_static(VERSION),
    )];
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
            retry_after: answer.retry_after,
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
    // Small requests answered at once: Nagle's algorithm would hold a request's last
    // segment until the fleet's delayed ACK (up to 40 ms on Linux).
    if let Err(error) = tcp.set_nodelay(true) {
        debug!(%error, "cannot disable Nagle's algorithm on the fleet API connection");
    }
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
    // Seconds only; an HTTP date is ignored (the backoff applies).
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = Limited::new(response.into_body(), MAX_ANSWER_LEN)
        .collect()
        .await
        .map_err(|e| http(format!("cannot read the answer: {e}")))?
        .to_bytes();
    Ok(Answer {
        status,
        etag,
        retry_after,
        body,
    })
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
            retry_after: None,
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
            retry_after: None,
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

    #[test]
    fn pauses_double_with_jitter_up_to_the_cap_and_honour_retry_after() {
        let policy = RetryPolicy {
            total: Duration::from_secs(60),
            first: Duration::from_millis(500),
            max: Duration::from_secs(4),
        };
        let ms =
            |attempt, retry_after, jitter| policy.pause(attempt, retry_after, jitter).as_millis();
        assert_eq!(ms(1, None, 1.0), 500);
        assert_eq!(ms(2, None, 1.0), 1000);
        assert_eq!(ms(3, None, 1.0), 2000);
        assert_eq!(ms(4, None, 1.0), 4000);
        assert_eq!(ms(40, None, 1.0), 4000);
        assert_eq!(ms(3, None, 0.5), 1000);
        assert_eq!(ms(3, None, 0.0), 1000, "jitter never below half");
        assert_eq!(ms(1, Some(Duration::from_secs(2)), 0.5), 2000);
        assert_eq!(ms(4, Some(Duration::from_secs(1)), 1.0), 4000);
        assert_eq!(
            ms(1, Some(Duration::from_secs(3600)), 1.0),
            MAX_RETRY_AFTER.as_millis()
        );
    }

    #[test]
    fn only_what_may_pass_is_transient() {
        let refused = |status: u16| RegisterError::Refused {
            action: REGISTRATION,
            status,
            reason: "X".to_owned(),
            message: String::new(),
            retry_after: None,
        };
        for status in [500, 502, 503, 504, 429] {
            assert!(refused(status).is_transient(), "{status}");
        }
        for status in [400, 401, 403, 404, 413, 0] {
            assert!(!refused(status).is_transient(), "{status}");
        }
        let connect = |source| RegisterError::Connect {
            address: "fleet:443".to_owned(),
            source,
        };
        assert!(
            connect(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)).is_transient()
        );
        let untrusted = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert!(!connect(untrusted).is_transient());
        assert!(
            !RegisterError::BadAnswer {
                action: REGISTRATION,
                reason: String::new()
            }
            .is_transient()
        );
    }

    /// A fleet stand-in on loopback: TLS with a certificate for `fleet.test` from a
    /// private CA, answering each HTTP/1.1 request with the next of `answers` (status,
    /// extra headers, JSON body); the last answer repeats. Counts the requests.
    struct FakeFleet {
        endpoint: FleetEndpoint,
        requests: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl FakeFleet {
        async fn start(answers: Vec<(u16, &'static str, &'static str)>) -> Self {
            use rcgen::{BasicConstraints, IsCa, KeyUsagePurpose};
            fn ok<T>(result: Result<T, rcgen::Error>) -> T {
                result.unwrap_or_else(|e| panic!("{e}"))
            }
            let ca_key = ok(KeyPair::generate());
            let mut ca_params = ok(CertificateParams::new(Vec::<String>::new()));
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            let ca = ok(ca_params.self_signed(&ca_key));
            let issuer = rcgen::Issuer::new(ca_params, ca_key);
            let key = ok(KeyPair::generate());
            let cert = ok(CertificateParams::new(vec!["fleet.test".to_owned()])
                .and_then(|p| p.signed_by(&key, &issuer)));
            let key = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der())
                .unwrap_or_else(|e| panic!("{e}"));
            let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
                .with_safe_default_protocol_versions()
                .and_then(|b| {
                    b.with_no_client_auth()
                        .with_single_cert(vec![cert.der().clone()], key)
                })
                .unwrap_or_else(|e| panic!("{e}"));
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let address = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
            let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let counter = requests.clone();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let (status, headers, body) = answers
                        .get(n)
                        .or(answers.last())
                        .copied()
                        .unwrap_or((500, "", "{}"));
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let Ok(mut stream) = acceptor.accept(tcp).await else {
                            return;
                        };
                        read_request(&mut stream).await;
                        let answer = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        use tokio::io::AsyncWriteExt;
                        let _ = stream.write_all(answer.as_bytes()).await;
                        let _ = stream.shutdown().await;
                    });
                }
            });
            let ca = tls::certificates_from_pem("fake fleet CA", ca.pem().as_bytes())
                .unwrap_or_else(|e| panic!("{e}"));
            Self {
                endpoint: FleetEndpoint {
                    address: address.to_string(),
                    server_name: "fleet.test".to_owned(),
                    ca,
                },
                requests,
            }
        }

        fn requests(&self) -> usize {
            self.requests.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    /// Reads one HTTP/1.1 request: headers, then `content-length` bytes of body.
    async fn read_request(stream: &mut (impl tokio::io::AsyncRead + Unpin)) {
        use tokio::io::AsyncReadExt;
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let Ok(read) = stream.read(&mut chunk).await else {
                return;
            };
            if read == 0 {
                return;
            }
            buffer.extend_from_slice(&chunk[..read]);
            let text = String::from_utf8_lossy(&buffer).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())
                            .flatten()
                    })
                    .unwrap_or(0);
                if buffer.len() >= end + 4 + length {
                    return;
                }
            }
        }
    }

    const NOT_LOADED: (u16, &str, &str) = (
        503,
        "retry-after: 1\r\n",
        r#"{"reason":"GroupNotLoaded","message":"the fleet has not loaded group infra/new yet"}"#,
    );

    fn quick(total: Duration) -> RetryPolicy {
        RetryPolicy {
            total,
            first: Duration::from_millis(20),
            max: Duration::from_millis(100),
        }
    }

    #[tokio::test]
    async fn registration_waits_out_a_group_not_loaded_yet_and_stops_at_a_refusal() {
        let fleet = FakeFleet::start(vec![
            NOT_LOADED,
            NOT_LOADED,
            (
                401,
                "",
                r#"{"reason":"TokenExpired","message":"copy the new token"}"#,
            ),
        ])
        .await;
        let started = std::time::Instant::now();
        let result = register_with_retry(
            &fleet.endpoint,
            "infra/new",
            "token",
            "vm-1",
            quick(Duration::from_secs(60)),
        )
        .await;
        let error = result.err().unwrap_or_else(|| panic!("registered"));
        assert_eq!(error.refusal_reason(), Some("TokenExpired"), "{error}");
        assert!(matches!(error, RegisterError::Refused { status: 401, .. }));
        assert_eq!(fleet.requests(), 3, "two 503s retried, the 401 not");
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "Retry-After (1 s) was honoured twice: {:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn refusals_of_the_request_are_never_retried() {
        for (status, reason) in [
            (400, "CsrMalformed"),
            (401, "TokenInvalid"),
            (403, "GroupNotFound"),
        ] {
            let body: &'static str =
                Box::leak(format!(r#"{{"reason":"{reason}","message":"no"}}"#).into_boxed_str());
            let fleet = FakeFleet::start(vec![(status, "", body)]).await;
            let result = register_with_retry(
                &fleet.endpoint,
                "infra/new",
                "token",
                "vm-1",
                quick(Duration::from_secs(60)),
            )
            .await;
            assert_eq!(
                result
                    .err()
                    .and_then(|e| e.refusal_reason().map(str::to_owned))
                    .as_deref(),
                Some(reason)
            );
            assert_eq!(fleet.requests(), 1, "{status} was retried");
        }
    }

    #[tokio::test]
    async fn retrying_gives_up_after_the_allowed_time() {
        let fleet = FakeFleet::start(vec![NOT_LOADED]).await;
        let result = register_with_retry(
            &fleet.endpoint,
            "infra/new",
            "token",
            "vm-1",
            quick(Duration::from_millis(2500)),
        )
        .await;
        match result {
            Err(RegisterError::GaveUp { attempts, last, .. }) => {
                assert!(attempts >= 2, "{attempts}");
                assert_eq!(last.refusal_reason(), Some("GroupNotLoaded"));
            }
            other => panic!("expected GaveUp, got {:?}", other.map(|s| s.connector_id)),
        }
        assert!(fleet.requests() >= 2);

        // Nobody listening: connection failures are retried until the time is up.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut endpoint = fleet.endpoint.clone();
        endpoint.address = closed
            .local_addr()
            .unwrap_or_else(|e| panic!("{e}"))
            .to_string();
        drop(closed);
        let result = register_with_retry(
            &endpoint,
            "infra/new",
            "token",
            "vm-1",
            quick(Duration::from_millis(300)),
        )
        .await;
        match result {
            Err(RegisterError::GaveUp { attempts, last, .. }) => {
                assert!(attempts >= 2, "{attempts}");
                assert!(matches!(*last, RegisterError::Connect { .. }), "{last}");
            }
            other => panic!("expected GaveUp, got {:?}", other.map(|s| s.connector_id)),
        }
    }

    #[tokio::test]
    async fn an_untrusted_fleet_certificate_is_not_retried() {
        let fleet = FakeFleet::start(vec![NOT_LOADED]).await;
        let other = FakeFleet::start(vec![NOT_LOADED]).await;
        let mut endpoint = fleet.endpoint.clone();
        endpoint.ca = other.endpoint.ca.clone();
        let result = register_with_retry(
            &endpoint,
            "infra/new",
            "token",
            "vm-1",
            quick(Duration::from_secs(60)),
        )
        .await;
        assert!(
            matches!(result, Err(RegisterError::Connect { .. })),
            "{:?}",
            result.map(|s| s.connector_id)
        );
        assert_eq!(fleet.requests(), 1);
    }
}
