//! Scenarios S1 and S3 of the performance design, the data plane measured side by side
//! in one run: straight to the backend (plain HTTP, the limit) and through
//! `sallyport-proxy` and `sallyport-connector` (user TLS to the proxy, the reverse HTTP/2
//! tunnel, plain HTTP from the connector to the backend), alternating A B A B.
//!
//! - **S3**, first, on processes that have served only a few requests: one connection
//!   downloads (and uploads) a generated body (1 GiB), timed by the benchmark's own client
//!   ([`client`]); the proxy's and the connector's resident memory is sampled from
//!   `/proc` during every transfer ([`sampler`]);
//! - **S1**: oha ([`oha`]) sends small GETs over 50 keep-alive connections for a fixed
//!   time; the 200 answers per second are counted, and the CPU time the proxy, the
//!   connector and the backend spent per request is read from `/proc`.
//!
//! [`fleet`] starts the system under test standalone (no cluster): the [`backend`], the
//! proxy reading a configuration compiled from YAML, the connector registering with a
//! static token; [`pki`] writes the TLS material; [`report`] prints medians and ratios.

pub mod authenticated;
pub mod backend;
pub mod client;
pub mod cpu;
pub mod error;
pub mod fleet;
pub mod oha;
pub mod pki;
pub mod process;
pub mod report;
pub mod sampler;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use clap::Args;

pub use error::DataplaneError;
use fleet::{Binaries, BinaryArgs, Fleet, FleetOptions};
use oha::OhaLoad;
use report::{DataplaneReport, ProcessCpu, S1Round, Settings, TransferRound, Versions};
use sampler::RssSampler;

/// Options of `sallyport-bench dataplane`.
#[derive(Clone, Debug, Args)]
pub struct DataplaneArgs {
    /// Rounds; each measures direct, then through the proxy (A B A B ...).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub rounds: u32,

    /// S1: concurrent keep-alive connections of oha.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub connections: u32,

    /// S1: seconds of load per measurement (each round has two).
    #[arg(long, value_name = "SECONDS", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub duration: u64,

    /// S1: seconds of unmeasured load against each target before the first round.
    #[arg(long, value_name = "SECONDS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=60))]
    pub warmup: u64,

    /// S3: size of each transfer, MiB.
    #[arg(long, value_name = "MIB", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=16_384))]
    pub transfer_mib: u64,

    /// S3: bound on one transfer, seconds; past it the run fails.
    #[arg(long, value_name = "SECONDS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub transfer_timeout: u64,

    /// S3: chunk size of the backend's downloads and of the client's uploads, KiB.
    #[arg(long, value_name = "KIB", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=16_384))]
    pub chunk_kib: u32,

    /// S3: downloads only.
    #[arg(long)]
    pub skip_upload: bool,

    /// Only S3.
    #[arg(long, conflicts_with = "skip_s3")]
    pub skip_s1: bool,

    /// Only S1.
    #[arg(long)]
    pub skip_s3: bool,

    /// Worker threads of the backend.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub backend_workers: u16,

    /// Tunnels the connector keeps to the proxy (`--tunnels-per-replica`).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub tunnels: u16,

    /// The oha executable (default: the cache of `bench/install-tools.sh`, then PATH).
    #[arg(long, value_name = "PATH", env = "SALLYPORT_BENCH_OHA")]
    pub oha: Option<PathBuf>,

    /// Where the proxy and connector executables are.
    #[command(flatten)]
    pub binaries: BinaryArgs,

    /// `RUST_LOG` of the proxy and the connector.
    #[arg(long, value_name = "FILTER", default_value = "info")]
    pub log_filter: String,

    /// Keep the run's directory (configuration, keys, the processes' logs) here instead
    /// of a temporary one that is removed unless the run fails.
    #[arg(long, value_name = "DIR")]
    pub keep_dir: Option<PathBuf>,
}

