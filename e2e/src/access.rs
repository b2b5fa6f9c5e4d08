//! What the conditional access e2e tests share: an OIDC app on a fleet whose proxies write
//! their sign-in log to files ([`AccessBed`]), a backend that also speaks WebSocket and
//! streams ([`AppBackend`]), clients that connect from a chosen loopback address
//! ([`get_from`], [`open_websocket`], [`open_stream`]), the sign-in log as the proxies
//! wrote it ([`SignInLog`]), and the operator's what-if tool ([`what_if`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::browser::{Browser, BrowserConfig};
use crate::dataplane::{
    Answer, Fleet, ProxyOptions, REACTION_TIMEOUT, StepError, eventually, https_get,
};
use crate::echo::{RecordingBackend, SeenRequest};
use crate::oidc::OidcProvider;
use crate::process::{OwnedProcess, workspace_binary};
use crate::sign_in::{connect_tls, get_over, start_provider, start_proxies_with};
use crate::test_ca::TestCa;

/// The app's external host.
pub const APP_HOST: &str = "wiki.sallyport.test";
/// The app's name (a PublishedApp in the test namespace).
pub const APP_NAME: &str = "wiki";
/// The session cookie of an app with the default cookie settings.
pub const SESSION_COOKIE: &str = "__Host-sallyport";
/// The `acr` the test provider issues for a sign-in with MFA.
pub const MFA_ACR: &str = "urn:sallyport:acr:mfa";
/// The `acr` the test provider issues for a password-only sign-in.
pub const PASSWORD_ACR: &str = "urn:sallyport:acr:password";
/// Alice of [`crate::oidc::OidcUser::standard`] signed in with her password, as the
/// what-if tool's arguments (without `--ip`).
pub const ALICE_WITH_PASSWORD: [&str; 12] = [
    "--user",
    "alice",
    "--email",
    "alice@example.test",
    "--group",
    "staff",
    "--group",
    "engineering",
    "--amr",
    "pwd",
    "--acr",
    PASSWORD_ACR,
];
/// The loopback address the tests' clients normally connect from.
pub const HOME: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));

// ---------------------------------------------------------------------------------------
// The backend

type BackendBody = UnsyncBoxBody<Bytes, Infallible>;

/// A plain HTTP/1.1 backend on loopback that records every request and answers:
///
/// - a WebSocket upgrade of `/ws`: accepted; text and binary messages come back as they
///   are;
/// - `GET /stream`: a body that never ends on its own, one line `tick <n>` every 100 ms;
/// - anything else: `user=<X-Remote-User>` and `target=<path and query>` as text.
pub struct AppBackend(RecordingBackend);

impl AppBackend {
    /// Starts it on a free port of 127.0.0.1.
    pub async fn start() -> Result<Self, std::io::Error> {
        RecordingBackend::start(backend_answer).await.map(Self)
    }
}

impl Deref for AppBackend {
    type Target = RecordingBackend;

    fn deref(&self) -> &RecordingBackend {
        &self.0
    }
}

fn text_body(text: String) -> BackendBody {
    Full::new(Bytes::from(text)).boxed_unsync()
}

fn backend_answer(seen: &SeenRequest, request: Request<Incoming>) -> Response<BackendBody> {
    let user = seen.header("x-remote-user").unwrap_or("").to_owned();
    let target = seen.target.clone();
    let key = request
        .headers()
        .get("sec-websocket-key")
        .map(|key| derive_accept_key(key.as_bytes()));
    if request.uri().path() == "/ws"
        && let Some(accept) = key
    {
        let upgrade = hyper::upgrade::on(request);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else {
                return;
            };
            let mut socket =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            while let Some(Ok(message)) = socket.next().await {
                if (message.is_text() || message.is_binary()) && socket.send(message).await.is_err()
                {
                    return;
                }
            }
        });
        let mut response = Response::new(text_body(String::new()));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(
            http::header::UPGRADE,
            http::HeaderValue::from_static("websocket"),
        );
        headers.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("Upgrade"),
        );
        if let Ok(value) = http::HeaderValue::try_from(accept) {
            headers.insert(http::header::SEC_WEBSOCKET_ACCEPT, value);
        }
        return response;
    }
    if request.uri().path() == "/stream" {
        // Ten minutes of ticks: far longer than any test waits.
        let ticks = futures::stream::unfold(0u32, |n| async move {
            if n >= 6000 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(format!("tick {n}\n")))),
                n + 1,
            ))
        });
        let mut response = Response::new(StreamBody::new(ticks).boxed_unsync());
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
        return response;
    }
    Response::new(text_body(format!("user={user}\ntarget={target}\n")))
}

