//! One OpenID provider as a relying party sees it: its discovered metadata, its signing
//! keys (cached, and fetched again when a token names a key the cache lacks, so key
//! rotation at the provider signs nobody out), the authorization request and the code
//! exchange with ID token validation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openidconnect::core::{
    CoreAuthDisplay, CoreAuthPrompt, CoreAuthenticationFlow, CoreErrorResponseType,
    CoreGenderClaim, CoreJsonWebKey, CoreJsonWebKeySet, CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm, CoreRevocableToken, CoreRevocationErrorResponse,
    CoreTokenIntrospectionResponse, CoreTokenType,
};
use openidconnect::{
    AdditionalClaims, AuthenticationContextClass, AuthorizationCode, ClaimsVerificationError,
    Client, ClientId, ClientSecret, CsrfToken, EmptyExtraTokenFields, EndpointMaybeSet,
    EndpointNotSet, EndpointSet, IdTokenClaims, IdTokenFields, IdTokenVerifier, IssuerUrl,
    LogoutRequest, Nonce, PkceCodeChallenge, PkceCodeVerifier, PostLogoutRedirectUrl,
    ProviderMetadataWithLogout, RedirectUrl, RequestTokenError, Scope, SignatureVerificationError,
    StandardErrorResponse, StandardTokenResponse, TokenResponse,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::http::{HttpError, ProviderHttpClient};

/// Allowed difference between the provider's clock and ours for `exp` and `iat`.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Signing algorithms accepted for ID tokens: asymmetric ones only (never `none`, never
/// an HMAC keyed with the client secret), further narrowed to what the provider
/// advertises.
pub const ALLOWED_ALGORITHMS: [CoreJwsSigningAlgorithm; 10] = [
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha384,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha512,
    CoreJwsSigningAlgorithm::RsaSsaPssSha256,
    CoreJwsSigningAlgorithm::RsaSsaPssSha384,
    CoreJwsSigningAlgorithm::RsaSsaPssSha512,
    CoreJwsSigningAlgorithm::EcdsaP256Sha256,
    CoreJwsSigningAlgorithm::EcdsaP384Sha384,
    CoreJwsSigningAlgorithm::EcdsaP521Sha512,
    CoreJwsSigningAlgorithm::EdDsa,
];

/// The least time between two fetches of the key set prompted by an unknown key id, so
/// forged tokens naming random key ids cannot make the proxy hammer the provider.
pub const MIN_KEY_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// After a failed discovery, how long before the provider is asked again.
pub const DISCOVERY_RETRY_AFTER: Duration = Duration::from_secs(5);

/// How long discovered metadata and keys are used before they are fetched again.
pub const METADATA_LIFETIME: Duration = Duration::from_secs(3600);

/// Why signing in with a provider failed. The categories are what users see on the
/// failure page; the details go to the log.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// The provider could not be reached or answered garbage (discovery, keys, token
    /// endpoint).
    #[error("identity provider {issuer} is unreachable: {detail}")]
    ProviderUnreachable {
        /// The provider's issuer URL.
        issuer: String,
        /// What failed.
        detail: String,
    },
    /// The provider refused the code exchange (for example an expired or replayed code).
    #[error("identity provider {issuer} refused the sign-in: {detail}")]
    ProviderRefused {
        /// The provider's issuer URL.
        issuer: String,
        /// The provider's error.
        detail: String,
    },
    /// The ID token failed validation (signature, issuer, audience, time, nonce).
    #[error("the ID token from {issuer} is invalid: {detail}")]
    TokenInvalid {
        /// The provider's issuer URL.
        issuer: String,
        /// Which check failed.
        detail: String,
    },
    /// The provider or client settings are unusable (a malformed URL).
    #[error("identity provider settings: {field}: {detail}")]
    Settings {
        /// The setting.
        field: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

/// Every claim of an ID token beyond the standard ones (for example `groups`), kept for
/// claim-to-header mappings and policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExtraClaims {
    /// The claims by name.
    #[serde(flatten)]
    pub claims: serde_json::Map<String, serde_json::Value>,
}

impl AdditionalClaims for ExtraClaims {}

type IdFields = IdTokenFields<
    ExtraClaims,
    EmptyExtraTokenFields,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm,
>;
type Tokens = StandardTokenResponse<IdFields, CoreTokenType>;
type RelyingParty = Client<
    ExtraClaims,
    CoreAuthDisplay,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJsonWebKey,
    CoreAuthPrompt,
    StandardErrorResponse<CoreErrorResponseType>,
    Tokens,
    CoreTokenIntrospectionResponse,
    CoreRevocableToken,
    CoreRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// A relying party's registration at a provider.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// The client id.
    pub client_id: String,
    /// The client secret (confidential clients); sent to the token endpoint only.
    pub client_secret: Option<String>,
    /// Scopes asked for besides `openid`.
    pub scopes: Vec<String>,
}

