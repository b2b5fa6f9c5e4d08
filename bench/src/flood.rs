//! Flood: legitimate users next to a request flood, through the proxy's abuse limits.
//!
//! The system under test is the data-plane benchmark's ([`crate::dataplane::fleet`]):
//! a backend, `sallyport-proxy run` standalone and `sallyport-connector run`, on
//! loopback. Legitimate traffic comes from 127.0.0.1: `--users` users, each on one
//! keep-alive connection sending a small GET every `1 / --user-rate` seconds (a user
//! with think time, under the default 100 requests per second per address). The flood
//! comes from `--flood-addresses` other addresses (127.0.0.2 onwards), each with
//! `--flood-connections` connections sending GETs back to back, as fast as answers come,
//! ignoring `Retry-After`, reconnecting when closed.
//!
//! Phases of `--duration` seconds each: the users alone, then users and flood, against
//! the proxy with its default limits; then (unless `--skip-unprotected`) users and flood
//! against a proxy with the per-client rate, in-flight and connection caps turned off.
//! The users' served requests per second, success ratio and latency are reported with
//! what the flood got (answers by status, connection failures). The flood runs on its
//! own thread (its own runtime), so that the users' client is not queued behind it.
//!
//! It measures and reports; nothing is asserted about timing.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpSocket;

use crate::dataplane::DataplaneError;
use crate::dataplane::client::Target;
use crate::dataplane::fleet::{APP_HOST, Binaries, Fleet, FleetOptions};
use crate::machine::Machine;

/// Options of `sallyport-bench flood`.
#[derive(Clone, Debug, Args)]
pub struct FloodArgs {
    /// Seconds of each phase.
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub duration: u64,

    /// Legitimate users on 127.0.0.1, one keep-alive connection each.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub users: u32,

    /// Requests per second of each legitimate user.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub user_rate: u32,

    /// Flooding addresses: 127.0.0.2 onwards.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(1..=200))]
    pub flood_addresses: u8,

    /// Connections per flooding address, each sending requests back to back.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub flood_connections: u32,

    /// Skip the phase against a proxy without per-client and in-flight limits.
    #[arg(long)]
    pub skip_unprotected: bool,

    /// Worker threads of the backend.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub backend_workers: u16,

    /// `RUST_LOG` of the proxy and the connector.
    #[arg(long, value_name = "FILTER", default_value = "warn")]
    pub log_filter: String,

    /// The `sallyport-proxy` executable (default: next to this one).
    #[arg(long, value_name = "PATH", env = "SALLYPORT_BENCH_PROXY_BIN")]
    pub proxy_bin: Option<PathBuf>,

    /// The `sallyport-connector` executable (default: next to this one).
    #[arg(long, value_name = "PATH", env = "SALLYPORT_BENCH_CONNECTOR_BIN")]
    pub connector_bin: Option<PathBuf>,
}

/// What the legitimate users got in one phase.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UsersResult {
    /// Requests sent.
    pub sent: u64,
    /// Answered 200 with the backend's body.
    pub ok: u64,
    /// Answers by status (other than 200), and `error` for failed exchanges.
    pub failed: BTreeMap<String, u64>,
    /// `ok` per second of the phase.
    pub ok_per_s: f64,
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
}

/// The run.
#[derive(Clone, Debug, Serialize)]
pub struct FloodReport {
    /// Where it ran.
    pub machine: Machine,
    /// Seconds per phase.
    pub duration_s: u64,
    /// Users and their rate.
    pub users: u32,
    /// Requests per second per user.
    pub user_rate: u32,
    /// Flooding addresses.
    pub flood_addresses: u8,
    /// Connections per flooding address.
    pub flood_connections: u32,
    /// The phases in order.
    pub phases: Vec<Phase>,
}

/// The flags of the proxy without request limits (the unprotected phase).
const UNPROTECTED: [&str; 6] = [
    "--client-requests-per-second",
    "0",
    "--max-requests-in-flight",
    "0",
    "--max-connections-per-client",
    "0",
];

