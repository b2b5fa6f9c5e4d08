//! A real OpenID provider for e2e tests: panva's `oidc-provider` (OpenID Certified) on the
//! machine's Node.js, run by `e2e/oidc-provider/provider.mjs` as an owned child process,
//! over HTTPS on loopback with a certificate from the test's [`TestCa`].
//!
//! What it offers (see the script's header for the details): discovery, the authorization
//! code flow with PKCE (S256 only), nonce and state, RP-initiated logout, a JWKS with ES256
//! and RS256 keys, a login form a [browser](crate::browser::Browser) fills in (username,
//! password and an "MFA" checkbox that selects `amr` `["pwd"]` or `["pwd","mfa"]` and the
//! acr [`ACR_PASSWORD`] or [`ACR_MFA`]), `prompt=login`, `max_age` and `acr_values`
//! (step-up), and test controls: [`OidcProvider::rotate_keys`],
//! [`OidcProvider::retire_old_keys`] and [`OidcProvider::set_token_ttl`].
//!
//! The script's npm dependencies are installed by `npm ci --prefix e2e/oidc-provider`
//! (`.ci/run` does it).

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::dataplane::{StepError, https_request};
use crate::process::{OwnedProcess, ProcessError};
use crate::test_ca::{TestCa, TestCaError};

/// The `acr` of a sign-in with a password only.
pub const ACR_PASSWORD: &str = "urn:sallyport:acr:password";
/// The `acr` of a sign-in with a password and a second factor.
pub const ACR_MFA: &str = "urn:sallyport:acr:mfa";

/// What the provider prints once it serves, followed by the issuer URL.
const READY_PREFIX: &str = "sallyport-oidc-provider ready issuer=";

/// How long the provider may take to start (Node.js loads, keys are generated): a few
/// seconds on a loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The provider could not be started or did not answer as expected.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// `npm ci` has not been run for the provider's directory.
    #[error(
        "the OpenID provider's npm packages are not installed in {0}: run `npm ci --prefix e2e/oidc-provider` (.ci/run does)"
    )]
    NotInstalled(PathBuf),
    /// Node.js is not on PATH.
    #[error(
        "`node` is not on PATH: the e2e tests need Node.js 20.19 or newer for the OpenID provider"
    )]
    NodeMissing,
    /// Its certificate could not be made.
    #[error("cannot make the OpenID provider's certificate: {0}")]
    Certificate(#[from] TestCaError),
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration could not be serialized (a bug).
    #[error("cannot serialize the OpenID provider's configuration: {0}")]
    Config(serde_json::Error),
    /// The process could not be started.
    #[error("cannot start the OpenID provider: {0}")]
    Start(#[from] ProcessError),
    /// The process exited before it was ready.
    #[error("the OpenID provider exited before it was ready; its output:\n{output}")]
    Exited {
        /// What it printed.
        output: String,
    },
    /// The process printed no ready line in time.
    #[error("the OpenID provider was not ready within {within:?}; its output:\n{output}")]
    NotReady {
        /// How long it was given.
        within: Duration,
        /// What it printed.
        output: String,
    },
    /// The ready line's issuer is not a URL with a port.
    #[error("the OpenID provider announced an unusable issuer {issuer:?}")]
    BadIssuer {
        /// What it printed.
        issuer: String,
    },
    /// A request to the provider failed.
    #[error("{what} failed: {source}")]
    Request {
        /// Which request.
        what: String,
        /// Why.
        source: StepError,
    },
    /// The provider answered with an unexpected status.
    #[error("{what} answered {status}: {body}")]
    Status {
        /// Which request.
        what: String,
        /// The status.
        status: StatusCode,
        /// The body (lossy text).
        body: String,
    },
    /// The provider's answer is not the JSON expected.
    #[error("{what} answered unexpected JSON: {source}")]
    Json {
        /// Which request.
        what: String,
        /// Why.
        source: serde_json::Error,
    },
}

/// The algorithm a client's ID tokens are signed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SigningAlg {
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
}

/// A relying party registered at the provider (a confidential web client, authorization
/// code flow, `client_secret_basic`).
#[derive(Debug, Clone, Serialize)]
pub struct OidcClient {
    /// Its `client_id`.
    pub client_id: String,
    /// Its `client_secret`.
    pub client_secret: String,
    /// Where codes may be sent.
    pub redirect_uris: Vec<String>,
    /// Where RP-initiated logout may return.
    pub post_logout_redirect_uris: Vec<String>,
    /// How its ID tokens are signed.
    pub id_token_signed_response_alg: SigningAlg,
}

