//! S7 of the performance design: 1,000 connectors reconnecting at once. Goal: all
//! re-established within 2 s.
//!
//! The system under test is the data-plane benchmark's ([`crate::dataplane::fleet`]): a
//! backend and one `sallyport-proxy run` standalone (per-client limits off: every
//! connector dials from 127.0.0.1, and the default cap of 256 connections per address
//! would refuse most tunnels). The connectors are real ones of the one group, run as
//! tasks by `--hosts` host processes ([`host`], this executable), each connector with its
//! own key, certificate, state directory and tunnels; their CPU is not this process's.
//!
//! 1. **Limits.** The open-files limit is raised to the hard limit (the children inherit
//!    it) and checked against what the proxy and the hosts need (a descriptor per tunnel
//!    and per configuration pull); the ephemeral port range against the tunnels. Too low:
//!    the run stops at once and says which limit.
//! 2. **Setup.** The hosts register their connectors (CSR signed by the proxy,
//!    `--register-concurrency` in flight in all) and report it in a status file; then
//!    every connector starts at once: the time until the proxy counts all tunnels is the
//!    first connect, reported apart from the rounds.
//! 3. **Rounds.** The proxy gets SIGKILL and is started again at once with the same
//!    command line (addresses, configuration, PKI). The benchmark polls its port until it
//!    accepts connections, then its `sallyport_proxy_tunnels_open` gauge every
//!    `--poll-ms`, until it counts every tunnel (bounded by `--round-timeout`). Times to
//!    50, 90, 99 and 100% of the tunnels, from the port's opening and from the kill; the
//!    same from the connectors' own `tunnel up` log lines (per tunnel and per connector),
//!    with their dial failures and backoff; the new proxy's CPU time and the hosts'. After
//!    `--settle-ms`, `--gets` GETs through the proxy must be answered by the backend.
//!
//! Every wait is bounded; every process is killed when the run ends, also on failure. It
//! measures and reports; nothing is asserted about timing.

pub mod curve;
pub mod host;
pub mod report;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use tokio::net::TcpStream;

use crate::DataplaneError;
use crate::dataplane::backend::SMALL_BODY;
use crate::dataplane::client::Target;
use crate::dataplane::fleet::{Binaries, BinaryArgs, Fleet, FleetOptions};
use crate::dataplane::process::ChildProcess;
use crate::machine::Machine;
use crate::s5::observe::{tunnels_open, wait_for_tunnels};
use crate::stats;
use curve::{ConnectorEvent, ConnectorSide, Reach, Sample};
use host::HostStatus;
pub use report::S7Report;
use report::{Limits, Round, Settings, Setup, Usage};

/// The default `RUST_LOG` of the connector hosts: warnings, and the dialer's tunnel
/// events S7 reads (`tunnel up`, `... redialling`, `dial failed`).
const HOST_LOG_FILTER: &str = "warn,sallyport_tunnel::dial=info";

/// The listen backlog of the proxy's tunnel and user port: Tokio's `TcpListener::bind`
/// asks for 1024 (the kernel caps it at `net.core.somaxconn`).
const TOKIO_BACKLOG: u64 = 1024;

/// Options of `sallyport-bench s7`.
#[derive(Clone, Debug, Args)]
pub struct S7Args {
    /// Connectors of the group, all reconnecting at once.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=20_000))]
    pub connectors: u32,

    /// `--tunnels-per-replica` of every connector (the connector's default is 2).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub tunnels: u16,

    /// Rounds: proxy kills and restarts, each timed until every tunnel is back.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub rounds: u32,

    /// Host processes the connectors are spread over (each runs its share as tasks).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub hosts: u16,

    /// Worker threads of each host's async runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub host_threads: u16,

    /// Registrations in flight at once, over all hosts (setup, not measured as the
    /// reconnection).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub register_concurrency: u16,