impl std::fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSettings")
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// What a sign-in must additionally ask the provider for (step-up).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthenticationRequirements {
    /// `acr_values` to request.
    pub acr_values: Vec<String>,
    /// `max_age`: the user must have authenticated this recently.
    pub max_age: Option<Duration>,
    /// `prompt=login`: authenticate again even with a session at the provider.
    pub force_login: bool,
}

/// The per-sign-in secrets the caller generates and keeps (sealed, in the browser)
/// until the provider sends the browser back.
#[derive(Clone, Copy)]
pub struct SignInSecrets<'a> {
    /// The `state` parameter.
    pub state: &'a str,
    /// The `nonce` the ID token must carry.
    pub nonce: &'a str,
    /// The PKCE code verifier (43 to 128 unreserved characters).
    pub pkce_verifier: &'a str,
}

impl std::fmt::Debug for SignInSecrets<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignInSecrets").finish_non_exhaustive()
    }
}

/// A signed-in user, from a validated ID token.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedIn {
    /// `iss`.
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// `preferred_username`.
    pub preferred_username: Option<String>,
    /// `email`.
    pub email: Option<String>,
    /// `name`.
    pub name: Option<String>,
    /// The `groups` claim (strings only).
    pub groups: Vec<String>,
    /// `amr`.
    pub amr: Vec<String>,
    /// `acr`.
    pub acr: Option<String>,
    /// `auth_time`, Unix seconds; the token's `iat` when absent.
    pub auth_time: i64,
    /// `iat`, Unix seconds.
    pub issued_at: i64,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
    /// Every other claim.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

struct KeyCache {
    keys: CoreJsonWebKeySet,
    fetched: Instant,
}

/// A discovered provider.
pub struct Provider {
    issuer: String,
    metadata: ProviderMetadataWithLogout,
    discovered: Instant,
    keys: Mutex<KeyCache>,
    refresh: tokio::sync::Mutex<()>,
    http: ProviderHttpClient,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

type Exchange =
    std::pin::Pin<Box<dyn Future<Output = Result<http::Response<Vec<u8>>, HttpError>> + Send>>;

/// `openidconnect`'s HTTP client interface over [`ProviderHttpClient`].
fn send(http: &ProviderHttpClient) -> impl Fn(http::Request<Vec<u8>>) -> Exchange + use<> {
    let http = http.clone();
    move |request| {
        let http = http.clone();
        Box::pin(async move { http.execute(request).await })
    }
}

fn unix(time: chrono::DateTime<chrono::Utc>) -> i64 {
    time.timestamp()
}

impl Provider {
    /// Discovers the provider at `issuer_url` (its metadata and key set).
    pub async fn discover(issuer_url: &str, http: ProviderHttpClient) -> Result<Self, OidcError> {
        let issuer = IssuerUrl::new(issuer_url.to_owned()).map_err(|e| OidcError::Settings {
            field: "issuerUrl",
            detail: format!("{issuer_url:?} is not a URL: {e}"),
        })?;
        let unreachable = |detail: String| OidcError::ProviderUnreachable {
            issuer: issuer_url.to_owned(),
            detail,
        };
        let metadata = ProviderMetadataWithLogout::discover_async(issuer, &send(&http))
            .await
            .map_err(|e| unreachable(format!("discovery failed: {}", chain(&e))))?;
        let keys = metadata.jwks().clone();
        info!(
            issuer = %issuer_url,
            keys = keys.keys().len(),
            end_session = metadata.additional_metadata().end_session_endpoint.is_some(),
            "identity provider discovered"
        );
        Ok(Self {
            issuer: issuer_url.to_owned(),
            metadata,
            discovered: Instant::now(),
            keys: Mutex::new(KeyCache {
                keys,
                fetched: Instant::now(),
            }),
            refresh: tokio::sync::Mutex::new(()),
            http,
        })
    }