impl OidcClient {
    /// A client with one redirect URI, ID tokens signed with ES256 and no logout URI.
    pub fn new(client_id: &str, client_secret: &str, redirect_uri: &str) -> Self {
        Self {
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            redirect_uris: vec![redirect_uri.to_owned()],
            post_logout_redirect_uris: Vec::new(),
            id_token_signed_response_alg: SigningAlg::ES256,
        }
    }

    /// Adds a `post_logout_redirect_uri`.
    pub fn post_logout_redirect_uri(mut self, uri: &str) -> Self {
        self.post_logout_redirect_uris.push(uri.to_owned());
        self
    }

    /// Signs its ID tokens with `alg`.
    pub fn signed_with(mut self, alg: SigningAlg) -> Self {
        self.id_token_signed_response_alg = alg;
        self
    }
}

/// A user who can sign in, with the claims the provider releases for them (by scope:
/// `email` → `email`, `email_verified`; `profile` → `name`, `preferred_username`;
/// `groups` → `groups`). The subject is the username.
#[derive(Debug, Clone, Serialize)]
pub struct OidcUser {
    /// What is typed into the login form.
    pub username: String,
    /// The password.
    pub password: String,
    /// The claims, e.g. `email`, `name`, `preferred_username`, `groups`.
    pub claims: serde_json::Map<String, Value>,
}

impl OidcUser {
    /// A user with `email` `<username>@example.test` (verified), `preferred_username`
    /// and `name` set to `username`, and no groups.
    pub fn new(username: &str, password: &str) -> Self {
        let mut claims = serde_json::Map::new();
        claims.insert("email".into(), format!("{username}@example.test").into());
        claims.insert("email_verified".into(), true.into());
        claims.insert("preferred_username".into(), username.into());
        claims.insert("name".into(), username.into());
        Self {
            username: username.to_owned(),
            password: password.to_owned(),
            claims,
        }
    }

    /// Sets claim `name` to `value`.
    pub fn claim(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.claims.insert(name.to_owned(), value.into());
        self
    }

    /// Sets the `groups` claim.
    pub fn groups<S: Into<String>>(self, groups: impl IntoIterator<Item = S>) -> Self {
        let groups: Vec<Value> = groups
            .into_iter()
            .map(|group| Value::String(group.into()))
            .collect();
        self.claim("groups", groups)
    }

    /// The users most tests need: `alice` (groups `staff`, `engineering`), `bob`
    /// ([`MANY_GROUPS`] groups `group-000`…, for header and cookie size limits) and `carol`
    /// (no groups); each one's password is `<username>-password`.
    pub fn standard() -> Vec<OidcUser> {
        vec![
            OidcUser::new("alice", "alice-password")
                .claim("name", "Alice Example")
                .groups(["staff", "engineering"]),
            OidcUser::new("bob", "bob-password")
                .claim("name", "Bob Example")
                .groups((0..MANY_GROUPS).map(|i| format!("group-{i:03}"))),
            OidcUser::new("carol", "carol-password").claim("name", "Carol Example"),
        ]
    }
}

/// How many groups the standard user `bob` has.
pub const MANY_GROUPS: usize = 200;

/// How to run a provider.
#[derive(Debug, Clone)]
pub struct OidcProviderConfig {
    /// The host name in the issuer URL; the certificate names it and `127.0.0.1`. Anything
    /// but an IP address must be resolved to 127.0.0.1 by its clients (see
    /// [`BrowserConfig::resolve`](crate::browser::BrowserConfig::resolve)).
    pub host: String,
    /// The registered clients.
    pub clients: Vec<OidcClient>,
    /// The users.
    pub users: Vec<OidcUser>,
    /// The lifetime of ID tokens issued from the start.
    pub id_token_ttl: Duration,
    /// The lifetime of access tokens issued from the start.
    pub access_token_ttl: Duration,
}

impl Default for OidcProviderConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".to_owned(),
            clients: Vec::new(),
            users: OidcUser::standard(),
            id_token_ttl: Duration::from_secs(3600),
            access_token_ttl: Duration::from_secs(3600),
        }
    }
}

