//! SIEM export, end to end: a real control plane, operator, proxy, connectors, OpenID
//! provider and headless Chromium, and a real HTTP receiver started by the test.
//!
//! The proxy and the operator deliver their events to the receiver (`/proxy`,
//! `/operator`). Alice signs in and requests the app from several addresses (sign-in
//! events); a second connector group gets a token and a connector registers with it, an
//! app is published (audit events). The receiver then answers 503, later drops its
//! connections: meanwhile Alice goes on, the new connector is deleted (revoked) and
//! another app is published. The receiver comes back, and gets everything. A last outage
//! spans the proxy's SIGTERM: the receiver comes back while the proxy drains, and the
//! proxy flushes before it exits. Every event the proxy wrote to its standard output, and
//! every audit event the operator wrote to its own, reached the receiver exactly once
//! (matched by `id`), those of the outages included.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kube::Api;
use kube::api::DeleteParams;
use nix::sys::signal::Signal;
use sallyport_api::Connector;
use sallyport_e2e::access::{AccessBed, AccessBedConfig, AccessProxy, session_cookie};
use sallyport_e2e::dataplane::{FLEET_TUNNEL_HOST, REACTION_TIMEOUT, StepError, eventually};
use sallyport_e2e::process::{OwnedProcess, workspace_binary};
use sallyport_e2e::sign_in::{check, sign_in_at};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// What the receiver does with a POST.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Records the events and answers 200.
    Accept,
    /// Answers 503, recording nothing.
    Unavailable,
    /// Drops the connection without an answer, recording nothing.
    Refuse,
}

#[derive(Debug, Default)]
struct Received {
    /// Every accepted event, by sender path (`/proxy`, `/operator`), in arrival order.
    events: BTreeMap<String, Vec<Value>>,
    /// POSTs not accepted (503 or dropped), by sender path.
    turned_away: BTreeMap<String, usize>,
}

/// A SIEM's HTTP intake: records every event of every accepted POST (JSON lines).
struct Receiver {
    address: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    received: Arc<Mutex<Received>>,
}

