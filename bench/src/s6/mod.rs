//! Scenario S6 of the performance design: a PublishedApp change in the cluster, timed
//! until every proxy replica enforces it, under steady load.
//!
//! The system ([`system`]) is real and on loopback: a control plane through
//! `sallyport-cluster`, the operator, `--proxies` proxy replicas watching the compiled
//! configuration, two connectors of one group, two backends `blue` and `green` (this
//! executable's `dataplane-backend --name`, which names itself in an `x-backend-name`
//! header), and one passthrough PublishedApp served from `blue`.
//!
//! Then:
//!
//! 1. a probe per replica ([`probe`]) asks `GET /` every `--probe-ms` on a keep-alive
//!    connection and notes which backend answered; a watch notes the app's internal URL
//!    in every version of the compiled fleet configuration ConfigMap;
//! 2. one oha per replica ([`load`]) sends `--rate` requests per second in all, at a
//!    fixed rate with latency correction, from `--warmup-ms` before the first change to
//!    the end;
//! 3. `--changes` times, one at a time: a merge patch of `spec.internalUrl` to the other
//!    backend (a blue/green cut-over); the clock starts when the apiserver's answer
//!    arrives; each replica's latency is its probe's first answer from the new backend;
//!    the next change waits until every replica has it (at most `--change-timeout`
//!    seconds, else the run stops changing and says it is incomplete) and `--settle-ms`
//!    more;
//! 4. oha is interrupted and reports; the report ([`report`]) gives the latency over
//!    every change and replica (p50, p99, max), per replica, the operator's part (until
//!    the configuration was seen), and the errors: oha's answers other than 200 and its
//!    failed requests, failed probes, and answers from the old backend after a replica
//!    had shown the new one (a flip back).
//!
//! Goal (performance.md): <= 1 s p99 on 3 proxies, no errors under 1k req/s during the
//! change. Every wait is bounded; every process is killed when the run ends, also on
//! failure. It measures and reports; it asserts nothing about timing.

pub mod load;
pub mod probe;
pub mod report;
pub mod system;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;

use crate::DataplaneError;
use crate::dataplane::fleet::BinaryArgs;
use crate::dataplane::{in_run_dir, locate, oha};
use crate::machine::Machine;
use load::{LoadSpec, RunningLoad, split_rate};
use probe::{ConfigWatch, Probe, ProbeTarget};
pub use report::S6Report;
use report::{ChangeTimes, Measured, Settings};
use system::{APP, APP_HOST, BACKENDS, Binaries, FLEET_CONFIG, REPLICAS, System, SystemOptions};

/// Options of `sallyport-bench s6`.
#[derive(Clone, Debug, Args)]
pub struct S6Args {
    /// PublishedApp changes, one at a time.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub changes: u32,

    /// Proxy replicas (the goal is stated for 3).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub proxies: u32,

    /// Load during the changes, requests per second over all replicas (one oha per
    /// replica, an equal share each); 0 for none.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub rate: u32,

    /// oha's keep-alive connections per replica.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub connections: u32,

    /// Milliseconds between a probe's requests to its replica.
    #[arg(long, value_name = "MS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub probe_ms: u64,

    /// Milliseconds of load and probes after every replica showed a change, before the
    /// next (a replica flipping back to the old backend then is an error).
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub settle_ms: u64,

    /// Milliseconds of load and probes before the first change.
    #[arg(long, value_name = "MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub warmup_ms: u64,

    /// Bound, in seconds, on one change reaching every replica; past it the run stops
    /// changing and reports itself incomplete.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub change_timeout: u64,

    /// `RUST_LOG` of the operator, the proxies and the connectors (their logs are files
    /// in the run's directory).
    #[arg(long, value_name = "FILTER", default_value = "info,kube=warn")]
    pub log_filter: String,

    /// The oha executable (default: `bash bench/install-tools.sh`'s, else `PATH`).
    #[arg(long, value_name = "PATH")]
    pub oha: Option<PathBuf>,