impl OidcProviderConfig {
    /// Registers `client`.
    pub fn client(mut self, client: OidcClient) -> Self {
        self.clients.push(client);
        self
    }
}

/// The configuration file `provider.mjs` reads.
#[derive(Serialize)]
struct ProviderFile<'a> {
    bind: &'a str,
    port: u16,
    host: &'a str,
    tls: TlsFiles,
    id_token_ttl_seconds: u64,
    access_token_ttl_seconds: u64,
    acr: AcrValues,
    clients: &'a [OidcClient],
    users: &'a [OidcUser],
}

#[derive(Serialize)]
struct TlsFiles {
    cert_file: PathBuf,
    key_file: PathBuf,
}

#[derive(Serialize)]
struct AcrValues {
    password: &'static str,
    mfa: &'static str,
}

/// The provider's signing keys, as `GET /admin/keys` reports them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ProviderKeys {
    /// The key ids that sign new tokens (one ES256, one RS256).
    pub signing: Vec<String>,
    /// Every key id in the JWKS, newest first.
    pub published: Vec<String>,
}

/// A running provider, stopped when dropped.
pub struct OidcProvider {
    process: OwnedProcess,
    issuer: String,
    address: std::net::SocketAddr,
    host: String,
    ca_pem: String,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for OidcProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcProvider")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// The directory of `provider.mjs` and its `package.json`.
pub fn provider_dir() -> PathBuf {
    crate::manifests::e2e_dir().join("oidc-provider")
}

impl OidcProvider {
    /// Starts a provider on a free loopback port, with a certificate issued by `ca`, and
    /// waits until it serves its discovery document.
    pub async fn start(ca: &TestCa, config: &OidcProviderConfig) -> Result<Self, OidcError> {
        let script_dir = provider_dir();
        if !script_dir
            .join("node_modules/oidc-provider/package.json")
            .is_file()
        {
            return Err(OidcError::NotInstalled(script_dir));
        }
        let node = crate::browser::find_program("node").ok_or(OidcError::NodeMissing)?;
        let dir = tempfile::Builder::new()
            .prefix("sallyport-oidc-")
            .tempdir()
            .map_err(|source| OidcError::Write {
                path: std::env::temp_dir(),
                source,
            })?;

        let mut names = vec![config.host.as_str()];
        if config.host != "127.0.0.1" {
            names.push("127.0.0.1");
        }
        let (cert_file, key_file) = ca.issue_server(&names)?.write(dir.path(), "provider")?;
        let file = ProviderFile {
            bind: "127.0.0.1",
            port: 0,
            host: &config.host,
            tls: TlsFiles {
                cert_file,
                key_file,
            },
            id_token_ttl_seconds: config.id_token_ttl.as_secs().max(1),
            access_token_ttl_seconds: config.access_token_ttl.as_secs().max(1),
            acr: AcrValues {
                password: ACR_PASSWORD,
                mfa: ACR_MFA,
            },
            clients: &config.clients,
            users: &config.users,
        };
        let config_path = dir.path().join("provider.json");
        let json = serde_json::to_vec_pretty(&file).map_err(OidcError::Config)?;
        std::fs::write(&config_path, json).map_err(|source| OidcError::Write {
            path: config_path.clone(),
            source,
        })?;

        let script = script_dir.join("provider.mjs").display().to_string();
        let config_arg = config_path.display().to_string();
        let args = [script.as_str(), "--config", config_arg.as_str()];
        let mut process = OwnedProcess::start_program(&node, &args, &[], true)?;
        let issuer = match wait_for_ready(&mut process).await {
            Ok(issuer) => issuer,
            // Rarely (twice in some twenty runs on a loaded 2-core machine, cause not yet
            // known) Node.js printed its first line and then nothing for a minute: say so
            // loudly and try once more.
            Err(OidcError::NotReady { within, output }) => {
                eprintln!(
                    "the OpenID provider was not ready within {within:?}; restarting it once. Its output:\n{output}"
                );
                tracing::warn!(?within, %output, "OpenID provider not ready, restarting it once");
                process.stop();
                process = OwnedProcess::start_program(&node, &args, &[], true)?;
                wait_for_ready(&mut process).await?
            }
            Err(e) => return Err(e),
        };
        let port = url::Url::parse(&issuer)
            .ok()
            .and_then(|url| url.port())
            .ok_or_else(|| OidcError::BadIssuer {
                issuer: issuer.clone(),
            })?;
        tracing::info!(%issuer, "OpenID provider started");
        let provider = Self {
            process,
            issuer,
            address: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            host: config.host.clone(),
            ca_pem: ca.pem(),
            _dir: dir,
        };
        provider.discovery().await?;
        Ok(provider)
    }