    /// The issuer URL.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Whether the metadata is old enough to be discovered again.
    pub fn is_stale(&self) -> bool {
        self.discovered.elapsed() >= METADATA_LIFETIME
    }

    fn relying_party(
        &self,
        client: &ClientSettings,
        redirect_uri: &str,
    ) -> Result<RelyingParty, OidcError> {
        let redirect =
            RedirectUrl::new(redirect_uri.to_owned()).map_err(|e| OidcError::Settings {
                field: "redirect URI",
                detail: format!("{redirect_uri:?}: {e}"),
            })?;
        let party = Client::from_provider_metadata(
            self.metadata.clone(),
            ClientId::new(client.client_id.clone()),
            client.client_secret.clone().map(ClientSecret::new),
        )
        .set_redirect_uri(redirect);
        Ok(party)
    }

    /// The authorization URL that starts a sign-in: the authorization-code flow with
    /// PKCE (S256 challenge of `secrets.pkce_verifier`), the caller's `state` and
    /// `nonce` (kept sealed in the browser until the callback), the client's scopes and
    /// `requirements`.
    pub fn authorization_url(
        &self,
        client: &ClientSettings,
        redirect_uri: &str,
        secrets: &SignInSecrets<'_>,
        requirements: &AuthenticationRequirements,
    ) -> Result<String, OidcError> {
        let party = self.relying_party(client, redirect_uri)?;
        let verifier = PkceCodeVerifier::new(secrets.pkce_verifier.to_owned());
        let challenge = PkceCodeChallenge::from_code_verifier_sha256(&verifier);
        let state = secrets.state.to_owned();
        let nonce = secrets.nonce.to_owned();
        let mut request = party
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                move || CsrfToken::new(state.clone()),
                move || Nonce::new(nonce.clone()),
            )
            .set_pkce_challenge(challenge);
        for scope in client.scopes.iter().filter(|s| s.as_str() != "openid") {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        for acr in &requirements.acr_values {
            request = request.add_auth_context_value(AuthenticationContextClass::new(acr.clone()));
        }
        if let Some(max_age) = requirements.max_age {
            request = request.set_max_age(max_age);
        }
        if requirements.force_login {
            request = request.add_prompt(CoreAuthPrompt::Login);
        }
        let (url, _, _) = request.url();
        Ok(url.to_string())
    }

    /// Finishes a sign-in: exchanges `code` (with the PKCE verifier) at the token
    /// endpoint and validates the ID token: signature with an allowed algorithm against
    /// the provider's keys, `iss`, `aud` (this client only), `exp` and `iat` within
    /// [`CLOCK_SKEW`], and `nonce`.
    pub async fn finish(
        &self,
        client: &ClientSettings,
        redirect_uri: &str,
        code: &str,
        pkce_verifier: &str,
        nonce: &str,
    ) -> Result<SignedIn, OidcError> {
        let party = self.relying_party(client, redirect_uri)?;
        let exchange = party
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|e| OidcError::Settings {
                field: "token_endpoint",
                detail: e.to_string(),
            })?
            .set_pkce_verifier(PkceCodeVerifier::new(pkce_verifier.to_owned()));
        let tokens =
            exchange
                .request_async(&send(&self.http))
                .await
                .map_err(|error| match error {
                    RequestTokenError::ServerResponse(answer) => OidcError::ProviderRefused {
                        issuer: self.issuer.clone(),
                        detail: answer.to_string(),
                    },
                    other => OidcError::ProviderUnreachable {
                        issuer: self.issuer.clone(),
                        detail: format!("token endpoint: {}", chain(&other)),
                    },
                })?;
        let Some(id_token) = tokens.id_token() else {
            return Err(self.invalid("the token response has no id_token".to_owned()));
        };
        let nonce = Nonce::new(nonce.to_owned());
        let verified = {
            let keys = self.current_keys();
            self.verifier(&client.client_id, keys).and_then(|verifier| {
                id_token
                    .claims(&verifier, &nonce)
                    .cloned()
                    .map_err(Verification::Claims)
            })
        };
        let claims = match verified {
            Ok(claims) => claims,
            Err(Verification::Claims(ClaimsVerificationError::SignatureVerification(
                SignatureVerificationError::NoMatchingKey,
            ))) => {
                debug!(issuer = %self.issuer, "the ID token names an unknown key; fetching the key set again");
                let keys = self.refresh_keys().await?;
                self.verifier(&client.client_id, keys)
                    .and_then(|verifier| {
                        id_token
                            .claims(&verifier, &nonce)
                            .cloned()
                            .map_err(Verification::Claims)
                    })
                    .map_err(|e| self.invalid(e.to_string()))?
            }
            Err(error) => return Err(self.invalid(error.to_string())),
        };
        Ok(signed_in(&claims))
    }