    /// The `sallyport-cluster` executable (default: next to this one).
    #[arg(long, value_name = "PATH", env = "SALLYPORT_BENCH_CLUSTER_BIN")]
    pub cluster_bin: Option<PathBuf>,

    /// The `sallyport-operator` executable (default: next to this one).
    #[arg(long, value_name = "PATH", env = "SALLYPORT_BENCH_OPERATOR_BIN")]
    pub operator_bin: Option<PathBuf>,

    /// Where the proxy and connector executables are.
    #[command(flatten)]
    pub binaries: BinaryArgs,

    /// Keep the run's directory (the fleet's PKI, state, every process's log) here
    /// instead of a temporary one that is removed unless the run fails.
    #[arg(long, value_name = "DIR")]
    pub keep_dir: Option<PathBuf>,
}

impl S6Args {
    fn locate(&self) -> Result<Binaries, DataplaneError> {
        let dataplane = self.binaries.locate()?;
        Ok(Binaries {
            cluster: locate(
                self.cluster_bin.as_ref(),
                "sallyport-cluster",
                &dataplane.bench,
            )?,
            operator: locate(
                self.operator_bin.as_ref(),
                "sallyport-operator",
                &dataplane.bench,
            )?,
            proxy: dataplane.proxy,
            connector: dataplane.connector,
            bench: dataplane.bench,
        })
    }

    fn settings(&self) -> Settings {
        Settings {
            proxies: (self.proxies as usize).min(REPLICAS.len()),
            changes: self.changes,
            rate: self.rate,
            connections: self.connections,
            probe_ms: self.probe_ms,
            settle_ms: self.settle_ms,
            warmup_ms: self.warmup_ms,
            change_timeout_s: self.change_timeout,
            profile: crate::report::build_profile(),
        }
    }
}

/// Runs S6.
pub fn run(args: &S6Args) -> Result<S6Report, DataplaneError> {
    let binaries = args.locate()?;
    let oha = match args.rate {
        0 => None,
        _ => Some(oha::locate(args.oha.as_deref())?),
    };
    in_run_dir(args.keep_dir.as_deref(), "s6", |dir| async move {
        measure(args, &binaries, oha.as_deref(), &dir).await
    })
}

/// How often the run checks its processes while it waits.
const CHECK_EVERY: Duration = Duration::from_millis(100);
/// How often it looks at the probes while a change travels.
const LOOK_EVERY: Duration = Duration::from_millis(2);

