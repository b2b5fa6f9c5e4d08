//! A rolling restart of the proxy fleet under load. Two replicas are restarted one after
//! the other the way a Deployment rolls them (SIGTERM, wait for the exit, a replacement
//! with the same name on the same address, wait until it is ready and both connectors
//! have tunnels to it) while eight users keep an app busy, half over HTTP/1.1 keep-alive
//! and half over HTTP/2, with quick GETs, slow GETs and POSTs with bodies. Not one request
//! fails, every answer is the one asked for, requests in flight at each SIGTERM finish,
//! and both replacements carry traffic afterwards.
//!
//! Users reach the replicas as through a Kubernetes Service: each new connection goes to
//! a replica whose `/readyz` answered 200 when last polled (every 100 ms, standing in for
//! the endpoints controller), and a connection stays where it is until the server closes
//! it (users also close theirs after some requests and open new ones, as visitors come and
//! go). Clients do what browsers do: a request the connection handed back unsent goes on a
//! new connection, and a GET whose keep-alive connection closed before any byte of its
//! answer is sent once more; a POST that was sent is never sent again.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use sallyport_e2e::dataplane::{
    ClientBody, Fleet, HttpsConnection, PatternBody, Protocol, REACTION_TIMEOUT, StepError,
    TrafficBackend, empty_body, eventually, http_request, https_get,
};
use serde_json::json;
use tokio::time::Instant;

type TestResult = Result<(), StepError>;

const APP_HOST: &str = "app.restart.test";
/// The proxy replicas, restarted in this order.
const REPLICAS: [&str; 2] = ["proxy-a", "proxy-b"];
/// Users; even ones speak HTTP/1.1, odd ones HTTP/2.
const USERS: usize = 8;
/// How long the backend takes to answer a slow GET.
const SLOW: Duration = Duration::from_millis(300);
/// The bound of one request, retries included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The bound of the whole load, whatever happens.
const LOAD_LIMIT: Duration = Duration::from_secs(300);
/// The bound of requests per user, whatever happens.
const MAX_REQUESTS: usize = 50_000;
/// How long the load goes on once the second replacement serves.
const AFTER: Duration = Duration::from_secs(4);
/// Requests a user sends on one connection before it closes it and opens another, as
/// visitors come and go and browsers let connections go: without it every connection
/// would stay on the replica restarted first.
const REQUESTS_PER_CONNECTION: usize = 10;
/// How often users look at the replicas' readiness.
const PROBE_EVERY: Duration = Duration::from_millis(100);
/// A replica's drain with the proxy's defaults takes at most `--drain-delay` (5 s) +
/// `--drain-timeout` (30 s) + the tunnels' drain (10 s); the rest is margin.
const EXIT_BOUND: Duration = Duration::from_secs(55);

/// What a user asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `GET /req/<user>/<n>`, answered at once.
    Get,
    /// `GET /slow/<ms>?u=<user>&n=<n>`, answered after [`SLOW`].
    Slow,
    /// `POST /count?u=<user>&n=<n>` with a pattern body of some tens of KiB.
    Post,
}

impl Kind {
    fn of(n: usize) -> Self {
        match n % 4 {
            0 | 1 => Self::Get,
            2 => Self::Post,
            _ => Self::Slow,
        }
    }
}

/// One request of one user.
#[derive(Debug, Clone)]
struct Outcome {
    user: usize,
    protocol: Protocol,
    kind: Kind,
    /// The replica (index in [`REPLICAS`]) of the connection that answered, or of the
    /// last one tried.
    replica: Option<usize>,
    /// When that connection was opened.
    connected_at: Option<Instant>,
    started: Instant,
    finished: Instant,
    /// Times the request came back unsent and went on a new connection.
    resent_unsent: usize,
    /// Whether a GET was sent once more after its keep-alive connection closed.
    retried: bool,
    /// `Ok` for the right status and body.
    result: Result<(), String>,
}

