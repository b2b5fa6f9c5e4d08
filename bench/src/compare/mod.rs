//! `sallyport-bench compare`: the data-plane scenarios of the performance design run side
//! by side against real peers in one run.
//!
//! One backend (the benchmark's own, a process of its own) is reached eight ways
//! ([`targets::TargetKind`]): straight (the limit); through nginx, plain and with user TLS;
//! through rathole over plain TCP and over TLS; through frp; through Sallyport's proxy and
//! connector to a passthrough app; and to an app with OpenID Connect pre-authentication
//! (a signed-in session) and conditional access. Each round measures every target in
//! turn (A B C ... A B C ...), so a change in the machine's load spreads over all of them;
//! medians over the rounds, min-max, ratios to direct and between targets.
//!
//! Scenarios ([`measure::ScenarioKind`]): S3 (one connection downloads, then uploads, a
//! generated body; resident memory of the hop sampled), S1 (small GETs over keep-alive
//! connections, closed loop), S1b (a new connection per request), S2 (fixed rates with
//! latency corrected for coordinated omission). Load comes from oha, a second process.
//!
//! Peers are installed by `bench/install-peers.sh` (rathole from crates.io, frp from the Go
//! module proxy, nginx from Debian) and started by [`crate::peers`].

pub mod measure;
pub mod plot;
pub mod quick;
pub mod report;
pub mod targets;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use crate::dataplane::fleet::{Binaries, BinaryArgs, Fleet, FleetOptions};
use crate::dataplane::{self, DataplaneError, oha};
use crate::peers::{PeerTools, RunningPeer};
use measure::{Measurement, RequestLoad, Sample, ScenarioKind, TransferLoad};
use report::{CompareReport, Series, Settings};
use targets::{Endpoint, TargetKind};

/// Options of `sallyport-bench compare`.
#[derive(Clone, Debug, Args)]
pub struct CompareArgs {
    /// The targets, in the order of each round (default: all).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = TargetKind::ALL)]
    pub targets: Vec<TargetKind>,

    /// The scenarios (default: all; S3 runs first, on processes that have served little).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = ScenarioKind::ALL)]
    pub scenarios: Vec<ScenarioKind>,

    /// Rounds; each measures every target once per scenario.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub rounds: u32,

    /// S1, S1b, S2: oha's concurrent connections.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub connections: u32,

    /// S1, S1b, S2: seconds of load per measurement.
    #[arg(long, value_name = "SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub duration: u64,

    /// Seconds of unmeasured S1 load against each target before the first round.
    #[arg(long, value_name = "SECONDS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=60))]
    pub warmup: u64,

    /// S2: the fixed rates, requests per second.
    #[arg(long, value_delimiter = ',', default_values_t = [2_000u32, 10_000])]
    pub rates: Vec<u32>,

    /// S3b: the fixed rate of the small GETs next to the bulk download (compared with S2
    /// at the same rate, which runs when --rates holds it).
    #[arg(long, value_name = "REQ_PER_S", default_value_t = 2_000)]
    pub bulk_rate: u32,

    /// S3: size of each transfer, MiB.
    #[arg(long, value_name = "MIB", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=16_384))]
    pub transfer_mib: u64,

    /// S3: bound on one transfer, seconds; past it the run fails.
    #[arg(long, value_name = "SECONDS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub transfer_timeout: u64,

    /// S3: chunk size of the backend's downloads and of the client's uploads, KiB.
    #[arg(long, value_name = "KIB", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=16_384))]
    pub chunk_kib: u32,

    /// Worker threads of the backend.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub backend_workers: u16,

    /// Tunnels Sallyport's connector keeps to the proxy (`--tunnels-per-replica`).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub tunnels: u16,

    /// `RUST_LOG` of Sallyport's proxy and connector (their production default is info).
    #[arg(long, value_name = "FILTER", default_value = "info")]
    pub log_filter: String,

    /// The oha executable (default: the cache of `bench/install-tools.sh`, then PATH).
    #[arg(long, value_name = "PATH", env = "SALLYPORT_BENCH_OHA")]
    pub oha: Option<PathBuf>,

    /// The script that installs the peers and prints where they are.
    #[arg(long, value_name = "PATH", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/install-peers.sh"))]
    pub peers_script: PathBuf,

    /// Where the proxy and connector executables are.
    #[command(flatten)]
    pub binaries: BinaryArgs,

    /// Write plots (SVG) of throughput and latency percentiles into this directory.
    #[arg(long, value_name = "DIR")]
    pub plots: Option<PathBuf>,