/// How often resident memory is sampled during a transfer.
const RSS_INTERVAL: Duration = Duration::from_millis(20);
/// At most this many samples per transfer (an hour at [`RSS_INTERVAL`]).
const RSS_SAMPLES: u32 = 180_000;

/// The executable `name`: `explicit` when given, else the file of that name next to the
/// benchmark (`bench`); an error with a hint when it is not there.
pub fn locate(
    explicit: Option<&PathBuf>,
    name: &'static str,
    bench: &Path,
) -> Result<PathBuf, DataplaneError> {
    let path = match explicit {
        Some(path) => path.clone(),
        None => bench
            .parent()
            .map(|dir| dir.join(name))
            .unwrap_or_else(|| PathBuf::from(name)),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(DataplaneError::BinaryNotFound {
            name,
            path,
            hint: "build the workspace binaries first (`cargo build --release --workspace --bins`, which `make bench` runs), or pass its path",
        })
    }
}

/// Runs S3 then S1 and returns what they measured.
pub fn run(args: &DataplaneArgs) -> Result<DataplaneReport, DataplaneError> {
    let binaries = args.binaries.locate()?;
    let oha = if args.skip_s1 {
        None
    } else {
        Some(oha::locate(args.oha.as_deref())?)
    };
    in_run_dir(args.keep_dir.as_deref(), "dataplane", |dir| async move {
        measure(args, &binaries, oha.as_deref(), &dir).await
    })
}

async fn measure(
    args: &DataplaneArgs,
    binaries: &Binaries,
    oha: Option<&Path>,
    dir: &Path,
) -> Result<DataplaneReport, DataplaneError> {
    let options = FleetOptions {
        backend_workers: args.backend_workers,
        chunk_kib: args.chunk_kib,
        log_filter: args.log_filter.clone(),
        tunnels: args.tunnels,
        // oha's users all come from 127.0.0.1: no limit per client address.
        proxy_args: ["--client-requests-per-second", "0"]
            .map(str::to_owned)
            .to_vec(),
        authenticated_app: false,
    };
    let mut fleet = Fleet::start(dir, binaries, &options).await?;
    eprintln!(
        "dataplane: the backend answers through the proxy; run directory {}",
        dir.display()
    );
    let versions = Versions {
        oha: match oha {
            Some(oha) => Some(oha::version(oha).await),
            None => None,
        },
        proxy: program_version(&binaries.proxy).await,
        connector: program_version(&binaries.connector).await,
    };
    let proxy_start = fleet.proxy.memory()?;
    let connector_start = fleet.connector.memory()?;

    let (downloads, uploads) = if args.skip_s3 {
        (Vec::new(), Vec::new())
    } else {
        transfers(args, &mut fleet).await?
    };
    let s1 = match oha {
        Some(oha) if !args.skip_s1 => small_gets(args, &mut fleet, oha).await?,
        _ => Vec::new(),
    };
    fleet.check_running()?;
    Ok(DataplaneReport::new(
        Settings {
            rounds: args.rounds,
            connections: args.connections,
            duration_s: args.duration,
            transfer_bytes: args.transfer_mib * 1024 * 1024,
            chunk_kib: args.chunk_kib,
            backend_workers: args.backend_workers,
            tunnels: args.tunnels,
            log_filter: args.log_filter.clone(),
        },
        versions,
        report::Memory {
            proxy_start,
            connector_start,
            proxy_end: fleet.proxy.memory()?,
            connector_end: fleet.connector.memory()?,
        },
        downloads,
        uploads,
        s1,
    ))
}

/// A single-threaded async runtime, as every scenario runs on: the child processes are
/// started from this thread, which outlives them (they get SIGKILL when it ends).
pub fn single_thread_runtime() -> Result<tokio::runtime::Runtime, DataplaneError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DataplaneError::io("starting the async runtime"))
}

