//! S6's load: one oha per proxy replica at a fixed rate (`-q`, with
//! `--latency-correction`) on keep-alive connections, started before the first change
//! and stopped (SIGINT: oha then prints its report) after the last. Its length is not
//! known up front, so oha gets a generous `-z` bound and is interrupted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;
use tokio::process::{Child, Command};

use crate::dataplane::DataplaneError;
use crate::dataplane::oha::{OhaResult, parse_report};

/// util-linux's `setpriv`, which makes the kernel kill oha when the benchmark dies.
const SETPRIV: &str = "/usr/bin/setpriv";
/// Bound on oha's exit and report after SIGINT.
const STOP_WITHIN: Duration = Duration::from_secs(30);

/// How one replica is loaded.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// The oha executable.
    pub oha: PathBuf,
    /// The replica's listen address.
    pub address: SocketAddr,
    /// The app's host name (the URL's, so SNI and `Host`, port 443 as published).
    pub host: String,
    /// The app's certificate, a PEM file.
    pub ca_file: PathBuf,
    /// Requests per second.
    pub rate: u32,
    /// Keep-alive connections.
    pub connections: u32,
    /// oha's own bound (`-z`); it is normally interrupted long before.
    pub bound: Duration,
    /// Where oha's standard error goes.
    pub log: PathBuf,
}

impl LoadSpec {
    /// oha's arguments.
    pub fn args(&self) -> Vec<String> {
        let port = self.address.port();
        vec![
            "--no-tui".to_owned(),
            "--output-format".to_owned(),
            "json".to_owned(),
            "-c".to_owned(),
            self.connections.to_string(),
            "-q".to_owned(),
            self.rate.to_string(),
            "--latency-correction".to_owned(),
            "-z".to_owned(),
            format!("{}s", self.bound.as_secs().max(1)),
            "--cacert".to_owned(),
            self.ca_file.display().to_string(),
            "--connect-to".to_owned(),
            format!("{}:443:{}:{port}", self.host, self.address.ip()),
            format!("https://{}/", self.host),
        ]
    }
}

/// A running oha; killed when dropped.
pub struct RunningLoad {
    child: Child,
    log: PathBuf,
}

/// What one oha reported.
#[derive(Clone, Debug, Serialize)]
pub struct LoadResult {
    /// oha's numbers (only 200 counts as ok).
    pub oha: OhaResult,
    /// Answers by status code.
    pub statuses: BTreeMap<String, u64>,
}

impl LoadResult {
    /// Answers other than 200 plus failed requests.
    pub fn errors(&self) -> u64 {
        self.oha.other_status + self.oha.errors
    }
}

impl RunningLoad {
    /// Starts oha as `spec` says. Call it from the thread that outlives it.
    pub fn start(spec: &LoadSpec) -> Result<Self, DataplaneError> {
        let log = std::fs::File::create(&spec.log).map_err(DataplaneError::io(format!(
            "creating {}",
            spec.log.display()
        )))?;
        let mut command = if Path::new(SETPRIV).is_file() {
            let mut command = Command::new(SETPRIV);
            command.args(["--pdeathsig", "KILL", "--"]).arg(&spec.oha);
            command
        } else {
            Command::new(&spec.oha)
        };
        command
            .args(spec.args())
            .env("NO_COLOR", "true")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        let child = command.spawn().map_err(|source| DataplaneError::Spawn {
            program: spec.oha.clone(),
            source,
        })?;
        Ok(Self {
            child,
            log: spec.log.clone(),
        })
    }

    /// Fails when oha has already exited.
    pub fn check_running(&mut self) -> Result<(), DataplaneError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(DataplaneError::Exited {
                name: "oha",
                status,
                log: self.log.clone(),
            }),
            Err(source) => Err(DataplaneError::Io {
                what: "checking on oha".to_owned(),
                source,
            }),
        }
    }

    /// Interrupts oha (SIGINT) and reads the report it prints then.
    pub async fn stop(self) -> Result<LoadResult, DataplaneError> {
        let pid = self
            .child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .ok_or_else(|| DataplaneError::Oha("exited before it was stopped".to_owned()))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGINT,
        )
        .map_err(|errno| DataplaneError::Io {
            what: format!("interrupting oha ({pid})"),
            source: std::io::Error::from(errno),
        })?;
        let log = self.log.clone();
        let output = tokio::time::timeout(STOP_WITHIN, self.child.wait_with_output())
            .await
            .map_err(|_| DataplaneError::Timeout {
                what: "oha's report after SIGINT".to_owned(),
                waited: STOP_WITHIN,
                last: None,
            })?
            .map_err(DataplaneError::io("reading oha's report"))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let oha = parse_report(&stdout).map_err(|error| {
            DataplaneError::Oha(format!(
                "{error} (exit {}; its log: {})",
                output.status,
                log.display()
            ))
        })?;
        Ok(LoadResult {
            oha,
            statuses: statuses(&stdout),
        })
    }
}

/// The answers by status code in oha's JSON report (empty when unreadable: the report
/// itself was read by [`parse_report`]).
pub fn statuses(report: &str) -> BTreeMap<String, u64> {
    serde_json::from_str::<serde_json::Value>(report.trim())
        .ok()
        .and_then(|value| {
            value.get("statusCodeDistribution").and_then(|codes| {
                codes.as_object().map(|codes| {
                    codes
                        .iter()
                        .filter_map(|(code, count)| Some((code.clone(), count.as_u64()?)))
                        .collect()
                })
            })
        })
        .unwrap_or_default()
}

/// `rate` requests per second shared by `parts` loads as evenly as whole numbers allow
/// (the first ones get the remainder).
pub fn split_rate(rate: u32, parts: usize) -> Vec<u32> {
    let parts_u32 = u32::try_from(parts.max(1)).unwrap_or(u32::MAX);
    let (each, rest) = (rate / parts_u32, rate % parts_u32);
    (0..parts_u32)
        .map(|index| each + u32::from(index < rest))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_shared_in_whole_requests() {
        assert_eq!(split_rate(1000, 3), [334, 333, 333]);
        assert_eq!(split_rate(999, 3), [333, 333, 333]);
        assert_eq!(split_rate(2, 3), [1, 1, 0]);
        assert_eq!(split_rate(1000, 1), [1000]);
    }

    #[test]
    fn oha_reaches_the_replica_for_the_published_host() {
        let spec = LoadSpec {
            oha: PathBuf::from("/bin/oha"),
            address: SocketAddr::from(([127, 0, 0, 1], 40123)),
            host: "s6.bench.test".to_owned(),
            ca_file: PathBuf::from("/tmp/ca.crt"),
            rate: 334,
            connections: 8,
            bound: Duration::from_secs(900),
            log: PathBuf::from("/tmp/oha.log"),
        };
        let args = spec.args();
        let joined = args.join(" ");
        assert!(joined.contains("-q 334 --latency-correction -z 900s"));
        assert!(joined.contains("--connect-to s6.bench.test:443:127.0.0.1:40123"));
        assert_eq!(
            args.last().map(String::as_str),
            Some("https://s6.bench.test/")
        );
    }

    #[test]
    fn statuses_are_read_from_the_report() {
        let report = r#"{"summary": {"total": 1.0},
            "statusCodeDistribution": {"200": 990, "403": 10}}"#;
        assert_eq!(
            statuses(report),
            BTreeMap::from([("200".to_owned(), 990), ("403".to_owned(), 10)])
        );
        assert!(statuses("garbage").is_empty());
    }
}
