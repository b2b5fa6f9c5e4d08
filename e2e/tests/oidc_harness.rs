//! The sign-in test infrastructure proves itself on its own: a real OpenID provider
//! (panva's oidc-provider on Node.js, `sallyport_e2e::oidc`) and a real headless Chromium
//! (`sallyport_e2e::browser`), with a tiny HTTPS relying party written here that does what
//! the proxy will do: discovery, an authorization code flow with PKCE S256, state and
//! nonce, the code exchanged at the token endpoint, the ID token's signature verified
//! against the JWKS and its claims checked.
//!
//! Covered: the browser trusts the test CA and refuses a certificate from any other CA; a
//! wrong password is refused on the login page; `amr`/`acr` follow the MFA choice;
//! `acr_values` forces a new sign-in (step-up) while a plain request rides the session;
//! `prompt=login` signs in another user (200 groups); ES256 and RS256 ID tokens; key
//! rotation (new `kid`s sign, old ones stay published until retired, then tokens they
//! signed stop verifying); a shorter ID-token lifetime; RP-initiated logout; reading
//! cookies and running `fetch()` in the page.
//!
//! Needs Debian's chromium, chromium-driver and libnss3-tools
//! (`hack/install-test-packages.sh`), Node.js 20.19+ and `npm ci --prefix
//! e2e/oidc-provider`; `.ci/run` does all of it. Without them the test fails and says
//! what is missing: it never skips.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use sallyport_e2e::browser::{Browser, BrowserConfig, BrowserError};
use sallyport_e2e::dataplane::{StepError, https_get, https_request};
use sallyport_e2e::oidc::{
    ACR_MFA, ACR_PASSWORD, MANY_GROUPS, OidcClient, OidcProvider, OidcProviderConfig, SigningAlg,
};
use sallyport_e2e::test_ca::{ServerCertificate, TestCa};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

type TestResult = Result<(), StepError>;

const ES256_CLIENT: &str = "rp-es256";
const RS256_CLIENT: &str = "rp-rs256";

/// The provider's endpoints, from its discovery document.
#[derive(Debug, Clone)]
struct Endpoints {
    issuer: String,
    authorization: String,
    token: String,
    jwks: String,
    end_session: String,
}

impl Endpoints {
    fn from_discovery(discovery: &Value) -> Result<Self, StepError> {
        let field = |name: &str| {
            discovery[name]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("discovery has no {name}: {discovery}"))
        };
        Ok(Self {
            issuer: field("issuer")?,
            authorization: field("authorization_endpoint")?,
            token: field("token_endpoint")?,
            jwks: field("jwks_uri")?,
            end_session: field("end_session_endpoint")?,
        })
    }
}

/// A sign-in the relying party completed: the verified ID token.
#[derive(Debug, Clone)]
struct SignIn {
    client_id: String,
    kid: String,
    alg: jsonwebtoken::Algorithm,
    claims: Value,
    id_token: String,
}

/// A started authorization request, by `state`.
struct Pending {
    client_id: String,
    nonce: String,
    verifier: String,
}

/// The relying party: a confidential client of the provider, as the proxy will be.
struct RelyingParty {
    base: String,
    endpoints: Endpoints,
    provider_address: SocketAddr,
    provider_host: String,
    ca_pem: String,
    /// client_id -> (secret, expected ID-token algorithm)
    clients: HashMap<String, (String, jsonwebtoken::Algorithm)>,
    pending: Mutex<HashMap<String, Pending>>,
    /// Every completed callback, in order: a verified sign-in or why it failed.
    outcomes: Mutex<Vec<Result<SignIn, String>>>,
}

impl RelyingParty {
    fn redirect_uri(&self) -> String {
        format!("{}/callback", self.base)
    }

    fn last_outcome(&self) -> Result<SignIn, StepError> {
        let outcomes = self.outcomes.lock().unwrap_or_else(PoisonError::into_inner);
        match outcomes.last() {
            Some(Ok(sign_in)) => Ok(sign_in.clone()),
            Some(Err(e)) => Err(format!("the relying party refused the sign-in: {e}").into()),
            None => Err("the relying party saw no callback".into()),
        }
    }

