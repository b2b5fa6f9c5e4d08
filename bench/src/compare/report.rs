//! The comparison's results: every sample, per measurement and target the median and
//! min-max over rounds, ratios to direct and between Sallyport and each peer, the goals of
//! the performance design this run can judge; a Markdown table for people and one JSON line
//! for machines.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;

use serde::Serialize;

use super::measure::{Latency, Measurement, Sample};
use super::targets::TargetKind;
use crate::dataplane::DataplaneError;
use crate::machine::Machine;
use crate::report::GoalOutcome;

/// The options of the run.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// The targets, in round order.
    pub targets: Vec<TargetKind>,
    /// Rounds.
    pub rounds: u32,
    /// oha's connections.
    pub connections: u32,
    /// Seconds per request measurement.
    pub duration_s: u64,
    /// S2's fixed rates.
    pub rates: Vec<u32>,
    /// S3: bytes per transfer.
    pub transfer_bytes: u64,
    /// S3: chunk size, KiB.
    pub chunk_kib: u32,
    /// Backend worker threads.
    pub backend_workers: u16,
    /// Sallyport's tunnels.
    pub tunnels: u16,
    /// Sallyport's `RUST_LOG`.
    pub log_filter: String,
}

/// The samples of one measurement against one target, one per round.
#[derive(Clone, Debug, Serialize)]
pub struct Series {
    /// What was measured.
    pub measurement: Measurement,
    /// Against which target.
    pub target: TargetKind,
    /// One per round.
    pub samples: Vec<Sample>,
}

impl Series {
    /// An empty series.
    pub fn new(measurement: Measurement, target: TargetKind) -> Self {
        Self {
            measurement,
            target,
            samples: Vec::new(),
        }
    }
}

/// A series summarized.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// What was measured.
    pub measurement: Measurement,
    /// Against which target.
    pub target: TargetKind,
    /// Median over rounds (req/s, or bytes/s for transfers).
    pub median: Option<f64>,
    /// Smallest round.
    pub min: Option<f64>,
    /// Largest round.
    pub max: Option<f64>,
    /// Median of the target's value over direct's in the same round.
    pub ratio_to_direct: Option<f64>,
    /// Latency percentiles, medians over rounds.
    pub latency: Latency,
    /// Failed requests over all rounds.
    pub failed: u64,
    /// The hop's CPU per answered request (µs), or per GiB (s) for transfers; median.
    pub hop_cpu: Option<f64>,
    /// Largest resident memory growth of each hop process during a transfer, bytes.
    pub rss_growth_max: BTreeMap<String, u64>,
    /// S3b: what the bulk download moved meanwhile, bytes per second (median).
    pub bulk_bytes_per_s: Option<f64>,
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => sorted.get(middle).copied(),
        _ => Some((sorted.get(middle - 1)? + sorted.get(middle)?) / 2.0),
    }
}

/// A latency in ms with two decimals, or `-`.
pub fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
}

fn fold_min_max(values: &[f64]) -> (Option<f64>, Option<f64>) {
    values.iter().fold((None, None), |(lo, hi), v| {
        (
            Some(lo.map_or(*v, |lo: f64| lo.min(*v))),
            Some(hi.map_or(*v, |hi: f64| hi.max(*v))),
        )
    })
}

/// The per-round ratios of `series` over `base` (rounds matched by number).
pub fn round_ratios(series: &Series, base: &Series) -> Vec<f64> {
    series
        .samples
        .iter()
        .filter_map(|sample| {
            let other = base.samples.iter().find(|b| b.round == sample.round)?;
            (other.value > 0.0).then(|| sample.value / other.value)
        })
        .collect()
}

