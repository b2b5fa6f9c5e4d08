//! S6's report: what the probes, the configuration watch and oha saw, judged against the
//! changes; a table per change, one per replica, the goals, and the whole as one JSON
//! line.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use serde::Serialize;

use super::load::LoadResult;
use super::probe::{ConfigSeen, Observation, Seen, config_reached, judge};
use crate::dataplane::DataplaneError;
use crate::machine::Machine;
use crate::report::{GoalOutcome, grouped};
use crate::stats::{millis, quantile, seconds};

/// The goal's bound on the change reaching every replica, at the 99th percentile.
pub const GOAL_P99: Duration = Duration::from_secs(1);
/// The share of the asked rate the load must reach for the no-error goal to count.
pub const RATE_REACHED: f64 = 0.9;

/// How the run was set up.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// Proxy replicas.
    pub proxies: usize,
    /// Changes asked for.
    pub changes: u32,
    /// Load over all replicas, requests per second (0: none).
    pub rate: u32,
    /// oha's keep-alive connections per replica.
    pub connections: u32,
    /// A probe's period per replica, ms.
    pub probe_ms: u64,
    /// Load and probes after every replica had a change, before the next, ms.
    pub settle_ms: u64,
    /// Load and probes before the first change, ms.
    pub warmup_ms: u64,
    /// Bound on one change reaching every replica, s.
    pub change_timeout_s: u64,
    /// The build of the benchmark (`release` or `debug`).
    pub profile: &'static str,
}

/// One change as the run made it.
#[derive(Clone, Debug)]
pub struct ChangeTimes {
    /// 1, 2, ...
    pub index: u32,
    /// The backend it points the app at (index in the backends' names).
    pub target: usize,
    /// Its internal URL.
    pub internal_url: String,
    /// The PublishedApp's generation after it.
    pub generation: Option<i64>,
    /// When the patch was sent, from the run's epoch.
    pub sent: Duration,
    /// When the apiserver's answer (accepted) arrived.
    pub accepted: Duration,
}

/// Everything the run collected, for [`S6Report::build`].
#[derive(Clone, Debug)]
pub struct Measured {
    /// The backends' names.
    pub backends: Vec<String>,
    /// The replicas' names.
    pub replicas: Vec<String>,
    /// The changes made, in order.
    pub changes: Vec<ChangeTimes>,
    /// Per replica (same order), what its probe saw, in time order.
    pub observations: Vec<Vec<Observation>>,
    /// The configuration versions the watch saw.
    pub config: Vec<ConfigSeen>,
    /// Per replica with load, its name and what oha reported.
    pub loads: Vec<(String, LoadResult)>,
    /// Control plane start until every replica answered.
    pub setup: Duration,
}

/// One change seen by one replica.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaChange {
    /// The replica.
    pub proxy: String,
    /// From the apiserver accepting the patch to the replica's first answer from the new
    /// backend, ms; `None` when it was not seen within the bound.
    pub ms: Option<f64>,
    /// Answers from the old backend after that first one (flips back).
    pub stale: u64,
    /// Probes without a 200 from a backend.
    pub failed: u64,
    /// Probes from the patch to the next change.
    pub probes: u64,
}

/// One change.
#[derive(Clone, Debug, Serialize)]
pub struct ChangeRecord {
    /// 1, 2, ...
    pub index: u32,
    /// The backend the app was pointed at.
    pub to: String,
    /// The PublishedApp's generation after the patch.
    pub generation: Option<i64>,
    /// The patch's round trip (sent to accepted), ms.
    pub patch_ms: f64,
    /// From accepted to the benchmark's watch seeing the compiled configuration with
    /// the new internal URL (the operator's part, plus one watch delivery), ms.
    pub config_ms: Option<f64>,
    /// Until the last replica answered from the new backend, ms.
    pub all_ms: Option<f64>,
    /// Per replica.
    pub replicas: Vec<ReplicaChange>,
}

/// Percentiles of a set of latencies (nearest rank), ms.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Percentiles {
    /// How many.
    pub samples: usize,
    /// Median.
    pub p50_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// The largest.
    pub max_ms: Option<f64>,
}