    fn outcome_count(&self) -> usize {
        self.outcomes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// `/login?client=..&prompt=..&acr_values=..`: a new authorization request.
    fn login(&self, query: &HashMap<String, String>) -> Response<Full<Bytes>> {
        let Some(client_id) = query
            .get("client")
            .filter(|c| self.clients.contains_key(*c))
        else {
            return text(StatusCode::BAD_REQUEST, "unknown client");
        };
        let state = random_token();
        let nonce = random_token();
        let verifier = random_token();
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        let mut params = vec![
            ("response_type", "code".to_owned()),
            ("client_id", client_id.clone()),
            ("redirect_uri", self.redirect_uri()),
            ("scope", "openid email profile groups".to_owned()),
            ("state", state.clone()),
            ("nonce", nonce.clone()),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256".to_owned()),
        ];
        for passed in ["prompt", "acr_values", "max_age"] {
            if let Some(value) = query.get(passed) {
                params.push((passed, value.clone()));
            }
        }
        let Ok(url) = url::Url::parse_with_params(&self.endpoints.authorization, &params) else {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "bad authorization URL");
        };
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                state,
                Pending {
                    client_id: client_id.clone(),
                    nonce,
                    verifier,
                },
            );
        Response::builder()
            .status(StatusCode::SEE_OTHER)
            .header(http::header::LOCATION, url.as_str())
            .body(Full::new(Bytes::new()))
            .unwrap_or_default()
    }

    /// `/callback?code=..&state=..&iss=..`: the code is exchanged and the ID token checked.
    async fn callback(&self, query: &HashMap<String, String>) -> Response<Full<Bytes>> {
        let outcome = self.complete(query).await;
        let page = match &outcome {
            Ok(sign_in) => {
                let sub = sign_in.claims["sub"].as_str().unwrap_or("?").to_owned();
                let amr = sign_in.claims["amr"].to_string();
                let session = random_token();
                let body = format!(
                    "<!DOCTYPE html><title>Relying party</title><p id=\"who\">signed in as {sub}</p><p id=\"amr\">amr {amr}</p>"
                );
                Response::builder()
                    .header(http::header::CONTENT_TYPE, "text/html; charset=utf-8")
                    .header(
                        http::header::SET_COOKIE,
                        format!("rp_session={session}; Path=/; Secure; HttpOnly; SameSite=Lax"),
                    )
                    .body(Full::new(Bytes::from(body)))
                    .unwrap_or_default()
            }
            Err(e) => text(StatusCode::OK, &format!("sign-in failed: {e}")),
        };
        self.outcomes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(outcome);
        page
    }

    async fn complete(&self, query: &HashMap<String, String>) -> Result<SignIn, String> {
        if let Some(error) = query.get("error") {
            return Err(format!(
                "the provider answered {error}: {}",
                query.get("error_description").map_or("", String::as_str)
            ));
        }
        let state = query.get("state").ok_or("no state")?;
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(state)
            .ok_or("unknown or replayed state")?;
        // RFC 9207: the provider names itself in the authorization response.
        if query.get("iss") != Some(&self.endpoints.issuer) {
            return Err(format!("iss parameter {:?}", query.get("iss")));
        }
        let code = query.get("code").ok_or("no code")?;
        let (secret, alg) = self
            .clients
            .get(&pending.client_id)
            .ok_or("unknown client")?;

        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "authorization_code")
            .append_pair("code", code)
            .append_pair("redirect_uri", &self.redirect_uri())
            .append_pair("code_verifier", &pending.verifier)
            .finish();
        let basic = STANDARD.encode(format!("{}:{secret}", pending.client_id));
        let request = Request::post(path_of(&self.endpoints.token)?)
            .header(http::header::AUTHORIZATION, format!("Basic {basic}"))
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| e.to_string())?;
        let answer = https_request(
            self.provider_address,
            &self.provider_host,
            self.ca_pem.as_bytes(),
            request,
        )
        .await
        .map_err(|e| format!("token request: {e}"))?;
        if answer.status != StatusCode::OK {
            return Err(format!(
                "token endpoint answered {}: {}",
                answer.status,
                answer.text()
            ));
        }
        let tokens: Value = serde_json::from_slice(&answer.body).map_err(|e| e.to_string())?;
        let id_token = tokens["id_token"].as_str().ok_or("no id_token")?.to_owned();

        let jwks = self.fetch_jwks().await.map_err(|e| e.to_string())?;
        let (kid, header_alg, claims) =
            verify_id_token(&id_token, &jwks, &self.endpoints.issuer, &pending.client_id)?;
        if header_alg != *alg {
            return Err(format!("signed with {header_alg:?}, registered {alg:?}"));
        }
        if claims["nonce"].as_str() != Some(pending.nonce.as_str()) {
            return Err(format!("nonce {} is not ours", claims["nonce"]));
        }
        Ok(SignIn {
            client_id: pending.client_id,
            kid,
            alg: header_alg,
            claims,
            id_token,
        })
    }

    async fn fetch_jwks(&self) -> Result<JwkSet, StepError> {
        let answer = https_get(
            self.provider_address,
            &self.provider_host,
            self.ca_pem.as_bytes(),
            &path_of(&self.endpoints.jwks)?,
        )
        .await?;
        Ok(serde_json::from_slice(&answer.body)?)
    }

    async fn serve(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let query: HashMap<String, String> = request
            .uri()
            .query()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .into_owned()
                    .collect()
            })
            .unwrap_or_default();
        let response = match request.uri().path() {
            "/login" => self.login(&query),
            "/callback" => self.callback(&query).await,
            "/logged-out" => text(
                StatusCode::OK,
                &format!(
                    "signed out of the relying party, state {}",
                    query.get("state").map_or("-", String::as_str)
                ),
            ),
            "/whoami" => {
                let cookie = request
                    .headers()
                    .get(http::header::COOKIE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                text(StatusCode::OK, &format!("cookie: {cookie}"))
            }
            _ => text(StatusCode::NOT_FOUND, "not found"),
        };
        Ok(response)
    }
}