// ---------------------------------------------------------------------------------------
// Clients

/// A TCP connection to `address` from `source` (any loopback address reaches a listener
/// on 127.0.0.1).
pub async fn connect_from(source: IpAddr, address: SocketAddr) -> Result<TcpStream, StepError> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    Ok(socket.connect(address).await?)
}

/// One HTTPS GET of `path` to `address` from `source`, as [`crate::sign_in::get`] sends
/// it.
pub async fn get_from(
    source: IpAddr,
    address: SocketAddr,
    authority: &str,
    ca_pem: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, StepError> {
    let tcp = connect_from(source, address).await?;
    get_over(tcp, APP_HOST, authority, ca_pem, path, headers).await
}

/// A WebSocket to the app over TLS.
pub type AppSocket = WebSocketStream<TlsStream<TcpStream>>;

/// Opens a WebSocket to `path` of the app at `authority` through the proxy at `address`,
/// from [`HOME`], sending `cookie`; the handshake's error as is (e.g. an HTTP 403).
pub async fn open_websocket(
    address: SocketAddr,
    authority: &str,
    ca_pem: &str,
    path: &str,
    cookie: &str,
) -> Result<Result<AppSocket, WsError>, StepError> {
    let tls = connect_tls(connect_from(HOME, address).await?, APP_HOST, ca_pem).await?;
    let mut request = format!("wss://{authority}{path}").into_client_request()?;
    request
        .headers_mut()
        .insert(http::header::COOKIE, http::HeaderValue::try_from(cookie)?);
    Ok(tokio_tungstenite::client_async(request, tls)
        .await
        .map(|(socket, _)| socket))
}

/// Sends `text` on `socket` and waits (at most [`REACTION_TIMEOUT`]) for it to come back.
pub async fn echo_over(socket: &mut AppSocket, text: &str) -> Result<(), StepError> {
    socket.send(Message::text(text)).await?;
    let answer = tokio::time::timeout(REACTION_TIMEOUT, socket.next())
        .await
        .map_err(|_| format!("no echo of {text:?} within {REACTION_TIMEOUT:?}"))?
        .ok_or("the WebSocket ended instead of echoing")??;
    if answer.to_text()? != text {
        return Err(format!("echoed {answer:?}, not {text:?}").into());
    }
    Ok(())
}

/// A response whose body is read as it streams.
pub struct OpenStream {
    /// The status.
    pub status: StatusCode,
    /// The body, still streaming.
    pub body: Incoming,
}

/// Sends `GET path` to the app at `authority` through the proxy at `address` from
/// [`HOME`] with `cookie`, and returns as soon as the response head is in.
pub async fn open_stream(
    address: SocketAddr,
    authority: &str,
    ca_pem: &str,
    path: &str,
    cookie: &str,
) -> Result<OpenStream, StepError> {
    let tls = connect_tls(connect_from(HOME, address).await?, APP_HOST, ca_pem).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let request = Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::COOKIE, cookie)
        .body(Full::new(Bytes::new()))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    Ok(OpenStream {
        status,
        body: response.into_body(),
    })
}

// ---------------------------------------------------------------------------------------
// The sign-in log

/// A proxy's sign-in log: the file its standard output goes to.
#[derive(Debug, Clone)]
pub struct SignInLog {
    path: PathBuf,
}

impl SignInLog {
    /// The log in `path`.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    /// The file: the proxy's whole standard output (its audit events too).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every complete sign-in log line written so far, oldest first.
    pub fn events(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        // Only whole lines: the last may still be being written.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|event| event["schema"] == "sallyport.dev/sign-in/v1")
            .collect()
    }

    /// The line of the decision made for request `request_id`, if one was logged.
    pub fn for_request(&self, request_id: &str) -> Option<Value> {
        self.events()
            .into_iter()
            .find(|event| event["requestId"] == request_id)
    }