    fn invalid(&self, detail: String) -> OidcError {
        OidcError::TokenInvalid {
            issuer: self.issuer.clone(),
            detail,
        }
    }

    fn current_keys(&self) -> CoreJsonWebKeySet {
        match self.keys.lock() {
            Ok(cache) => cache.keys.clone(),
            Err(poisoned) => poisoned.into_inner().keys.clone(),
        }
    }

    fn verifier(
        &self,
        client_id: &str,
        keys: CoreJsonWebKeySet,
    ) -> Result<IdTokenVerifier<'static, CoreJsonWebKey>, Verification> {
        let advertised = self.metadata.id_token_signing_alg_values_supported();
        let allowed: Vec<CoreJwsSigningAlgorithm> = ALLOWED_ALGORITHMS
            .iter()
            .filter(|alg| advertised.contains(alg))
            .cloned()
            .collect();
        if allowed.is_empty() {
            return Err(Verification::NoAlgorithm);
        }
        let skew = chrono::Duration::from_std(CLOCK_SKEW).unwrap_or_default();
        Ok(IdTokenVerifier::new_public_client(
            ClientId::new(client_id.to_owned()),
            self.metadata.issuer().clone(),
            keys,
        )
        .set_allowed_algs(allowed)
        .set_time_fn(move || chrono::Utc::now() - skew)
        .set_issue_time_verifier_fn(move |issued| {
            let latest = chrono::Utc::now() + skew;
            if issued > latest {
                Err(format!("issued in the future ({issued})"))
            } else {
                Ok(())
            }
        }))
    }

    /// Fetches the key set again, unless that happened less than
    /// [`MIN_KEY_REFRESH_INTERVAL`] ago.
    async fn refresh_keys(&self) -> Result<CoreJsonWebKeySet, OidcError> {
        let _one_at_a_time = self.refresh.lock().await;
        let recent = match self.keys.lock() {
            Ok(cache) => {
                (cache.fetched.elapsed() < MIN_KEY_REFRESH_INTERVAL).then(|| cache.keys.clone())
            }
            Err(poisoned) => {
                let cache = poisoned.into_inner();
                (cache.fetched.elapsed() < MIN_KEY_REFRESH_INTERVAL).then(|| cache.keys.clone())
            }
        };
        if let Some(keys) = recent {
            return Ok(keys);
        }
        let keys = CoreJsonWebKeySet::fetch_async(self.metadata.jwks_uri(), &send(&self.http))
            .await
            .map_err(|e| OidcError::ProviderUnreachable {
                issuer: self.issuer.clone(),
                detail: format!("key set: {}", chain(&e)),
            })?;
        info!(issuer = %self.issuer, keys = keys.keys().len(), "identity provider key set fetched again");
        let mut cache = match self.keys.lock() {
            Ok(cache) => cache,
            Err(poisoned) => poisoned.into_inner(),
        };
        cache.keys = keys.clone();
        cache.fetched = Instant::now();
        Ok(keys)
    }

    /// The provider's end-session URL (RP-initiated logout) for `client_id`, sending the
    /// browser back to `post_logout_redirect_uri`; `None` when the provider has none.
    pub fn end_session_url(
        &self,
        client_id: &str,
        post_logout_redirect_uri: &str,
    ) -> Option<String> {
        let endpoint = self
            .metadata
            .additional_metadata()
            .end_session_endpoint
            .clone()?;
        let mut request =
            LogoutRequest::from(endpoint).set_client_id(ClientId::new(client_id.to_owned()));
        match PostLogoutRedirectUrl::new(post_logout_redirect_uri.to_owned()) {
            Ok(url) => request = request.set_post_logout_redirect_uri(url),
            Err(error) => {
                warn!(issuer = %self.issuer, %error, "cannot use the post-logout redirect URI");
            }
        }
        Some(request.http_get_url().to_string())
    }
}