impl Percentiles {
    /// Of `samples`.
    pub fn of(samples: &[Duration]) -> Self {
        let at = |q: f64| quantile(samples, q).map(millis);
        Self {
            samples: samples.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// One replica over the run.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaSummary {
    /// Its name.
    pub proxy: String,
    /// Its propagation latency over the changes.
    pub latency: Percentiles,
    /// Flips back to an old backend (warm-up included: any answer not from `blue`).
    pub stale: u64,
    /// Probes without a 200 from a backend.
    pub probe_failures: u64,
    /// Probes sent.
    pub probes: u64,
    /// What oha saw through it.
    pub load: Option<LoadResult>,
}

/// oha over every replica.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadTotals {
    /// 200 answers.
    pub ok: u64,
    /// Other answers plus failed requests.
    pub errors: u64,
    /// Answers by status.
    pub statuses: BTreeMap<String, u64>,
    /// Failed requests by oha's message.
    pub error_kinds: BTreeMap<String, u64>,
    /// 200 answers per second, summed over the replicas.
    pub ok_per_second: f64,
}

/// What S6 measured.
#[derive(Clone, Debug, Serialize)]
pub struct S6Report {
    /// Where it ran.
    pub machine: Machine,
    /// How.
    pub settings: Settings,
    /// Control plane start until every replica answered, s (not measured by the goal).
    pub setup_s: f64,
    /// Every change made reached every replica within the bound.
    pub complete: bool,
    /// The changes.
    pub changes: Vec<ChangeRecord>,
    /// Propagation latency over every change and replica: the S6 number.
    pub propagation: Percentiles,
    /// Accepted to the compiled configuration seen, over the changes.
    pub config: Percentiles,
    /// Per replica.
    pub replicas: Vec<ReplicaSummary>,
    /// oha over every replica.
    pub load: LoadTotals,
    /// Probe failures by kind.
    pub probe_failure_kinds: BTreeMap<String, u64>,
    /// Errors in all: oha's non-200 answers and failures, failed probes, flips back.
    pub errors: u64,
    /// The goals.
    pub goals: Vec<GoalOutcome>,
}

impl S6Report {
    /// Judges `measured`.
    pub fn build(machine: Machine, settings: Settings, measured: Measured) -> Self {
        let Measured {
            backends,
            replicas,
            changes,
            observations,
            config,
            loads,
            setup,
        } = measured;
        let name = |index: usize| backends.get(index).cloned().unwrap_or_default();
        let mut records = Vec::new();
        let mut per_replica_latency: Vec<Vec<Duration>> = vec![Vec::new(); replicas.len()];
        let mut stale = vec![0u64; replicas.len()];
        let mut all_latencies = Vec::new();
        let mut config_latencies = Vec::new();
        let mut complete = changes.len() == settings.changes as usize;

        // Before the first change every answer must come from the first backend.
        let first_sent = changes.first().map(|c| c.sent);
        for (replica, seen) in observations.iter().enumerate() {
            let warmup = judge(seen, Duration::ZERO, first_sent, 0);
            stale[replica] += warmup.old_before + warmup.stale;
        }
        for (position, change) in changes.iter().enumerate() {
            let end = changes.get(position + 1).map(|next| next.sent);
            let mut row = Vec::new();
            let mut slowest: Option<Duration> = Some(Duration::ZERO);
            for (replica, seen) in observations.iter().enumerate() {
                let window = judge(seen, change.sent, end, change.target);
                let latency = window
                    .first_new
                    .map(|first| first.saturating_sub(change.accepted));
                if let Some(latency) = latency {
                    per_replica_latency[replica].push(latency);
                    all_latencies.push(latency);
                } else {
                    complete = false;
                }
                slowest = slowest.zip(latency).map(|(a, b)| a.max(b));
                stale[replica] += window.stale;
                row.push(ReplicaChange {
                    proxy: replicas.get(replica).cloned().unwrap_or_default(),
                    ms: latency.map(millis),
                    stale: window.stale,
                    failed: window.failed,
                    probes: window.probes,
                });
            }
            let config_at = config_reached(&config, change.sent, &change.internal_url)
                .map(|at| at.saturating_sub(change.accepted));
            config_latencies.extend(config_at);
            records.push(ChangeRecord {
                index: change.index,
                to: name(change.target),
                generation: change.generation,
                patch_ms: millis(change.accepted.saturating_sub(change.sent)),
                config_ms: config_at.map(millis),
                all_ms: slowest.map(millis),
                replicas: row,
            });
        }

        let mut failure_kinds: BTreeMap<String, u64> = BTreeMap::new();
        for seen in observations.iter().flatten() {
            if let Seen::Failed(kind) = &seen.seen {
                *failure_kinds.entry(kind.clone()).or_default() += 1;
            }
        }
        let mut load = LoadTotals::default();
        for (_, result) in &loads {
            load.ok += result.oha.ok;
            load.errors += result.errors();
            load.ok_per_second += result.oha.ok_per_second;
            for (status, count) in &result.statuses {
                *load.statuses.entry(status.clone()).or_default() += count;
            }
            for (kind, count) in &result.oha.error_kinds {
                *load.error_kinds.entry(kind.clone()).or_default() += count;
            }
        }
        let summaries: Vec<ReplicaSummary> = replicas
            .iter()
            .enumerate()
            .map(|(index, proxy)| {
                let seen = observations
                    .get(index)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                ReplicaSummary {
                    proxy: proxy.clone(),
                    latency: Percentiles::of(&per_replica_latency[index]),
                    stale: stale[index],
                    probe_failures: seen
                        .iter()
                        .filter(|o| matches!(o.seen, Seen::Failed(_)))
                        .count() as u64,
                    probes: seen.len() as u64,
                    load: loads
                        .iter()
                        .find(|(name, _)| name == proxy)
                        .map(|(_, result)| result.clone()),
                }
            })
            .collect();
        let errors = load.errors
            + summaries
                .iter()
                .map(|s| s.probe_failures + s.stale)
                .sum::<u64>();
        let propagation = Percentiles::of(&all_latencies);
        let goals = goals(&settings, &propagation, complete, &load, &summaries, errors);
        Self {
            machine,
            settings,
            setup_s: seconds(setup),
            complete,
            changes: records,
            propagation,
            config: Percentiles::of(&config_latencies),
            replicas: summaries,
            load,
            probe_failure_kinds: failure_kinds,
            errors,
            goals,
        }
    }