impl Summary {
    fn of(series: &Series, direct: Option<&Series>, transfer_bytes: u64) -> Self {
        let values: Vec<f64> = series.samples.iter().map(|s| s.value).collect();
        let (min, max) = fold_min_max(&values);
        let pick = |f: fn(&Latency) -> Option<f64>| {
            median(
                &series
                    .samples
                    .iter()
                    .filter_map(|s| s.latency.as_ref().and_then(f))
                    .collect::<Vec<_>>(),
            )
        };
        let mut rss_growth_max = BTreeMap::new();
        for sample in &series.samples {
            for (name, growth) in &sample.rss_growth {
                let entry = rss_growth_max.entry(name.clone()).or_insert(0);
                *entry = (*entry).max(*growth);
            }
        }
        Self {
            measurement: series.measurement,
            target: series.target,
            median: median(&values),
            min,
            max,
            ratio_to_direct: direct.and_then(|direct| median(&round_ratios(series, direct))),
            latency: Latency {
                p50_ms: pick(|l| l.p50_ms),
                p99_ms: pick(|l| l.p99_ms),
                p999_ms: pick(|l| l.p999_ms),
                after_s: series
                    .samples
                    .iter()
                    .find_map(|s| s.latency.as_ref().and_then(|l| l.after_s)),
            },
            failed: series.samples.iter().map(|s| s.failed).sum(),
            hop_cpu: median(
                &series
                    .samples
                    .iter()
                    .filter_map(|s| s.hop_cpu_per_unit(series.measurement, transfer_bytes))
                    .collect::<Vec<_>>(),
            ),
            rss_growth_max,
            bulk_bytes_per_s: median(
                &series
                    .samples
                    .iter()
                    .filter_map(|s| s.bulk_bytes_per_s)
                    .collect::<Vec<_>>(),
            ),
        }
    }
}

/// A ratio between two targets of one measurement: the median over rounds of `ours /
/// peer` in the same round.
#[derive(Clone, Debug, Serialize)]
pub struct PeerRatio {
    /// What was measured.
    pub measurement: Measurement,
    /// Sallyport's target.
    pub ours: TargetKind,
    /// The peer.
    pub peer: TargetKind,
    /// Median of the per-round ratios.
    pub ratio: Option<f64>,
    /// Smallest and largest per-round ratio.
    pub range: (Option<f64>, Option<f64>),
}

/// Everything one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct CompareReport {
    /// Where it ran.
    pub machine: Machine,
    /// The benchmark's build profile.
    pub profile: &'static str,
    /// The options.
    pub settings: Settings,
    /// Versions of what ran.
    pub versions: BTreeMap<String, String>,
    /// Summaries.
    pub summaries: Vec<Summary>,
    /// Sallyport's targets against each other target.
    pub peer_ratios: Vec<PeerRatio>,
    /// The goals this run can judge.
    pub goals: Vec<GoalOutcome>,
    /// Every sample.
    pub series: Vec<Series>,
}

impl CompareReport {
    /// The report of `series`.
    pub fn new(
        settings: Settings,
        versions: BTreeMap<String, String>,
        series: Vec<Series>,
    ) -> Self {
        let find = |measurement: Measurement, target: TargetKind| {
            series
                .iter()
                .find(|s| s.measurement == measurement && s.target == target)
        };
        let summaries: Vec<Summary> = series
            .iter()
            .map(|s| {
                Summary::of(
                    s,
                    find(s.measurement, TargetKind::Direct),
                    settings.transfer_bytes,
                )
            })
            .collect();
        let mut peer_ratios = Vec::new();
        for ours in series.iter().filter(|s| s.target.ours()) {
            for peer in series
                .iter()
                .filter(|s| s.measurement == ours.measurement && !s.target.ours())
            {
                let ratios = round_ratios(ours, peer);
                peer_ratios.push(PeerRatio {
                    measurement: ours.measurement,
                    ours: ours.target,
                    peer: peer.target,
                    ratio: median(&ratios),
                    range: fold_min_max(&ratios),
                });
            }
        }
        let mut report = Self {
            machine: Machine::here(),
            profile: crate::report::build_profile(),
            settings,
            versions,
            summaries,
            peer_ratios,
            goals: Vec::new(),
            series,
        };
        report.goals = super::report::goals(&report);
        report
    }