#[derive(Debug, thiserror::Error)]
enum Verification {
    #[error(transparent)]
    Claims(ClaimsVerificationError),
    #[error("the provider advertises no signing algorithm Sallyport accepts")]
    NoAlgorithm,
}

fn signed_in(claims: &IdTokenClaims<ExtraClaims, CoreGenderClaim>) -> SignedIn {
    let issued_at = unix(claims.issue_time());
    let mut extra = claims.additional_claims().claims.clone();
    let groups = match extra.remove("groups") {
        Some(serde_json::Value::Array(values)) => values
            .into_iter()
            .filter_map(|v| match v {
                serde_json::Value::String(s) => Some(s),
                _ => None,
            })
            .collect(),
        Some(serde_json::Value::String(one)) => vec![one],
        _ => Vec::new(),
    };
    SignedIn {
        issuer: claims.issuer().to_string(),
        subject: claims.subject().to_string(),
        preferred_username: claims.preferred_username().map(|u| u.to_string()),
        email: claims.email().map(|e| e.to_string()),
        name: claims
            .name()
            .and_then(|n| n.get(None))
            .map(|n| n.to_string()),
        groups,
        amr: claims
            .auth_method_refs()
            .map(|amr| amr.iter().map(|m| m.to_string()).collect())
            .unwrap_or_default(),
        acr: claims.auth_context_ref().map(|a| a.to_string()),
        auth_time: claims.auth_time().map(unix).unwrap_or(issued_at),
        issued_at,
        expires_at: unix(claims.expiration()),
        extra,
    }
}

/// An error and its sources on one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The providers a proxy uses, discovered on first use and kept; a provider that
/// cannot be discovered is asked again after [`DISCOVERY_RETRY_AFTER`], not on every
/// request.
#[derive(Debug)]
pub struct Providers {
    http: ProviderHttpClient,
    known: tokio::sync::Mutex<HashMap<String, Known>>,
}

#[derive(Debug)]
enum Known {
    Discovered(Arc<Provider>),
    Failed { at: Instant, detail: String },
}

impl Providers {
    /// No provider discovered yet; `http` talks to them.
    pub fn new(http: ProviderHttpClient) -> Self {
        Self {
            http,
            known: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The provider at `issuer_url`, discovering it when needed.
    pub async fn get(&self, issuer_url: &str) -> Result<Arc<Provider>, OidcError> {
        let mut known = self.known.lock().await;
        match known.get(issuer_url) {
            Some(Known::Discovered(provider)) if !provider.is_stale() => {
                return Ok(provider.clone());
            }
            Some(Known::Failed { at, detail }) if at.elapsed() < DISCOVERY_RETRY_AFTER => {
                return Err(OidcError::ProviderUnreachable {
                    issuer: issuer_url.to_owned(),
                    detail: detail.clone(),
                });
            }
            _ => {}
        }
        match Provider::discover(issuer_url, self.http.clone()).await {
            Ok(provider) => {
                let provider = Arc::new(provider);
                known.insert(issuer_url.to_owned(), Known::Discovered(provider.clone()));
                Ok(provider)
            }
            Err(error) => {
                warn!(issuer = %issuer_url, %error, "identity provider discovery failed");
                // A stale but working provider beats none.
                if let Some(Known::Discovered(provider)) = known.get(issuer_url) {
                    return Ok(provider.clone());
                }
                known.insert(
                    issuer_url.to_owned(),
                    Known::Failed {
                        at: Instant::now(),
                        detail: error.to_string(),
                    },
                );
                Err(error)
            }
        }
    }
}