/// What every user shares: where the replicas are and which are ready.
struct Users {
    addresses: [SocketAddr; 2],
    ready: [AtomicBool; 2],
    /// Rotates new connections over the ready replicas.
    next: AtomicUsize,
    /// Slow GETs in flight, per replica of their connection.
    slow_in_flight: [AtomicUsize; 2],
    stop: AtomicBool,
    ca: Vec<u8>,
}

/// An open connection of a user.
struct Open {
    connection: HttpsConnection,
    replica: usize,
    at: Instant,
    /// Requests answered on it.
    answered: usize,
}

impl Users {
    /// A new connection to a ready replica, as a Service would route it.
    async fn connect(&self, protocol: Protocol) -> Result<Open, String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ready: Vec<usize> = (0..REPLICAS.len())
                .filter(|i| self.ready[*i].load(Ordering::SeqCst))
                .collect();
            if !ready.is_empty() {
                let replica = ready[self.next.fetch_add(1, Ordering::Relaxed) % ready.len()];
                let at = Instant::now();
                let connection =
                    HttpsConnection::open(self.addresses[replica], APP_HOST, &self.ca, protocol)
                        .await
                        .map_err(|e| format!("connecting to {}: {e}", REPLICAS[replica]))?;
                return Ok(Open {
                    connection,
                    replica,
                    at,
                    answered: 0,
                });
            }
            if Instant::now() > deadline {
                return Err("no replica was ready for 15 s".to_owned());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Counts one slow GET as in flight until dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn post_len(user: usize, n: usize) -> u64 {
    8_000 + ((user * 7_919 + n * 997) % 120_000) as u64
}

fn request(kind: Kind, user: usize, n: usize) -> Result<Request<ClientBody>, String> {
    let built = match kind {
        Kind::Get => Request::get(format!("/req/{user}/{n}")).body(empty_body()),
        Kind::Slow => {
            Request::get(format!("/slow/{}?u={user}&n={n}", SLOW.as_millis())).body(empty_body())
        }
        Kind::Post => Request::post(format!("/count?u={user}&n={n}"))
            .body(PatternBody::new(post_len(user, n)).boxed_client()),
    };
    built.map_err(|e| e.to_string())
}

/// Whether the answer is the one to this very request.
fn check(kind: Kind, user: usize, n: usize, status: StatusCode, body: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(body);
    let expected = match kind {
        Kind::Get => format!("target=/req/{user}/{n}\n"),
        Kind::Slow => format!("target=/slow/{}?u={user}&n={n}\n", SLOW.as_millis()),
        Kind::Post => format!("received={}\nmismatch=none\n", post_len(user, n)),
    };
    if status == StatusCode::OK && text.contains(&expected) {
        Ok(())
    } else {
        Err(format!(
            "{status}, expected {expected:?} in {:?}",
            text.trim()
        ))
    }
}

/// Sends request `n` of `user`, on its connection while the server keeps it open, else on
/// a new one.
async fn exchange(
    users: &Users,
    user: usize,
    n: usize,
    connection: &mut Option<Open>,
    outcome: &mut Outcome,
) -> Result<(), String> {
    let kind = outcome.kind;
    loop {
        let reusable = match connection.take() {
            Some(mut open) => open.connection.ready().await.then_some(open),
            None => None,
        };
        let mut open = match reusable {
            Some(open) => open,
            None => users.connect(outcome.protocol).await?,
        };
        outcome.replica = Some(open.replica);
        outcome.connected_at = Some(open.at);
        let in_flight =
            (kind == Kind::Slow).then(|| InFlight::new(&users.slow_in_flight[open.replica]));
        match open.connection.try_send(request(kind, user, n)?).await {
            Ok(response) => {
                let status = response.status();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("{status}, the body broke off: {e}"))?
                    .to_bytes();
                drop(in_flight);
                open.answered += 1;
                *connection = Some(open);
                return check(kind, user, n, status, &body);
            }
            Err(failure) if failure.unsent => {
                outcome.resent_unsent += 1;
                if outcome.resent_unsent > 5 {
                    return Err(format!("handed back unsent 6 times: {}", failure.error));
                }
            }
            // A browser sends a GET once more when its keep-alive connection closed
            // before any byte of the answer; never a POST.
            Err(failure) if kind != Kind::Post && open.answered > 0 && !outcome.retried => {
                eprintln!(
                    "user {user}: GET {n} on a reused connection to {} failed ({}); sending it once more",
                    REPLICAS[open.replica], failure.error
                );
                outcome.retried = true;
            }
            Err(failure) => {
                return Err(format!(
                    "sent to {}, no answer: {}",
                    REPLICAS[open.replica], failure.error
                ));
            }
        }
    }
}

/// One user: requests one after another until told to stop.
async fn user(
    user: usize,
    protocol: Protocol,
    users: Arc<Users>,
    deadline: Instant,
) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    let mut connection = None;
    for n in 0..MAX_REQUESTS {
        let started = Instant::now();
        if users.stop.load(Ordering::SeqCst) || started >= deadline {
            break;
        }
        let mut outcome = Outcome {
            user,
            protocol,
            kind: Kind::of(n),
            replica: None,
            connected_at: None,
            started,
            finished: started,
            resent_unsent: 0,
            retried: false,
            result: Ok(()),
        };
        let result = tokio::time::timeout(
            REQUEST_TIMEOUT,
            exchange(&users, user, n, &mut connection, &mut outcome),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_TIMEOUT:?}")));
        if result.is_err()
            || connection
                .as_ref()
                .is_some_and(|open: &Open| open.answered >= REQUESTS_PER_CONNECTION)
        {
            connection = None;
        }
        outcome.result = result;
        outcome.finished = Instant::now();
        outcomes.push(outcome);
    }
    outcomes
}