    /// Waits for a line that `accept` takes; `what` names it in the error, which also
    /// shows the lines written.
    pub async fn wait_for(
        &self,
        what: &str,
        accept: impl Fn(&Value) -> bool,
    ) -> Result<Value, StepError> {
        let found = eventually(what, REACTION_TIMEOUT, async || {
            Ok(self.events().into_iter().find(|event| accept(event)))
        })
        .await;
        found.map_err(|error| format!("{error}; the sign-in log:\n{}", self.dump()).into())
    }

    /// The lines, for error messages.
    pub fn dump(&self) -> String {
        self.events()
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The result of each policy in a sign-in log line (`id` → `result`).
pub fn policy_results(event: &Value) -> BTreeMap<String, String> {
    event["policies"]
        .as_array()
        .map(|policies| {
            policies
                .iter()
                .map(|policy| {
                    (
                        policy["id"].as_str().unwrap_or_default().to_owned(),
                        policy["result"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// The what-if tool

/// Runs `sallyport-operator whatif <args> --output json` against the cluster of
/// `kubeconfig`; the sign-in log line it prints. Its exit code only says whether the
/// sign-in would be allowed, so it is not an error.
pub fn what_if(kubeconfig: &Path, args: &[&str]) -> Result<Value, StepError> {
    let operator = workspace_binary("sallyport-operator")?;
    let output = std::process::Command::new(operator)
        .arg("whatif")
        .args(args)
        .args(["--output", "json"])
        .env("KUBECONFIG", kubeconfig)
        .output()?;
    serde_json::from_slice(&output.stdout).map_err(|error| {
        format!(
            "whatif {args:?} printed no JSON ({error}); status {}, stdout:\n{}\nstderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
        .into()
    })
}

// ---------------------------------------------------------------------------------------
// The bed

/// One proxy replica of an [`AccessBed`].
#[derive(Debug, Clone)]
pub struct AccessProxy {
    /// Its replica name.
    pub name: String,
    /// Further `sallyport-proxy run` arguments.
    pub extra_args: Vec<String>,
}

impl AccessProxy {
    /// Replica `name` with `extra_args`.
    pub fn new(name: &str, extra_args: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
        }
    }
}

/// How to set up an [`AccessBed`].
#[derive(Debug, Clone)]
pub struct AccessBedConfig {
    /// The test namespace's prefix.
    pub prefix: String,
    /// The proxy replicas; the app's external URL has the first one's port.
    pub proxies: Vec<AccessProxy>,
    /// The app's `spec.assignment`.
    pub assignment: Value,
    /// ConditionalAccessPolicies (whole objects, in the test namespace) in force before
    /// anyone signs in.
    pub policies: Vec<Value>,
}

/// An OIDC app `wiki` at `https://wiki.sallyport.test:<port of the first proxy>/`, served
/// from an [`AppBackend`] through one connector by proxies that write their sign-in logs
/// to files, with a real provider (client `wiki`) whose users are
/// [`crate::oidc::OidcUser::standard`]; the policies given are in force on every proxy.
pub struct AccessBed {
    /// The fleet: operator, proxies.
    pub fleet: Fleet,
    /// The CA of the app's certificate and the provider's.
    pub ca: TestCa,
    /// The OpenID provider.
    pub provider: OidcProvider,
    /// The backend.
    pub backend: AppBackend,
    /// `wiki.sallyport.test:<port>`: what a browser sends as `Host`.
    pub authority: String,
    /// `https://wiki.sallyport.test:<port>/`.
    pub app_url: String,
    /// Each proxy's sign-in log, in the order of [`AccessBedConfig::proxies`].
    pub logs: Vec<SignInLog>,
    _logs_dir: tempfile::TempDir,
    _connector: OwnedProcess,
    _connector_state: tempfile::TempDir,
}

impl AccessBed {
    /// Sets it up as `config` says (the `sallyport-cluster` executable is `supervisor`)
    /// and waits until every proxy routes the app with the policies in force and the
    /// connector carries its requests.
    pub async fn start(supervisor: &Path, config: &AccessBedConfig) -> Result<Self, StepError> {
        let ca = TestCa::new("Sallyport e2e conditional access CA")?;
        let mut fleet = Fleet::start(supervisor, &config.prefix, &[]).await?;
        let logs_dir = tempfile::tempdir()?;
        let mut logs = Vec::new();
        let mut replicas = Vec::new();
        for proxy in &config.proxies {
            let file = logs_dir
                .path()
                .join(format!("{}.sign-in.jsonl", proxy.name));
            logs.push(SignInLog::new(&file));
            replicas.push((
                proxy.name.as_str(),
                ProxyOptions {
                    extra_args: proxy.extra_args.clone(),
                    stdout_file: Some(file),
                },
            ));
        }
        start_proxies_with(&mut fleet, &ca, &replicas).await?;
        let first = fleet
            .proxies
            .first()
            .ok_or("an access bed needs a proxy")?
            .ports
            .listen;
        let authority = format!("{APP_HOST}:{}", first.port());
        let app_url = format!("https://{authority}/");
        let provider = start_provider(&ca, &app_url).await?;

        let namespace = fleet.bed.namespace.clone();
        let client = fleet.bed.client.clone();
        let secrets = Api::<Secret>::namespaced(client.clone(), &namespace);
        let certificate = ca.issue_server(&[APP_HOST])?;
        for secret in [
            json!({
                "metadata": {"name": "wiki-tls"}, "type": "kubernetes.io/tls",
                "stringData": {"tls.crt": certificate.cert_pem, "tls.key": certificate.key_pem},
            }),
            json!({
                "metadata": {"name": "wiki-oidc"}, "type": "Opaque",
                "stringData": {"client-secret": "wiki-client-secret"},
            }),
        ] {
            secrets
                .create(&Default::default(), &serde_json::from_value(secret)?)
                .await?;
        }
        let group = fleet.create_group("dc", json!({})).await?;
        let backend = AppBackend::start().await?;
        for policy in &config.policies {
            crate::manifests::create(client.clone(), &namespace, policy).await?;
        }
        crate::manifests::create(
            client.clone(),
            &namespace,
            &json!({
                "apiVersion": "sallyport.dev/v1alpha1", "kind": "PublishedApp",
                "metadata": {"name": APP_NAME},
                "spec": {
                    "externalUrl": app_url,
                    "internalUrl": backend.url(),
                    "connectorGroup": {"name": "dc"},
                    "tls": {"secretName": "wiki-tls"},
                    "preAuthentication": {"type": "OIDC", "oidc": {
                        "issuerUrl": provider.issuer(),
                        "clientId": "wiki",
                        "clientSecretRef": {"name": "wiki-oidc", "key": "client-secret"},
                        "scopes": ["openid", "profile", "email", "groups"]
                    }},
                    "assignment": config.assignment,
                    "identity": {"headers": [
                        {"name": "X-Remote-User", "claim": "preferred_username"}
                    ]}
                }
            }),
        )
        .await?;
        let connector_state = tempfile::tempdir()?;
        let connector = fleet.connector(&group, connector_state.path()).start()?;

        // The policies in the compiled configuration, on the app's route.
        let app_id = format!("{namespace}/{APP_NAME}");
        let wanted: Vec<String> = config
            .policies
            .iter()
            .filter(|policy| policy["spec"]["state"] != "Disabled")
            .map(|policy| {
                format!(
                    "{namespace}/{}",
                    policy["metadata"]["name"].as_str().unwrap_or_default()
                )
            })
            .collect();
        eventually(
            "the app's route with its policies in the fleet configuration",
            REACTION_TIMEOUT,
            async || {
                let Some(compiled) = fleet.fleet_config().await? else {
                    return Ok(None);
                };
                Ok(compiled
                    .routes
                    .iter()
                    .find(|route| route.app == app_id)
                    .filter(|route| wanted.iter().all(|id| route.policies.contains(id)))
                    .map(|_| ()))
            },
        )
        .await?;
        // A passthrough app published only now: a proxy that serves it has a
        // configuration compiled after the one above, so it enforces the policies too;
        // it also shows the connector carrying requests of every proxy.
        let probe_ca = fleet
            .publish_app("probe", "probe.sallyport.test", &backend.url(), "dc")
            .await?;
        let addresses = fleet.addresses();
        let ca_pem = ca.pem();
        eventually(
            "every proxy serving the app and its probe",
            REACTION_TIMEOUT,
            async || {
                for address in &addresses {
                    let probe =
                        https_get(*address, "probe.sallyport.test", &probe_ca, "/probe").await?;
                    let app = get_from(HOME, *address, &authority, &ca_pem, "/", &[]).await?;
                    if probe.status != StatusCode::OK || app.status != StatusCode::UNAUTHORIZED {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            },
        )
        .await?;
        Ok(Self {
            fleet,
            ca,
            provider,
            backend,
            authority,
            app_url,
            logs,
            _logs_dir: logs_dir,
            _connector: connector,
            _connector_state: connector_state,
        })
    }

    /// The app's id, `namespace/wiki`.
    pub fn app_id(&self) -> String {
        format!("{}/{APP_NAME}", self.fleet.bed.namespace)
    }

    /// What the what-if tool answers, over the objects in the cluster, for a sign-in to
    /// the app described by `sign_in` (its `--user`, `--group`, `--ip`, ... arguments) at
    /// the time and authentication time of the sign-in log line `logged`.
    pub fn what_if_as_logged(&self, sign_in: &[&str], logged: &Value) -> Result<Value, StepError> {
        let app = self.app_id();
        let at = [
            "--time",
            logged["time"].as_str().unwrap_or_default(),
            "--auth-time",
            logged["authTime"].as_str().unwrap_or_default(),
            "--operator-namespace",
            &self.fleet.bed.operator_namespace,
        ];
        what_if(
            self.fleet.bed.control_plane.kubeconfig_path(),
            &[&["--app", &app][..], sign_in, &at].concat(),
        )
    }

    /// The id of policy `name` of the test namespace, `namespace/name`.
    pub fn policy_id(&self, name: &str) -> String {
        format!("{}/{name}", self.fleet.bed.namespace)
    }

    /// The listen address of proxy `index`.
    pub fn proxy(&self, index: usize) -> SocketAddr {
        self.fleet.proxies[index].ports.listen
    }

    /// A fresh headless browser trusting the test CA, with the app host on 127.0.0.1.
    pub async fn browser(&self) -> Result<Browser, StepError> {
        Ok(Browser::start(
            &BrowserConfig::default()
                .trust_ca("sallyport-e2e", &self.ca.pem())
                .resolve(APP_HOST, "127.0.0.1"),
        )
        .await?)
    }

    /// `GET path` from `source` through proxy `proxy` with the app's `Host`.
    pub async fn get(
        &self,
        proxy: usize,
        source: IpAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Answer, StepError> {
        get_from(
            source,
            self.proxy(proxy),
            &self.authority,
            &self.ca.pem(),
            path,
            headers,
        )
        .await
    }

    /// Merge-patches ConditionalAccessPolicy `name` of the test namespace with `patch`.
    pub async fn patch_policy(&self, name: &str, patch: Value) -> Result<(), StepError> {
        let api: Api<DynamicObject> = crate::manifests::api_for(
            self.fleet.bed.client.clone(),
            &self.fleet.bed.namespace,
            &json!({"apiVersion": "sallyport.dev/v1alpha1", "kind": "ConditionalAccessPolicy"}),
        );
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }
}

/// A ConditionalAccessPolicy `name` for the app [`APP_NAME`] and every user, in `state`,
/// with `conditions` and `grant`.
pub fn app_policy(name: &str, state: &str, conditions: Value, grant: Value) -> Value {
    json!({
        "apiVersion": "sallyport.dev/v1alpha1", "kind": "ConditionalAccessPolicy",
        "metadata": {"name": name},
        "spec": {
            "state": state,
            "assignments": {"apps": {"names": [APP_NAME]}, "users": {"include": ["*"]}},
            "conditions": conditions,
            "grant": grant
        }
    })
}

/// The session cookie the browser holds for the app, as a `Cookie` header value.
pub async fn session_cookie(browser: &Browser) -> Result<String, StepError> {
    let cookies = browser.cookies().await?;
    let session = cookies
        .iter()
        .find(|c| c.name == SESSION_COOKIE)
        .ok_or_else(|| format!("no {SESSION_COOKIE} cookie in the browser: {cookies:?}"))?;
    Ok(format!("{SESSION_COOKIE}={}", session.value))
}

/// The request id the proxy answered `answer` with.
pub fn request_id(answer: &Answer) -> Result<String, StepError> {
    Ok(answer
        .headers
        .get("x-request-id")
        .ok_or_else(|| format!("no X-Request-Id in the answer: {:?}", answer.headers))?
        .to_str()?
        .to_owned())
}
