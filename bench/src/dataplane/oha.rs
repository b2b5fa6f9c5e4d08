//! oha, the load generator of the small-GET scenario (S1): where it is, how it is run,
//! and what the benchmark reads from its JSON report (`--output-format json`).
//!
//! oha counts every request it started, also those it aborted itself when the duration
//! ran out (`aborted due to deadline`); its `requestsPerSec` includes them and failures.
//! The benchmark counts only answers with status 200, over oha's measured duration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::DataplaneError;

/// The oha version `bench/install-tools.sh` installs by default.
pub const OHA_VERSION: &str = "1.16.0";

/// The error oha records for requests it cut off at the end of `-z`.
const DEADLINE_ERROR: &str = "aborted due to deadline";

/// Where oha is: the given path, else the cache `bench/install-tools.sh` installs into
/// (`$SALLYPORT_TOOLS_DIR`, default `~/.cache/sallyport/tools`), else `PATH`.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, DataplaneError> {
    const HINT: &str = "install it with `bash bench/install-tools.sh` (`make bench-dataplane` does), or pass --oha PATH";
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_owned())
        } else {
            Err(DataplaneError::BinaryNotFound {
                name: "oha",
                path: path.to_owned(),
                hint: HINT,
            })
        };
    }
    let tools = std::env::var_os("SALLYPORT_TOOLS_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/sallyport/tools"))
        });
    let cached = tools.map(|dir| dir.join(format!("oha-{OHA_VERSION}/bin/oha")));
    if let Some(cached) = cached.as_ref().filter(|path| path.is_file()) {
        return Ok(cached.clone());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("oha"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| DataplaneError::BinaryNotFound {
            name: "oha",
            path: cached.unwrap_or_else(|| PathBuf::from("oha")),
            hint: HINT,
        })
}

/// `oha --version`, e.g. `oha 1.16.0`.
pub async fn version(oha: &Path) -> String {
    match tokio::process::Command::new(oha)
        .arg("--version")
        .output()
        .await
    {
        Ok(output) => String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        Err(error) => format!("unknown ({error})"),
    }
}

/// One oha run.
#[derive(Clone, Debug)]
pub struct OhaLoad<'a> {
    /// The oha executable.
    pub oha: &'a Path,
    /// The URL requested.
    pub url: String,
    /// Concurrent connections (`-c`).
    pub connections: u32,
    /// How long (`-z`).
    pub duration: Duration,
    /// Further arguments (`--cacert`, `--connect-to`).
    pub extra: Vec<String>,
    /// Also report latency over the requests that started this long after the run began
    /// ([`OhaResult::steady`]): oha writes every answered request to a temporary SQLite
    /// file (`--db-url`), read when it ends. At a fixed rate, the requests of the first
    /// moments wait for oha's connections (and TLS handshakes) to open, and the
    /// coordinated-omission correction rightly counts that wait; this leaves it out.
    pub steady_after: Option<Duration>,
}