    /// Keep the run's directory (configurations, keys, every process's log) here instead
    /// of a temporary one that is removed unless the run fails.
    #[arg(long, value_name = "DIR")]
    pub keep_dir: Option<PathBuf>,
}

impl CompareArgs {
    fn measurements(&self) -> Vec<Measurement> {
        let mut scenarios = self.scenarios.clone();
        scenarios.sort_by_key(|s| ScenarioKind::ALL.iter().position(|a| a == s));
        scenarios.dedup();
        scenarios
            .into_iter()
            .flat_map(|scenario| match scenario {
                ScenarioKind::S1 => vec![Measurement::S1],
                ScenarioKind::S1b => vec![Measurement::S1b],
                ScenarioKind::S2 => self
                    .rates
                    .iter()
                    .map(|&rate| Measurement::S2 { rate })
                    .collect(),
                ScenarioKind::S3 => vec![Measurement::S3Download, Measurement::S3Upload],
                ScenarioKind::S3b => vec![Measurement::S3b {
                    rate: self.bulk_rate,
                }],
            })
            .collect()
    }

    fn settings(&self) -> Settings {
        Settings {
            targets: self.targets.clone(),
            rounds: self.rounds,
            connections: self.connections,
            duration_s: self.duration,
            rates: self.rates.clone(),
            transfer_bytes: self.transfer_mib * 1024 * 1024,
            chunk_kib: self.chunk_kib,
            backend_workers: self.backend_workers,
            tunnels: self.tunnels,
            log_filter: self.log_filter.clone(),
        }
    }
}

/// Runs the comparison and returns what it measured (and writes the plots, if asked).
pub fn run(args: &CompareArgs) -> Result<CompareReport, DataplaneError> {
    let binaries = args.binaries.locate()?;
    let needs_oha = args.scenarios.iter().any(|s| *s != ScenarioKind::S3);
    let oha = if needs_oha {
        Some(oha::locate(args.oha.as_deref())?)
    } else {
        None
    };
    let result = dataplane::in_run_dir(args.keep_dir.as_deref(), "compare", |dir| async move {
        measure_all(args, &binaries, oha.as_deref(), &dir).await
    });
    let report = result?;
    if let Some(plots) = &args.plots {
        for written in plot::write_all(&report, plots)? {
            eprintln!("compare: wrote {}", written.display());
        }
    }
    Ok(report)
}

