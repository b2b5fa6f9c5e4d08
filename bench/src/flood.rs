//! Flood: legitimate users next to a request flood, through the proxy's abuse limits.
//!
//! The system under test is the data-plane benchmark's ([`crate::dataplane::fleet`]):
//! a backend, `sallyport-proxy run` standalone and `sallyport-connector run`, on
//! loopback. Legitimate traffic comes from `--users` users, each from an address of its
//! own (127.0.1.1 onwards, [`user_address`]) on one keep-alive connection. With
//! `--user-mode max` (the default) every user sends its next small GET as soon as the
//! last one is answered (a closed loop: what the users get is what the fleet serves
//! them); with `--user-mode fixed` every `1 / --user-rate` seconds (a user with think
//! time). The flood comes from `--flood-addresses` other addresses (127.0.0.2 onwards),
//! each with `--flood-connections` connections sending GETs back to back, as fast as
//! answers come, ignoring `Retry-After`, reconnecting when closed.
//!
//! The per-client limits of the proxy count the users too: a user is one address, so a
//! closed-loop user faster than `--client-requests-per-second` (100 by default) gets 429
//! like a flooder. The users are many so that each stays under it; the phases without
//! limits show what they get when it cannot bite.
//!
//! Phases of `--duration` seconds each, against the proxy with its default limits and
//! then (unless `--skip-unprotected`) against a proxy with the per-client rate,
//! in-flight and connection caps turned off: the users alone, then users and flood. The
//! users' served requests per second, success ratio and latency are reported with what
//! the flood got (answers by status, connection failures). The flood runs on its own
//! thread (its own runtime), so that the users' client is not queued behind it. The
//! flood is bounded: `--flood-addresses` x `--flood-connections` connections for
//! `--duration` seconds.
//!
//! It measures and reports; nothing is asserted about timing.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, ValueEnum};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpSocket;

use crate::dataplane::DataplaneError;
use crate::dataplane::backend::SMALL_BODY;
use crate::dataplane::client::Target;
use crate::dataplane::fleet::{APP_HOST, BinaryArgs, Fleet, FleetOptions};
use crate::machine::Machine;
use crate::stats;

/// How long a user waits for one answer (or a connection) before counting a timeout.
const USER_TIMEOUT: Duration = Duration::from_secs(10);

/// Users per /24 of their addresses (127.0.1.1-250, 127.0.2.1-250, ...).
const USERS_PER_NETWORK: u32 = 250;

/// How the legitimate users send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UserMode {
    /// Closed loop: the next request as soon as the last one is answered.
    Max,
    /// One request every `1 / --user-rate` seconds (later when an answer takes longer).
    Fixed,
}

/// Options of `sallyport-bench flood`.
#[derive(Clone, Debug, Args)]
pub struct FloodArgs {
    /// Seconds of each phase.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub duration: u64,

    /// Legitimate users, each from its own address (127.0.1.1 onwards, 250 per /24) on
    /// one keep-alive connection.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub users: u32,

    /// How the users send: `max`, back to back (closed loop, the fleet's capacity for
    /// them), or `fixed`, --user-rate requests per second each.
    #[arg(long, value_enum, default_value_t = UserMode::Max)]
    pub user_mode: UserMode,

    /// Requests per second of each legitimate user with `--user-mode fixed`.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub user_rate: u32,

    /// Flooding addresses: 127.0.0.2 onwards.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(1..=200))]
    pub flood_addresses: u8,

    /// Connections per flooding address, each sending requests back to back.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub flood_connections: u32,

    /// Skip the phases against a proxy without per-client and in-flight limits.
    #[arg(long)]
    pub skip_unprotected: bool,

    /// Worker threads of the backend.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub backend_workers: u16,

    /// `RUST_LOG` of the proxy and the connector.
    #[arg(long, value_name = "FILTER", default_value = "warn")]
    pub log_filter: String,