impl OhaLoad<'_> {
    /// Runs oha to the end and reads its report; it is killed if it runs more than 60 s
    /// past its duration.
    pub async fn run(&self) -> Result<OhaResult, DataplaneError> {
        let records = match self.steady_after {
            Some(_) => Some(
                tempfile::Builder::new()
                    .prefix("sallyport-bench-oha-")
                    .tempdir()
                    .map_err(DataplaneError::io("creating a directory for oha's records"))?,
            ),
            None => None,
        };
        let db = records.as_ref().map(|dir| dir.path().join("requests.db"));
        let mut command = tokio::process::Command::new(self.oha);
        if let Some(db) = &db {
            command.arg("--db-url").arg(db);
        }
        command
            .args(["--no-tui", "--output-format", "json"])
            .args(["-c", &self.connections.to_string()])
            .args(["-z", &format!("{}ms", self.duration.as_millis())])
            .args(&self.extra)
            .arg(&self.url)
            .env("NO_COLOR", "true")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let bound = self.duration + Duration::from_secs(60);
        let output = tokio::time::timeout(bound, command.output())
            .await
            .map_err(|_| DataplaneError::Timeout {
                what: format!("oha against {}", self.url),
                waited: bound,
                last: None,
            })?
            .map_err(|source| DataplaneError::Spawn {
                program: self.oha.to_owned(),
                source,
            })?;
        if !output.status.success() {
            return Err(DataplaneError::Oha(format!(
                "exited with {} against {}: {}",
                output.status,
                self.url,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        let mut result = parse_report(&String::from_utf8_lossy(&output.stdout))?;
        if let (Some(db), Some(after)) = (&db, self.steady_after) {
            result.steady = Some(steady_latency(db, after)?);
        }
        Ok(result)
    }
}

/// Latency over the requests that started at or after an offset into the run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct SteadyLatency {
    /// The offset, seconds: requests that started earlier are left out.
    pub after_s: f64,
    /// Answered requests counted.
    pub requests: u64,
    /// Median, milliseconds.
    pub p50_ms: Option<f64>,
    /// 99th percentile, milliseconds.
    pub p99_ms: Option<f64>,
    /// 99.9th percentile, milliseconds.
    pub p999_ms: Option<f64>,
}

/// Reads oha's per-request records (`--db-url`; table `oha`: `start`, `end`,
/// `start_latency_correction` in seconds from the run's start, `status`) and returns the
/// latency of the 200 answers to requests that started at or after `after`, measured from
/// when each was due (`start_latency_correction`, with `--latency-correction`) or sent.
pub fn steady_latency(db: &Path, after: Duration) -> Result<SteadyLatency, DataplaneError> {
    let failed = |error: rusqlite::Error| {
        DataplaneError::Oha(format!("reading its records in {}: {error}", db.display()))
    };
    let connection =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(failed)?;
    let mut statement = connection
        .prepare(
            "SELECT end - COALESCE(start_latency_correction, start) FROM oha \
             WHERE status = 200 AND start >= ?1",
        )
        .map_err(failed)?;
    let mut latencies: Vec<f64> = statement
        .query_map([after.as_secs_f64()], |row| row.get::<_, f64>(0))
        .map_err(failed)?
        .collect::<Result<_, _>>()
        .map_err(failed)?;
    latencies.sort_by(f64::total_cmp);
    let quantile = |q: f64| {
        let rank = (q * latencies.len() as f64).ceil() as usize;
        latencies
            .get(rank.saturating_sub(1))
            .map(|seconds| seconds * 1000.0)
    };
    Ok(SteadyLatency {
        after_s: after.as_secs_f64(),
        requests: latencies.len() as u64,
        p50_ms: quantile(0.5),
        p99_ms: quantile(0.99),
        p999_ms: quantile(0.999),
    })
}

/// What the benchmark takes from one oha report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OhaResult {
    /// Answers with status 200.
    pub ok: u64,
    /// Answers with another status.
    pub other_status: u64,
    /// Requests that failed (connection errors, timeouts), not counting those oha cut off
    /// at the end of the run.
    pub errors: u64,
    /// The run's duration as oha measured it, seconds.
    pub seconds: f64,
    /// 200 answers per second.
    pub ok_per_second: f64,
    /// Median latency of answered requests, milliseconds.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: Option<f64>,
    /// 99.9th percentile latency, milliseconds.
    pub p999_ms: Option<f64>,
    /// Error messages and their counts, as oha reports them (deadline aborts left out).
    pub error_kinds: BTreeMap<String, u64>,
    /// Latency after the start of the run, when [`OhaLoad::steady_after`] asked for it.
    pub steady: Option<SteadyLatency>,
}

#[derive(Deserialize)]
struct Report {
    summary: Summary,
    #[serde(rename = "latencyPercentiles", default)]
    latency_percentiles: BTreeMap<String, Option<f64>>,
    #[serde(rename = "statusCodeDistribution", default)]
    status_codes: BTreeMap<String, u64>,
    #[serde(rename = "errorDistribution", default)]
    errors: BTreeMap<String, u64>,
}

#[derive(Deserialize)]
struct Summary {
    total: f64,
}

/// Reads oha's JSON report (`--output-format json`, oha 1.x).
pub fn parse_report(json: &str) -> Result<OhaResult, DataplaneError> {
    let report: Report = serde_json::from_str(json.trim())
        .map_err(|error| DataplaneError::Oha(format!("unreadable JSON report: {error}")))?;
    let ok = report.status_codes.get("200").copied().unwrap_or(0);
    let other_status = report
        .status_codes
        .iter()
        .filter(|(code, _)| code.as_str() != "200")
        .map(|(_, count)| count)
        .sum();
    let error_kinds: BTreeMap<String, u64> = report
        .errors
        .into_iter()
        .filter(|(kind, _)| kind != DEADLINE_ERROR)
        .collect();
    let errors = error_kinds.values().sum();
    let seconds = report.summary.total;
    if seconds <= 0.0 || !seconds.is_finite() {
        return Err(DataplaneError::Oha(format!(
            "the report's duration is {seconds} s"
        )));
    }
    let millis = |key: &str| {
        report
            .latency_percentiles
            .get(key)
            .copied()
            .flatten()
            .map(|s| s * 1000.0)
    };
    Ok(OhaResult {
        ok,
        other_status,
        errors,
        seconds,
        ok_per_second: ok as f64 / seconds,
        p50_ms: millis("p50"),
        p99_ms: millis("p99"),
        p999_ms: millis("p99.9"),
        error_kinds,
        steady: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of a real oha 1.16 report, shortened.
    const REPORT: &str = r#"{
      "summary": {"successRate": 1.0, "total": 8.0012, "slowest": 0.05, "fastest": 0.0001,
                  "average": 0.0012, "requestsPerSec": 40010.5, "totalData": 640000,
                  "sizePerRequest": 2, "sizePerSec": 80000.0},
      "metrics": {"success_rate": 1.0, "requests_per_sec": 40010.5,
                  "latency_ms": {"min": 0.1, "mean": 1.2, "p50": 1.1, "p95": 2.0, "p99": 3.0, "max": 50.0}},
      "responseTimeHistogram": {"0.0001": 10},
      "latencyPercentiles": {"p10": 0.0008, "p25": 0.0009, "p50": 0.0011, "p75": 0.0013,
                             "p90": 0.0016, "p95": 0.002, "p99": 0.003, "p99.9": 0.01, "p99.99": 0.04},
      "firstByteHistogram": {}, "firstBytePercentiles": {},
      "rps": {"mean": 40000.0, "stddev": 100.0, "max": 41000.0, "min": 39000.0, "percentiles": {}},
      "details": {"DNSDialup": {"average": 0.0, "fastest": 0.0, "slowest": 0.0},
                  "DNSLookup": {"average": 0.0, "fastest": 0.0, "slowest": 0.0},
                  "firstByte": {"average": 0.0, "fastest": 0.0, "slowest": 0.0}},
      "statusCodeDistribution": {"200": 320000, "503": 4},
      "errorDistribution": {"aborted due to deadline": 50, "connection closed": 3}
    }"#;

    #[test]
    fn counts_only_200_answers_and_leaves_out_deadline_aborts() -> Result<(), DataplaneError> {
        let result = parse_report(REPORT)?;
        assert_eq!(result.ok, 320_000);
        assert_eq!(result.other_status, 4);
        assert_eq!(result.errors, 3);
        assert_eq!(
            result.error_kinds,
            BTreeMap::from([("connection closed".to_owned(), 3)])
        );
        assert!((result.ok_per_second - 320_000.0 / 8.0012).abs() < 1e-6);
        assert_eq!(result.p50_ms.map(|ms| (ms * 1000.0).round()), Some(1100.0));
        assert_eq!(result.p99_ms.map(|ms| (ms * 1000.0).round()), Some(3000.0));
        assert_eq!(
            result.p999_ms.map(|ms| (ms * 1000.0).round()),
            Some(10_000.0)
        );
        Ok(())
    }

    #[test]
    fn a_run_without_answers_has_no_latency_and_garbage_is_an_error() -> Result<(), DataplaneError>
    {
        let empty = r#"{"summary": {"total": 2.0}, "latencyPercentiles": {"p50": null},
                        "statusCodeDistribution": {}, "errorDistribution": {"connection refused": 7}}"#;
        let result = parse_report(empty)?;
        assert_eq!((result.ok, result.errors, result.p50_ms), (0, 7, None));
        assert_eq!(result.ok_per_second, 0.0);
        assert!(parse_report("not json").is_err());
        assert!(parse_report(r#"{"summary": {"total": 0.0}}"#).is_err());
        Ok(())
    }

    #[test]
    fn steady_latency_leaves_out_the_first_requests_and_other_statuses()
    -> Result<(), DataplaneError> {
        let dir = tempfile::tempdir().map_err(DataplaneError::io("tempdir"))?;
        let db = dir.path().join("requests.db");
        let connection =
            rusqlite::Connection::open(&db).map_err(|e| DataplaneError::Oha(e.to_string()))?;
        // oha's table, as oha 1.16 creates it.
        connection
            .execute_batch(
                "CREATE TABLE oha (url TEXT NOT NULL, start REAL NOT NULL,
                 start_latency_correction REAL, end REAL NOT NULL, duration REAL NOT NULL,
                 status INTEGER NOT NULL, len_bytes INTEGER NOT NULL, run INTEGER NOT NULL);",
            )
            .map_err(|e| DataplaneError::Oha(e.to_string()))?;
        let insert = |start: f64, due: f64, latency: f64, status: u16| {
            connection
                .execute(
                    "INSERT INTO oha VALUES ('u', ?1, ?2, ?3, ?4, ?5, 2, 0)",
                    rusqlite::params![start, due, due + latency, due + latency - start, status],
                )
                .map(|_| ())
                .map_err(|e| DataplaneError::Oha(e.to_string()))
        };
        // The first second: slow (connections opening), left out.
        for i in 0..100 {
            insert(0.01 * f64::from(i), 0.01 * f64::from(i), 0.150, 200)?;
        }
        // After it: 1,000 answers, 1 ms each but the last ten 5 ms; and errors left out.
        for i in 0..1000 {
            let start = 1.0 + 0.001 * f64::from(i);
            let latency = if i >= 990 { 0.005 } else { 0.001 };
            insert(start, start - 0.0005, latency, 200)?;
        }
        insert(2.5, 2.5, 9.0, 503)?;
        let steady = steady_latency(&db, Duration::from_secs(1))?;
        assert_eq!(steady.requests, 1000);
        let ms = |v: Option<f64>| v.map(|v| (v * 10.0).round() / 10.0);
        assert_eq!(ms(steady.p50_ms), Some(1.0));
        assert_eq!(ms(steady.p99_ms), Some(1.0));
        assert_eq!(ms(steady.p999_ms), Some(5.0));
        let all = steady_latency(&db, Duration::ZERO)?;
        assert_eq!(all.requests, 1100);
        assert_eq!(ms(all.p99_ms), Some(150.0));
        Ok(())
    }
}
