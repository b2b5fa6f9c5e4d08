//! The connector host of S7 (`sallyport-bench s7-connector-host`, started by `s7`, not
//! for people): one process that runs many real connectors as tasks of one async
//! runtime, through the connector's library (`sallyport_connector::run`), each with its
//! own state directory and no metrics port. A thousand connector processes would need
//! about 24 MiB each in a debug build (measured), more than this machine can spare; as
//! tasks they share a runtime and the code pages, and nothing else: each registers with
//! its own key, keeps its own tunnels and pulls its own configuration.
//!
//! The host registers its connectors first (`register`, with bounded concurrency; the
//! token comes from `SALLYPORT_REGISTRATION_TOKEN`), writes its progress to
//! `--status-file` (JSON, replaced atomically), then waits for `--go-file` to exist and
//! starts every connector at once (`run`, on the saved state). It runs until killed; a
//! connector that stops is counted in the status file with its error.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Parser};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::dataplane::DataplaneError;

/// How many error messages the status file keeps.
const ERRORS_KEPT: usize = 5;

/// Options of `sallyport-bench s7-connector-host`.
#[derive(Clone, Debug, Args)]
pub struct HostArgs {
    /// The directory under which the connectors' state directories are
    /// (`connector-NNNN`).
    #[arg(long, value_name = "DIR")]
    pub state_root: PathBuf,

    /// The number of this host's first connector.
    #[arg(long, default_value_t = 0)]
    pub first: u32,

    /// How many connectors this host runs.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub count: u32,

    /// The fleet's address (`--fleet-address` of each connector).
    #[arg(long)]
    pub fleet_address: String,

    /// The fleet's tunnel host name (`--fleet-server-name`).
    #[arg(long)]
    pub fleet_server_name: String,

    /// The fleet's root CA file (`--fleet-ca-file`).
    #[arg(long)]
    pub fleet_ca_file: PathBuf,

    /// The ConnectorGroup, namespace/name (`--group`).
    #[arg(long)]
    pub group: String,

    /// `--tunnels-per-replica` of each connector.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub tunnels: u16,

    /// Registrations in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub register_concurrency: u16,

    /// Worker threads of the host's runtime.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,

    /// Where the host writes its progress (JSON).
    #[arg(long, value_name = "PATH")]
    pub status_file: PathBuf,

    /// The host starts its connectors once this file exists.
    #[arg(long, value_name = "PATH")]
    pub go_file: PathBuf,

    /// How long the host waits for the go file before it gives up, seconds.
    #[arg(long, default_value_t = 3600)]
    pub go_timeout: u64,
}

/// A host's progress, as its status file holds it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    /// Connectors of this host.
    pub connectors: u32,
    /// Registered (or found registered) so far.
    pub registered: u32,
    /// Registrations that failed.
    pub registration_failed: u32,
    /// From the host's start until every registration ended, ms.
    pub registration_ms: Option<f64>,
    /// Connectors started (`run`).
    pub started: u32,
    /// Connectors whose `run` returned (none should).
    pub stopped: u32,
    /// The first errors of registrations and of stopped connectors.
    pub errors: Vec<String>,
}

impl HostStatus {
    /// Every registration has ended, one way or the other.
    pub fn registration_done(&self) -> bool {
        self.registered + self.registration_failed >= self.connectors
    }

    fn error(&mut self, error: String) {
        if self.errors.len() < ERRORS_KEPT {
            self.errors.push(error);
        }
    }

    /// Writes the status to `path` (a temporary file renamed over it).
    pub fn save(&self, path: &Path) -> Result<(), DataplaneError> {
        let temporary = path.with_extension("tmp");
        let json = serde_json::to_vec(self).map_err(|error| DataplaneError::Client {
            what: "encoding the host's status".to_owned(),
            message: error.to_string(),
        })?;
        std::fs::write(&temporary, json)
            .and_then(|()| std::fs::rename(&temporary, path))
            .map_err(DataplaneError::io(format!("writing {}", path.display())))
    }

    /// The status in `path`; `None` while it is not there (or not whole).
    pub fn load(path: &Path) -> Option<Self> {
        let text = std::fs::read(path).ok()?;
        serde_json::from_slice(&text).ok()
    }
}

/// The state directory of connector `index` under `root`.
pub fn state_dir(root: &Path, index: u32) -> PathBuf {
    root.join(format!("connector-{index:04}"))
}

impl HostArgs {
    /// The `sallyport-connector` command line of connector `index`: `register` or `run`.
    pub fn connector_argv(&self, command: &str, index: u32) -> Vec<String> {
        let mut argv: Vec<String> = [
            "sallyport-connector",
            command,
            "--fleet-address",
            &self.fleet_address,
            "--fleet-server-name",
            &self.fleet_server_name,
            "--fleet-ca-file",
            &self.fleet_ca_file.display().to_string(),
            "--group",
            &self.group,
            "--state-dir",
            &state_dir(&self.state_root, index).display().to_string(),
            "--log-format",
            "json",
        ]
        .map(str::to_owned)
        .to_vec();
        if command == "register" {
            argv.extend(["--registration-retry-for".to_owned(), "60s".to_owned()]);
        } else {
            argv.extend(["--tunnels-per-replica".to_owned(), self.tunnels.to_string()]);
        }
        argv
    }