    /// Milliseconds between two readings of the proxy's tunnels gauge.
    #[arg(long, value_name = "MS", default_value_t = 20, value_parser = clap::value_parser!(u64).range(5..=1000))]
    pub poll_ms: u64,

    /// Seconds a round (or the first connect) may take before it counts as incomplete.
    #[arg(long, value_name = "S", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=1800))]
    pub round_timeout: u64,

    /// Seconds the registration of every connector may take.
    #[arg(long, value_name = "S", default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..=7200))]
    pub setup_timeout: u64,

    /// Milliseconds of quiet after all tunnels are back, before the traffic check and
    /// the next round (configuration pulls and retries end).
    #[arg(long, value_name = "MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub settle_ms: u64,

    /// GETs through the proxy after each round, each to be answered by the backend.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub gets: u32,

    /// `RUST_LOG` of the proxy (its default is `info`).
    #[arg(long, value_name = "FILTER", default_value = "info")]
    pub proxy_log_filter: String,

    /// `RUST_LOG` of the connector hosts (the tunnel events S7 reads are logged at info).
    #[arg(long, value_name = "FILTER", default_value = HOST_LOG_FILTER)]
    pub host_log_filter: String,

    /// Keep the run's directory (configuration, keys, state, logs) here instead of a
    /// temporary one that is removed unless the run fails.
    #[arg(long, value_name = "DIR")]
    pub keep_dir: Option<PathBuf>,

    /// Where the proxy and connector executables are.
    #[command(flatten)]
    pub binaries: BinaryArgs,
}

/// Runs S7 and returns what it measured.
pub fn run(args: &S7Args) -> Result<S7Report, DataplaneError> {
    let binaries = args.binaries.locate()?;
    let limits = check_limits(args)?;
    crate::dataplane::in_run_dir(args.keep_dir.as_deref(), "s7", |dir| async move {
        measure(args, &binaries, limits, &dir).await
    })
}

/// Raises the open-files limit to the hard limit (inherited by the children) and checks
/// it, and the ephemeral ports, against the run's size.
fn check_limits(args: &S7Args) -> Result<Limits, DataplaneError> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|errno| DataplaneError::Io {
        what: "reading the open-files limit".to_owned(),
        source: std::io::Error::from(errno),
    })?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|errno| DataplaneError::Io {
        what: format!("raising the open-files limit to {hard}"),
        source: std::io::Error::from(errno),
    })?;
    let ports = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| port_range_size(&text));
    let read_number = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
    };
    let limits = Limits::needed(
        u64::from(args.connectors),
        u64::from(args.tunnels),
        u64::from(args.hosts),
        hard,
        ports,
        read_number("/proc/sys/net/core/somaxconn"),
        read_number("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
    );
    if limits.open_files < limits.open_files_needed {
        return Err(DataplaneError::Limit {
            what: "open files (RLIMIT_NOFILE hard limit) for the tunnels of the proxy and the hosts".to_owned(),
            needed: limits.open_files_needed,
            available: limits.open_files,
            hint: "raise the hard limit (`ulimit -Hn`, LimitNOFILE=, /etc/security/limits.conf) or run fewer --connectors".to_owned(),
        });
    }
    if let Some(ports) = limits.ephemeral_ports
        && ports < limits.ephemeral_ports_needed
    {
        return Err(DataplaneError::Limit {
            what: "ephemeral ports (net.ipv4.ip_local_port_range) for the tunnels".to_owned(),
            needed: limits.ephemeral_ports_needed,
            available: ports,
            hint: "widen net.ipv4.ip_local_port_range or run fewer --connectors".to_owned(),
        });
    }
    Ok(limits)
}

/// The number of ports in `ip_local_port_range` (`low high`).
fn port_range_size(text: &str) -> Option<u64> {
    let mut numbers = text.split_whitespace().map(str::parse::<u64>);
    let (low, high) = (numbers.next()?.ok()?, numbers.next()?.ok()?);
    (high >= low).then(|| high - low + 1)
}

