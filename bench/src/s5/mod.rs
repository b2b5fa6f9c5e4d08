//! S5 of the performance design: connectors starting, dying and draining under load, and
//! a mass cancellation.
//!
//! The system under test is the data-plane benchmark's ([`crate::dataplane::fleet`]): a
//! backend, `sallyport-proxy run` standalone, and connectors of the one group started
//! here as processes (`sallyport-connector run`, a state directory each, JSON logs). The
//! proxy's per-client limits are off (all users come from loopback). Per round:
//!
//! 1. **First response.** No connector runs. A connector starts with an empty state
//!    directory (it registers), and users already connected to the proxy ask `GET /`
//!    every `--poll-ms` (the proxy holds a request up to `--wait-for-tunnel` for a tunnel,
//!    so the first 200 comes as soon as one is up): spawn to first 200, to the
//!    connector's `dialling the fleet` (what it spent before it could connect), to the
//!    proxy's `tunnel opened`. It is killed, and started again on the same directory (a
//!    restart: the normal case), measured the same way.
//! 2. **Failover.** A second connector joins; `--connections` users send small GETs back
//!    to back; one connector gets SIGKILL: how many requests failed, from the first
//!    failure to the last, and from the kill until new requests succeed.
//! 3. **Drain.** The same with SIGTERM: failed requests (goal: none) and the drain time
//!    (SIGTERM to exit).
//! 4. **Mass cancellation.** `--cancel-requests` requests to the backend's `/slow/MS` on
//!    `--cancel-connections` HTTP/2 connections, all dropped at once: once every request
//!    reached the backend, and again right after sending (streams the connector may not
//!    have accepted yet, the case of h2's `max_pending_accept_reset_streams`). Tunnel
//!    teardowns are counted in the proxy's and the connectors' logs (tunnels ended,
//!    GOAWAY) and the proxy's `sallyport_proxy_tunnels_open`; requests right after must
//!    still succeed.
//!
//! Everything is bounded: every wait, every request ([`load::REQUEST_TIMEOUT`]), the
//! load phases by `--load-before-ms` and `--load-after-ms`. It measures and reports;
//! nothing is asserted about timing.

pub mod load;
pub mod observe;
pub mod report;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use clap::Args;

use crate::dataplane::DataplaneError;
use crate::dataplane::backend::{INFLIGHT_PATH, SLOW_PATH};
use crate::dataplane::fleet::{BinaryArgs, Fleet, FleetOptions};
use crate::dataplane::process::ChildProcess;
use crate::machine::Machine;
use crate::stats;
use load::{FailureWindow, Link, Load};
use observe::{TunnelEvents, first_after, read_log, tunnel_events, wait_for_tunnels};
pub use report::S5Report;
use report::{CancelRound, DrainRound, FailoverRound, Settings, StartRound};

/// The proxy's per-client and in-flight limits, off: every user is on loopback.
pub const LIMITS_OFF: [&str; 6] = [
    "--client-requests-per-second",
    "0",
    "--max-requests-in-flight",
    "0",
    "--max-connections-per-client",
    "0",
];

/// The default `RUST_LOG` of S5: warnings, and the tunnel events it counts.
const LOG_FILTER: &str =
    "warn,sallyport_proxy::serve=info,sallyport_tunnel=info,sallyport_connector=info";

/// Options of `sallyport-bench s5`.
#[derive(Clone, Debug, Args)]
pub struct S5Args {
    /// Rounds; each measures every part once.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub rounds: u32,

    /// Failover and drain: users, each on its keep-alive connection, sending small GETs
    /// back to back.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub connections: u32,

    /// Failover and drain: milliseconds of load before the kill or SIGTERM.
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub load_before_ms: u64,

    /// Failover and drain: milliseconds of load after the kill, or after the drained
    /// connector exited.
    #[arg(long, value_name = "MS", default_value_t = 3000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub load_after_ms: u64,

    /// First response: users polling, each on its connection.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub pollers: u32,

    /// First response: milliseconds between a user's answer (not 200) and its next request.
    #[arg(long, value_name = "MS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub poll_ms: u64,

    /// Mass cancellation: requests in flight, cancelled at once.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub cancel_requests: u32,

    /// Mass cancellation: HTTP/2 connections carrying them (the proxy allows 250 streams
    /// on one).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=200))]
    pub cancel_connections: u32,

    /// Mass cancellation: how long the backend would take to answer, milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1_000..=600_000))]
    pub slow_ms: u64,