    /// The parsed `sallyport-connector` command of connector `index`.
    fn connector_command(
        &self,
        command: &str,
        index: u32,
    ) -> Result<sallyport_connector::Command, DataplaneError> {
        let argv = self.connector_argv(command, index);
        sallyport_connector::Cli::try_parse_from(&argv)
            .map_err(|error| DataplaneError::Client {
                what: format!("the flags of connector {index} ({})", argv.join(" ")),
                message: error.to_string(),
            })?
            .command
            .ok_or_else(|| DataplaneError::Client {
                what: format!("the flags of connector {index}"),
                message: "no command".to_owned(),
            })
    }
}

/// Runs the host until it is killed (or every connector stopped).
pub fn serve(args: &HostArgs) -> Result<(), DataplaneError> {
    // JSON lines on stderr (the host's log file), filtered by RUST_LOG.
    sallyport_service::init_tracing("json");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.threads))
        .enable_all()
        .build()
        .map_err(DataplaneError::io("starting the host's async runtime"))?;
    runtime.block_on(host(args))
}

async fn host(args: &HostArgs) -> Result<(), DataplaneError> {
    let started = Instant::now();
    let mut status = HostStatus {
        connectors: args.count,
        ..HostStatus::default()
    };
    status.save(&args.status_file)?;
    let indices = args.first..args.first.saturating_add(args.count);

    // Registration, a bounded number at a time.
    let mut registrations = futures::stream::iter(indices.clone())
        .map(|index| async move {
            let Ok(sallyport_connector::Command::Register(fleet)) =
                args.connector_command("register", index)
            else {
                return Err(format!(
                    "connector {index}: the register flags do not parse"
                ));
            };
            sallyport_connector::run::register_only(fleet)
                .await
                .map(|_| ())
                .map_err(|error| format!("connector {index}: {error}"))
        })
        .buffer_unordered(usize::from(args.register_concurrency));
    while let Some(result) = registrations.next().await {
        match result {
            Ok(()) => status.registered += 1,
            Err(error) => {
                status.registration_failed += 1;
                status.error(error);
            }
        }
        if status.registration_done()
            || (status.registered + status.registration_failed).is_multiple_of(50)
        {
            if status.registration_done() {
                status.registration_ms = Some(crate::stats::millis(started.elapsed()));
            }
            status.save(&args.status_file)?;
        }
    }
    drop(registrations);

    // Every connector at once, when the benchmark says so.
    let deadline = Instant::now() + Duration::from_secs(args.go_timeout);
    while !args.go_file.exists() {
        if Instant::now() > deadline {
            return Err(DataplaneError::Timeout {
                what: format!("the go file {}", args.go_file.display()),
                waited: Duration::from_secs(args.go_timeout),
                last: None,
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut connectors = JoinSet::new();
    for index in indices {
        let sallyport_connector::Command::Run(run) = args.connector_command("run", index)? else {
            return Err(DataplaneError::Client {
                what: format!("the run flags of connector {index}"),
                message: "not a run command".to_owned(),
            });
        };
        connectors.spawn(async move {
            sallyport_connector::run::run(run)
                .await
                .map_err(|error| format!("connector {index}: {error}"))
        });
        status.started += 1;
    }
    status.save(&args.status_file)?;
    while let Some(ended) = connectors.join_next().await {
        status.stopped += 1;
        match ended {
            Ok(Ok(())) => status.error("a connector stopped without an error".to_owned()),
            Ok(Err(error)) => status.error(error),
            Err(error) => status.error(format!("a connector's task failed: {error}")),
        }
        status.save(&args.status_file)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> HostArgs {
        HostArgs {
            state_root: PathBuf::from("/tmp/s7"),
            first: 0,
            count: 3,
            fleet_address: "127.0.0.1:4443".to_owned(),
            fleet_server_name: "tunnel.bench.test".to_owned(),
            fleet_ca_file: PathBuf::from("/tmp/ca.crt"),
            group: "bench/bench".to_owned(),
            tunnels: 3,
            register_concurrency: 2,
            threads: 1,
            status_file: PathBuf::from("/tmp/s7/status.json"),
            go_file: PathBuf::from("/tmp/s7/go"),
            go_timeout: 1,
        }
    }

    #[test]
    fn the_connectors_own_command_line_parses() {
        let args = args();
        let Ok(sallyport_connector::Command::Run(run)) = args.connector_command("run", 12) else {
            panic!("the run flags parse");
        };
        assert_eq!(run.tunnels_per_replica, 3);
        assert_eq!(run.metrics_address, None, "no port per connector");
        assert_eq!(
            run.fleet.state.state_dir,
            PathBuf::from("/tmp/s7/connector-0012")
        );
        assert_eq!(run.fleet.group.as_deref(), Some("bench/bench"));
        let Ok(sallyport_connector::Command::Register(fleet)) =
            args.connector_command("register", 7)
        else {
            panic!("the register flags parse");
        };
        assert_eq!(fleet.registration_retry_for, Duration::from_secs(60));
        assert_eq!(fleet.log_format, "json");
    }

    #[test]
    fn the_status_file_round_trips() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary directory: {e}"));
        let path = dir.path().join("status.json");
        assert_eq!(HostStatus::load(&path), None);
        let mut status = HostStatus {
            connectors: 2,
            registered: 1,
            ..HostStatus::default()
        };
        assert!(!status.registration_done());
        status.registration_failed = 1;
        for index in 0..10 {
            status.error(format!("error {index}"));
        }
        assert!(status.registration_done());
        assert_eq!(status.errors.len(), ERRORS_KEPT);
        status
            .save(&path)
            .unwrap_or_else(|e| panic!("saving the status: {e}"));
        assert_eq!(HostStatus::load(&path), Some(status));
    }
}