/// The `sallyport-connector run` flag `name`'s value in `args`.
fn flag_value<'a>(args: &'a [String], name: &str) -> Result<&'a str, DataplaneError> {
    args.iter()
        .position(|arg| arg == name)
        .and_then(|at| args.get(at + 1))
        .map(String::as_str)
        .ok_or_else(|| DataplaneError::Client {
            what: "reading the connector's command line".to_owned(),
            message: format!("no {name} in {args:?}"),
        })
}

/// A process's command line after its program, from `/proc/<pid>/cmdline`.
fn command_line(pid: u32) -> Result<(String, Vec<String>), DataplaneError> {
    let path = format!("/proc/{pid}/cmdline");
    let bytes = std::fs::read(&path).map_err(DataplaneError::io(format!("reading {path}")))?;
    let mut argv = bytes
        .split(|byte| *byte == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned());
    let program = argv.next().unwrap_or_default();
    let mut args: Vec<String> = argv.collect();
    if args.last().is_some_and(String::is_empty) {
        args.pop();
    }
    Ok((program, args))
}

/// A connector host, running.
struct Host {
    process: ChildProcess,
    status_file: PathBuf,
    log: PathBuf,
    /// How much of its log the previous round read.
    log_read: usize,
}

impl Host {
    fn status(&self) -> HostStatus {
        HostStatus::load(&self.status_file).unwrap_or_default()
    }

    /// The connector events logged since the last call.
    fn new_events(&mut self) -> Vec<ConnectorEvent> {
        let Ok(bytes) = std::fs::read(&self.log) else {
            return Vec::new();
        };
        let fresh = bytes.get(self.log_read..).unwrap_or_default();
        // Only whole lines: a line being written is read next time.
        let whole = fresh
            .iter()
            .rposition(|byte| *byte == b'\n')
            .map_or(0, |at| at + 1);
        self.log_read += whole;
        String::from_utf8_lossy(&fresh[..whole])
            .lines()
            .filter_map(curve::parse_connector_line)
            .collect()
    }
}

/// What the run holds while it measures.
struct Run<'a> {
    args: &'a S7Args,
    binaries: &'a Binaries,
    dir: PathBuf,
    fleet: Fleet,
    hosts: Vec<Host>,
    /// The proxy's command line (after the program), to start it again as it was.
    proxy_args: Vec<String>,
    /// Tunnels when every connector has all of its own.
    target: u64,
}

async fn measure(
    args: &S7Args,
    binaries: &Binaries,
    limits: Limits,
    dir: &Path,
) -> Result<S7Report, DataplaneError> {
    let mut proxy_args: Vec<String> = crate::s5::LIMITS_OFF
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect();
    // A starting replica waits for tunnels before it is ready; S7 watches the tunnels,
    // not readiness, so the default stays.
    proxy_args.extend(["--log-format".to_owned(), "json".to_owned()]);
    let options = FleetOptions {
        backend_workers: 1,
        chunk_kib: 64,
        log_filter: args.proxy_log_filter.clone(),
        tunnels: args.tunnels,
        proxy_args,
        authenticated_app: false,
    };
    eprintln!(
        "s7: {} connectors x {} tunnels on {} host processes; open-files limit {} (needed {}), {} ephemeral ports (needed {}); run directory {}",
        args.connectors,
        args.tunnels,
        args.hosts,
        limits.open_files,
        limits.open_files_needed,
        limits
            .ephemeral_ports
            .map_or_else(|| "?".to_owned(), |p| p.to_string()),
        limits.ephemeral_ports_needed,
        dir.display()
    );
    let mut fleet = Fleet::start(dir, binaries, &options).await?;
    // The fleet's own connector makes way for the group measured here.
    fleet.connector.kill()?;
    fleet.connector.wait_exit(Duration::from_secs(10)).await?;
    wait_for_tunnels(fleet.probe_address, 0, Duration::from_secs(30)).await?;
    let (program, proxy_args) = command_line(fleet.proxy.pid())?;
    if !program.ends_with("sallyport-proxy") {
        return Err(DataplaneError::Client {
            what: "reading the proxy's command line".to_owned(),
            message: format!("the process runs {program:?}, not sallyport-proxy"),
        });
    }
    let versions = report::Versions {
        proxy: crate::dataplane::program_version(&binaries.proxy).await,
        connector: crate::dataplane::program_version(&binaries.connector).await,
    };
    let mut run = Run {
        args,
        binaries,
        dir: dir.to_owned(),
        fleet,
        hosts: Vec::new(),
        proxy_args,
        target: u64::from(args.connectors) * u64::from(args.tunnels),
    };
    let setup = run.setup().await?;
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        let measured = run.round(round).await?;
        rounds.push(measured);
    }
    run.check_running()?;
    let end = run.usage()?;
    Ok(S7Report {
        machine: Machine::here(),
        profile: crate::report::build_profile(),
        versions,
        settings: Settings {
            connectors: args.connectors,
            tunnels_per_connector: args.tunnels,
            target_tunnels: run.target,
            rounds: args.rounds,
            hosts: args.hosts,
            host_threads: args.host_threads,
            register_concurrency: args.register_concurrency,
            poll_ms: args.poll_ms,
            round_timeout_s: args.round_timeout,
            settle_ms: args.settle_ms,
            gets: args.gets,
            proxy_log_filter: args.proxy_log_filter.clone(),
            host_log_filter: args.host_log_filter.clone(),
        },
        limits,
        setup,
        rounds,
        end,
    })
}