fn locate(explicit: Option<&PathBuf>, name: &'static str) -> Result<PathBuf, DataplaneError> {
    let bench = std::env::current_exe().map_err(DataplaneError::io("finding this executable"))?;
    let path = explicit.cloned().unwrap_or_else(|| {
        bench
            .parent()
            .map(|dir| dir.join(name))
            .unwrap_or_else(|| PathBuf::from(name))
    });
    if path.is_file() {
        Ok(path)
    } else {
        Err(DataplaneError::BinaryNotFound {
            name,
            path,
            hint: "build the workspace binaries first (`cargo build --release --workspace --bins`, which `make bench-flood` runs), or pass its path",
        })
    }
}

/// Runs the phases and returns what they measured.
pub fn run(args: &FloodArgs) -> Result<FloodReport, DataplaneError> {
    let binaries = Binaries {
        proxy: locate(args.proxy_bin.as_ref(), "sallyport-proxy")?,
        connector: locate(args.connector_bin.as_ref(), "sallyport-connector")?,
        bench: std::env::current_exe().map_err(DataplaneError::io("finding this executable"))?,
    };
    // The children are started from this thread, which outlives them.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DataplaneError::io("starting the async runtime"))?;
    let mut phases = Vec::new();
    let protected: &[&str] = &[];
    let fleets: &[(&str, &[&str])] = if args.skip_unprotected {
        &[("default limits", protected)]
    } else {
        &[("default limits", protected), ("limits off", &UNPROTECTED)]
    };
    for (index, (label, proxy_args)) in fleets.iter().enumerate() {
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
        };
        runtime.block_on(async {
            let mut fleet = Fleet::start(dir.path(), &binaries, &options).await?;
            if index == 0 {
                eprintln!("flood: users alone ({label})");
                let users = users(args, &fleet.via_proxy).await;
                phases.push(Phase {
                    name: format!("users alone, {label}"),
                    users,
                    flood: None,
                });
            }
            eprintln!("flood: users and flood ({label})");
            let flood = start_flood(args, &fleet)?;
            let users = users(args, &fleet.via_proxy).await;
            let flood = flood.join().map_err(|_| DataplaneError::Client {
                what: "the flood thread".to_owned(),
                message: "panicked".to_owned(),
            })??;
            fleet.check_running()?;
            phases.push(Phase {
                name: format!("users and flood, {label}"),
                users,
                flood: Some(flood),
            });
            Ok::<_, DataplaneError>(())
        })?;
    }
    Ok(FloodReport {
        machine: Machine::here(),
        duration_s: args.duration,
        users: args.users,
        user_rate: args.user_rate,
        flood_addresses: args.flood_addresses,
        flood_connections: args.flood_connections,
        phases,
    })
}