    /// The summary of `measurement` against `target`.
    pub fn summary(&self, measurement: Measurement, target: TargetKind) -> Option<&Summary> {
        self.summaries
            .iter()
            .find(|s| s.measurement == measurement && s.target == target)
    }

    /// The ratio of `ours` over `peer` for `measurement`.
    pub fn peer_ratio(
        &self,
        measurement: Measurement,
        ours: TargetKind,
        peer: TargetKind,
    ) -> Option<&PeerRatio> {
        self.peer_ratios
            .iter()
            .find(|r| r.measurement == measurement && r.ours == ours && r.peer == peer)
    }

    /// The measurements present, in run order.
    pub fn measurements(&self) -> Vec<Measurement> {
        let mut seen = Vec::new();
        for series in &self.series {
            if !seen.contains(&series.measurement) {
                seen.push(series.measurement);
            }
        }
        seen
    }

    /// The tables.
    pub fn table(&self) -> String {
        crate::report::written(|out| self.write_table(out))
    }

    fn write_table(&self, out: &mut String) -> std::fmt::Result {
        crate::report::write_heading(
            out,
            "compare: the data plane side by side with its peers",
            &self.machine,
            self.profile,
            "make bench-compare",
        )?;
        let s = &self.settings;
        writeln!(
            out,
            "{} rounds, targets in round order: {}; {} oha connections, {} s per measurement; transfers of {} MiB",
            s.rounds,
            s.targets
                .iter()
                .map(|t| t.label())
                .collect::<Vec<_>>()
                .join(", "),
            s.connections,
            s.duration_s,
            s.transfer_bytes / (1024 * 1024)
        )?;
        let versions: Vec<String> = self
            .versions
            .iter()
            .map(|(name, version)| format!("{name}: {version}"))
            .collect();
        writeln!(out, "versions: {}", versions.join("; "))?;
        for measurement in self.measurements() {
            let transfer = measurement.is_transfer();
            writeln!(
                out,
                "\n### {} ({})\n",
                measurement.label(),
                measurement.unit()
            )?;
            if let Some(after) = self
                .summaries
                .iter()
                .filter(|s| s.measurement == measurement)
                .find_map(|s| s.latency.after_s)
            {
                writeln!(
                    out,
                    "Latency: requests that started {after} s or more into each measurement (before, oha opens its connections).\n"
                )?;
            }
            writeln!(
                out,
                "| target | median | min-max | to direct | sallyport-auth to it | sallyport to it | p50 / p99 / p99.9 ms | failed | hop CPU {} |",
                if transfer { "s/GiB" } else { "µs/req" }
            )?;
            writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
            for summary in self
                .summaries
                .iter()
                .filter(|s| s.measurement == measurement)
            {
                let scale = if transfer { 1e-9 } else { 1.0 };
                let value = |v: Option<f64>| {
                    v.map_or_else(
                        || "-".to_owned(),
                        |v| {
                            if transfer {
                                format!("{:.3}", v * scale)
                            } else {
                                crate::report::grouped(v.round() as u64)
                            }
                        },
                    )
                };
                let ratio = |ours: TargetKind| {
                    if summary.target.ours() {
                        return "-".to_owned();
                    }
                    self.peer_ratio(measurement, ours, summary.target)
                        .and_then(|r| r.ratio)
                        .map_or_else(|| "-".to_owned(), |r| format!("**{r:.2}x**"))
                };
                let latency = if transfer {
                    "-".to_owned()
                } else {
                    format!(
                        "{} / {} / {}",
                        ms(summary.latency.p50_ms),
                        ms(summary.latency.p99_ms),
                        ms(summary.latency.p999_ms)
                    )
                };
                let cpu = summary.hop_cpu.map_or_else(
                    || "-".to_owned(),
                    |c| {
                        if transfer {
                            format!("{c:.2}")
                        } else {
                            format!("{c:.0}")
                        }
                    },
                );
                let rss = if summary.rss_growth_max.is_empty() {
                    String::new()
                } else {
                    let growth: Vec<String> = summary
                        .rss_growth_max
                        .iter()
                        .map(|(name, bytes)| {
                            format!("{name} +{:.1} MiB", *bytes as f64 / (1024.0 * 1024.0))
                        })
                        .collect();
                    format!(" (RSS {})", growth.join(", "))
                };
                let rss = match summary.bulk_bytes_per_s {
                    Some(bulk) => format!("{rss} (bulk {:.2} GB/s)", bulk / 1e9),
                    None => rss,
                };
                writeln!(
                    out,
                    "| {} | {} | {}-{} | {} | {} | {} | {} | {} | {}{} |",
                    summary.target.label(),
                    value(summary.median),
                    value(summary.min),
                    value(summary.max),
                    summary
                        .ratio_to_direct
                        .map_or_else(|| "-".to_owned(), |r| format!("{r:.3}x")),
                    ratio(TargetKind::SallyportAuth),
                    ratio(TargetKind::Sallyport),
                    latency,
                    summary.failed,
                    cpu,
                    rss
                )?;
            }
        }
        writeln!(out, "\n### Goals (performance.md)\n")?;
        writeln!(out, "| goal | measured | met |")?;
        writeln!(out, "|---|---|---|")?;
        for goal in &self.goals {
            writeln!(
                out,
                "| {} | {} | {} |",
                goal.goal,
                goal.measured,
                if goal.met { "yes" } else { "**no**" }
            )?;
        }
        Ok(())
    }