async fn measure_all(
    args: &CompareArgs,
    binaries: &Binaries,
    oha: Option<&Path>,
    dir: &Path,
) -> Result<CompareReport, DataplaneError> {
    // Each target once, in the order given.
    let mut targets: Vec<TargetKind> = Vec::new();
    for target in &args.targets {
        if !targets.contains(target) {
            targets.push(*target);
        }
    }
    let ours = targets.iter().any(|t| t.ours());
    let options = FleetOptions {
        backend_workers: args.backend_workers,
        chunk_kib: args.chunk_kib,
        log_filter: args.log_filter.clone(),
        tunnels: args.tunnels,
        // oha's users all come from 127.0.0.1: no limit per client address.
        proxy_args: ["--client-requests-per-second", "0"]
            .map(str::to_owned)
            .to_vec(),
        authenticated_app: targets.contains(&TargetKind::SallyportAuth),
    };
    // The fleet brings the backend every target shares; its proxy and connector idle
    // while other targets are measured (with only Sallyport's targets off, they still run:
    // a few idle tasks).
    let mut fleet = Fleet::start(dir, binaries, &options).await?;
    eprintln!(
        "compare: the backend answers on {}{}",
        fleet.backend_address,
        if ours { ", and through Sallyport" } else { "" }
    );
    let mut versions = BTreeMap::new();
    versions.insert(
        "sallyport".to_owned(),
        dataplane::program_version(&binaries.proxy).await,
    );
    if let Some(oha) = oha {
        versions.insert("oha".to_owned(), oha::version(oha).await);
    }
    let needs_peers = targets.iter().any(|t| t.peer().is_some());
    let tools = if needs_peers {
        eprintln!(
            "compare: installing the peers if needed ({})",
            args.peers_script.display()
        );
        let tools = PeerTools::install(&args.peers_script).await?;
        versions.extend(tools.versions().await);
        Some(tools)
    } else {
        None
    };

    let mut peers: Vec<RunningPeer> = Vec::new();
    let mut endpoints = Vec::new();
    for kind in &targets {
        let endpoint = match (kind, kind.peer(), &tools) {
            (TargetKind::Direct, _, _) => Endpoint::direct(fleet.backend_address),
            (TargetKind::Sallyport, _, _) => Endpoint::sallyport(&fleet, false)?,
            (TargetKind::SallyportAuth, _, _) => Endpoint::sallyport(&fleet, true)?,
            (_, Some(peer_kind), Some(tools)) => {
                eprintln!("compare: starting {}", kind.label());
                let peer =
                    RunningPeer::start(peer_kind, tools, fleet.backend_address, &dir.join("peers"))
                        .await?;
                let endpoint = Endpoint::peer(*kind, &peer)?;
                peers.push(peer);
                endpoint
            }
            (_, _, _) => continue,
        };
        endpoints.push(endpoint);
    }

    let transfer = TransferLoad {
        bytes: args.transfer_mib * 1024 * 1024,
        chunk: args.chunk_kib as usize * 1024,
        within: Duration::from_secs(args.transfer_timeout),
    };
    let request = oha.map(|oha| RequestLoad {
        oha,
        connections: args.connections,
        duration: Duration::from_secs(args.duration),
    });
    let backend_pid = fleet.backend.pid();
    let measurements = args.measurements();
    let mut series: Vec<Series> = Vec::new();
    for measurement in &measurements {
        for endpoint in &endpoints {
            series.push(Series::new(*measurement, endpoint.kind));
        }
    }
    let mut warmed_up = false;
    for measurement in measurements {
        if !measurement.is_transfer()
            && !warmed_up
            && let Some(request) = &request
        {
            warmed_up = true;
            warm_up(request, args.warmup, &endpoints, backend_pid).await?;
        }
        for round in 1..=args.rounds {
            for endpoint in &endpoints {
                check_running(&mut fleet, &mut peers)?;
                let sample = match (measurement, &request) {
                    (Measurement::S3Download, _) => {
                        measure::transfer(&transfer, false, endpoint, backend_pid, round).await?
                    }
                    (Measurement::S3Upload, _) => {
                        measure::transfer(&transfer, true, endpoint, backend_pid, round).await?
                    }
                    (Measurement::S3b { rate }, Some(request)) => {
                        measure::requests_next_to_bulk(
                            request,
                            rate,
                            &transfer,
                            endpoint,
                            backend_pid,
                            round,
                        )
                        .await?
                    }
                    (_, Some(request)) => {
                        measure::requests(request, measurement, endpoint, backend_pid, round)
                            .await?
                    }
                    (_, None) => continue,
                };
                progress(measurement, round, args.rounds, endpoint.kind, &sample);
                if let Some(series) = series
                    .iter_mut()
                    .find(|s| s.measurement == measurement && s.target == endpoint.kind)
                {
                    series.samples.push(sample);
                }
            }
        }
    }
    check_running(&mut fleet, &mut peers)?;
    Ok(CompareReport::new(args.settings(), versions, series))
}

/// Unmeasured S1 load against each target, so every one has its connections, caches and
/// (Sallyport) tunnel windows warmed before the first measured round.
async fn warm_up(
    request: &RequestLoad<'_>,
    seconds: u64,
    endpoints: &[Endpoint],
    backend_pid: u32,
) -> Result<(), DataplaneError> {
    if seconds == 0 {
        return Ok(());
    }
    let load = RequestLoad {
        duration: Duration::from_secs(seconds),
        ..request.clone()
    };
    for endpoint in endpoints {
        eprintln!("compare: warm-up, {seconds} s: {}", endpoint.kind.label());
        let sample = measure::requests(&load, Measurement::S1, endpoint, backend_pid, 0).await?;
        if sample.ok == 0 {
            return Err(DataplaneError::Oha(format!(
                "no 200 answer during the warm-up through {}",
                endpoint.kind.label()
            )));
        }
    }
    Ok(())
}

fn check_running(fleet: &mut Fleet, peers: &mut [RunningPeer]) -> Result<(), DataplaneError> {
    fleet.check_running()?;
    for peer in peers {
        peer.check_running()?;
    }
    Ok(())
}

fn progress(
    measurement: Measurement,
    round: u32,
    rounds: u32,
    target: TargetKind,
    sample: &Sample,
) {
    let value = if measurement.is_transfer() {
        format!("{:>8.2} GB/s", sample.value / 1e9)
    } else {
        format!("{:>8.0} req/s", sample.value)
    };
    let latency = sample
        .latency
        .map(|l| {
            format!(
                ", p50/p99/p99.9 {}/{}/{} ms",
                report::ms(l.p50_ms),
                report::ms(l.p99_ms),
                report::ms(l.p999_ms)
            )
        })
        .unwrap_or_default();
    eprintln!(
        "compare: {} round {round}/{rounds}: {:<14} {value}{latency}{}",
        measurement.label(),
        target.label(),
        if sample.failed > 0 {
            format!(" ({} failed)", sample.failed)
        } else {
            String::new()
        }
    );
}