impl Run<'_> {
    /// Starts the hosts, waits for every registration, then starts every connector at
    /// once and waits for all tunnels.
    async fn setup(&mut self) -> Result<Setup, DataplaneError> {
        let args = self.args;
        let launch = &self.fleet.connector_launch;
        let fleet_address = flag_value(&launch.args, "--fleet-address")?.to_owned();
        let server_name = flag_value(&launch.args, "--fleet-server-name")?.to_owned();
        let ca_file = flag_value(&launch.args, "--fleet-ca-file")?.to_owned();
        let group = flag_value(&launch.args, "--group")?.to_owned();
        let token = launch.token.clone();
        let state_root = self.dir.join("connectors");
        std::fs::create_dir_all(&state_root).map_err(DataplaneError::io(format!(
            "creating {}",
            state_root.display()
        )))?;
        let go_file = self.dir.join("s7-go");
        let hosts = u32::from(args.hosts).min(args.connectors);
        let concurrency = (u32::from(args.register_concurrency) / hosts).max(1);
        let proxy_cpu_before = self.fleet.proxy.cpu_time()?;
        eprintln!(
            "s7: registering {} connectors ({} at a time) in {hosts} hosts",
            args.connectors,
            concurrency * hosts
        );
        let spawned = Instant::now();
        let mut first = 0;
        for index in 0..hosts {
            let count = args.connectors / hosts + u32::from(index < args.connectors % hosts);
            let status_file = self.dir.join(format!("host-{index}.status.json"));
            let log = self.dir.join(format!("host-{index}.log"));
            let host_args: Vec<String> = [
                "s7-connector-host",
                "--state-root",
                &state_root.display().to_string(),
                "--first",
                &first.to_string(),
                "--count",
                &count.to_string(),
                "--fleet-address",
                &fleet_address,
                "--fleet-server-name",
                &server_name,
                "--fleet-ca-file",
                &ca_file,
                "--group",
                &group,
                "--tunnels",
                &args.tunnels.to_string(),
                "--register-concurrency",
                &concurrency.to_string(),
                "--threads",
                &args.host_threads.to_string(),
                "--status-file",
                &status_file.display().to_string(),
                "--go-file",
                &go_file.display().to_string(),
                "--go-timeout",
                &(args.setup_timeout + 60).to_string(),
            ]
            .map(str::to_owned)
            .to_vec();
            let process = ChildProcess::start(
                "s7-connector-host",
                &self.binaries.bench,
                &host_args,
                &[
                    ("RUST_LOG", &args.host_log_filter),
                    ("SALLYPORT_REGISTRATION_TOKEN", &token),
                ],
                &log,
            )?;
            self.hosts.push(Host {
                process,
                status_file,
                log,
                log_read: 0,
            });
            first += count;
        }

        // Every registration, bounded by --setup-timeout.
        let within = Duration::from_secs(args.setup_timeout);
        let mut reported = 0;
        loop {
            self.check_running()?;
            let statuses: Vec<HostStatus> = self.hosts.iter().map(Host::status).collect();
            let registered: u32 = statuses.iter().map(|s| s.registered).sum();
            let failed: u32 = statuses.iter().map(|s| s.registration_failed).sum();
            if failed > 0 {
                let errors: Vec<String> = statuses.into_iter().flat_map(|s| s.errors).collect();
                return Err(DataplaneError::Client {
                    what: format!("registering {} connectors", args.connectors),
                    message: format!("{failed} failed: {}", errors.join("; ")),
                });
            }
            if registered >= args.connectors && statuses.iter().all(HostStatus::registration_done) {
                break;
            }
            if registered >= reported + 100 {
                reported = registered;
                eprintln!(
                    "s7:   {registered} registered after {:.1} s",
                    spawned.elapsed().as_secs_f64()
                );
            }
            if spawned.elapsed() > within {
                return Err(DataplaneError::Timeout {
                    what: format!("the registration of {} connectors", args.connectors),
                    waited: within,
                    last: Some(format!("{registered} registered")),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let registration = spawned.elapsed();
        let proxy_cpu_registration = self
            .fleet
            .proxy
            .cpu_time()?
            .saturating_sub(proxy_cpu_before);
        let host_registration_ms: Vec<f64> = self
            .hosts
            .iter()
            .filter_map(|host| host.status().registration_ms)
            .collect();
        eprintln!(
            "s7: {} connectors registered in {:.1} s; starting them all at once",
            args.connectors,
            registration.as_secs_f64()
        );

        // The first connect: every connector at once.
        let proxy_cpu_before = self.fleet.proxy.cpu_time()?;
        let hosts_cpu_before = self.hosts_cpu()?;
        let go_wall = SystemTime::now();
        let go = Instant::now();
        std::fs::write(&go_file, b"go\n")
            .map_err(DataplaneError::io(format!("writing {}", go_file.display())))?;
        let (samples, _) = self.follow_gauge(go).await?;
        let first_connect = Reach::of_samples(&samples, self.target, Duration::ZERO);
        let done = go.elapsed();
        let proxy_cpu = self
            .fleet
            .proxy
            .cpu_time()?
            .saturating_sub(proxy_cpu_before);
        let hosts_cpu = self.hosts_cpu()?.saturating_sub(hosts_cpu_before);
        eprintln!(
            "s7: first connect: {} of {} tunnels after {:.1} s",
            samples.last().map_or(0, |s| s.tunnels),
            self.target,
            done.as_secs_f64()
        );
        self.settle().await?;
        let events: Vec<ConnectorEvent> =
            self.hosts.iter_mut().flat_map(Host::new_events).collect();
        let connector_side = ConnectorSide::of(
            &events,
            go_wall,
            u64::from(args.connectors),
            u64::from(args.tunnels),
            Duration::ZERO,
        );
        Ok(Setup {
            registration_ms: stats::millis(registration),
            host_registration_ms,
            registrations_per_s: f64::from(args.connectors) / registration.as_secs_f64().max(1e-9),
            proxy_cpu_registration_ms: stats::millis(proxy_cpu_registration),
            first_connect,
            first_connect_complete: first_connect.p100_ms.is_some(),
            connector_side,
            proxy_cpu_ms: stats::millis(proxy_cpu),
            hosts_cpu_ms: stats::millis(hosts_cpu),
            curve: curve::compact(&samples),
            usage: self.usage()?,
        })
    }

    /// One round: SIGKILL the proxy, start it again at once, time the tunnels' return.
    async fn round(&mut self, round: u32) -> Result<Round, DataplaneError> {
        let args = self.args;
        let before = self.gauge_now().await;
        for host in &mut self.hosts {
            // Only this round's lines from here on.
            drop(host.new_events());
        }
        let hosts_cpu_before = self.hosts_cpu()?;
        eprintln!(
            "s7: round {round}/{}: SIGKILL to the proxy ({} tunnels open)",
            args.rounds,
            before.map_or_else(|| "?".to_owned(), |n| n.to_string())
        );
        let killed_wall = SystemTime::now();
        let killed = Instant::now();
        self.fleet.proxy.kill()?;
        if self
            .fleet
            .proxy
            .wait_exit(Duration::from_secs(10))
            .await?
            .is_none()
        {
            return Err(DataplaneError::Timeout {
                what: "the proxy's exit after SIGKILL".to_owned(),
                waited: Duration::from_secs(10),
                last: None,
            });
        }
        let exited = killed.elapsed();
        let proxy = ChildProcess::start(
            "sallyport-proxy",
            &self.binaries.proxy,
            &self.proxy_args,
            &[("RUST_LOG", &args.proxy_log_filter)],
            &self.dir.join(format!("proxy-round-{round}.log")),
        )?;
        let spawned = killed.elapsed();
        self.fleet.proxy = proxy;
        let open = self.wait_for_port(killed).await?;
        let (samples, scrape_errors) = self.follow_gauge(killed).await?;
        let last = samples.last().map_or(0, |s| s.tunnels);
        let done = killed.elapsed();
        let proxy_cpu = self.fleet.proxy.cpu_time()?;
        let hosts_cpu = self.hosts_cpu()?.saturating_sub(hosts_cpu_before);
        let from_open = Reach::of_samples(&samples, self.target, open);
        let from_kill = Reach::of_samples(&samples, self.target, Duration::ZERO);
        eprintln!(
            "s7:   port open {:.0} ms after the kill; {last} of {} tunnels; 50/90/99/100% after {} ms from the port's opening",
            stats::millis(open),
            self.target,
            [50, 90, 99, 100]
                .map(|p| from_open
                    .get(p)
                    .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.0}")))
                .join("/")
        );
        self.settle().await?;
        let after_settle = self.gauge_now().await;
        let events: Vec<ConnectorEvent> =
            self.hosts.iter_mut().flat_map(Host::new_events).collect();
        let connector_side = ConnectorSide::of(
            &events,
            killed_wall,
            u64::from(args.connectors),
            u64::from(args.tunnels),
            open,
        );
        let connectors_seen = curve::connectors_seen(&events).len() as u64;
        let (gets_ok, gets_failed, get_error) = traffic(&self.fleet.via_proxy, args.gets).await;
        eprintln!(
            "s7:   connectors' side: {} tunnels up, all of {} connectors' after {} ms from the kill; {} dial failures (deepest {}); GETs {gets_ok} ok, {gets_failed} failed",
            connector_side.tunnels_up,
            connector_side.connectors_complete,
            connector_side
                .connectors
                .p100_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.0}")),
            connector_side.dial_failures,
            connector_side
                .failures_by_depth
                .keys()
                .max()
                .copied()
                .unwrap_or(0)
        );
        let round = Round {
            round,
            tunnels_before: before,
            proxy_exited_ms: stats::millis(exited),
            proxy_spawned_ms: stats::millis(spawned),
            port_open_ms: stats::millis(open),
            from_open,
            from_kill,
            tunnels_reached: last,
            complete: last >= self.target,
            measured_for_ms: stats::millis(done),
            scrape_errors,
            tunnels_after_settle: after_settle,
            curve_from_open: curve::CURVE_POINTS_MS
                .iter()
                .map(|&ms| {
                    (
                        ms,
                        curve::open_at(&samples, open + Duration::from_millis(ms)),
                    )
                })
                .collect(),
            curve: curve::compact(&samples),
            connector_side,
            connectors_seen,
            proxy_cpu_ms: stats::millis(proxy_cpu),
            proxy_busy_cores: proxy_cpu.as_secs_f64()
                / done.saturating_sub(spawned).as_secs_f64().max(1e-9),
            hosts_cpu_ms: stats::millis(hosts_cpu),
            proxy_cpu_per_tunnel_ms: (last > 0).then(|| stats::millis(proxy_cpu) / last as f64),
            hosts_cpu_per_tunnel_ms: (last > 0).then(|| stats::millis(hosts_cpu) / last as f64),
            gets_ok,
            gets_failed,
            get_error,
        };
        if after_settle.is_none_or(|open| open < self.target) {
            // The next round should start from every tunnel open; one that cannot (an
            // overloaded machine) starts from what there is, shown as its tunnels_before.
            let within = Duration::from_secs(args.round_timeout);
            if let Err(error) =
                wait_for_tunnels(self.fleet.probe_address, self.target, within).await
            {
                eprintln!("s7:   the next round starts without every tunnel: {error}");
            }
        }
        self.check_running()?;
        Ok(round)
    }

    /// The tunnels gauge now; `None` when the proxy did not answer three times (an
    /// overloaded proxy answers `/metrics` late too).
    async fn gauge_now(&self) -> Option<u64> {
        for _ in 0..3 {
            if let Ok(open) = tunnels_open(self.fleet.probe_address).await {
                return Some(open);
            }
        }
        None
    }

    /// Polls the proxy's port every millisecond until it accepts a connection: when,
    /// from `origin`.
    async fn wait_for_port(&mut self, origin: Instant) -> Result<Duration, DataplaneError> {
        let within = Duration::from_secs(60);
        let address: SocketAddr = self.fleet.proxy_address;
        loop {
            self.fleet.proxy.check_running()?;
            if TcpStream::connect(address).await.is_ok() {
                return Ok(origin.elapsed());
            }
            if origin.elapsed() > within {
                return Err(DataplaneError::Timeout {
                    what: format!("the restarted proxy listening on {address}"),
                    waited: within,
                    last: None,
                });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Reads the tunnels gauge every `--poll-ms` until it counts every tunnel or
    /// `--round-timeout` passed: the readings (times from `origin`, when each answer
    /// came) and how many scrapes failed.
    async fn follow_gauge(
        &mut self,
        origin: Instant,
    ) -> Result<(Vec<Sample>, u64), DataplaneError> {
        let within = Duration::from_secs(self.args.round_timeout);
        let deadline = Instant::now() + within;
        let mut ticks = tokio::time::interval(Duration::from_millis(self.args.poll_ms));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut samples = Vec::new();
        let mut errors = 0;
        loop {
            ticks.tick().await;
            self.fleet.proxy.check_running()?;
            match tunnels_open(self.fleet.probe_address).await {
                Ok(tunnels) => {
                    samples.push(Sample {
                        at: origin.elapsed(),
                        tunnels,
                    });
                    if tunnels >= self.target {
                        break;
                    }
                }
                Err(_) => errors += 1,
            }
            if Instant::now() > deadline {
                eprintln!(
                    "s7:   not every tunnel back within {within:?}: {} of {}",
                    samples.last().map_or(0, |s| s.tunnels),
                    self.target
                );
                break;
            }
        }
        Ok((samples, errors))
    }

    /// Waits `--settle-ms`, checking that nothing died.
    async fn settle(&mut self) -> Result<(), DataplaneError> {
        tokio::time::sleep(Duration::from_millis(self.args.settle_ms)).await;
        self.check_running()
    }

    /// Fails when the backend, the proxy or a host exited, or a connector stopped.
    fn check_running(&mut self) -> Result<(), DataplaneError> {
        self.fleet.backend.check_running()?;
        self.fleet.proxy.check_running()?;
        for host in &mut self.hosts {
            host.process.check_running()?;
            let status = host.status();
            if status.stopped > 0 {
                return Err(DataplaneError::Client {
                    what: format!("the connectors of {}", host.log.display()),
                    message: format!("{} stopped: {}", status.stopped, status.errors.join("; ")),
                });
            }
        }
        Ok(())
    }

    /// CPU time of all hosts so far.
    fn hosts_cpu(&self) -> Result<Duration, DataplaneError> {
        self.hosts
            .iter()
            .map(|host| host.process.cpu_time())
            .sum::<Result<Duration, DataplaneError>>()
    }

    /// CPU time and memory of the proxy and the hosts now.
    fn usage(&self) -> Result<Usage, DataplaneError> {
        let proxy = self.fleet.proxy.memory()?;
        let mut hosts_rss = 0;
        let mut hosts_peak = 0;
        for host in &self.hosts {
            let memory = host.process.memory()?;
            hosts_rss += memory.rss_bytes;
            hosts_peak += memory.peak_rss_bytes;
        }
        Ok(Usage {
            proxy_rss_bytes: proxy.rss_bytes,
            proxy_peak_rss_bytes: proxy.peak_rss_bytes,
            proxy_cpu_ms: stats::millis(self.fleet.proxy.cpu_time()?),
            hosts_rss_bytes: hosts_rss,
            hosts_peak_rss_bytes: hosts_peak,
            hosts_cpu_ms: stats::millis(self.hosts_cpu()?),
            per_connector_rss_bytes: hosts_rss / u64::from(self.args.connectors.max(1)),
        })
    }
}

/// `gets` GETs through the proxy (one connection, a new one after a failure): answered
/// by the backend, failed, and the last failure.
async fn traffic(target: &Target, gets: u32) -> (u32, u32, Option<String>) {
    let within = Duration::from_secs(5);
    let (mut ok, mut failed, mut last_error) = (0, 0, None);
    let mut connection = None;
    for _ in 0..gets {
        if connection.is_none() {
            match tokio::time::timeout(within, target.connect()).await {
                Ok(Ok(fresh)) => connection = Some(fresh),
                Ok(Err(error)) => last_error = Some(error.to_string()),
                Err(_) => last_error = Some(format!("no connection within {within:?}")),
            }
        }
        let Some(open) = connection.as_mut() else {
            failed += 1;
            continue;
        };
        match open.get("/", within).await {
            Ok(answer)
                if answer.status == http::StatusCode::OK
                    && answer.head.as_bytes() == SMALL_BODY =>
            {
                ok += 1;
            }
            Ok(answer) => {
                failed += 1;
                last_error = Some(format!("{}: {}", answer.status, answer.head.trim()));
            }
            Err(error) => {
                failed += 1;
                last_error = Some(error.to_string());
                connection = None;
            }
        }
    }
    (ok, failed, last_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_port_range() {
        assert_eq!(port_range_size("32768\t60999\n"), Some(28232));
        assert_eq!(port_range_size("1024 1024"), Some(1));
        assert_eq!(port_range_size("60999 32768"), None);
        assert_eq!(port_range_size(""), None);
    }

    #[test]
    fn finds_a_flag_of_the_connector() {
        let args: Vec<String> = [
            "run",
            "--group",
            "bench/bench",
            "--tunnels-per-replica",
            "2",
        ]
        .map(str::to_owned)
        .to_vec();
        assert_eq!(flag_value(&args, "--group").ok(), Some("bench/bench"));
        assert!(flag_value(&args, "--fleet-address").is_err());
        assert!(flag_value(&args[..2], "--group").is_err());
    }

    #[test]
    fn reads_this_process_command_line() {
        let (program, _) =
            command_line(std::process::id()).unwrap_or_else(|e| panic!("own cmdline: {e}"));
        assert!(!program.is_empty());
    }
}