impl Receiver {
    async fn start() -> Result<Self, StepError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let mode = Arc::new(Mutex::new(Mode::Accept));
        let received = Arc::new(Mutex::new(Received::default()));
        let (task_mode, task_received) = (mode.clone(), received.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (mode, received) = (task_mode.clone(), task_received.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (mode, received) = (mode.clone(), received.clone());
                        async move { intake(request, &mode, &received).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            address,
            mode,
            received,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap_or_else(PoisonError::into_inner) = mode;
    }

    fn events(&self, path: &str) -> Vec<Value> {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .events
            .get(path)
            .cloned()
            .unwrap_or_default()
    }

    fn turned_away(&self, path: &str) -> usize {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .turned_away
            .get(path)
            .copied()
            .unwrap_or_default()
    }
}

async fn intake(
    request: Request<Incoming>,
    mode: &Mutex<Mode>,
    received: &Mutex<Received>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let path = request.uri().path().to_owned();
    let body = request
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let mode = *mode.lock().unwrap_or_else(PoisonError::into_inner);
    let mut received = received.lock().unwrap_or_else(PoisonError::into_inner);
    if mode != Mode::Accept {
        *received.turned_away.entry(path).or_default() += 1;
        if mode == Mode::Refuse {
            // hyper drops the connection without an answer.
            return Err(std::io::Error::other("refusing"));
        }
        let mut response = Response::new(Full::new(Bytes::from_static(b"down for maintenance")));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return Ok(response);
    }
    let mut events = Vec::new();
    for line in String::from_utf8_lossy(&body).lines() {
        events.push(serde_json::from_str::<Value>(line).map_err(std::io::Error::other)?);
    }
    received.events.entry(path).or_default().extend(events);
    Ok(Response::new(Full::new(Bytes::new())))
}

/// The events (JSON lines with a `schema`) in a process's standard output file.
fn written(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| {
            event["schema"]
                .as_str()
                .is_some_and(|s| s.starts_with("sallyport.dev/"))
        })
        .collect()
}

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|event| event["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Whether every event written has arrived.
fn all_arrived(written: &[Value], received: &[Value]) -> bool {
    let received = ids(received);
    ids(written).iter().all(|id| received.contains(id))
}

/// Every event written arrived exactly once, and nothing else arrived.
fn check_exactly_once(who: &str, written: &[Value], received: &[Value]) -> Result<(), StepError> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for id in ids(received) {
        *counts.entry(id).or_default() += 1;
    }
    let written_ids = ids(written);
    check(
        written_ids.iter().all(|id| !id.is_empty()),
        format!("{who}: an event without an id: {written:?}"),
    )?;
    let missing: Vec<&String> = written_ids
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    let repeated: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let unknown: Vec<&String> = counts
        .keys()
        .filter(|id| !written_ids.contains(id))
        .collect();
    check(
        missing.is_empty() && repeated.is_empty() && unknown.is_empty(),
        format!(
            "{who}: {} written, {} received; missing {missing:?}, repeated {repeated:?}, never written {unknown:?}",
            written.len(),
            received.len()
        ),
    )
}

/// A loopback source address, `127.0.0.<n>`: each one a fresh decision (a sign-in event).
fn source(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// Starts `sallyport-operator run` as the fleet's operator (`identity` takes its Lease
/// back at once), its standard output (the audit events) in `stdout`.
fn start_operator(
    bed: &AccessBed,
    identity: &str,
    stdout: &Path,
    endpoint: &str,
) -> Result<OwnedProcess, StepError> {
    let operator = workspace_binary("sallyport-operator")?
        .display()
        .to_string();
    let kubeconfig = bed.fleet.bed.operator_kubeconfig.display().to_string();
    let stdout = stdout.display().to_string();
    let args = [
        "-c",
        "exec \"$0\" \"$@\" >\"$SALLYPORT_E2E_STDOUT_FILE\"",
        &operator,
        "run",
        "--namespace",
        &bed.fleet.bed.operator_namespace,
        "--probe-address",
        "127.0.0.1:0",
        "--tunnel-hostname",
        FLEET_TUNNEL_HOST,
        "--events-http-endpoint",
        endpoint,
        "--events-http-batch-size",
        "3",
        "--events-http-max-wait",
        "200ms",
        "--events-max-backoff",
        "1s",
        "--events-shutdown-timeout",
        "30s",
    ];
    Ok(OwnedProcess::start_program(
        Path::new("/bin/sh"),
        &args,
        &[
            ("KUBECONFIG", kubeconfig.as_str()),
            ("POD_NAME", identity),
            ("RUST_LOG", "info,kube=warn"),
            ("SALLYPORT_E2E_STDOUT_FILE", stdout.as_str()),
        ],
        false,
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_reaches_the_siem_exactly_once_through_outages_and_shutdown()
-> Result<(), StepError> {
    let receiver = Receiver::start().await?;
    let proxy_endpoint = receiver.url("/proxy");
    let mut bed = AccessBed::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        &AccessBedConfig {
            prefix: "siem".to_owned(),
            proxies: vec![AccessProxy::new(
                "proxy-a",
                &[
                    "--events-http-endpoint",
                    &proxy_endpoint,
                    "--events-http-batch-size",
                    "4",
                    "--events-http-max-wait",
                    "200ms",
                    "--events-max-backoff",
                    "1s",
                    "--events-shutdown-timeout",
                    "30s",
                    "--drain-delay",
                    "1s",
                ],
            )],
            assignment: json!({}),
            policies: Vec::new(),
        },
    )
    .await?;
    let proxy_stdout: PathBuf = bed
        .logs
        .first()
        .map(|log| log.path().to_owned())
        .ok_or("the bed has a proxy")?;

    // The operator, restarted to deliver to the receiver too.
    let operator_dir = tempfile::tempdir()?;
    let operator_stdout = operator_dir.path().join("operator.jsonl");
    bed.fleet.operator.signal(Signal::SIGKILL)?;
    bed.fleet.operator.wait_for_exit(REACTION_TIMEOUT).await;
    let identity = format!("e2e-operator-{}", bed.fleet.bed.operator_namespace);
    bed.fleet.operator = start_operator(
        &bed,
        &identity,
        &operator_stdout,
        &receiver.url("/operator"),
    )?;

    // Sign-in events: the sign-in, and a request from each of a few addresses.
    let browser = bed.browser().await?;
    sign_in_at(
        &browser,
        &format!("{}start", bed.app_url),
        bed.provider.issuer(),
        "alice",
    )
    .await?;
    let cookie = session_cookie(&browser).await?;
    browser.close().await?;
    let with_cookie = [("cookie", cookie.as_str())];
    let mut next_source = 2u8;
    let mut requests_from_new_addresses = async |n: u8| -> Result<(), StepError> {
        for _ in 0..n {
            let answer = bed.get(0, source(next_source), "/", &with_cookie).await?;
            check(
                answer.status == StatusCode::OK,
                format!("a request from 127.0.0.{next_source}: {}", answer.status),
            )?;
            next_source += 1;
        }
        Ok(())
    };
    requests_from_new_addresses(3).await?;

    // Audit events: a group's token, a connector registering with it, an app published.
    let extra = bed.fleet.create_group("extra", json!({})).await?;
    let extra_state = tempfile::tempdir()?;
    let _extra_connector = bed.fleet.connector(&extra, extra_state.path()).start()?;
    let registered = eventually(
        "the extra connector's registration",
        REACTION_TIMEOUT,
        async || {
            Ok(written(&proxy_stdout).into_iter().find(|e| {
                e["action"] == "connector.registered" && e["details"]["group"] == extra.id
            }))
        },
    )
    .await?;
    bed.fleet
        .publish_app("first", "first.sallyport.test", &bed.backend.url(), "dc")
        .await?;
    eventually("the first events delivered", REACTION_TIMEOUT, async || {
        let operator_published = receiver
            .events("/operator")
            .iter()
            .any(|e| e["action"] == "configuration.published");
        Ok(
            (operator_published
                && all_arrived(&written(&proxy_stdout), &receiver.events("/proxy")))
            .then_some(()),
        )
    })
    .await?;

    // An outage: 503, then dropped connections.
    let before_outage = written(&proxy_stdout).len();
    receiver.set(Mode::Unavailable);
    requests_from_new_addresses(3).await?;
    let connectors =
        Api::<Connector>::namespaced(bed.fleet.bed.client.clone(), &bed.fleet.bed.namespace);
    let extra_connector = registered["object"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    connectors
        .delete(&extra_connector, &DeleteParams::default())
        .await?;
    eventually("503s to both senders", REACTION_TIMEOUT, async || {
        Ok(
            (receiver.turned_away("/proxy") >= 2 && receiver.turned_away("/operator") >= 2)
                .then_some(()),
        )
    })
    .await?;
    receiver.set(Mode::Refuse);
    let turned_away = receiver.turned_away("/proxy") + receiver.turned_away("/operator");
    requests_from_new_addresses(2).await?;
    bed.fleet
        .publish_app("second", "second.sallyport.test", &bed.backend.url(), "dc")
        .await?;
    eventually(
        "dropped connections to both senders",
        REACTION_TIMEOUT,
        async || {
            Ok(
                (receiver.turned_away("/proxy") + receiver.turned_away("/operator")
                    >= turned_away + 4)
                    .then_some(()),
            )
        },
    )
    .await?;
    let during_outage = written(&proxy_stdout)[before_outage..].to_vec();
    check(
        during_outage
            .iter()
            .filter(|e| e["schema"] == "sallyport.dev/sign-in/v1")
            .count()
            >= 5,
        format!("sign-in events during the outage: {during_outage:?}"),
    )?;
    check(
        ids(&during_outage)
            .iter()
            .all(|id| !ids(&receiver.events("/proxy")).contains(id)),
        "events of the outage arrived during the outage",
    )?;
    receiver.set(Mode::Accept);
    eventually(
        "the outage's events delivered",
        REACTION_TIMEOUT,
        async || {
            let operator = receiver.events("/operator");
            let revoked = operator.iter().any(|e| {
                e["action"] == "connector.revoked"
                    && e["object"]["name"] == extra_connector.as_str()
            });
            Ok(
                (revoked && all_arrived(&written(&proxy_stdout), &receiver.events("/proxy")))
                    .then_some(()),
            )
        },
    )
    .await?;

    // An outage across the proxy's shutdown: the receiver is back while it drains.
    receiver.set(Mode::Unavailable);
    let before_shutdown = written(&proxy_stdout).len();
    requests_from_new_addresses(2).await?;
    let last = written(&proxy_stdout)[before_shutdown..].to_vec();
    check(
        last.len() >= 2,
        format!("the last sign-in events: {last:?}"),
    )?;
    let proxy = &mut bed.fleet.proxies[0].process;
    proxy.terminate()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    receiver.set(Mode::Accept);
    let status = proxy
        .wait_for_exit(Duration::from_secs(90))
        .await
        .ok_or("the proxy did not exit within 90 s of SIGTERM")?;
    check(status.success(), format!("the proxy exited with {status}"))?;
    check(
        all_arrived(&last, &receiver.events("/proxy")),
        "the events of the last outage were flushed before the proxy exited",
    )?;
    // The operator flushes at its SIGTERM too.
    bed.fleet.operator.terminate()?;
    let status = bed
        .fleet
        .operator
        .wait_for_exit(Duration::from_secs(90))
        .await
        .ok_or("the operator did not exit within 90 s of SIGTERM")?;
    check(
        status.success(),
        format!("the operator exited with {status}"),
    )?;

    // Exactly once, by id.
    let proxy_written = written(&proxy_stdout);
    let proxy_received = receiver.events("/proxy");
    check_exactly_once("proxy", &proxy_written, &proxy_received)?;
    let operator_written = written(&operator_stdout);
    check_exactly_once("operator", &operator_written, &receiver.events("/operator"))?;

    // What arrived is what was written, and covers what happened.
    let stages: Vec<&str> = proxy_received
        .iter()
        .filter(|e| e["schema"] == "sallyport.dev/sign-in/v1")
        .filter_map(|e| e["stage"].as_str())
        .collect();
    check(
        stages.contains(&"signIn") && stages.iter().filter(|s| **s == "request").count() >= 10,
        format!("sign-in stages received: {stages:?}"),
    )?;
    let arrived_registration = proxy_received
        .iter()
        .find(|e| e["id"] == registered["id"])
        .ok_or("the registration's audit event did not arrive")?;
    check(
        arrived_registration == &registered
            && registered["schema"] == "sallyport.dev/audit/v1"
            && registered["actor"] == json!({"component": "sallyport-proxy", "replica": "proxy-a"})
            && registered["outcome"] == "success"
            && registered["object"]["kind"] == "Connector"
            && registered["object"]["namespace"] == bed.fleet.bed.namespace.as_str(),
        format!("the registration event: {registered}"),
    )?;
    let operator_received = receiver.events("/operator");
    let actions: Vec<&str> = operator_received
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    let published = receiver
        .events("/operator")
        .into_iter()
        .filter(|e| e["action"] == "configuration.published")
        .count();
    check(
        published >= 3
            && actions.contains(&"connectorGroup.tokenIssued")
            && actions.contains(&"connector.revoked"),
        format!("operator actions received: {actions:?}"),
    )?;
    let refused = proxy_received
        .iter()
        .filter(|e| e["action"] == "connector.refused")
        .count();
    eprintln!(
        "siem_export: proxy wrote {} events ({} sign-in, {refused} refusals), operator {}; all arrived once",
        proxy_written.len(),
        stages.len(),
        operator_written.len()
    );
    Ok(())
}