/// Runs `measure` in the run's directory on a single-threaded runtime: `keep` (created),
/// else a new temporary directory `sallyport-bench-<label>-...`, removed afterwards unless
/// the run fails (then its path, with every process's log, is printed).
///
/// One thread: every child process is started from the main thread, which outlives them
/// (they get SIGKILL when it ends).
pub fn in_run_dir<T, F>(
    keep: Option<&Path>,
    label: &str,
    measure: impl FnOnce(PathBuf) -> F,
) -> Result<T, DataplaneError>
where
    F: Future<Output = Result<T, DataplaneError>>,
{
    let (dir, temp) = match keep {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(DataplaneError::io(format!("creating {}", dir.display())))?;
            (dir.to_owned(), None)
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix(&format!("sallyport-bench-{label}-"))
                .tempdir()
                .map_err(DataplaneError::io("creating a temporary directory"))?;
            (temp.path().to_owned(), Some(temp))
        }
    };
    let runtime = single_thread_runtime()?;
    let result = runtime.block_on(measure(dir));
    if result.is_err()
        && let Some(temp) = temp
    {
        let kept = temp.keep();
        eprintln!(
            "{label}: the run failed; its directory, with every process's log, is kept at {}",
            kept.display()
        );
    }
    result
}

/// `<program> --version`, trimmed (or why it could not be read).
pub async fn program_version(program: &Path) -> String {
    match tokio::process::Command::new(program)
        .arg("--version")
        .output()
        .await
    {
        Ok(output) => String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        Err(error) => format!("unknown ({error})"),
    }
}

/// S3: per round, a download direct then through the proxy, then (unless skipped) an
/// upload direct then through the proxy; each target's two transfers share a connection.
async fn transfers(
    args: &DataplaneArgs,
    fleet: &mut Fleet,
) -> Result<(Vec<TransferRound>, Vec<TransferRound>), DataplaneError> {
    let size = args.transfer_mib * 1024 * 1024;
    let within = Duration::from_secs(args.transfer_timeout);
    let chunk = Bytes::from(vec![b'u'; args.chunk_kib as usize * 1024]);
    let path = format!("{}{size}", backend::BYTES_PATH);
    let targets = [fleet.direct.clone(), fleet.via_proxy.clone()];
    let mut downloads = Vec::new();
    let mut uploads = Vec::new();
    for round in 1..=args.rounds {
        let mut connections = Vec::new();
        for target in &targets {
            connections.push((target, target.connect().await?));
        }
        let mut download = TransferRound::new(round);
        let mut upload = TransferRound::new(round);
        for uploading in [false, true] {
            if uploading && args.skip_upload {
                break;
            }
            let what = if uploading { "upload" } else { "download" };
            for (target, connection) in &mut connections {
                fleet.check_running()?;
                let watched = watched_pids(fleet);
                let cpu_before = cpu_times(fleet)?;
                let sampler = RssSampler::start(&watched, RSS_INTERVAL, RSS_SAMPLES);
                let done = if uploading {
                    connection
                        .upload(backend::UPLOAD_PATH, size, chunk.clone(), within)
                        .await
                } else {
                    connection.get(&path, within).await
                };
                let memory = sampler.finish();
                let done = done?;
                let cpu = cpu_delta(&cpu_before, &cpu_times(fleet)?);
                check_transfer(&done, size, uploading, target.label())?;
                let through_proxy = matches!(target, client::Target::Proxy { .. });
                let record = if uploading {
                    &mut upload
                } else {
                    &mut download
                };
                record.record(through_proxy, done.rate(size), &memory, cpu);
                eprintln!(
                    "dataplane: S3 round {round}/{}: {what:<8} {:<6} {:.2} GB/s",
                    args.rounds,
                    target.label(),
                    done.rate(size) / 1e9
                );
            }
        }
        downloads.push(download);
        if !args.skip_upload {
            uploads.push(upload);
        }
    }
    Ok((downloads, uploads))
}