    /// Whether every goal is met.
    pub fn met(&self) -> bool {
        self.goals.iter().all(|g| g.met)
    }

    /// Prints the tables, then the report as one JSON line.
    pub fn write(&self, out: &mut impl Write) -> Result<(), DataplaneError> {
        let text = self.table().map_err(|_| DataplaneError::Client {
            what: "formatting the report".to_owned(),
            message: "fmt::Error".to_owned(),
        })?;
        let io = || DataplaneError::io("writing the report");
        out.write_all(text.as_bytes()).map_err(io())?;
        #[derive(Serialize)]
        struct Line<'a> {
            scenario: &'static str,
            #[serde(flatten)]
            report: &'a S6Report,
        }
        let json = serde_json::to_string(&Line {
            scenario: "s6",
            report: self,
        })
        .map_err(|e| DataplaneError::Client {
            what: "encoding the report".to_owned(),
            message: e.to_string(),
        })?;
        writeln!(out, "\n{json}").map_err(io())
    }

    fn table(&self) -> Result<String, std::fmt::Error> {
        use std::fmt::Write as _;
        let mut out = String::new();
        let s = &self.settings;
        crate::report::write_heading(
            &mut out,
            "S6: a PublishedApp change until every proxy replica enforces it",
            &self.machine,
            s.profile,
            "make bench-s6",
        )?;
        writeln!(
            out,
            "\n{} replicas, {} changes of spec.internalUrl (blue <-> green), load {} req/s over \
             all replicas ({} keep-alive connections each), a probe per replica every {} ms; \
             {} ms of load before the first change and {} ms after each; setup {:.1} s\n",
            s.proxies,
            s.changes,
            s.rate,
            s.connections,
            s.probe_ms,
            s.warmup_ms,
            s.settle_ms,
            self.setup_s,
        )?;
        let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
        write!(out, "| change | to | patch ms | config ms |")?;
        for replica in &self.replicas {
            write!(out, " {} ms |", replica.proxy)?;
        }
        writeln!(out, " all ms | stale | failed probes |")?;
        write!(out, "|---|---|---|---|")?;
        for _ in &self.replicas {
            write!(out, "---|")?;
        }
        writeln!(out, "---|---|---|")?;
        for change in &self.changes {
            write!(
                out,
                "| {} | {} | {:.1} | {} |",
                change.index,
                change.to,
                change.patch_ms,
                opt(change.config_ms)
            )?;
            for replica in &change.replicas {
                write!(out, " {} |", opt(replica.ms))?;
            }
            writeln!(
                out,
                " {} | {} | {} |",
                opt(change.all_ms),
                change.replicas.iter().map(|r| r.stale).sum::<u64>(),
                change.replicas.iter().map(|r| r.failed).sum::<u64>(),
            )?;
        }

        writeln!(
            out,
            "\n| replica | p50 ms | p99 ms | max ms | probes | failed probes | stale | load: 200 | load: errors | load p50 / p99 ms |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|---|---|---|---|")?;
        for replica in &self.replicas {
            let (ok, errors, latency) = match &replica.load {
                Some(load) => (
                    grouped(load.oha.ok),
                    grouped(load.errors()),
                    format!("{} / {}", opt(load.oha.p50_ms), opt(load.oha.p99_ms)),
                ),
                None => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
            };
            writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {ok} | {errors} | {latency} |",
                replica.proxy,
                opt(replica.latency.p50_ms),
                opt(replica.latency.p99_ms),
                opt(replica.latency.max_ms),
                replica.probes,
                replica.probe_failures,
                replica.stale,
            )?;
        }
        writeln!(
            out,
            "\nAll changes x replicas ({} samples): p50 {} ms, p99 {} ms, max {} ms; compiled \
             configuration seen: p50 {} ms, p99 {} ms",
            self.propagation.samples,
            opt(self.propagation.p50_ms),
            opt(self.propagation.p99_ms),
            opt(self.propagation.max_ms),
            opt(self.config.p50_ms),
            opt(self.config.p99_ms),
        )?;
        writeln!(
            out,
            "Load: {} answered 200 ({:.0}/s of {} asked), {} errors; statuses {:?}; failures {:?}",
            grouped(self.load.ok),
            self.load.ok_per_second,
            s.rate,
            grouped(self.load.errors),
            self.load.statuses,
            self.load.error_kinds,
        )?;
        if s.rate > 0 && !rate_reached(s, &self.load) {
            writeln!(
                out,
                "WARNING: the load reached {:.0} of the {} req/s asked: the system (or this machine) could not keep up",
                self.load.ok_per_second, s.rate
            )?;
        }
        if !self.probe_failure_kinds.is_empty() {
            writeln!(out, "Probe failures: {:?}", self.probe_failure_kinds)?;
        }
        if !self.complete {
            writeln!(
                out,
                "INCOMPLETE: a change did not reach every replica within {} s, or fewer changes were made than asked",
                s.change_timeout_s
            )?;
        }
        writeln!(out)?;
        crate::report::write_goal_rows(
            &mut out,
            "| goal | measured | verdict |",
            "|---|---|---|",
            &self.goals,
        )?;
        Ok(out)
    }
}