    /// `--tunnels-per-replica` of every connector.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub tunnels: u16,

    /// Worker threads of the backend.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub backend_workers: u16,

    /// `RUST_LOG` of the proxy and the connectors (the tunnel events S5 counts are logged
    /// at info).
    #[arg(long, value_name = "FILTER", default_value = LOG_FILTER)]
    pub log_filter: String,

    /// Where the proxy and connector executables are.
    #[command(flatten)]
    pub binaries: BinaryArgs,
}

/// Bound on a connector's start or a tunnel count to settle.
const SETTLE_WITHIN: Duration = Duration::from_secs(30);

/// Runs the rounds and returns what they measured.
pub fn run(args: &S5Args) -> Result<S5Report, DataplaneError> {
    let binaries = args.binaries.locate()?;
    // The children are started from this thread, which outlives them.
    let runtime = crate::dataplane::single_thread_runtime()?;
    let dir = tempfile::Builder::new()
        .prefix("sallyport-bench-s5-")
        .tempdir()
        .map_err(DataplaneError::io("creating a temporary directory"))?;
    let mut proxy_args: Vec<String> = LIMITS_OFF.iter().map(|a| (*a).to_owned()).collect();
    proxy_args.extend(["--log-format".to_owned(), "json".to_owned()]);
    let options = FleetOptions {
        backend_workers: args.backend_workers,
        chunk_kib: 64,
        log_filter: args.log_filter.clone(),
        tunnels: args.tunnels,
        proxy_args,
        authenticated_app: false,
    };
    let mut report = S5Report {
        machine: Machine::here(),
        settings: Settings {
            rounds: args.rounds,
            connections: args.connections,
            load_before_ms: args.load_before_ms,
            load_after_ms: args.load_after_ms,
            pollers: args.pollers,
            poll_ms: args.poll_ms,
            cancel_requests: args.cancel_requests,
            cancel_connections: args.cancel_connections,
            slow_ms: args.slow_ms,
            tunnels_per_connector: args.tunnels,
        },
        registration: Vec::new(),
        restart: Vec::new(),
        failover: Vec::new(),
        drain: Vec::new(),
        cancel: Vec::new(),
    };
    runtime.block_on(async {
        let mut fleet = Fleet::start(dir.path(), &binaries, &options).await?;
        let link = Link::to(&fleet)?;
        let mut run = Run {
            args,
            dir: dir.path().to_owned(),
            tunnels: u64::from(args.tunnels),
            connector_logs: Vec::new(),
            starts: 0,
        };
        // The fleet's own connector makes way for the ones measured here.
        fleet.connector.kill()?;
        fleet.connector.wait_exit(Duration::from_secs(10)).await?;
        wait_for_tunnels(fleet.probe_address, 0, SETTLE_WITHIN).await?;
        let b_state = run.dir.join("b-state");
        for round in 1..=args.rounds {
            eprintln!(
                "s5: round {round}/{}: first response after a connector's start",
                args.rounds
            );
            let a_state = run.dir.join(format!("a-state-{round}"));
            let (registration, mut a) = run
                .first_response(&fleet, &link, &a_state, "registration")
                .await?;
            report.registration.push(registration);
            a.kill()?;
            a.wait_exit(Duration::from_secs(10)).await?;
            wait_for_tunnels(fleet.probe_address, 0, SETTLE_WITHIN).await?;
            let (restart, mut a) = run
                .first_response(&fleet, &link, &a_state, "restart")
                .await?;
            report.restart.push(restart);

            let mut b = run.start_connector(&fleet, "connector-b", &b_state)?;
            wait_for_tunnels(fleet.probe_address, 2 * run.tunnels, SETTLE_WITHIN).await?;

            eprintln!("s5: round {round}: failover (SIGKILL under load)");
            report
                .failover
                .push(run.failover(&fleet, &link, &mut a).await?);
            let mut a = run.start_connector(&fleet, "connector-a", &a_state)?;
            wait_for_tunnels(fleet.probe_address, 2 * run.tunnels, SETTLE_WITHIN).await?;

            eprintln!("s5: round {round}: graceful drain (SIGTERM under load)");
            report.drain.push(run.drain(&link, &mut a).await?);
            let mut a = run.start_connector(&fleet, "connector-a", &a_state)?;
            wait_for_tunnels(fleet.probe_address, 2 * run.tunnels, SETTLE_WITHIN).await?;

            for at_backend in [true, false] {
                eprintln!(
                    "s5: round {round}: mass cancellation of {} requests ({})",
                    args.cancel_requests,
                    if at_backend {
                        "all at the backend"
                    } else {
                        "right after sending"
                    }
                );
                report
                    .cancel
                    .push(run.mass_cancel(&fleet, &link, at_backend).await?);
            }
            fleet.backend.check_running()?;
            fleet.proxy.check_running()?;
            for connector in [&mut a, &mut b] {
                connector.check_running()?;
                connector.kill()?;
                connector.wait_exit(Duration::from_secs(10)).await?;
            }
            wait_for_tunnels(fleet.probe_address, 0, SETTLE_WITHIN).await?;
        }
        Ok::<_, DataplaneError>(())
    })?;
    Ok(report)
}