/// Fails unless the answer is a 200 with all `size` bytes (a download) or the backend's
/// count of `size` bytes (an upload).
fn check_transfer(
    got: &client::Transfer,
    size: u64,
    upload: bool,
    label: &str,
) -> Result<(), DataplaneError> {
    let complete = if upload {
        got.head.trim() == size.to_string()
    } else {
        got.received == size
    };
    if got.status != http::StatusCode::OK || !complete {
        return Err(DataplaneError::Client {
            what: format!("{} ({label})", if upload { "upload" } else { "download" }),
            message: format!(
                "status {}, {} bytes received of {size}: {}",
                got.status,
                got.received,
                got.head.chars().take(200).collect::<String>()
            ),
        });
    }
    Ok(())
}

/// The pids whose memory a transfer samples, in the order of [`ProcessCpu`]: proxy,
/// connector, backend.
fn watched_pids(fleet: &Fleet) -> [u32; 3] {
    [
        fleet.proxy.pid(),
        fleet.connector.pid(),
        fleet.backend.pid(),
    ]
}

/// CPU times so far: proxy, connector, backend, the client (this benchmark and its
/// reaped children, i.e. oha once it exited), the whole machine.
fn cpu_times(fleet: &Fleet) -> Result<[Duration; 5], DataplaneError> {
    Ok([
        fleet.proxy.cpu_time()?,
        fleet.connector.cpu_time()?,
        fleet.backend.cpu_time()?,
        crate::procfs::own_cpu_time()? + cpu::reaped_children(),
        cpu::machine_busy(),
    ])
}

fn cpu_delta(before: &[Duration; 5], after: &[Duration; 5]) -> ProcessCpu {
    let delta = |i: usize| {
        after
            .get(i)
            .zip(before.get(i))
            .map_or(0.0, |(a, b)| a.saturating_sub(*b).as_secs_f64())
    };
    ProcessCpu {
        proxy_s: delta(0),
        connector_s: delta(1),
        backend_s: delta(2),
        client_s: delta(3),
        machine_s: delta(4),
    }
}

/// S1: after a warm-up of each target, per round oha direct then through the proxy.
async fn small_gets(
    args: &DataplaneArgs,
    fleet: &mut Fleet,
    oha: &Path,
) -> Result<Vec<S1Round>, DataplaneError> {
    let direct = OhaLoad {
        oha,
        url: format!("http://{}/", fleet.backend_address),
        connections: args.connections,
        duration: Duration::from_secs(args.duration),
        extra: Vec::new(),
        steady_after: None,
    };
    let port = fleet.proxy_address.port();
    let via_proxy = OhaLoad {
        url: format!("https://{}:{port}/", fleet::APP_HOST),
        extra: vec![
            "--cacert".to_owned(),
            fleet.app_ca_file.display().to_string(),
            "--connect-to".to_owned(),
            format!("{}:{port}:127.0.0.1:{port}", fleet::APP_HOST),
        ],
        ..direct.clone()
    };
    if args.warmup > 0 {
        for load in [&direct, &via_proxy] {
            eprintln!("dataplane: S1 warm-up, {} s: {}", args.warmup, load.url);
            let warmup = OhaLoad {
                duration: Duration::from_secs(args.warmup),
                ..load.clone()
            };
            let result = warmup.run().await?;
            if result.ok == 0 {
                return Err(DataplaneError::Oha(format!(
                    "no 200 answer during the warm-up against {}: {result:?}",
                    load.url
                )));
            }
        }
    }
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        let mut results = Vec::new();
        for load in [&direct, &via_proxy] {
            fleet.check_running()?;
            let before = cpu_times(fleet)?;
            let result = load.run().await?;
            let cpu = cpu_delta(&before, &cpu_times(fleet)?);
            eprintln!(
                "dataplane: S1 round {round}/{}: {:>8.0} req/s ({} errors, {} not 200) {}",
                args.rounds, result.ok_per_second, result.errors, result.other_status, load.url
            );
            results.push((result, cpu));
        }
        let mut results = results.into_iter();
        if let (Some(direct), Some(proxy)) = (results.next(), results.next()) {
            rounds.push(S1Round::new(round, direct, proxy));
        }
    }
    Ok(rounds)
}