/// Verifies `id_token`'s signature with the key its `kid` names in `jwks`, and its `iss`,
/// `aud` and `exp`; its kid, algorithm and claims.
fn verify_id_token(
    id_token: &str,
    jwks: &JwkSet,
    issuer: &str,
    audience: &str,
) -> Result<(String, jsonwebtoken::Algorithm, Value), String> {
    let header = jsonwebtoken::decode_header(id_token).map_err(|e| format!("header: {e}"))?;
    let kid = header.kid.ok_or("no kid")?;
    let jwk = jwks
        .find(&kid)
        .ok_or_else(|| format!("kid {kid} is not in the JWKS"))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid}: {e}"))?;
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[audience]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
    let data = jsonwebtoken::decode::<Value>(id_token, &key, &validation)
        .map_err(|e| format!("ID token: {e}"))?;
    Ok((kid, header.alg, data.claims))
}

fn path_of(url: &str) -> Result<String, String> {
    let url = url::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
    Ok(match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    })
}

fn random_token() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap_or_default()
}

/// Serves `rp` over HTTPS with `certificate` on `listener`, until the test ends.
fn serve_https(listener: TcpListener, certificate: &ServerCertificate, rp: Arc<RelyingParty>) {
    let acceptor = certificate
        .rustls_server_config(&[b"http/1.1"])
        .map(tokio_rustls::TlsAcceptor::from)
        .unwrap_or_else(|e| panic!("relying party TLS: {e}"));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let rp = rp.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |request| rp.clone().serve(request));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
}