    /// Writes the tables, then the JSON line.
    pub fn write(&self, out: &mut impl Write) -> Result<(), DataplaneError> {
        let json = serde_json::to_string(self).map_err(|error| DataplaneError::Io {
            what: "encoding the report as JSON".to_owned(),
            source: std::io::Error::other(error),
        })?;
        write!(out, "{}\n{json}\n", self.table()).map_err(DataplaneError::io("writing the report"))
    }
}

/// The goals of performance.md this run can judge (only those whose targets ran).
pub fn goals(report: &CompareReport) -> Vec<GoalOutcome> {
    use Measurement::*;
    use TargetKind::*;
    let mut goals = Vec::new();
    let ratio_goal = |goals: &mut Vec<GoalOutcome>,
                      text: &str,
                      measurement: Measurement,
                      ours: TargetKind,
                      peer: TargetKind,
                      at_least: f64| {
        if let Some(ratio) = report
            .peer_ratio(measurement, ours, peer)
            .and_then(|r| r.ratio)
        {
            goals.push(GoalOutcome {
                goal: text.to_owned(),
                measured: format!("{ratio:.2}x ({} / {})", ours.label(), peer.label()),
                met: ratio >= at_least,
            });
        }
    };
    ratio_goal(
        &mut goals,
        "S1, authentication and policy on: >= 1.0x rathole-TLS",
        S1,
        SallyportAuth,
        RatholeTls,
        1.0,
    );
    ratio_goal(
        &mut goals,
        "S1 stretch: >= 1.0x rathole-TCP",
        S1,
        SallyportAuth,
        RatholeTcp,
        1.0,
    );
    if let Some(median) = report.summary(S1, SallyportAuth).and_then(|s| s.median) {
        goals.push(GoalOutcome {
            goal: "S1: >= 10x the reference connector's 1,200 req/s".to_owned(),
            measured: format!("{} req/s", crate::report::grouped(median.round() as u64)),
            met: median >= 12_000.0,
        });
    }
    ratio_goal(
        &mut goals,
        "S1b, user TLS: >= 5x rathole-TLS",
        S1b,
        Sallyport,
        RatholeTls,
        5.0,
    );
    for (rate, bound_ms) in [(10_000, 1.5), (2_000, 0.5)] {
        let measurement = S2 { rate };
        let direct = report.summary(measurement, Direct);
        for ours in [SallyportAuth, Sallyport] {
            let Some(summary) = report.summary(measurement, ours) else {
                continue;
            };
            if let (Some(p99), Some(base)) = (
                summary.latency.p99_ms,
                direct.and_then(|d| d.latency.p99_ms),
            ) {
                let held = summary
                    .median
                    .is_some_and(|achieved| achieved >= f64::from(rate) * 0.95);
                goals.push(GoalOutcome {
                    goal: format!(
                        "S2 at {rate} req/s ({}): added p99 over direct <= {bound_ms} ms",
                        ours.label()
                    ),
                    measured: format!(
                        "+{:.2} ms (p99 {p99:.2} vs {base:.2}){}",
                        p99 - base,
                        if held {
                            ""
                        } else {
                            "; the rate was not sustained"
                        }
                    ),
                    met: held && p99 - base <= bound_ms,
                });
            }
        }
        if rate == 10_000
            && let (Some(ours), Some(peer)) = (
                report
                    .summary(measurement, SallyportAuth)
                    .and_then(|s| s.latency.p999_ms),
                report
                    .summary(measurement, RatholeTls)
                    .and_then(|s| s.latency.p999_ms),
            )
        {
            goals.push(GoalOutcome {
                goal: "S2 at 10000 req/s: p99.9 no worse than rathole-TLS".to_owned(),
                measured: format!("{ours:.2} ms vs {peer:.2} ms"),
                met: ours <= peer,
            });
        }
    }
    for summary in report
        .summaries
        .iter()
        .filter(|s| s.target.ours() && matches!(s.measurement, S3b { .. }))
    {
        let S3b { rate } = summary.measurement else {
            continue;
        };
        let alone = report
            .summary(S2 { rate }, summary.target)
            .and_then(|s| s.latency.p99_ms);
        if let (Some(with_bulk), Some(alone)) = (summary.latency.p99_ms, alone) {
            goals.push(GoalOutcome {
                goal: format!(
                    "S3b ({}): small-GET p99 at {rate} req/s at most doubles next to a bulk transfer",
                    summary.target.label()
                ),
                measured: format!(
                    "{with_bulk:.2} ms vs {alone:.2} ms alone ({:.2}x)",
                    with_bulk / alone.max(1e-9)
                ),
                met: with_bulk <= 2.0 * alone,
            });
        }
    }
    ratio_goal(
        &mut goals,
        "S3 download, one stream, user TLS: >= 1.5x rathole-TLS",
        S3Download,
        Sallyport,
        RatholeTls,
        1.5,
    );
    ratio_goal(
        &mut goals,
        "S3 upload, one stream, user TLS: >= 1.5x rathole-TLS",
        S3Upload,
        Sallyport,
        RatholeTls,
        1.5,
    );
    for measurement in [S3Download, S3Upload] {
        if let Some(summary) = report.summary(measurement, Sallyport)
            && let Some(largest) = summary.rss_growth_max.values().max()
        {
            goals.push(GoalOutcome {
                goal: format!(
                    "{}: memory growth <= 64 MiB per process",
                    measurement.label()
                ),
                measured: format!("{:.1} MiB", *largest as f64 / (1024.0 * 1024.0)),
                met: *largest <= 64 * 1024 * 1024,
            });
        }
    }
    goals
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::measure::Cpu;

    fn sample(round: u32, value: f64, p99: f64) -> Sample {
        Sample {
            round,
            value,
            ok: 1000,
            failed: 0,
            latency: Some(Latency {
                p50_ms: Some(p99 / 2.0),
                p99_ms: Some(p99),
                p999_ms: Some(p99 * 2.0),
                after_s: None,
            }),
            cpu: Cpu::default(),
            rss_growth: Vec::new(),
            bulk_bytes_per_s: None,
        }
    }

    fn series(measurement: Measurement, target: TargetKind, values: &[(f64, f64)]) -> Series {
        Series {
            measurement,
            target,
            samples: values
                .iter()
                .enumerate()
                .map(|(i, (v, p99))| sample(i as u32 + 1, *v, *p99))
                .collect(),
        }
    }

    fn settings() -> Settings {
        Settings {
            targets: TargetKind::ALL.to_vec(),
            rounds: 3,
            connections: 50,
            duration_s: 5,
            rates: vec![2000, 10_000],
            transfer_bytes: 1 << 30,
            chunk_kib: 64,
            backend_workers: 2,
            tunnels: 2,
            log_filter: "info".to_owned(),
        }
    }

    #[test]
    fn ratios_are_taken_round_by_round_and_goals_follow_them() {
        let report = CompareReport::new(
            settings(),
            BTreeMap::new(),
            vec![
                series(Measurement::S1, TargetKind::Direct, &[(40_000.0, 1.0); 3]),
                series(
                    Measurement::S1,
                    TargetKind::RatholeTls,
                    &[(10_000.0, 3.0), (20_000.0, 3.0), (10_000.0, 3.0)],
                ),
                series(
                    Measurement::S1,
                    TargetKind::SallyportAuth,
                    &[(12_000.0, 2.0), (16_000.0, 2.0), (8_000.0, 2.0)],
                ),
            ],
        );
        let ratio = report
            .peer_ratio(
                Measurement::S1,
                TargetKind::SallyportAuth,
                TargetKind::RatholeTls,
            )
            .unwrap_or_else(|| panic!("no ratio"));
        // Rounds: 1.2, 0.8, 0.8 -> median 0.8 (not 12,000 / 10,000 of the medians).
        assert_eq!(ratio.ratio, Some(0.8));
        assert_eq!(ratio.range, (Some(0.8), Some(1.2)));
        let auth = report
            .summary(Measurement::S1, TargetKind::SallyportAuth)
            .unwrap_or_else(|| panic!("no summary"));
        assert_eq!(auth.median, Some(12_000.0));
        assert_eq!(auth.ratio_to_direct, Some(0.3));
        let rathole_goal = report
            .goals
            .iter()
            .find(|g| g.goal.contains(">= 1.0x rathole-TLS"))
            .unwrap_or_else(|| panic!("no goal: {:?}", report.goals));
        assert!(!rathole_goal.met);
        let absolute = report
            .goals
            .iter()
            .find(|g| g.goal.contains("1,200"))
            .unwrap_or_else(|| panic!("no goal"));
        assert!(absolute.met, "{absolute:?}");
        assert!(report.table().contains("**0.80x**"), "{}", report.table());
    }

    #[test]
    fn s2_goals_need_the_rate_held_and_the_added_p99_within_bound() {
        let rate = Measurement::S2 { rate: 2000 };
        let report = CompareReport::new(
            settings(),
            BTreeMap::new(),
            vec![
                series(rate, TargetKind::Direct, &[(2000.0, 1.0); 3]),
                series(rate, TargetKind::SallyportAuth, &[(2000.0, 1.4); 3]),
                series(rate, TargetKind::Sallyport, &[(1500.0, 1.2); 3]),
            ],
        );
        let goal = |who: &str| {
            report
                .goals
                .iter()
                .find(|g| g.goal.contains("2000") && g.goal.contains(&format!("({who})")))
                .unwrap_or_else(|| panic!("no goal for {who}: {:?}", report.goals))
                .clone()
        };
        assert!(goal("sallyport-auth").met);
        let passthrough = goal("sallyport");
        assert!(!passthrough.met, "the rate was not held: {passthrough:?}");
        assert!(passthrough.measured.contains("not sustained"));
    }

    #[test]
    fn medians_skip_nothing_finite_and_handle_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
    }
}
