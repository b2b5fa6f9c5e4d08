//! Steps the sign-in e2e tests share: a raw HTTPS request to an app host on a proxy (SNI
//! and `Host` chosen by the test, e.g. with the port a browser would send), and a
//! browser's trips through the OpenID provider's login and sign-out pages.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;

use crate::browser::Browser;
use crate::dataplane::{Answer, Fleet, IDENTITY_PROVIDER_CA_FILE, ProxyOptions, StepError};
use crate::oidc::{OidcClient, OidcProvider, OidcProviderConfig};
use crate::test_ca::TestCa;

/// One HTTPS GET of `path` to `address` with SNI `sni`, `Host: authority` and `headers`,
/// trusting only `ca_pem`.
pub async fn get(
    address: SocketAddr,
    sni: &str,
    authority: &str,
    ca_pem: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, StepError> {
    get_over(
        TcpStream::connect(address).await?,
        sni,
        authority,
        ca_pem,
        path,
        headers,
    )
    .await
}

/// TLS with SNI `sni` over `tcp`, trusting only `ca_pem` (no ALPN: HTTP/1.1).
pub async fn connect_tls(
    tcp: TcpStream,
    sni: &str,
    ca_pem: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, StepError> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(certificate?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(sni.to_owned())?, tcp)
        .await?)
}

/// Like [`get`], over the connected `tcp` (e.g. a socket bound to a chosen source
/// address).
pub async fn get_over(
    tcp: TcpStream,
    sni: &str,
    authority: &str,
    ca_pem: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, StepError> {
    let tls = connect_tls(tcp, sni, ca_pem).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let mut builder = Request::get(path).header(http::header::HOST, authority);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = sender
        .send_request(builder.body(Full::new(Bytes::new()))?)
        .await?;
    let (parts, body) = response.into_parts();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await?.to_bytes(),
    })
}

/// `Ok` when `condition` holds, else an error saying `what`.
pub fn check(condition: bool, what: impl Into<String>) -> Result<(), StepError> {
    if condition {
        Ok(())
    } else {
        Err(what.into().into())
    }
}

/// Goes to `url`, which must lead to the login page of the provider at `issuer`, signs in
/// as `username` (password `<username>-password`, no MFA) and waits until the browser has
/// left the provider; the URL it is then at.
pub async fn sign_in_at(
    browser: &Browser,
    url: &str,
    issuer: &str,
    username: &str,
) -> Result<url::Url, StepError> {
    browser.goto(url).await?;
    browser
        .wait_for_url("the provider's login page", |at| {
            at.as_str().starts_with(issuer)
        })
        .await?;
    browser
        .sign_in(username, &format!("{username}-password"), false)
        .await?;
    Ok(browser
        .wait_for_url("back from the provider", |at| {
            !at.as_str().starts_with(issuer)
        })
        .await?)
}

/// Signs out of the app at `app_url` (`https://host:port/`) and confirms at the provider
/// at `issuer`; waits for the app's signed-out page.
pub async fn sign_out(
    browser: &Browser,
    app_url: &str,
    issuer: &str,
) -> Result<url::Url, StepError> {
    browser
        .goto(&format!("{app_url}.sallyport/sign-out"))
        .await?;
    browser
        .wait_for_url("the provider's sign-out page", |at| {
            at.as_str().starts_with(issuer)
        })
        .await?;
    browser.confirm_sign_out().await?;
    Ok(browser
        .wait_for_url("the signed-out page", |at| {
            at.path() == "/.sallyport/signed-out"
        })
        .await?)
}

/// Starts the proxy replicas `names` of `fleet`, trusting `ca` for identity providers,
/// and waits until they listen.
pub async fn start_proxies(
    fleet: &mut Fleet,
    ca: &TestCa,
    names: &[&str],
) -> Result<(), StepError> {
    let replicas: Vec<(&str, ProxyOptions)> = names
        .iter()
        .map(|name| (*name, ProxyOptions::default()))
        .collect();
    start_proxies_with(fleet, ca, &replicas).await
}

/// Like [`start_proxies`], each replica started with its [`ProxyOptions`] (extra
/// arguments, a file for its sign-in log).
pub async fn start_proxies_with(
    fleet: &mut Fleet,
    ca: &TestCa,
    replicas: &[(&str, ProxyOptions)],
) -> Result<(), StepError> {
    std::fs::write(fleet.pki.path().join(IDENTITY_PROVIDER_CA_FILE), ca.pem())?;
    fleet.add_proxies(replicas).await
}

/// Starts a provider with a certificate from `ca` and one client, `wiki` (secret
/// `wiki-client-secret`), registered for the app at `app_url` (`https://host:port/`):
/// its callback and signed-out page.
pub async fn start_provider(ca: &TestCa, app_url: &str) -> Result<OidcProvider, StepError> {
    Ok(OidcProvider::start(
        ca,
        &OidcProviderConfig::default().client(
            OidcClient::new(
                "wiki",
                "wiki-client-secret",
                &format!("{app_url}.sallyport/callback"),
            )
            .post_logout_redirect_uri(&format!("{app_url}.sallyport/signed-out")),
        ),
    )
    .await?)
}