/// State of a run: where the connectors' logs are.
struct Run<'a> {
    args: &'a S5Args,
    dir: PathBuf,
    tunnels: u64,
    connector_logs: Vec<PathBuf>,
    starts: u32,
}

impl Run<'_> {
    /// Starts a connector on `state_dir`, logging JSON to a new file.
    fn start_connector(
        &mut self,
        fleet: &Fleet,
        name: &'static str,
        state_dir: &Path,
    ) -> Result<ChildProcess, DataplaneError> {
        self.starts += 1;
        let log = self.dir.join(format!("{name}-{}.log", self.starts));
        self.connector_logs.push(log.clone());
        fleet.connector_launch.start(
            name,
            state_dir,
            &log,
            &["--log-format".to_owned(), "json".to_owned()],
        )
    }

    /// Starts connector A on `state_dir` with users polling: when the first 200 came,
    /// and what the logs say about the time before.
    async fn first_response(
        &mut self,
        fleet: &Fleet,
        link: &Link,
        state_dir: &Path,
        kind: &'static str,
    ) -> Result<(StartRound, ChildProcess), DataplaneError> {
        let mut senders = Vec::new();
        for _ in 0..self.args.pollers {
            senders.push(
                tokio::time::timeout(load::REQUEST_TIMEOUT, link.open())
                    .await
                    .map_err(|_| DataplaneError::Timeout {
                        what: "a poller's connection to the proxy".to_owned(),
                        waited: load::REQUEST_TIMEOUT,
                        last: None,
                    })?
                    .map_err(DataplaneError::client("a poller's connection to the proxy"))?,
            );
        }
        let pollers = self.args.pollers;
        let poll = Duration::from_millis(self.args.poll_ms);
        let spawned_wall = SystemTime::now();
        let spawned = Instant::now();
        let child = self.start_connector(fleet, "connector-a", state_dir)?;
        let log = self.connector_logs.last().cloned().unwrap_or_default();
        let tasks: Vec<_> = senders
            .into_iter()
            .enumerate()
            .map(|(index, mut sender)| {
                let link = link.clone();
                tokio::spawn(async move {
                    // Staggered: together the pollers ask every poll / pollers.
                    tokio::time::sleep(poll * index as u32 / pollers).await;
                    let deadline = Instant::now() + SETTLE_WITHIN;
                    while Instant::now() < deadline {
                        match tokio::time::timeout(load::REQUEST_TIMEOUT, link.get_ok(&mut sender))
                            .await
                        {
                            Ok(Ok(true)) => return Some(Instant::now()),
                            Ok(Ok(false)) => {}
                            Ok(Err(_)) | Err(_) => match link.open().await {
                                Ok(fresh) => sender = fresh,
                                Err(_) => tokio::time::sleep(poll).await,
                            },
                        }
                        tokio::time::sleep(poll).await;
                    }
                    None
                })
            })
            .collect();
        let mut first = None;
        for task in tasks {
            if let Ok(Some(at)) = task.await {
                first = Some(first.map_or(at, |earlier: Instant| earlier.min(at)));
            }
        }
        let Some(first) = first else {
            return Err(DataplaneError::Timeout {
                what: format!("a 200 through the proxy after the connector's start ({kind})"),
                waited: SETTLE_WITHIN,
                last: None,
            });
        };
        let connector_lines = read_log(&log);
        let proxy_lines = read_log(fleet.proxy.log());
        let ms = |at: Option<Duration>| at.map(stats::millis);
        let round = StartRound {
            kind,
            first_ok_ms: stats::millis(first - spawned),
            first_log_ms: ms(connector_lines
                .iter()
                .filter_map(|line| line.at.duration_since(spawned_wall).ok())
                .min()),
            credentials_ms: ms(first_after(
                &connector_lines,
                spawned_wall,
                &["registered", "using the saved registration"],
            )),
            dialling_ms: ms(first_after(
                &connector_lines,
                spawned_wall,
                &["dialling the fleet"],
            )),
            connector_tunnel_up_ms: ms(first_after(&connector_lines, spawned_wall, &["tunnel up"])),
            proxy_tunnel_opened_ms: ms(first_after(&proxy_lines, spawned_wall, &["tunnel opened"])),
        };
        eprintln!(
            "s5:   {kind}: first 200 after {:.1} ms (dialling at {:?} ms, proxy's tunnel opened at {:?} ms)",
            round.first_ok_ms, round.dialling_ms, round.proxy_tunnel_opened_ms
        );
        Ok((round, child))
    }

    /// Load, SIGKILL to `victim`, load: what the users saw.
    async fn failover(
        &mut self,
        fleet: &Fleet,
        link: &Link,
        victim: &mut ChildProcess,
    ) -> Result<FailoverRound, DataplaneError> {
        let proxy_before = tunnel_events(&[fleet.proxy.log()]);
        let load = Load::start(link, self.args.connections);
        tokio::time::sleep(Duration::from_millis(self.args.load_before_ms)).await;
        let event = load.started.elapsed();
        victim.kill()?;
        let proxy_noticed =
            wait_for_tunnels(fleet.probe_address, self.tunnels, Duration::from_secs(10))
                .await
                .ok();
        tokio::time::sleep(
            Duration::from_millis(self.args.load_after_ms)
                .saturating_sub(load.started.elapsed() - event),
        )
        .await;
        let samples = load.stop().await;
        victim.wait_exit(Duration::from_secs(10)).await?;
        let window = FailureWindow::of(&samples, event);
        eprintln!(
            "s5:   {} of {} requests failed; new requests succeed {:?} ms after the kill",
            window.failed, window.requests, window.new_requests_succeed_ms
        );
        Ok(FailoverRound {
            window,
            proxy_noticed_ms: proxy_noticed.map(stats::millis),
            proxy_events: tunnel_events(&[fleet.proxy.log()]).since(&proxy_before),
        })
    }

    /// Load, SIGTERM to `victim`, load until it exited and a while after.
    async fn drain(
        &mut self,
        link: &Link,
        victim: &mut ChildProcess,
    ) -> Result<DrainRound, DataplaneError> {
        let load = Load::start(link, self.args.connections);
        tokio::time::sleep(Duration::from_millis(self.args.load_before_ms)).await;
        let event = load.started.elapsed();
        let terminated = Instant::now();
        victim.terminate()?;
        // The connector's --drain-timeout is 30 s by default.
        let status = victim.wait_exit(Duration::from_secs(60)).await?;
        let drain = terminated.elapsed();
        tokio::time::sleep(Duration::from_millis(self.args.load_after_ms)).await;
        let samples = load.stop().await;
        let Some(status) = status else {
            return Err(DataplaneError::Timeout {
                what: "the drained connector's exit".to_owned(),
                waited: Duration::from_secs(60),
                last: None,
            });
        };
        let window = FailureWindow::of(&samples, event);
        eprintln!(
            "s5:   {} of {} requests failed; drained in {:.0} ms ({status})",
            window.failed,
            window.requests,
            stats::millis(drain)
        );
        Ok(DrainRound {
            window,
            drain_ms: stats::millis(drain),
            exit_status: status.to_string(),
        })
    }

    /// `--cancel-requests` slow requests on HTTP/2 connections, all dropped at once;
    /// tunnel events before and after, and whether requests still succeed.
    async fn mass_cancel(
        &mut self,
        fleet: &Fleet,
        link: &Link,
        at_backend: bool,
    ) -> Result<CancelRound, DataplaneError> {
        let args = self.args;
        let proxy_log = fleet.proxy.log().to_owned();
        let connector_logs: Vec<&Path> = self.connector_logs.iter().map(PathBuf::as_path).collect();
        let proxy_before = tunnel_events(&[&proxy_log]);
        let connectors_before = tunnel_events(&connector_logs);
        let tunnels_before = observe::tunnels_open(fleet.probe_address).await?;

        let mut connections = Vec::new();
        for index in 0..args.cancel_connections {
            let from = IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                5,
                u8::try_from(1 + index % 250).unwrap_or(1),
            ));
            let connection = tokio::time::timeout(load::REQUEST_TIMEOUT, link.open_h2(from))
                .await
                .map_err(|_| DataplaneError::Timeout {
                    what: "an HTTP/2 connection to the proxy".to_owned(),
                    waited: load::REQUEST_TIMEOUT,
                    last: None,
                })?
                .map_err(DataplaneError::client("an HTTP/2 connection to the proxy"))?;
            connections.push(connection);
        }
        let path = format!("{SLOW_PATH}{}", args.slow_ms);
        let mut requests = Vec::new();
        for index in 0..args.cancel_requests {
            let Some((sender, _)) = connections.get(index as usize % connections.len()) else {
                break;
            };
            let mut sender = sender.clone();
            let request = link.request_h2(&path);
            requests.push(tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    let _ = sender.send_request(request).await;
                }
            }));
        }
        let sent = Instant::now();
        let mut reached = None;
        if at_backend {
            let deadline = sent + SETTLE_WITHIN;
            while reached.is_none_or(|count| count < u64::from(args.cancel_requests))
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
                reached = backend_in_flight(fleet).await.ok().or(reached);
            }
        } else {
            // Let the requests go out (the streams open), then cancel at once.
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let cancelled = Instant::now();
        let sent_to_cancel = cancelled - sent;
        for request in &requests {
            request.abort();
        }
        for (_, task) in &connections {
            task.abort();
        }
        drop(requests);
        drop(connections);

        // Right after: do requests still succeed?
        let mut after_ok = 0;
        let mut after_failed = 0;
        let mut checkers = Vec::new();
        for _ in 0..4 {
            let link = link.clone();
            checkers.push(tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut sender = None;
                for _ in 0..25 {
                    if sender.is_none() {
                        sender = tokio::time::timeout(load::REQUEST_TIMEOUT, link.open())
                            .await
                            .ok()
                            .and_then(Result::ok);
                    }
                    let Some(connection) = sender.as_mut() else {
                        failed += 1;
                        continue;
                    };
                    match tokio::time::timeout(load::REQUEST_TIMEOUT, link.get_ok(connection)).await
                    {
                        Ok(Ok(true)) => ok += 1,
                        Ok(Ok(false)) => failed += 1,
                        Ok(Err(_)) | Err(_) => {
                            failed += 1;
                            sender = None;
                        }
                    }
                }
                (ok, failed)
            }));
        }
        for checker in checkers {
            if let Ok((ok, failed)) = checker.await {
                after_ok += ok;
                after_failed += failed;
            }
        }
        // Until the backend saw every request go.
        let mut backend_released = None;
        let deadline = cancelled + Duration::from_secs(15);
        while Instant::now() < deadline {
            if backend_in_flight(fleet).await.is_ok_and(|count| count == 0) {
                backend_released = Some(cancelled.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Let late tunnel events reach the logs.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let tunnels_after = observe::tunnels_open(fleet.probe_address).await?;
        let proxy_events = tunnel_events(&[&proxy_log]).since(&proxy_before);
        let connector_events = tunnel_events(&connector_logs).since(&connectors_before);
        let round = CancelRound {
            mode: if at_backend {
                "all at the backend"
            } else {
                "right after sending"
            },
            requests: args.cancel_requests,
            at_backend_when_cancelled: reached,
            sent_to_cancel_ms: stats::millis(sent_to_cancel),
            backend_released_ms: backend_released.map(stats::millis),
            after_ok,
            after_failed,
            tunnels_before,
            tunnels_after,
            proxy_events,
            connector_events,
        };
        eprintln!(
            "s5:   {:?} at the backend when cancelled; teardowns: proxy {}, connectors {}; tunnels {} -> {}; after: {} ok, {} failed",
            round.at_backend_when_cancelled,
            proxy_events.ended,
            connector_events.ended,
            tunnels_before,
            tunnels_after,
            after_ok,
            after_failed
        );
        Ok(round)
    }
}

/// The backend's count of `/slow` requests waiting.
async fn backend_in_flight(fleet: &Fleet) -> Result<u64, DataplaneError> {
    let mut connection = fleet.direct.connect().await?;
    let answer = connection
        .get(INFLIGHT_PATH, Duration::from_secs(5))
        .await?;
    answer
        .head
        .trim()
        .parse()
        .map_err(DataplaneError::client("the backend's in-flight count"))
}

/// Zero tunnel events.
pub fn no_teardown(events: &TunnelEvents) -> bool {
    events.ended == 0 && events.goaway == 0
}
