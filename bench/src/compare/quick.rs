//! `sallyport-bench quick` (`make bench-quick`, run by CI): a short comparison (direct,
//! rathole over TLS, Sallyport with authentication and policy; S1 and an S3 download; 3
//! rounds) whose ratios are checked against a baseline file with a generous tolerance.
//! Ratios, not absolute speeds, so a slower or busier machine does not fail it; the
//! tolerance (by default a ratio may fall to half its baseline) absorbs run-to-run noise,
//! and what it catches is a large regression of the data path against its peer and
//! against the backend.

use std::path::PathBuf;

use clap::Args;
use serde::{Deserialize, Serialize};

use super::measure::{Measurement, ScenarioKind};
use super::report::CompareReport;
use super::targets::TargetKind;
use super::{CompareArgs, run as run_compare};
use crate::dataplane::DataplaneError;
use crate::dataplane::fleet::BinaryArgs;

/// Options of `sallyport-bench quick`.
#[derive(Clone, Debug, Args)]
pub struct QuickArgs {
    /// The baseline ratios and the tolerance.
    #[arg(long, value_name = "FILE", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/quick-baseline.json"))]
    pub baseline: PathBuf,

    /// Rounds.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,

    /// Seconds of S1 load per measurement.
    #[arg(long, value_name = "SECONDS", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub duration: u64,

    /// Size of each S3 download, MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub transfer_mib: u64,

    /// The oha executable (default: the cache of `bench/install-tools.sh`, then PATH).
    #[arg(long, value_name = "PATH", env = "SALLYPORT_BENCH_OHA")]
    pub oha: Option<PathBuf>,

    /// The script that installs the peers.
    #[arg(long, value_name = "PATH", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/install-peers.sh"))]
    pub peers_script: PathBuf,

    /// Keep the run's directory here.
    #[arg(long, value_name = "DIR")]
    pub keep_dir: Option<PathBuf>,
}

/// The baseline file: ratios measured on a quiet run, and how far below them a run may
/// fall.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Baseline {
    /// A ratio passes when it is at least `baseline * tolerance`.
    pub tolerance: f64,
    /// Where the baseline came from (commit, machine, date).
    pub measured: String,
    /// The ratios.
    pub ratios: Vec<BaselineRatio>,
}

/// One baseline ratio: `ours / against` for one measurement.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct BaselineRatio {
    /// The measurement.
    pub measurement: Measurement,
    /// Sallyport's target.
    pub ours: TargetKind,
    /// What it is divided by (a peer or direct).
    pub against: TargetKind,
    /// The baseline value.
    pub baseline: f64,
}

/// The outcome of one check.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What was checked.
    pub ratio: BaselineRatio,
    /// The ratio this run measured (median of rounds).
    pub measured: Option<f64>,
    /// The smallest that passes.
    pub floor: f64,
    /// Whether it passed.
    pub passed: bool,
}

/// The quick run's report.
#[derive(Clone, Debug, Serialize)]
pub struct QuickReport {
    /// The comparison it ran.
    pub compare: CompareReport,
    /// The checks.
    pub checks: Vec<Check>,
}

/// Ratios that fell below their floor.
#[derive(Debug, thiserror::Error)]
#[error(
    "bench-quick: {failed} of {total} ratios fell below baseline x tolerance (see the table above): {names}"
)]
pub struct Regression {
    /// How many failed.
    pub failed: usize,
    /// How many were checked.
    pub total: usize,
    /// Which.
    pub names: String,
}

/// Reads the baseline, naming the file on error.
pub fn read_baseline(path: &std::path::Path) -> Result<Baseline, DataplaneError> {
    let text = std::fs::read_to_string(path)
        .map_err(DataplaneError::io(format!("reading {}", path.display())))?;
    serde_json::from_str(&text).map_err(|error| DataplaneError::Io {
        what: format!("reading {}", path.display()),
        source: std::io::Error::other(error),
    })
}

/// Checks `report` against `baseline`.
pub fn check(report: &CompareReport, baseline: &Baseline) -> Vec<Check> {
    baseline
        .ratios
        .iter()
        .map(|ratio| {
            let measured = if ratio.against == TargetKind::Direct {
                report
                    .summary(ratio.measurement, ratio.ours)
                    .and_then(|s| s.ratio_to_direct)
            } else {
                report
                    .peer_ratio(ratio.measurement, ratio.ours, ratio.against)
                    .and_then(|r| r.ratio)
            };
            let floor = ratio.baseline * baseline.tolerance;
            Check {
                ratio: ratio.clone(),
                measured,
                floor,
                passed: measured.is_some_and(|m| m >= floor),
            }
        })
        .collect()
}