/// `GET /readyz` on a probe address: status and body.
async fn readyz(probes: SocketAddr) -> Result<(StatusCode, String), StepError> {
    let request = Request::get("/readyz").body(Full::new(Bytes::new()))?;
    let answer = tokio::time::timeout(Duration::from_secs(2), http_request(probes, request))
        .await
        .map_err(|_| format!("{probes}/readyz: no answer within 2s"))??;
    Ok((answer.status, answer.text()))
}

/// Polls every replica's `/readyz` until the users stop, as the endpoints controller
/// would: a replica that does not answer 200 gets no new connections.
async fn watch_readiness(users: Arc<Users>, probes: [SocketAddr; 2]) {
    while !users.stop.load(Ordering::SeqCst) {
        let answers = futures::future::join_all(probes.iter().map(|p| readyz(*p))).await;
        for (ready, answer) in users.ready.iter().zip(answers) {
            let status = answer.map(|(status, _)| status).ok();
            ready.store(status == Some(StatusCode::OK), Ordering::SeqCst);
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

/// One replica's restart, as the test saw it.
#[derive(Debug)]
struct Restart {
    replica: usize,
    terminated_at: Instant,
    /// `/readyz` after SIGTERM, while the old process still ran.
    unready: (StatusCode, String),
    exit: ExitStatus,
    exited_at: Instant,
    /// The replacement answered `/readyz` with 200.
    ready_at: Instant,
    /// Requests through the replacement had reached both connectors.
    tunnels_at: Instant,
}

/// Stops replica `replica` with SIGTERM while a slow request is in flight through it,
/// waits for its exit, starts its replacement on the same ports and waits until it is
/// ready and both connectors serve through it.
async fn restart(
    fleet: &mut Fleet,
    replica: usize,
    users: &Users,
    backend: &TrafficBackend,
    app_ca: &[u8],
) -> Result<Restart, StepError> {
    let name = REPLICAS[replica];
    let ports = fleet.proxies[replica].ports;
    eventually(
        &format!("a slow request in flight through {name}"),
        Duration::from_secs(10),
        async || Ok((users.slow_in_flight[replica].load(Ordering::SeqCst) > 0).then_some(())),
    )
    .await?;
    let terminated_at = Instant::now();
    fleet.proxies[replica].process.terminate()?;
    let unready = eventually(
        &format!("{name} answering /readyz with 503 after SIGTERM"),
        Duration::from_secs(3),
        async || {
            let (status, text) = readyz(ports.probes).await?;
            Ok((status != StatusCode::OK).then_some((status, text)))
        },
    )
    .await?;
    assert!(
        fleet.proxies[replica].process.is_running(),
        "{name} exited before its drain delay was over"
    );
    let exit = fleet.proxies[replica]
        .process
        .wait_for_exit(EXIT_BOUND)
        .await
        .ok_or_else(|| format!("{name} still ran {EXIT_BOUND:?} after SIGTERM"))?;
    let exited_at = Instant::now();
    eprintln!(
        "{name}: SIGTERM, /readyz {unready:?}, exited ({exit}) {:?} later",
        exited_at - terminated_at
    );

    fleet.proxies[replica].process = fleet.start_replica(name, ports)?;
    eventually(
        &format!("{name}'s replacement ready"),
        REACTION_TIMEOUT,
        async || Ok((readyz(ports.probes).await?.0 == StatusCode::OK).then_some(())),
    )
    .await?;
    let ready_at = Instant::now();
    let mut probe = 0;
    let prefix = format!("/probe/{name}/");
    eventually(
        &format!("requests through {name}'s replacement reaching both connectors"),
        REACTION_TIMEOUT,
        async || {
            probe += 1;
            let answer =
                https_get(ports.listen, APP_HOST, app_ca, &format!("{prefix}{probe}")).await?;
            if answer.status != StatusCode::OK {
                return Ok(None);
            }
            let arrivals = backend.arrivals();
            let reached = |label: &str| {
                arrivals
                    .iter()
                    .any(|a| a.target.starts_with(&prefix) && a.from.as_deref() == Some(label))
            };
            Ok((reached("one") && reached("two")).then_some(()))
        },
    )
    .await?;
    let tunnels_at = Instant::now();
    eprintln!(
        "{name}: replacement ready {:?} after the exit, both connectors through it {:?} later",
        ready_at - exited_at,
        tunnels_at - ready_at
    );
    Ok(Restart {
        replica,
        terminated_at,
        unready,
        exit,
        exited_at,
        ready_at,
        tunnels_at,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_the_proxies_under_load_loses_no_request() -> TestResult {
    let mut fleet = Fleet::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "restart",
        &REPLICAS,
    )
    .await?;
    let backend = TrafficBackend::start("app").await?;
    let group = fleet.create_group("dc", json!({})).await?;
    let app_ca = fleet
        .publish_app("app", APP_HOST, &backend.url(), "dc")
        .await?;
    let (one_state, two_state) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (_one, _two) = fleet
        .start_two_connectors(
            &group,
            [one_state.path(), two_state.path()],
            &backend,
            ["one", "two"],
            APP_HOST,
            &app_ca,
        )
        .await?;
    let ports = [fleet.proxies[0].ports, fleet.proxies[1].ports];
    for (name, ports) in REPLICAS.iter().zip(ports) {
        eventually(&format!("{name} ready"), REACTION_TIMEOUT, async || {
            Ok((readyz(ports.probes).await?.0 == StatusCode::OK).then_some(()))
        })
        .await?;
    }

    let users = Arc::new(Users {
        addresses: ports.map(|p| p.listen),
        ready: [AtomicBool::new(false), AtomicBool::new(false)],
        next: AtomicUsize::new(0),
        slow_in_flight: [AtomicUsize::new(0), AtomicUsize::new(0)],
        stop: AtomicBool::new(false),
        ca: app_ca.clone(),
    });
    let prober = tokio::spawn(watch_readiness(users.clone(), ports.map(|p| p.probes)));
    eventually(
        "the users seeing both replicas ready",
        REACTION_TIMEOUT,
        async || {
            Ok(users
                .ready
                .iter()
                .all(|r| r.load(Ordering::SeqCst))
                .then_some(()))
        },
    )
    .await?;
    let started = Instant::now();
    let load: Vec<_> = (0..USERS)
        .map(|i| {
            let protocol = if i % 2 == 0 {
                Protocol::Http1
            } else {
                Protocol::Http2
            };
            tokio::spawn(user(i, protocol, users.clone(), started + LOAD_LIMIT))
        })
        .collect();

    let mut restarts = Vec::new();
    let mut rolled = Ok(());
    for replica in 0..REPLICAS.len() {
        match restart(&mut fleet, replica, &users, &backend, &app_ca).await {
            Ok(done) => restarts.push(done),
            Err(error) => {
                rolled = Err(error);
                break;
            }
        }
    }
    if rolled.is_ok() {
        tokio::time::sleep(AFTER).await;
    }
    users.stop.store(true, Ordering::SeqCst);
    let mut outcomes = Vec::new();
    for user in load {
        outcomes.extend(user.await?);
    }
    prober.await?;
    rolled?;
    outcomes.sort_by_key(|o| o.started);

    let failures: Vec<&Outcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    let count = |kind: Kind| outcomes.iter().filter(|o| o.kind == kind).count();
    let retried = outcomes.iter().filter(|o| o.retried).count();
    let resent = outcomes.iter().filter(|o| o.resent_unsent > 0).count();
    eprintln!(
        "{} requests in {:?} ({} GET, {} slow GET, {} POST), {} failed; {retried} GETs sent once more after their keep-alive connection closed, {resent} requests handed back unsent and sent on a new connection",
        outcomes.len(),
        started.elapsed(),
        count(Kind::Get),
        count(Kind::Slow),
        count(Kind::Post),
        failures.len()
    );
    for failure in &failures {
        eprintln!(
            "failed: user {} ({:?}) {:?} through {:?}, sent {:?} after the start: {:?}",
            failure.user,
            failure.protocol,
            failure.kind,
            failure.replica.map(|r| REPLICAS[r]),
            failure.started - started,
            failure.result
        );
    }
    assert!(
        failures.is_empty(),
        "{} requests failed during the rolling restart",
        failures.len()
    );
    assert!(
        outcomes
            .iter()
            .all(|o| !(o.kind == Kind::Post && o.retried)),
        "a POST was sent twice"
    );
    assert!(count(Kind::Post) >= 50, "the users sent POSTs throughout");

    for restart in &restarts {
        let name = REPLICAS[restart.replica];
        assert!(
            restart.exit.success(),
            "{name} exited with {}",
            restart.exit
        );
        assert_eq!(
            restart.unready.0,
            StatusCode::SERVICE_UNAVAILABLE,
            "{name}'s /readyz after SIGTERM"
        );
        assert!(
            restart.unready.1.contains("draining"),
            "{name}'s /readyz says why it is unready: {:?}",
            restart.unready.1
        );
        let ok = |o: &&Outcome| o.result.is_ok();
        let old = |o: &&Outcome| {
            o.replica == Some(restart.replica)
                && o.connected_at.is_some_and(|at| at < restart.terminated_at)
        };
        let held = outcomes
            .iter()
            .filter(ok)
            .filter(old)
            .filter(|o| {
                o.kind == Kind::Slow
                    && o.started < restart.terminated_at
                    && o.finished > restart.terminated_at
            })
            .count();
        assert!(
            held >= 1,
            "no slow request in flight through {name} at SIGTERM finished"
        );
        let meanwhile = outcomes
            .iter()
            .filter(ok)
            .filter(|o| o.started > restart.terminated_at && o.finished < restart.ready_at)
            .count();
        assert!(
            meanwhile >= 20,
            "only {meanwhile} requests were answered while {name} was away"
        );
        let replacement = |protocol: Protocol| {
            outcomes
                .iter()
                .filter(ok)
                .filter(|o| {
                    o.protocol == protocol
                        && o.replica == Some(restart.replica)
                        && o.connected_at.is_some_and(|at| at > restart.exited_at)
                })
                .count()
        };
        let (http1, http2) = (replacement(Protocol::Http1), replacement(Protocol::Http2));
        eprintln!(
            "{name}: {held} slow requests held through the drain, {meanwhile} requests answered while it was away, its replacement answered {http1} over HTTP/1.1 and {http2} over HTTP/2 (tunnels of both connectors {:?} after the exit)",
            restart.tunnels_at - restart.exited_at
        );
        assert!(
            http1 >= 5 && http2 >= 5,
            "{name}'s replacement carried too little of the load: {http1} over HTTP/1.1, {http2} over HTTP/2"
        );
    }
    Ok(())
}