    /// The issuer URL, `https://<host>:<port>` (no trailing slash).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Where it listens (loopback).
    pub fn address(&self) -> std::net::SocketAddr {
        self.address
    }

    /// The host name of the issuer URL (also the TLS server name).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The PEM of the CA that issued its certificate: what its clients must trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The URL of `path` (starting with `/`) at the provider.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.issuer)
    }

    /// Everything it has printed (its log lines start with `oidc-provider:`).
    pub fn output(&self) -> String {
        self.process.output()
    }

    /// Its discovery document, `/.well-known/openid-configuration`.
    pub async fn discovery(&self) -> Result<Value, OidcError> {
        self.call(Method::GET, "/.well-known/openid-configuration", None)
            .await
    }

    /// Its JWKS (the `jwks_uri` document).
    pub async fn jwks(&self) -> Result<Value, OidcError> {
        self.call(Method::GET, "/jwks", None).await
    }

    /// Its signing keys.
    pub async fn keys(&self) -> Result<ProviderKeys, OidcError> {
        let value = self.call(Method::GET, "/admin/keys", None).await?;
        parse("GET /admin/keys", value)
    }

    /// Rotates the signing keys: a new ES256 and a new RS256 key (new `kid`s) sign from now
    /// on; the old ones stay in the JWKS until [`OidcProvider::retire_old_keys`].
    pub async fn rotate_keys(&self) -> Result<ProviderKeys, OidcError> {
        let value = self.call(Method::POST, "/admin/keys/rotate", None).await?;
        parse("POST /admin/keys/rotate", value)
    }

    /// Removes every key but the newest ones from the JWKS: tokens they signed no longer
    /// verify.
    pub async fn retire_old_keys(&self) -> Result<ProviderKeys, OidcError> {
        let value = self.call(Method::POST, "/admin/keys/retire", None).await?;
        parse("POST /admin/keys/retire", value)
    }

    /// Sets the lifetime of ID tokens and access tokens issued from now on (whole seconds,
    /// at least one).
    pub async fn set_token_ttl(
        &self,
        id_token: Duration,
        access_token: Duration,
    ) -> Result<(), OidcError> {
        let body = serde_json::json!({
            "id_token_seconds": id_token.as_secs().max(1),
            "access_token_seconds": access_token.as_secs().max(1),
        });
        self.call(Method::POST, "/admin/ttl", Some(body)).await?;
        Ok(())
    }

    /// Stops it (SIGKILL).
    pub fn stop(self) {
        self.process.stop();
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, OidcError> {
        let what = format!("{method} {}", self.url(path));
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::ACCEPT, "application/json");
        let request = match body {
            Some(body) => request
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.to_string()))),
            None => request.body(Full::new(Bytes::new())),
        }
        .map_err(|source| OidcError::Request {
            what: what.clone(),
            source: source.into(),
        })?;
        let answer = https_request(self.address, &self.host, self.ca_pem.as_bytes(), request)
            .await
            .map_err(|source| OidcError::Request {
                what: what.clone(),
                source,
            })?;
        if answer.status != StatusCode::OK {
            return Err(OidcError::Status {
                what,
                status: answer.status,
                body: answer.text(),
            });
        }
        serde_json::from_slice(&answer.body).map_err(|source| OidcError::Json { what, source })
    }
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, value: Value) -> Result<T, OidcError> {
    serde_json::from_value(value).map_err(|source| OidcError::Json {
        what: what.to_owned(),
        source,
    })
}

/// Waits for the ready line; the issuer it names.
async fn wait_for_ready(process: &mut OwnedProcess) -> Result<String, OidcError> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        let output = process.output();
        if let Some(issuer) = output
            .lines()
            .find_map(|line| line.strip_prefix(READY_PREFIX))
        {
            return Ok(issuer.trim().to_owned());
        }
        if !process.is_running() {
            // The pipes may still hold the last words.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return Err(OidcError::Exited {
                output: process.output(),
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(OidcError::NotReady {
                within: START_TIMEOUT,
                output,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