    /// Where the proxy and connector executables are.
    #[command(flatten)]
    pub binaries: BinaryArgs,
}

/// What the legitimate users got in one phase.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UsersResult {
    /// Requests that ended within the phase (answered, failed or timed out).
    pub sent: u64,
    /// Answered 200 with the backend's body.
    pub ok: u64,
    /// Failures by kind: the status of an answer other than 200, `200 other body`,
    /// `error` (the exchange failed, e.g. the connection was closed), `timeout` (no
    /// answer within 10 s), `connect` (the connection could not be opened).
    pub failed: BTreeMap<String, u64>,
    /// Requests still waiting for their answer when the phase ended (not in `sent`).
    pub unfinished: u64,
    /// `ok` per second of the phase.
    pub ok_per_s: f64,
    /// `ok_per_s` per user (to hold against the per-client limit).
    pub ok_per_s_per_user: f64,
    /// `ok / sent`.
    pub success_ratio: f64,
    /// Median latency of the successful requests, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency of the successful requests, milliseconds.
    pub p99_ms: f64,
}

/// What the flood got in one phase.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FloodResult {
    /// Requests that got an answer.
    pub answered: u64,
    /// Answers by status.
    pub statuses: BTreeMap<u16, u64>,
    /// Connections that could not be opened or failed mid-exchange (closed by the proxy,
    /// refused before the handshake).
    pub connection_failures: u64,
    /// Answers per second of the phase.
    pub answered_per_s: f64,
    /// 200 answers per second (what reached the backend).
    pub served_per_s: f64,
}

/// One phase.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    /// What ran.
    pub name: String,
    /// The legitimate users.
    pub users: UsersResult,
    /// The flood, when one ran.
    pub flood: Option<FloodResult>,
    /// CPU seconds used during the phase, by process.
    pub cpu: CpuSeconds,
}

/// CPU seconds (user and system) during one phase, from `/proc`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CpuSeconds {
    /// The proxy.
    pub proxy: f64,
    /// The connector.
    pub connector: f64,
    /// The backend.
    pub backend: f64,
    /// This process: the users' client and the flood's generator.
    pub clients: f64,
    /// The whole machine, all CPUs (other processes included).
    pub machine: f64,
    /// The phase's wall-clock seconds times the CPUs: what the machine had.
    pub available: f64,
}

/// CPU time used so far, by process.
struct CpuSnapshot {
    at: Instant,
    proxy: Duration,
    connector: Duration,
    backend: Duration,
    clients: Duration,
    machine: Duration,
}

impl CpuSnapshot {
    fn take(fleet: &Fleet) -> Result<Self, DataplaneError> {
        Ok(Self {
            at: Instant::now(),
            proxy: fleet.proxy.cpu_time()?,
            connector: fleet.connector.cpu_time()?,
            backend: fleet.backend.cpu_time()?,
            clients: crate::procfs::own_cpu_time()?,
            machine: crate::dataplane::cpu::machine_busy(),
        })
    }

    /// What was used from `self` until `later`, on a machine of `cpus` CPUs.
    fn until(&self, later: &Self, cpus: usize) -> CpuSeconds {
        let used = |from: Duration, to: Duration| stats::seconds(to.saturating_sub(from));
        CpuSeconds {
            proxy: used(self.proxy, later.proxy),
            connector: used(self.connector, later.connector),
            backend: used(self.backend, later.backend),
            clients: used(self.clients, later.clients),
            machine: used(self.machine, later.machine),
            available: stats::seconds(later.at.saturating_duration_since(self.at) * cpus as u32),
        }
    }
}

/// The run.
#[derive(Clone, Debug, Serialize)]
pub struct FloodReport {
    /// Where it ran.
    pub machine: Machine,
    /// Seconds per phase.
    pub duration_s: u64,
    /// Legitimate users (one address each).
    pub users: u32,
    /// How they sent.
    pub user_mode: UserMode,
    /// Requests per second per user, with [`UserMode::Fixed`].
    pub user_rate: Option<u32>,
    /// Flooding addresses.
    pub flood_addresses: u8,
    /// Connections per flooding address.
    pub flood_connections: u32,
    /// The phases in order.
    pub phases: Vec<Phase>,
}

