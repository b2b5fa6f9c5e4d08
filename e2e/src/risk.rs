//! What the risk detection e2e tests share: sign-ins driven over plain HTTPS from a
//! chosen loopback address, through the real OpenID provider's login form
//! ([`sign_in_from`]), failed sign-ins as the provider reports them ([`fail_sign_in`]),
//! and a private `redis-server` ([`RedisServer`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, TcpListener};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::Full;
use serde_json::Value;

use crate::access::{AccessBed, SESSION_COOKIE};
use crate::dataplane::{Answer, StepError, https_request};

/// The cookies a client holds: name to value, paths ignored (each sign-in has its own
/// jar, and the servers ignore cookies they do not know).
#[derive(Debug, Default, Clone)]
struct Jar(BTreeMap<String, String>);

impl Jar {
    fn take(&mut self, answer: &Answer) {
        for value in answer.headers.get_all(header::SET_COOKIE) {
            let Ok(text) = value.to_str() else { continue };
            let pair = text.split(';').next().unwrap_or_default();
            let Some((name, value)) = pair.split_once('=') else {
                continue;
            };
            let expired = text.to_ascii_lowercase().contains("max-age=0");
            if value.is_empty() || expired {
                self.0.remove(name.trim());
            } else {
                self.0
                    .insert(name.trim().to_owned(), value.trim().to_owned());
            }
        }
    }

    fn header(&self) -> String {
        self.0
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn location(answer: &Answer) -> Result<url::Url, StepError> {
    let text = answer
        .headers
        .get(header::LOCATION)
        .ok_or_else(|| {
            format!(
                "expected a redirect, got {} {}",
                answer.status,
                answer.text()
            )
        })?
        .to_str()?;
    Ok(text.parse()?)
}

fn path_and_query(url: &url::Url) -> String {
    match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    }
}

/// Starts a sign-in to the app through proxy `proxy` from `source`: the provider URL the
/// proxy sends the browser to, and the cookies it set (the sealed transaction).
async fn start(
    bed: &AccessBed,
    proxy: usize,
    source: IpAddr,
) -> Result<(url::Url, Jar), StepError> {
    let started = bed
        .get(proxy, source, "/.sallyport/sign-in?return=%2Fhome", &[])
        .await?;
    if started.status != StatusCode::FOUND {
        return Err(format!("sign-in start: {} {}", started.status, started.text()).into());
    }
    let mut jar = Jar::default();
    jar.take(&started);
    Ok((location(&started)?, jar))
}

/// A sign-in that the provider refused (the user cancelled, or the provider denied it):
/// started through proxy `proxy` from `source`, and called back with
/// `error=access_denied` as the provider does. Returns the proxy's answer to the
/// callback (403 "Sign-in declined").
pub async fn fail_sign_in(
    bed: &AccessBed,
    proxy: usize,
    source: IpAddr,
) -> Result<Answer, StepError> {
    let (authorize, jar) = start(bed, proxy, source).await?;
    let state = authorize
        .query_pairs()
        .find(|(name, _)| name == "state")
        .map(|(_, value)| value.into_owned())
        .ok_or_else(|| format!("no state in {authorize}"))?;
    let callback = format!(
        "/.sallyport/callback?error=access_denied&error_description=End-User+cancelled&state={state}"
    );
    let cookie = jar.header();
    bed.get(proxy, source, &callback, &[("cookie", cookie.as_str())])
        .await
}

/// The end of a sign-in over HTTP: the proxy's answer to the callback and, when it
/// signed the user in, the session cookie as a `Cookie` header value.
#[derive(Debug)]
pub struct HttpSignIn {
    /// The proxy's answer to the callback.
    pub answer: Answer,
    /// `__Host-sallyport=…`, when a session was set.
    pub session_cookie: Option<String>,
}

/// Signs `username` (password `<username>-password`, no MFA) in to the app through
/// proxy `proxy` from `source`: the sign-in start and the callback go from `source`, the
/// provider's login form is filled in over HTTPS (from 127.0.0.1, as the provider sees
/// no proxy addresses).
pub async fn sign_in_from(
    bed: &AccessBed,
    proxy: usize,
    source: IpAddr,
    username: &str,
) -> Result<HttpSignIn, StepError> {
    let (authorize, mut app_jar) = start(bed, proxy, source).await?;
    let provider = &bed.provider;
    let ca = provider.ca_pem().as_bytes().to_vec();
    let mut provider_jar = Jar::default();
    let send = async |jar: &Jar, request: http::request::Builder, body: Option<String>| {
        let request = request
            .header("cookie", jar.header())
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        https_request(provider.address(), provider.host(), &ca, request).await
    };
    // The authorization request, then the login form, then back to the app.
    let mut next = authorize.clone();
    let mut posted = false;
    for _ in 0..10 {
        if next.host_str() != authorize.host_str() {
            break;
        }
        let path = path_and_query(&next);
        let answer = send(&provider_jar, Request::get(&path), None).await?;
        provider_jar.take(&answer);
        if answer.status == StatusCode::OK && path.starts_with("/interaction/") && !posted {
            posted = true;
            let form = format!("username={username}&password={username}-password",);
            let login = send(
                &provider_jar,
                Request::post(format!("{}/login", next.path()))
                    .header("content-type", "application/x-www-form-urlencoded"),
                Some(form),
            )
            .await?;
            provider_jar.take(&login);
            next = next.join(location(&login)?.as_str())?;
            continue;
        }
        if !answer.status.is_redirection() {
            return Err(format!(
                "the provider answered {path} with {} {}",
                answer.status,
                answer.text()
            )
            .into());
        }
        let target = answer
            .headers
            .get(header::LOCATION)
            .ok_or("a redirect without Location")?
            .to_str()?
            .to_owned();
        next = next.join(&target)?;
    }
    if !next.path().ends_with("/.sallyport/callback") {
        return Err(
            format!("the provider did not send the browser back to the app: {next}").into(),
        );
    }
    let cookie = app_jar.header();
    let answer = bed
        .get(
            proxy,
            source,
            &path_and_query(&next),
            &[("cookie", cookie.as_str())],
        )
        .await?;
    app_jar.take(&answer);
    let session_cookie = app_jar
        .0
        .get(SESSION_COOKIE)
        .map(|value| format!("{SESSION_COOKIE}={value}"));
    Ok(HttpSignIn {
        answer,
        session_cookie,
    })
}

/// The names of the risk detections of a sign-in log line.
pub fn detections(event: &Value) -> Vec<String> {
    event["riskDetections"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter_map(|d| d["type"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A `redis-server` of the test's own (Debian's `redis-server` package) on a free
/// loopback port, without persistence; stopped when dropped.
pub struct RedisServer {
    _child: tokio::process::Child,
    /// `redis://127.0.0.1:<port>/`.
    pub url: String,
}

impl RedisServer {
    /// Starts one and waits until it accepts connections.
    pub async fn start() -> Result<Self, StepError> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = tokio::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start redis-server (hack/install-test-packages.sh installs it): {e}"
                )
            })?;
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(Self {
                    _child: child,
                    url: format!("redis://127.0.0.1:{port}/"),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!("redis-server did not listen on port {port}").into())
    }
}