/// The legitimate users for `--duration`: what they got.
async fn users(args: &FloodArgs, target: &Target) -> UsersResult {
    let duration = Duration::from_secs(args.duration);
    let started = Instant::now();
    let deadline = started + duration;
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.user_rate));
    let tasks: Vec<_> = (0..args.users)
        .map(|_| {
            let target = target.clone();
            tokio::spawn(async move {
                let mut outcomes: Vec<Result<(StatusCode, bool, Duration), ()>> = Vec::new();
                let mut connection = None;
                let mut ticks = tokio::time::interval(interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while Instant::now() < deadline {
                    ticks.tick().await;
                    if connection.is_none() {
                        connection = target.connect().await.ok();
                    }
                    let Some(open) = connection.as_mut() else {
                        outcomes.push(Err(()));
                        continue;
                    };
                    match open.get("/", Duration::from_secs(10)).await {
                        Ok(answer) => outcomes.push(Ok((
                            answer.status,
                            answer.head.as_bytes() == crate::dataplane::backend::SMALL_BODY,
                            answer.elapsed,
                        ))),
                        Err(_) => {
                            connection = None;
                            outcomes.push(Err(()));
                        }
                    }
                }
                outcomes
            })
        })
        .collect();
    let mut result = UsersResult::default();
    let mut latencies = Vec::new();
    for task in tasks {
        let Ok(outcomes) = task.await else { continue };
        for outcome in outcomes {
            result.sent += 1;
            match outcome {
                Ok((StatusCode::OK, true, elapsed)) => {
                    result.ok += 1;
                    latencies.push(elapsed.as_secs_f64() * 1000.0);
                }
                Ok((status, _, _)) => {
                    *result
                        .failed
                        .entry(status.as_u16().to_string())
                        .or_default() += 1
                }
                Err(()) => *result.failed.entry("error".to_owned()).or_default() += 1,
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    result.ok_per_s = result.ok as f64 / seconds;
    result.success_ratio = if result.sent == 0 {
        0.0
    } else {
        result.ok as f64 / result.sent as f64
    };
    latencies.sort_by(f64::total_cmp);
    let percentile = |p: f64| {
        let index = ((latencies.len() as f64 - 1.0) * p).round().max(0.0) as usize;
        latencies.get(index).copied().unwrap_or(0.0)
    };
    result.p50_ms = percentile(0.5);
    result.p99_ms = percentile(0.99);
    result
}

/// Starts the flood on its own thread for `--duration`; joins to what it got.
fn start_flood(
    args: &FloodArgs,
    fleet: &Fleet,
) -> Result<std::thread::JoinHandle<Result<FloodResult, DataplaneError>>, DataplaneError> {
    let Target::Proxy { tls, port, .. } = fleet.via_proxy.clone() else {
        return Err(DataplaneError::Client {
            what: "the flood".to_owned(),
            message: "needs the proxy target".to_owned(),
        });
    };
    let proxy = fleet.proxy_address;
    let args = args.clone();
    Ok(std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(DataplaneError::io("starting the flood's runtime"))?;
        runtime.block_on(async move {
            let duration = Duration::from_secs(args.duration);
            let started = Instant::now();
            let deadline = started + duration;
            let connector = tokio_rustls::TlsConnector::from(tls);
            let host = format!("{APP_HOST}:{port}");
            let mut tasks = Vec::new();
            for address in 0..args.flood_addresses {
                let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + address));
                for _ in 0..args.flood_connections {
                    tasks.push(tokio::spawn(flood_connection(
                        from,
                        proxy,
                        connector.clone(),
                        host.clone(),
                        deadline,
                    )));
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
    }))
}

/// One flooding connection from `from`, reopened whenever it fails, until `deadline`.
async fn flood_connection(
    from: IpAddr,
    proxy: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    host: String,
    deadline: Instant,
) -> FloodResult {
    let mut result = FloodResult::default();
    let Ok(name) = ServerName::try_from(APP_HOST.to_owned()) else {
        return result;
    };
    let until = tokio::time::Instant::from_std(deadline);
    while Instant::now() < deadline {
        let open = async {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(from, 0))?;
            let tcp = socket.connect(proxy).await?;
            let _ = tcp.set_nodelay(true);
            let stream = tls.connect(name.clone(), tcp).await?;
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)
        };
        let Ok(Ok((mut sender, connection))) = tokio::time::timeout_at(until, open).await else {
            result.connection_failures += 1;
            // Refused: try again shortly, as a flood would.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(connection);
        while Instant::now() < deadline {
            let Ok(request) = Request::get("/")
                .header(http::header::HOST, host.as_str())
                .body(Empty::new())
            else {
                return result;
            };
            let exchange = async {
                let response = sender.send_request(request).await?;
                let status = response.status();
                response.into_body().collect().await?;
                Ok::<_, hyper::Error>(status)
            };
            match tokio::time::timeout_at(until, exchange).await {
                Ok(Ok(status)) => {
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
        writeln!(
            out,
            "Flood: {} users x {} req/s from 127.0.0.1; flood from {} addresses x {} connections, back to back; {} s per phase\n",
            self.users, self.user_rate, self.flood_addresses, self.flood_connections, self.duration_s
        )
        .map_err(io())?;
        writeln!(
            out,
            "| phase | users: ok req/s | success | p50 ms | p99 ms | users' failures | flood: answers/s | flood: 200/s | flood answers by status | flood connection failures |"
        )
        .map_err(io())?;
        writeln!(out, "|---|---|---|---|---|---|---|---|---|---|").map_err(io())?;
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
            let user_failures = if users.failed.is_empty() {
                "none".to_owned()
            } else {
                users
                    .failed
                    .iter()
                    .map(|(what, count)| format!("{what}: {count}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            writeln!(
                out,
                "| {} | {:.1} | {:.2}% ({}/{}) | {:.1} | {:.1} | {} | {} | {} | {} | {} |",
                phase.name,
                users.ok_per_s,
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
        let json = serde_json::to_string(self).map_err(|e| DataplaneError::Client {
            what: "encoding the report".to_owned(),
            message: e.to_string(),
        })?;
        writeln!(out, "\n{json}").map_err(io())?;
        Ok(())
    }
}