/// The flags of the proxy without request limits (the unprotected phases).
const UNPROTECTED: [&str; 6] = [
    "--client-requests-per-second",
    "0",
    "--max-requests-in-flight",
    "0",
    "--max-connections-per-client",
    "0",
];

/// The address of user `index` (from 0): 127.0.1.1 to 127.0.1.250, then 127.0.2.1 on;
/// clear of the flood's 127.0.0.x.
pub fn user_address(index: u32) -> IpAddr {
    let network = 1 + index / USERS_PER_NETWORK;
    let host = 1 + index % USERS_PER_NETWORK;
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        u8::try_from(network).unwrap_or(u8::MAX),
        u8::try_from(host).unwrap_or(u8::MAX),
    ))
}

/// Runs the phases and returns what they measured.
pub fn run(args: &FloodArgs) -> Result<FloodReport, DataplaneError> {
    let binaries = args.binaries.locate()?;
    // The children are started from this thread, which outlives them.
    let runtime = crate::dataplane::single_thread_runtime()?;
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let mut phases = Vec::new();
    let protected: &[&str] = &[];
    let fleets: &[(&str, &[&str])] = if args.skip_unprotected {
        &[("default limits", protected)]
    } else {
        &[("default limits", protected), ("limits off", &UNPROTECTED)]
    };
    for (label, proxy_args) in fleets {
        let dir = tempfile::Builder::new()
            .prefix("sallyport-bench-flood-")
            .tempdir()
            .map_err(DataplaneError::io("creating a temporary directory"))?;
        let options = FleetOptions {
            backend_workers: args.backend_workers,
            chunk_kib: 64,
            log_filter: args.log_filter.clone(),
            tunnels: 2,
            proxy_args: proxy_args.iter().map(|a| (*a).to_owned()).collect(),
            authenticated_app: false,
        };
        runtime.block_on(async {
            let mut fleet = Fleet::start(dir.path(), &binaries, &options).await?;
            let link = Link::to(&fleet)?;
            eprintln!("flood: users alone ({label})");
            let before = CpuSnapshot::take(&fleet)?;
            let users = legitimate_users(args, &link).await;
            fleet.check_running()?;
            let after = CpuSnapshot::take(&fleet)?;
            phases.push(Phase {
                name: format!("users alone, {label}"),
                users,
                flood: None,
                cpu: before.until(&after, cpus),
            });
            eprintln!("flood: users and flood ({label})");
            let before = CpuSnapshot::take(&fleet)?;
            let flood = start_flood(args, link.clone());
            let users = legitimate_users(args, &link).await;
            let flood = flood.join().map_err(|_| DataplaneError::Client {
                what: "the flood thread".to_owned(),
                message: "panicked".to_owned(),
            })??;
            fleet.check_running()?;
            let after = CpuSnapshot::take(&fleet)?;
            phases.push(Phase {
                name: format!("users and flood, {label}"),
                users,
                flood: Some(flood),
                cpu: before.until(&after, cpus),
            });
            Ok::<_, DataplaneError>(())
        })?;
    }
    Ok(FloodReport {
        machine: Machine::here(),
        duration_s: args.duration,
        users: args.users,
        user_mode: args.user_mode,
        user_rate: (args.user_mode == UserMode::Fixed).then_some(args.user_rate),
        flood_addresses: args.flood_addresses,
        flood_connections: args.flood_connections,
        phases,
    })
}

/// How users and flooders reach the app through the proxy: TLS trusting the app's
/// certificate, SNI and `Host` the app's.
#[derive(Clone)]
struct Link {
    proxy: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    host: HeaderValue,
}