/// The claim `name` as a list of strings.
fn strings(claims: &Value, name: &str) -> Vec<String> {
    claims[name]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn lifetime(claims: &Value) -> Option<i64> {
    Some(claims["exp"].as_i64()? - claims["iat"].as_i64()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_signs_in_at_a_real_openid_provider() -> TestResult {
    let ca = TestCa::new("sallyport-e2e-oidc-harness")?;
    let rp_listener = TcpListener::bind("127.0.0.1:0").await?;
    let rp_base = format!("https://{}", rp_listener.local_addr()?);
    let logged_out = format!("{rp_base}/logged-out");
    let config = OidcProviderConfig::default()
        .client(
            OidcClient::new(ES256_CLIENT, "es256-secret", &format!("{rp_base}/callback"))
                .post_logout_redirect_uri(&logged_out),
        )
        .client(
            OidcClient::new(RS256_CLIENT, "rs256-secret", &format!("{rp_base}/callback"))
                .signed_with(SigningAlg::RS256),
        );
    let provider = OidcProvider::start(&ca, &config).await?;

    // Discovery and JWKS as a relying party finds them.
    let discovery = provider.discovery().await?;
    let endpoints = Endpoints::from_discovery(&discovery)?;
    assert_eq!(endpoints.issuer, provider.issuer());
    assert_eq!(
        discovery["code_challenge_methods_supported"],
        json!(["S256"])
    );
    assert_eq!(discovery["response_types_supported"], json!(["code"]));
    assert_eq!(
        discovery["acr_values_supported"],
        json!([ACR_PASSWORD, ACR_MFA])
    );
    let jwks = provider.jwks().await?;
    let algs: Vec<&str> = jwks["keys"]
        .as_array()
        .map(|keys| keys.iter().filter_map(|k| k["alg"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(algs, ["ES256", "RS256"], "JWKS: {jwks}");
    assert!(
        jwks["keys"]
            .as_array()
            .is_some_and(|keys| keys.iter().all(|k| k.get("d").is_none())),
        "the JWKS publishes no private parts"
    );
    let first_keys = provider.keys().await?;
    assert_eq!(first_keys.signing, first_keys.published);

    let rp = Arc::new(RelyingParty {
        base: rp_base.clone(),
        endpoints: endpoints.clone(),
        provider_address: provider.address(),
        provider_host: provider.host().to_owned(),
        ca_pem: ca.pem(),
        clients: HashMap::from([
            (
                ES256_CLIENT.to_owned(),
                ("es256-secret".to_owned(), jsonwebtoken::Algorithm::ES256),
            ),
            (
                RS256_CLIENT.to_owned(),
                ("rs256-secret".to_owned(), jsonwebtoken::Algorithm::RS256),
            ),
        ]),
        pending: Mutex::default(),
        outcomes: Mutex::default(),
    });
    serve_https(rp_listener, &ca.issue_server(&["127.0.0.1"])?, rp.clone());

    // A server whose certificate comes from another CA: the browser refuses it.
    let stranger_ca = TestCa::new("not-trusted-by-the-browser")?;
    let stranger_listener = TcpListener::bind("127.0.0.1:0").await?;
    let stranger_url = format!("https://{}/whoami", stranger_listener.local_addr()?);
    serve_https(
        stranger_listener,
        &stranger_ca.issue_server(&["127.0.0.1"])?,
        rp.clone(),
    );

    let browser = Browser::start(&BrowserConfig::default().trust_ca(ca.name(), &ca.pem())).await?;
    match browser.goto(&stranger_url).await {
        Err(BrowserError::Certificate { code, .. }) => {
            assert_eq!(code, "NET::ERR_CERT_AUTHORITY_INVALID");
        }
        other => panic!("the browser accepted a certificate from an untrusted CA: {other:?}"),
    }

    // 1. alice signs in with a password only (ES256 client); a wrong password first.
    browser
        .goto(&format!("{rp_base}/login?client={ES256_CLIENT}"))
        .await?;
    assert_eq!(browser.text_of("#client-id").await?, ES256_CLIENT);
    browser.sign_in("alice", "not-her-password", false).await?;
    assert_eq!(
        browser.text_of("#error").await?,
        "Invalid username or password."
    );
    assert_eq!(
        browser.current_url().await?.port(),
        Some(provider.address().port()),
        "a refused password stays at the provider"
    );
    browser.sign_in("alice", "alice-password", false).await?;
    assert_eq!(browser.text_of("#who").await?, "signed in as alice");
    let password_sign_in = rp.last_outcome()?;
    let claims = &password_sign_in.claims;
    assert_eq!(password_sign_in.client_id, ES256_CLIENT);
    assert_eq!(password_sign_in.alg, jsonwebtoken::Algorithm::ES256);
    assert!(first_keys.signing.contains(&password_sign_in.kid));
    assert_eq!(claims["iss"], json!(provider.issuer()));
    assert_eq!(claims["aud"], json!(ES256_CLIENT));
    assert_eq!(claims["sub"], json!("alice"));
    assert_eq!(strings(claims, "amr"), ["pwd"]);
    assert_eq!(claims["acr"], json!(ACR_PASSWORD));
    assert_eq!(claims["email"], json!("alice@example.test"));
    assert_eq!(claims["email_verified"], json!(true));
    assert_eq!(claims["preferred_username"], json!("alice"));
    assert_eq!(claims["name"], json!("Alice Example"));
    assert_eq!(strings(claims, "groups"), ["staff", "engineering"]);
    assert_eq!(lifetime(claims), Some(3600));

    // The relying party's cookie, as the browser holds and sends it.
    let cookies = browser.cookies().await?;
    let rp_cookie = cookies
        .iter()
        .find(|c| c.name == "rp_session")
        .ok_or_else(|| format!("no rp_session cookie among {cookies:?}"))?;
    assert!(rp_cookie.secure && rp_cookie.http_only, "{rp_cookie:?}");
    assert_eq!(rp_cookie.same_site.as_deref(), Some("Lax"));
    let fetched = browser.fetch("/whoami", json!({})).await?;
    assert_eq!(fetched.status, 200, "{fetched:?}");
    assert!(
        fetched
            .body
            .contains(&format!("rp_session={}", rp_cookie.value)),
        "fetch() sent {}",
        fetched.body
    );

    // 2. Step-up: acr_values asks for MFA, so the provider asks again although alice has a
    //    session; she ticks MFA (RS256 client).
    browser
        .goto(&format!(
            "{rp_base}/login?client={RS256_CLIENT}&acr_values={ACR_MFA}"
        ))
        .await?;
    assert!(
        browser
            .text_of("#prompt-reasons")
            .await?
            .contains("acr_values_unsatisfied")
    );
    assert!(browser.text_of("#acr-values").await?.contains(ACR_MFA));
    browser.sign_in("alice", "alice-password", true).await?;
    assert_eq!(browser.text_of("#who").await?, "signed in as alice");
    let mfa_sign_in = rp.last_outcome()?;
    assert_eq!(mfa_sign_in.client_id, RS256_CLIENT);
    assert_eq!(mfa_sign_in.alg, jsonwebtoken::Algorithm::RS256);
    assert!(first_keys.signing.contains(&mfa_sign_in.kid));
    assert_eq!(mfa_sign_in.claims["aud"], json!(RS256_CLIENT));
    assert_eq!(strings(&mfa_sign_in.claims, "amr"), ["pwd", "mfa"]);
    assert_eq!(mfa_sign_in.claims["acr"], json!(ACR_MFA));

    //    A plain request rides the session: no login page on the way.
    let before = rp.outcome_count();
    browser
        .goto(&format!("{rp_base}/login?client={ES256_CLIENT}"))
        .await?;
    assert_eq!(browser.text_of("#who").await?, "signed in as alice");
    assert_eq!(rp.outcome_count(), before + 1);
    assert_eq!(strings(&rp.last_outcome()?.claims, "amr"), ["pwd", "mfa"]);

    // 3. prompt=login: the login page again, and bob with his many groups.
    browser
        .goto(&format!(
            "{rp_base}/login?client={ES256_CLIENT}&prompt=login"
        ))
        .await?;
    browser.sign_in("bob", "bob-password", false).await?;
    assert_eq!(browser.text_of("#who").await?, "signed in as bob");
    let bob = rp.last_outcome()?;
    let groups = strings(&bob.claims, "groups");
    assert_eq!(groups.len(), MANY_GROUPS);
    assert_eq!(groups.first().map(String::as_str), Some("group-000"));
    assert_eq!(strings(&bob.claims, "amr"), ["pwd"]);

    // 4. Key rotation: new kids sign, the old ones stay published until retired.
    let rotated = provider.rotate_keys().await?;
    assert!(
        rotated
            .signing
            .iter()
            .all(|kid| !first_keys.published.contains(kid)),
        "{rotated:?}"
    );
    assert_eq!(rotated.published.len(), 4, "{rotated:?}");
    let jwks: JwkSet = serde_json::from_value(provider.jwks().await?)?;
    for kid in rotated.signing.iter().chain(&first_keys.signing) {
        assert!(jwks.find(kid).is_some(), "{kid} is not in the JWKS");
    }
    verify_id_token(
        &password_sign_in.id_token,
        &jwks,
        provider.issuer(),
        ES256_CLIENT,
    )?;
    browser
        .goto(&format!(
            "{rp_base}/login?client={ES256_CLIENT}&prompt=login"
        ))
        .await?;
    browser.sign_in("alice", "alice-password", false).await?;
    assert_eq!(browser.text_of("#who").await?, "signed in as alice");
    let after_rotation = rp.last_outcome()?;
    assert!(
        rotated.signing.contains(&after_rotation.kid),
        "signed by {} after the rotation to {:?}",
        after_rotation.kid,
        rotated.signing
    );

    let retired = provider.retire_old_keys().await?;
    assert_eq!(retired.published, rotated.signing);
    let jwks: JwkSet = serde_json::from_value(provider.jwks().await?)?;
    assert_eq!(jwks.keys.len(), 2);
    let refused = verify_id_token(
        &password_sign_in.id_token,
        &jwks,
        provider.issuer(),
        ES256_CLIENT,
    );
    assert!(
        refused.is_err_and(|e| e.contains("not in the JWKS")),
        "a token of a retired key still verifies"
    );
    verify_id_token(
        &after_rotation.id_token,
        &jwks,
        provider.issuer(),
        ES256_CLIENT,
    )?;

    // 5. Short-lived ID tokens, for expiry tests.
    provider
        .set_token_ttl(Duration::from_secs(5), Duration::from_secs(5))
        .await?;
    browser
        .goto(&format!("{rp_base}/login?client={ES256_CLIENT}"))
        .await?;
    assert_eq!(browser.text_of("#who").await?, "signed in as alice");
    let short = rp.last_outcome()?;
    assert_eq!(lifetime(&short.claims), Some(5), "{}", short.claims);

    // 6. RP-initiated logout ends the provider's session.
    let logout = url::Url::parse_with_params(
        &endpoints.end_session,
        &[
            ("id_token_hint", short.id_token.as_str()),
            ("post_logout_redirect_uri", logged_out.as_str()),
            ("state", "bye"),
        ],
    )?;
    browser.goto(logout.as_str()).await?;
    browser.confirm_sign_out().await?;
    let landed = browser.current_url().await?;
    assert_eq!(landed.path(), "/logged-out", "{landed}");
    assert!(
        browser
            .page_text()
            .await?
            .contains("signed out of the relying party, state bye")
    );
    browser
        .goto(&format!("{rp_base}/login?client={ES256_CLIENT}"))
        .await?;
    assert!(
        browser.has("form#login").await?,
        "signed out, the provider asks again"
    );

    browser.close().await?;
    provider.stop();
    Ok(())
}