/// Whether the load reached [`RATE_REACHED`] of the asked rate (never, without load).
fn rate_reached(settings: &Settings, load: &LoadTotals) -> bool {
    settings.rate > 0 && load.ok_per_second >= RATE_REACHED * f64::from(settings.rate)
}

/// The two goals of S6.
fn goals(
    settings: &Settings,
    propagation: &Percentiles,
    complete: bool,
    load: &LoadTotals,
    replicas: &[ReplicaSummary],
    errors: u64,
) -> Vec<GoalOutcome> {
    let p99 = propagation.p99_ms;
    let failed_probes: u64 = replicas.iter().map(|r| r.probe_failures).sum();
    let stale: u64 = replicas.iter().map(|r| r.stale).sum();
    let reached = rate_reached(settings, load);
    vec![
        GoalOutcome {
            goal: format!(
                "a PublishedApp change enforced by all {} proxies <= {} ms p99",
                settings.proxies,
                GOAL_P99.as_millis()
            ),
            measured: match p99 {
                Some(p99) if complete => format!("{p99:.1} ms p99"),
                Some(p99) => format!("{p99:.1} ms p99 (incomplete: a change was not seen)"),
                None => "no change seen".to_owned(),
            },
            met: complete && p99.is_some_and(|p99| p99 <= millis(GOAL_P99)),
        },
        GoalOutcome {
            goal: format!(
                "no errors under {} req/s during the changes",
                grouped(u64::from(settings.rate))
            ),
            measured: format!(
                "load: {} errors of {}, 200s at {:.0}/s{}; probes: {failed_probes} failed, {stale} stale",
                grouped(load.errors),
                grouped(load.ok + load.errors),
                load.ok_per_second,
                if reached {
                    ""
                } else {
                    " (below the asked rate)"
                },
            ),
            met: errors == 0 && reached,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::oha::OhaResult;

    fn ms(value: u64) -> Duration {
        Duration::from_millis(value)
    }

    fn settings(changes: u32) -> Settings {
        Settings {
            proxies: 2,
            changes,
            rate: 100,
            connections: 2,
            probe_ms: 5,
            settle_ms: 100,
            warmup_ms: 100,
            change_timeout_s: 30,
            profile: "debug",
        }
    }

    fn observations(entries: &[(u64, usize)]) -> Vec<Observation> {
        entries
            .iter()
            .map(|(at, backend)| Observation {
                at: ms(*at),
                seen: Seen::Backend(*backend),
            })
            .collect()
    }

    fn load(ok: u64, other_status: u64) -> LoadResult {
        LoadResult {
            oha: OhaResult {
                ok,
                other_status,
                errors: 0,
                seconds: 1.0,
                ok_per_second: ok as f64,
                p50_ms: Some(1.0),
                p99_ms: Some(2.0),
                p999_ms: None,
                error_kinds: BTreeMap::new(),
                steady: None,
            },
            statuses: BTreeMap::from([("200".to_owned(), ok)]),
        }
    }

    fn measured(second_replica: Vec<Observation>, loads: Vec<(String, LoadResult)>) -> Measured {
        Measured {
            backends: vec!["blue".to_owned(), "green".to_owned()],
            replicas: vec!["proxy-1".to_owned(), "proxy-2".to_owned()],
            changes: vec![
                ChangeTimes {
                    index: 1,
                    target: 1,
                    internal_url: "http://green/".to_owned(),
                    generation: Some(2),
                    sent: ms(100),
                    accepted: ms(104),
                },
                ChangeTimes {
                    index: 2,
                    target: 0,
                    internal_url: "http://blue/".to_owned(),
                    generation: Some(3),
                    sent: ms(400),
                    accepted: ms(404),
                },
            ],
            observations: vec![
                observations(&[(50, 0), (150, 0), (204, 1), (300, 1), (500, 1), (604, 0)]),
                second_replica,
            ],
            config: vec![
                ConfigSeen {
                    at: ms(150),
                    internal_url: Some("http://green/".to_owned()),
                },
                ConfigSeen {
                    at: ms(450),
                    internal_url: Some("http://blue/".to_owned()),
                },
            ],
            loads,
            setup: Duration::from_secs(20),
        }
    }

    #[test]
    fn latencies_run_from_the_accepted_patch_to_each_replicas_first_new_answer() {
        let second = observations(&[(60, 0), (254, 1), (454, 0), (700, 0)]);
        let report = S6Report::build(
            Machine::here(),
            settings(2),
            measured(
                second,
                vec![
                    ("proxy-1".to_owned(), load(500, 0)),
                    ("proxy-2".to_owned(), load(500, 0)),
                ],
            ),
        );
        // proxy-1: 100 and 200 ms; proxy-2: 150 and 50 ms.
        assert!(report.complete);
        assert_eq!(report.propagation.samples, 4);
        assert_eq!(report.propagation.p50_ms, Some(100.0));
        assert_eq!(report.propagation.p99_ms, Some(200.0));
        assert_eq!(report.changes[0].all_ms, Some(150.0));
        assert_eq!(report.changes[1].all_ms, Some(200.0));
        assert_eq!(report.changes[0].config_ms, Some(46.0));
        assert_eq!(report.changes[0].patch_ms, 4.0);
        assert_eq!(report.errors, 0);
        assert!(report.met(), "{:?}", report.goals);
        let mut out = Vec::new();
        report
            .write(&mut out)
            .unwrap_or_else(|e| panic!("writing the report: {e}"));
        let text = String::from_utf8_lossy(&out);
        let json = text.lines().last().unwrap_or_default();
        assert!(json.starts_with("{\"scenario\":\"s6\""), "{json}");
        assert!(text.contains("| proxy-2 ms |"), "{text}");
    }

    #[test]
    fn a_flip_back_a_missed_change_and_load_errors_fail_the_goals() {
        // proxy-2 sees green, flips back to blue once, and never sees the second change.
        let second = observations(&[(60, 0), (254, 1), (260, 0), (300, 1), (700, 1)]);
        let report = S6Report::build(
            Machine::here(),
            settings(2),
            measured(
                second,
                vec![
                    ("proxy-1".to_owned(), load(500, 3)),
                    ("proxy-2".to_owned(), load(500, 0)),
                ],
            ),
        );
        assert!(!report.complete);
        assert_eq!(report.changes[0].replicas[1].stale, 1);
        assert_eq!(report.changes[1].replicas[1].ms, None);
        assert_eq!(report.changes[1].all_ms, None);
        assert_eq!(report.replicas[1].stale, 1);
        assert_eq!(report.load.errors, 3);
        assert_eq!(report.errors, 4);
        assert!(report.goals.iter().all(|g| !g.met), "{:?}", report.goals);
    }

    #[test]
    fn an_answer_from_the_wrong_backend_before_any_change_is_stale() {
        let second = observations(&[(60, 1), (254, 1), (454, 0)]);
        let report = S6Report::build(Machine::here(), settings(2), measured(second, Vec::new()));
        assert_eq!(report.replicas[1].stale, 1);
        assert!(report.complete);
    }
}