impl Link {
    fn to(fleet: &Fleet) -> Result<Self, DataplaneError> {
        let Target::Proxy { tls, port, .. } = fleet.via_proxy.clone() else {
            return Err(DataplaneError::Client {
                what: "the flood".to_owned(),
                message: "needs the proxy target".to_owned(),
            });
        };
        Ok(Self {
            proxy: fleet.proxy_address,
            tls: tokio_rustls::TlsConnector::from(tls),
            name: ServerName::try_from(APP_HOST.to_owned())
                .map_err(DataplaneError::client("the app's host name"))?,
            host: HeaderValue::try_from(format!("{APP_HOST}:{port}"))
                .map_err(DataplaneError::client("the app's Host header"))?,
        })
    }

    /// One HTTP/1.1 connection from `from` (TCP, TLS, handshake).
    async fn open(&self, from: IpAddr) -> std::io::Result<SendRequest<Empty<Bytes>>> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(from, 0))?;
        let tcp = socket.connect(self.proxy).await?;
        let _ = tcp.set_nodelay(true);
        let stream = self.tls.connect(self.name.clone(), tcp).await?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// `GET /` on `sender`: the status and the body.
    async fn get(
        &self,
        sender: &mut SendRequest<Empty<Bytes>>,
    ) -> Result<(StatusCode, Bytes), hyper::Error> {
        sender.ready().await?;
        // GET / (the defaults of a request).
        let mut request = Request::new(Empty::new());
        request
            .headers_mut()
            .insert(http::header::HOST, self.host.clone());
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// What one user got.
#[derive(Default)]
struct UserOutcome {
    sent: u64,
    ok: u64,
    failed: BTreeMap<String, u64>,
    unfinished: u64,
    latencies: Vec<Duration>,
}

impl UserOutcome {
    fn fail(&mut self, kind: impl Into<String>) {
        self.sent += 1;
        *self.failed.entry(kind.into()).or_default() += 1;
    }
}

/// The legitimate users for `--duration`: what they got.
async fn legitimate_users(args: &FloodArgs, link: &Link) -> UsersResult {
    let duration = Duration::from_secs(args.duration);
    let started = Instant::now();
    let deadline = started + duration;
    let pace = match args.user_mode {
        UserMode::Max => None,
        UserMode::Fixed => Some(Duration::from_secs_f64(1.0 / f64::from(args.user_rate))),
    };
    let tasks: Vec<_> = (0..args.users)
        .map(|index| {
            tokio::spawn(user(
                user_address(index),
                link.clone(),
                pace,
                tokio::time::Instant::from_std(deadline),
            ))
        })
        .collect();
    let mut result = UsersResult::default();
    let mut latencies = Vec::new();
    for task in tasks {
        let Ok(outcome) = task.await else { continue };
        result.sent += outcome.sent;
        result.ok += outcome.ok;
        result.unfinished += outcome.unfinished;
        for (kind, count) in outcome.failed {
            *result.failed.entry(kind).or_default() += count;
        }
        latencies.extend(outcome.latencies);
    }
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    result.ok_per_s = result.ok as f64 / seconds;
    result.ok_per_s_per_user = result.ok_per_s / f64::from(args.users);
    result.success_ratio = if result.sent == 0 {
        0.0
    } else {
        result.ok as f64 / result.sent as f64
    };
    result.p50_ms = stats::quantile(&latencies, 0.5).map_or(0.0, stats::millis);
    result.p99_ms = stats::quantile(&latencies, 0.99).map_or(0.0, stats::millis);
    result
}

/// One user from `from` on one keep-alive connection (reopened when it fails) until
/// `deadline`: back to back, or one request per `pace`.
async fn user(
    from: IpAddr,
    link: Link,
    pace: Option<Duration>,
    deadline: tokio::time::Instant,
) -> UserOutcome {
    let mut outcome = UserOutcome::default();
    let mut ticks = pace.map(|pace| {
        let mut ticks = tokio::time::interval(pace);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks
    });
    let mut connection = None;
    while tokio::time::Instant::now() < deadline {
        if let Some(ticks) = ticks.as_mut() {
            ticks.tick().await;
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        let within = deadline.min(tokio::time::Instant::now() + USER_TIMEOUT);
        let sender = match connection.as_mut() {
            Some(sender) => sender,
            None => match tokio::time::timeout_at(within, link.open(from)).await {
                Ok(Ok(sender)) => connection.insert(sender),
                Err(_) if tokio::time::Instant::now() >= deadline => break,
                Ok(Err(_)) | Err(_) => {
                    outcome.fail("connect");
                    if pace.is_none() {
                        // Not a tight loop of refused connections.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    continue;
                }
            },
        };
        let sent = Instant::now();
        match tokio::time::timeout_at(within, link.get(sender)).await {
            Ok(Ok((StatusCode::OK, body))) if body.as_ref() == SMALL_BODY => {
                outcome.sent += 1;
                outcome.ok += 1;
                outcome.latencies.push(sent.elapsed());
            }
            Ok(Ok((StatusCode::OK, _))) => outcome.fail("200 other body"),
            Ok(Ok((status, _))) => outcome.fail(status.as_u16().to_string()),
            Ok(Err(_)) => {
                outcome.fail("error");
                connection = None;
            }
            Err(_) if tokio::time::Instant::now() >= deadline => {
                outcome.unfinished += 1;
                break;
            }
            Err(_) => {
                outcome.fail("timeout");
                connection = None;
            }
        }
    }
    outcome
}

/// Starts the flood on its own thread for `--duration`; joins to what it got.
fn start_flood(
    args: &FloodArgs,
    link: Link,
) -> std::thread::JoinHandle<Result<FloodResult, DataplaneError>> {
    let args = args.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(DataplaneError::io("starting the flood's runtime"))?;
        runtime.block_on(async move {
            let duration = Duration::from_secs(args.duration);
            let started = Instant::now();
            let deadline = started + duration;
            let mut tasks = Vec::new();
            for address in 0..args.flood_addresses {
                let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + address));
                for _ in 0..args.flood_connections {
                    tasks.push(tokio::spawn(flood_connection(from, link.clone(), deadline)));
                }
            }
            let mut result = FloodResult::default();
            for task in tasks {
                let Ok(part) = task.await else { continue };
                result.answered += part.answered;
                result.connection_failures += part.connection_failures;
                for (status, count) in part.statuses {
                    *result.statuses.entry(status).or_default() += count;
                }
            }
            let seconds = started.elapsed().as_secs_f64().max(1e-9);
            result.answered_per_s = result.answered as f64 / seconds;
            result.served_per_s = result.statuses.get(&200).copied().unwrap_or(0) as f64 / seconds;
            Ok(result)
        })
    })
}

