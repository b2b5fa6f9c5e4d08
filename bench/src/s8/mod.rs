//! Scenario S8 of the performance design: the operator under 1,000 PublishedApps applied
//! at once, and the fleet configuration compiler at 10,000 apps.
//!
//! - [`operator`]: a real control plane and the operator as a real process; N apps
//!   applied, timed until all are Ready and published ([`fixtures`] holds the objects);
//! - [`compile`]: the pure compiler over a generated fleet ([`fleet`]), timed several
//!   times, with the sizes of what it produces;
//! - [`proxy_memory`]: one proxy holding the generated fleet (10,000 apps): its resident
//!   memory empty, loaded, and after a request to every app;
//! - [`apiserver_requests`]: what the apiserver was asked during the burst;
//! - [`report`]: the table, the JSON line and the goals.

pub mod apiserver_requests;
pub mod compile;
pub mod fixtures;
pub mod fleet;
pub mod operator;
pub mod proxy_memory;
pub mod report;

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::error::BenchError;
use report::S8Report;

/// Options of `sallyport-bench s8`.
#[derive(Clone, Debug, Args)]
pub struct S8Args {
    /// PublishedApps the operator part applies (the goal is stated for 1,000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=20_000))]
    pub apps: u32,

    /// Server-side applies in flight at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub concurrency: u32,

    /// Bound, in seconds, from the first apply until all apps are applied, Ready and
    /// published; past it the run fails and says how far it got.
    #[arg(long, value_name = "SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,

    /// Apps in the generated fleet of the compile part (the goal is stated for 10,000).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(100..=100_000))]
    pub compile_apps: u32,

    /// Timed compiles of the generated fleet.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub compile_runs: u32,

    /// Apps in the generated fleet the proxy part loads into one proxy (the goal is
    /// stated for 10,000).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(100..=100_000))]
    pub proxy_apps: u32,

    /// HTTPS requests in flight at once while the proxy part visits every app.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=512))]
    pub proxy_concurrency: u32,

    /// Leave out the operator part (no control plane).
    #[arg(long)]
    pub skip_operator: bool,

    /// Leave out the compile part.
    #[arg(long)]
    pub skip_compile: bool,

    /// Leave out the proxy part.
    #[arg(long)]
    pub skip_proxy: bool,

    /// The `sallyport-proxy` executable (default: next to this one).
    #[arg(long, value_name = "PATH", env = "SALLYPORT_BENCH_PROXY_BIN")]
    pub proxy_bin: Option<PathBuf>,

    /// The `sallyport-cluster` executable (default: next to this one, in the same cargo
    /// target profile directory).
    #[arg(long, value_name = "PATH", env = "SALLYPORT_BENCH_CLUSTER_BIN")]
    pub cluster_bin: Option<PathBuf>,

    /// The `sallyport-operator` executable (default: next to this one; build it with
    /// `--release` to measure what ships).
    #[arg(long, value_name = "PATH", env = "SALLYPORT_BENCH_OPERATOR_BIN")]
    pub operator_bin: Option<PathBuf>,

    /// Keep the operator's log in this file (default: a temporary file, kept only when the
    /// run fails).
    #[arg(long, value_name = "FILE")]
    pub operator_log: Option<PathBuf>,

    /// `RUST_LOG` for the operator.
    #[arg(long, value_name = "FILTER", default_value = "info,kube=warn")]
    pub operator_log_filter: String,
}

/// Runs S8: the compile part first (on a quiet machine), then the proxy part, then the
/// operator part.
pub fn run(args: &S8Args) -> Result<S8Report, BenchError> {
    if args.skip_compile && args.skip_operator && args.skip_proxy {
        return Err(BenchError::Fixture {
            what: "the options".into(),
            message: "--skip-compile, --skip-proxy and --skip-operator leave nothing to run".into(),
        });
    }
    let options = operator::OperatorBenchOptions {
        apps: args.apps as usize,
        concurrency: args.concurrency as usize,
        timeout: Duration::from_secs(args.timeout),
        cluster_bin: args.cluster_bin.clone(),
        operator_bin: args.operator_bin.clone(),
        operator_log: args.operator_log.clone(),
        operator_log_filter: args.operator_log_filter.clone(),
    };
    // Missing binaries fail at once, not after the compile part.
    let binaries = if args.skip_operator {
        None
    } else {
        Some(operator::Binaries::locate(&options)?)
    };
    let compile = if args.skip_compile {
        None
    } else {
        Some(compile::run(
            args.compile_apps as usize,
            args.compile_runs as usize,
        )?)
    };
    let proxy = if args.skip_proxy {
        None
    } else {
        let bench = std::env::current_exe().map_err(BenchError::CurrentExe)?;
        let proxy = crate::dataplane::locate(args.proxy_bin.as_ref(), "sallyport-proxy", &bench)
            .map_err(BenchError::from)?;
        Some(
            proxy_memory::run(&proxy_memory::ProxyMemoryOptions {
                apps: args.proxy_apps as usize,
                proxy,
                concurrency: args.proxy_concurrency as usize,
                log_filter: "warn".to_owned(),
            })
            .map_err(BenchError::from)?,
        )
    };
    let operator = match &binaries {
        Some(binaries) => Some(operator::run(&options, binaries)?),
        None => None,
    };
    Ok(S8Report::new(compile, proxy, operator))
}