async fn measure(
    args: &S6Args,
    binaries: &Binaries,
    oha: Option<&Path>,
    dir: &Path,
) -> Result<S6Report, DataplaneError> {
    let settings = args.settings();
    let mut system = System::start(
        dir,
        binaries,
        &SystemOptions {
            proxies: settings.proxies,
            log_filter: args.log_filter.clone(),
        },
    )
    .await?;
    let names: Vec<String> = BACKENDS.iter().map(|n| (*n).to_owned()).collect();
    let epoch = Instant::now();
    let probes: Vec<Probe> = system
        .replicas
        .iter()
        .map(|replica| {
            Probe::start(
                ProbeTarget {
                    address: replica.address,
                    host: APP_HOST.to_owned(),
                    ca_pem: system.app_ca.clone(),
                    names: names.clone(),
                },
                epoch,
                Duration::from_millis(args.probe_ms),
            )
        })
        .collect();
    let config_watch = ConfigWatch::start(
        system.config_maps(),
        FLEET_CONFIG,
        format!("{}/{APP}", system.namespace),
        epoch,
    );

    let change_timeout = Duration::from_secs(args.change_timeout);
    let settle = Duration::from_millis(args.settle_ms);
    let bound = Duration::from_millis(args.warmup_ms)
        + (change_timeout + settle) * args.changes
        + Duration::from_secs(120);
    let mut loads = Vec::new();
    if let Some(oha) = oha {
        let rates = split_rate(args.rate, system.replicas.len());
        for (replica, rate) in system.replicas.iter().zip(rates) {
            if rate == 0 {
                continue;
            }
            let spec = LoadSpec {
                oha: oha.to_owned(),
                address: replica.address,
                host: APP_HOST.to_owned(),
                ca_file: system.app_ca_file.clone(),
                rate,
                connections: args.connections,
                bound,
                log: dir.join(format!("oha-{}.log", replica.name)),
            };
            loads.push((replica.name.to_owned(), RunningLoad::start(&spec)?));
        }
    }
    eprintln!(
        "s6: load of {} req/s over {} replicas, probes every {} ms; {} ms before the first change",
        args.rate,
        system.replicas.len(),
        args.probe_ms,
        args.warmup_ms
    );
    hold(
        &mut system,
        &mut loads,
        Duration::from_millis(args.warmup_ms),
    )
    .await?;

    let mut changes = Vec::new();
    let mut current = 0usize;
    for index in 1..=args.changes {
        let target = 1 - current;
        let internal_url = system.backend_urls[target].clone();
        let sent = epoch.elapsed();
        let generation = system.point_app_at(&internal_url).await?;
        let accepted = epoch.elapsed();
        let deadline = Instant::now() + change_timeout;
        let mut reached: Vec<Option<Duration>> = vec![None; probes.len()];
        let mut last_check = Instant::now();
        while reached.iter().any(Option::is_none) && Instant::now() < deadline {
            for (seen, probe) in reached.iter_mut().zip(&probes) {
                if seen.is_none() {
                    *seen = probe::first_from(&probe.log, sent, target);
                }
            }
            if last_check.elapsed() >= CHECK_EVERY {
                check(&mut system, &mut loads)?;
                last_check = Instant::now();
            }
            tokio::time::sleep(LOOK_EVERY).await;
        }
        changes.push(ChangeTimes {
            index,
            target,
            internal_url,
            generation,
            sent,
            accepted,
        });
        let shown: Vec<String> = reached
            .iter()
            .map(|r| {
                r.map_or_else(
                    || "not seen".to_owned(),
                    |at| format!("{:.0} ms", at.saturating_sub(accepted).as_secs_f64() * 1e3),
                )
            })
            .collect();
        eprintln!(
            "s6: change {index}/{} to {}: {}",
            args.changes,
            BACKENDS[target],
            shown.join(", ")
        );
        if reached.iter().any(Option::is_none) {
            eprintln!(
                "s6: a replica did not show change {index} within {change_timeout:?}; no more changes"
            );
            hold(&mut system, &mut loads, settle).await?;
            break;
        }
        current = target;
        hold(&mut system, &mut loads, settle).await?;
    }

    eprintln!("s6: stopping the load");
    let mut results = Vec::new();
    for (name, load) in loads {
        results.push((name, load.stop().await?));
    }
    let observations: Vec<_> = probes.into_iter().map(Probe::stop).collect();
    let config = config_watch.stop();
    let measured = Measured {
        backends: names,
        replicas: system.replicas.iter().map(|r| r.name.to_owned()).collect(),
        changes,
        observations,
        config,
        loads: results,
        setup: system.setup,
    };
    eprintln!("s6: stopping the system");
    drop(system);
    Ok(S6Report::build(Machine::here(), settings, measured))
}

/// Waits `duration` while checking that every process runs.
async fn hold(
    system: &mut System,
    loads: &mut [(String, RunningLoad)],
    duration: Duration,
) -> Result<(), DataplaneError> {
    let until = Instant::now() + duration;
    loop {
        check(system, loads)?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        tokio::time::sleep(left.min(CHECK_EVERY)).await;
    }
}

fn check(system: &mut System, loads: &mut [(String, RunningLoad)]) -> Result<(), DataplaneError> {
    system.check_running()?;
    for (_, load) in loads.iter_mut() {
        load.check_running()?;
    }
    Ok(())
}