/// Runs the quick comparison and checks it.
pub fn run(args: &QuickArgs) -> Result<QuickReport, DataplaneError> {
    let baseline = read_baseline(&args.baseline)?;
    let compare = CompareArgs {
        targets: vec![
            TargetKind::Direct,
            TargetKind::RatholeTls,
            TargetKind::SallyportAuth,
        ],
        scenarios: vec![ScenarioKind::S3, ScenarioKind::S1],
        rounds: args.rounds,
        connections: 50,
        duration: args.duration,
        warmup: 1,
        rates: Vec::new(),
        bulk_rate: 2_000,
        transfer_mib: args.transfer_mib,
        transfer_timeout: 120,
        chunk_kib: 64,
        backend_workers: 2,
        tunnels: 2,
        log_filter: "info".to_owned(),
        oha: args.oha.clone(),
        peers_script: args.peers_script.clone(),
        binaries: BinaryArgs::default(),
        plots: None,
        keep_dir: args.keep_dir.clone(),
    };
    let report = run_compare(&compare)?;
    let checks = check(&report, &baseline);
    Ok(QuickReport {
        compare: report,
        checks,
    })
}

impl QuickReport {
    /// Writes the comparison's tables, the checks, and the JSON line; then fails if a
    /// check did.
    pub fn write(&self, out: &mut impl std::io::Write) -> Result<(), crate::Error> {
        let mut table = self.compare.table();
        table.push_str("\n### bench-quick: ratios against the baseline\n\n");
        table.push_str("| measurement | ratio | baseline | floor | measured | passed |\n");
        table.push_str("|---|---|---:|---:|---:|---|\n");
        for check in &self.checks {
            table.push_str(&format!(
                "| {} | {} / {} | {:.3} | {:.3} | {} | {} |\n",
                check.ratio.measurement.label(),
                check.ratio.ours.label(),
                check.ratio.against.label(),
                check.ratio.baseline,
                check.floor,
                check
                    .measured
                    .map_or_else(|| "-".to_owned(), |m| format!("{m:.3}")),
                if check.passed { "yes" } else { "**no**" }
            ));
        }
        let json = serde_json::to_string(self).map_err(|error| DataplaneError::Io {
            what: "encoding the report as JSON".to_owned(),
            source: std::io::Error::other(error),
        })?;
        write!(out, "{table}\n{json}\n").map_err(DataplaneError::io("writing the report"))?;
        let failed: Vec<String> = self
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| {
                format!(
                    "{} {}/{}",
                    c.ratio.measurement.label(),
                    c.ratio.ours.label(),
                    c.ratio.against.label()
                )
            })
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(Regression {
                failed: failed.len(),
                total: self.checks.len(),
                names: failed.join(", "),
            }
            .into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::measure::{Cpu, Sample};
    use crate::compare::report::{Series, Settings};
    use std::collections::BTreeMap;

    fn series(target: TargetKind, values: &[f64]) -> Series {
        Series {
            measurement: Measurement::S1,
            target,
            samples: values
                .iter()
                .enumerate()
                .map(|(i, v)| Sample {
                    round: i as u32 + 1,
                    value: *v,
                    ok: 1,
                    failed: 0,
                    latency: None,
                    cpu: Cpu::default(),
                    rss_growth: Vec::new(),
                    bulk_bytes_per_s: None,
                })
                .collect(),
        }
    }

    #[test]
    fn a_ratio_passes_above_its_floor_and_fails_below_or_when_missing() {
        let report = CompareReport::new(
            Settings {
                targets: vec![],
                rounds: 3,
                connections: 50,
                duration_s: 3,
                rates: vec![],
                transfer_bytes: 0,
                chunk_kib: 64,
                backend_workers: 2,
                tunnels: 2,
                log_filter: "info".to_owned(),
            },
            BTreeMap::new(),
            vec![
                series(TargetKind::Direct, &[40_000.0, 40_000.0, 40_000.0]),
                series(TargetKind::RatholeTls, &[10_000.0, 10_000.0, 10_000.0]),
                series(TargetKind::SallyportAuth, &[4_000.0, 4_000.0, 4_000.0]),
            ],
        );
        let ratio = |against, baseline| BaselineRatio {
            measurement: Measurement::S1,
            ours: TargetKind::SallyportAuth,
            against,
            baseline,
        };
        let baseline = Baseline {
            tolerance: 0.5,
            measured: "test".to_owned(),
            ratios: vec![
                // 0.4 measured; floor 0.35: passes.
                ratio(TargetKind::RatholeTls, 0.7),
                // 0.1 measured against direct; floor 0.15: fails.
                ratio(TargetKind::Direct, 0.3),
                // Not measured: fails.
                ratio(TargetKind::Frp, 1.0),
            ],
        };
        let checks = check(&report, &baseline);
        let passed: Vec<bool> = checks.iter().map(|c| c.passed).collect();
        assert_eq!(passed, [true, false, false]);
        assert_eq!(checks.first().and_then(|c| c.measured), Some(0.4));
        let quick = QuickReport {
            compare: report,
            checks,
        };
        let mut out = Vec::new();
        let error = quick.write(&mut out).err().map(|e| e.to_string());
        assert!(
            error.as_deref().is_some_and(|e| e.contains("2 of 3")),
            "{error:?}"
        );
    }

    #[test]
    fn the_committed_baseline_reads() {
        let baseline = read_baseline(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/quick-baseline.json"
        )))
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(baseline.tolerance > 0.0 && baseline.tolerance <= 1.0);
        assert!(!baseline.ratios.is_empty());
    }
}
