//! The HTTPS client the relying party talks to providers with: discovery, JWKS and the
//! token endpoint. HTTPS only, the system trust store plus the fleet's extra provider
//! CAs, a timeout on every exchange and a cap on the size of what a provider may send.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;
use tracing::{debug, warn};

/// How long one exchange with a provider may take, connection included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest answer read from a provider (discovery documents and key sets are a few
/// KiB; token responses are smaller still).
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// An exchange with a provider failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The TLS client could not be configured.
    #[error("the TLS client for identity providers cannot be built: {0}")]
    Tls(#[source] rustls::Error),
    /// Only `https://` provider endpoints are used.
    #[error("{url}: identity provider endpoints must use https")]
    NotHttps {
        /// The refused URL.
        url: String,
    },
    /// No connection or no complete answer.
    #[error("{url}: {reason}")]
    Exchange {
        /// The endpoint.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The provider took longer than the timeout.
    #[error("{url}: no answer within {timeout:?}")]
    Timeout {
        /// The endpoint.
        url: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The answer was larger than [`MAX_RESPONSE_BYTES`].
    #[error("{url}: the answer is larger than {limit} bytes")]
    TooLarge {
        /// The endpoint.
        url: String,
        /// The limit.
        limit: usize,
    },
}

/// An HTTPS client for identity providers; cheap to clone.
#[derive(Clone)]
pub struct ProviderHttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl std::fmt::Debug for ProviderHttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderHttpClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ProviderHttpClient {
    /// A client trusting the system's roots and `extra_roots` (for providers with a
    /// private CA), with `timeout` per exchange.
    pub fn new(
        crypto: Arc<CryptoProvider>,
        extra_roots: &[CertificateDer<'static>],
        timeout: Duration,
    ) -> Result<Self, HttpError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            warn!(%error, "cannot read part of the system trust store");
        }
        let (system, _) = roots.add_parsable_certificates(native.certs);
        for certificate in extra_roots {
            roots.add(certificate.clone()).map_err(HttpError::Tls)?;
        }
        debug!(
            system,
            extra = extra_roots.len(),
            "identity provider trust store loaded"
        );
        let config = ClientConfig::builder_with_provider(crypto)
            .with_safe_default_protocol_versions()
            .map_err(HttpError::Tls)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Self { client, timeout })
    }

    /// Sends `request` and reads the whole (bounded) answer.
    pub async fn execute(
        &self,
        request: http::Request<Vec<u8>>,
    ) -> Result<http::Response<Vec<u8>>, HttpError> {
        let url = request.uri().to_string();
        if request.uri().scheme() != Some(&http::uri::Scheme::HTTPS) {
            return Err(HttpError::NotHttps { url });
        }
        let request = request.map(|body| Full::new(Bytes::from(body)));
        let exchange = async {
            let response =
                self.client
                    .request(request)
                    .await
                    .map_err(|error| HttpError::Exchange {
                        url: url.clone(),
                        reason: error_chain(&error),
                    })?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|error| {
                    if error.is::<http_body_util::LengthLimitError>() {
                        HttpError::TooLarge {
                            url: url.clone(),
                            limit: MAX_RESPONSE_BYTES,
                        }
                    } else {
                        HttpError::Exchange {
                            url: url.clone(),
                            reason: error.to_string(),
                        }
                    }
                })?
                .to_bytes();
            Ok(http::Response::from_parts(parts, body.to_vec()))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(HttpError::Timeout {
                url,
                timeout: self.timeout,
            }),
        }
    }
}

/// An error and its sources on one line (hyper's own message alone says little).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