/// One flooding connection from `from`, reopened whenever it fails, until `deadline`.
async fn flood_connection(from: IpAddr, link: Link, deadline: Instant) -> FloodResult {
    let mut result = FloodResult::default();
    let until = tokio::time::Instant::from_std(deadline);
    while Instant::now() < deadline {
        let Ok(Ok(mut sender)) = tokio::time::timeout_at(until, link.open(from)).await else {
            result.connection_failures += 1;
            // Refused: try again shortly, as a flood would.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        while Instant::now() < deadline {
            match tokio::time::timeout_at(until, link.get(&mut sender)).await {
                Ok(Ok((status, _))) => {
                    result.answered += 1;
                    *result.statuses.entry(status.as_u16()).or_default() += 1;
                }
                Ok(Err(_)) => {
                    result.connection_failures += 1;
                    break;
                }
                Err(_) => return result,
            }
        }
    }
    result
}

impl FloodReport {
    /// Prints the phases as a Markdown table, then the report as one JSON line.
    pub fn write(&self, out: &mut impl Write) -> Result<(), DataplaneError> {
        let io = || DataplaneError::io("writing the report");
        writeln!(out, "Machine: {}\n", self.machine).map_err(io())?;
        let sending = match self.user_rate {
            Some(rate) => format!("{rate} req/s each"),
            None => "back to back (closed loop)".to_owned(),
        };
        writeln!(
            out,
            "Flood: {} users, one address each from 127.0.1.1, one keep-alive connection each, {sending}; flood from {} addresses (127.0.0.2..) x {} connections, back to back; {} s per phase\n",
            self.users, self.flood_addresses, self.flood_connections, self.duration_s
        )
        .map_err(io())?;
        writeln!(
            out,
            "| phase | users: ok req/s | per user | success | p50 ms | p99 ms | users' failures | flood: answers/s | flood: 200/s | flood answers by status | flood connection failures |"
        )
        .map_err(io())?;
        writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|").map_err(io())?;
        for phase in &self.phases {
            let users = &phase.users;
            let (answered, served, statuses, failures) = match &phase.flood {
                Some(flood) => (
                    format!("{:.0}", flood.answered_per_s),
                    format!("{:.0}", flood.served_per_s),
                    flood
                        .statuses
                        .iter()
                        .map(|(status, count)| format!("{status}: {count}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    flood.connection_failures.to_string(),
                ),
                None => ("-".into(), "-".into(), "-".into(), "-".into()),
            };
            let mut user_failures: Vec<String> = users
                .failed
                .iter()
                .map(|(what, count)| format!("{what}: {count}"))
                .collect();
            if users.unfinished > 0 {
                user_failures.push(format!("(unfinished at the end: {})", users.unfinished));
            }
            let user_failures = if user_failures.is_empty() {
                "none".to_owned()
            } else {
                user_failures.join(", ")
            };
            writeln!(
                out,
                "| {} | {:.1} | {:.1} | {:.2}% ({}/{}) | {:.1} | {:.1} | {} | {} | {} | {} | {} |",
                phase.name,
                users.ok_per_s,
                users.ok_per_s_per_user,
                users.success_ratio * 100.0,
                users.ok,
                users.sent,
                users.p50_ms,
                users.p99_ms,
                user_failures,
                answered,
                served,
                statuses,
                failures
            )
            .map_err(io())?;
        }
        writeln!(
            out,
            "\nCPU seconds during each phase (of {} available per phase):\n",
            self.phases.first().map_or_else(
                || "-".to_owned(),
                |phase| format!("{:.0}", phase.cpu.available)
            )
        )
        .map_err(io())?;
        writeln!(
            out,
            "| phase | proxy | connector | backend | clients (users + flood, this process) | whole machine |"
        )
        .map_err(io())?;
        writeln!(out, "|---|---|---|---|---|---|").map_err(io())?;
        for phase in &self.phases {
            let cpu = &phase.cpu;
            writeln!(
                out,
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                phase.name, cpu.proxy, cpu.connector, cpu.backend, cpu.clients, cpu.machine
            )
            .map_err(io())?;
        }
        let json = serde_json::to_string(self).map_err(|e| DataplaneError::Client {
            what: "encoding the report".to_owned(),
            message: e.to_string(),
        })?;
        writeln!(out, "\n{json}").map_err(io())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_have_addresses_of_their_own_clear_of_the_flood() {
        let addresses: Vec<IpAddr> = (0..1000).map(user_address).collect();
        let mut unique = addresses.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), addresses.len());
        assert_eq!(addresses[0], IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1)));
        assert_eq!(addresses[250], IpAddr::V4(Ipv4Addr::new(127, 0, 2, 1)));
        assert_eq!(addresses[999], IpAddr::V4(Ipv4Addr::new(127, 0, 4, 250)));
        assert!(addresses.iter().all(|address| match address {
            IpAddr::V4(v4) => v4.octets()[2] >= 1 && v4.octets()[3] >= 1,
            IpAddr::V6(_) => false,
        }));
    }
}
