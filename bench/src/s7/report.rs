//! S7's report: the setup, a table per round, the summary over rounds, the goal, and
//! the whole as one JSON line.

use std::io::Write;

use serde::Serialize;

use super::TOKIO_BACKLOG;
use super::curve::{CURVE_POINTS_MS, ConnectorSide, PERCENTS, Reach};
use crate::dataplane::DataplaneError;
use crate::machine::Machine;
use crate::report::GoalOutcome;
use crate::stats::Spread;

/// The goal of the performance design, milliseconds.
pub const GOAL_MS: f64 = 2000.0;

/// How the run was set up.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// Connectors of the group.
    pub connectors: u32,
    /// Tunnels each keeps to the one proxy.
    pub tunnels_per_connector: u16,
    /// Tunnels when all are back.
    pub target_tunnels: u64,
    /// Rounds.
    pub rounds: u32,
    /// Host processes.
    pub hosts: u16,
    /// Worker threads per host.
    pub host_threads: u16,
    /// Registrations in flight at once.
    pub register_concurrency: u16,
    /// Between two readings of the gauge, ms.
    pub poll_ms: u64,
    /// Bound of a round, s.
    pub round_timeout_s: u64,
    /// Quiet time after a round, ms.
    pub settle_ms: u64,
    /// GETs after each round.
    pub gets: u32,
    /// `RUST_LOG` of the proxy.
    pub proxy_log_filter: String,
    /// `RUST_LOG` of the hosts.
    pub host_log_filter: String,
}

/// The versions of the programs under test.
#[derive(Clone, Debug, Serialize)]
pub struct Versions {
    /// `sallyport-proxy --version`.
    pub proxy: String,
    /// `sallyport-connector --version` (the hosts run the same library).
    pub connector: String,
}

/// The machine's limits the run depends on, and what it needs of them.
#[derive(Clone, Debug, Serialize)]
pub struct Limits {
    /// The open-files limit of the benchmark and its children (raised to the hard limit).
    pub open_files: u64,
    /// What the proxy (a descriptor per tunnel and per configuration pull) or a host
    /// needs, with room for the rest.
    pub open_files_needed: u64,
    /// Ports in `net.ipv4.ip_local_port_range`.
    pub ephemeral_ports: Option<u64>,
    /// A port per tunnel and per configuration pull, at once.
    pub ephemeral_ports_needed: u64,
    /// `net.core.somaxconn`.
    pub somaxconn: Option<u64>,
    /// `net.ipv4.tcp_max_syn_backlog`.
    pub tcp_max_syn_backlog: Option<u64>,
    /// The proxy listener's accept queue: Tokio asks for 1024, capped at somaxconn. More
    /// connections arriving at once than it holds are dropped and retried by the
    /// connecting side's TCP a second later.
    pub listen_backlog: u64,
}

impl Limits {
    /// What `connectors` connectors of `tunnels` tunnels on `hosts` hosts need, next to
    /// what the machine has.
    pub fn needed(
        connectors: u64,
        tunnels: u64,
        hosts: u64,
        open_files: u64,
        ephemeral_ports: Option<u64>,
        somaxconn: Option<u64>,
        tcp_max_syn_backlog: Option<u64>,
    ) -> Self {
        // Besides the tunnels, every connector may pull its configuration at once (a
        // short connection); 256 more for files, the runtime and the probes.
        let proxy = connectors * (tunnels + 1) + 256;
        let per_host = connectors.div_ceil(hosts.max(1));
        let host = per_host * (tunnels + 2) + 256;
        Self {
            open_files,
            open_files_needed: proxy.max(host),
            ephemeral_ports,
            ephemeral_ports_needed: connectors * (tunnels + 1),
            somaxconn,
            tcp_max_syn_backlog,
            listen_backlog: somaxconn.map_or(TOKIO_BACKLOG, |max| max.min(TOKIO_BACKLOG)),
        }
    }
}

/// CPU time and memory of the processes at one point.
#[derive(Clone, Debug, Serialize)]
pub struct Usage {
    /// The proxy's resident memory, bytes.
    pub proxy_rss_bytes: u64,
    /// Its peak.
    pub proxy_peak_rss_bytes: u64,
    /// The (current) proxy's CPU time since its start, ms.
    pub proxy_cpu_ms: f64,
    /// All hosts' resident memory, bytes.
    pub hosts_rss_bytes: u64,
    /// Their peaks, added.
    pub hosts_peak_rss_bytes: u64,
    /// All hosts' CPU time since their start, ms.
    pub hosts_cpu_ms: f64,
    /// The hosts' resident memory per connector (runtimes included), bytes.
    pub per_connector_rss_bytes: u64,
}

/// Registration and the first connect.
#[derive(Clone, Debug, Serialize)]
pub struct Setup {
    /// From the hosts' spawn until every connector was registered, ms.
    pub registration_ms: f64,
    /// Each host's own count, from its start, ms.
    pub host_registration_ms: Vec<f64>,
    /// Connectors registered per second.
    pub registrations_per_s: f64,
    /// The proxy's CPU time during the registrations, ms.
    pub proxy_cpu_registration_ms: f64,
    /// From starting every connector at once until each share of the tunnels was open
    /// at the proxy.
    pub first_connect: Reach,
    /// Whether all were, within the round timeout.
    pub first_connect_complete: bool,
    /// The same from the connectors' log lines.
    pub connector_side: ConnectorSide,
    /// The proxy's CPU time during the first connect, ms.
    pub proxy_cpu_ms: f64,
    /// The hosts' CPU time during it, ms.
    pub hosts_cpu_ms: f64,
    /// The gauge's readings, `[ms from the start, tunnels]`, flat stretches dropped.
    pub curve: Vec<(f64, u64)>,
    /// Memory and CPU once all were connected.
    pub usage: Usage,
}

/// One kill and restart of the proxy.
#[derive(Clone, Debug, Serialize)]
pub struct Round {
    /// Its number, from 1.
    pub round: u32,
    /// Tunnels open before the kill (`None`: the proxy's `/metrics` did not answer).
    pub tunnels_before: Option<u64>,
    /// From the kill until the old proxy had exited, ms.
    pub proxy_exited_ms: f64,
    /// ... until the new one was spawned, ms.
    pub proxy_spawned_ms: f64,
    /// ... until its port accepted a connection, ms.
    pub port_open_ms: f64,
    /// From the port's opening until each share of the tunnels was open (the gauge).
    pub from_open: Reach,
    /// The same from the kill.
    pub from_kill: Reach,
    /// The last count read.
    pub tunnels_reached: u64,
    /// Whether every tunnel came back within the round timeout.
    pub complete: bool,
    /// From the kill to the last reading, ms.
    pub measured_for_ms: f64,
    /// Readings of the gauge that failed (the proxy not answering yet).
    pub scrape_errors: u64,
    /// The count after the settle time (flapping tunnels show here).
    pub tunnels_after_settle: Option<u64>,
    /// Tunnels open so many ms after the port opened (`[ms, tunnels]`).
    pub curve_from_open: Vec<(u64, u64)>,
    /// The gauge's readings, `[ms from the kill, tunnels]`, flat stretches dropped.
    pub curve: Vec<(f64, u64)>,
    /// What the connectors logged, from the kill.
    pub connector_side: ConnectorSide,
    /// Connectors that logged a tunnel event in the round.
    pub connectors_seen: u64,
    /// The new proxy's CPU time from its start to the last reading, ms.
    pub proxy_cpu_ms: f64,
    /// That CPU time over the wall time from its spawn: cores busy on average.
    pub proxy_busy_cores: f64,
    /// The hosts' CPU time from the kill to the last reading, ms.
    pub hosts_cpu_ms: f64,
    /// The new proxy's CPU time per tunnel it counted (its start-up included), ms: what
    /// a reconnection costs the proxy, for sizing (2,000 tunnels x this / cores).
    pub proxy_cpu_per_tunnel_ms: Option<f64>,
    /// The hosts' CPU time per tunnel counted, ms (the connectors' side).
    pub hosts_cpu_per_tunnel_ms: Option<f64>,
    /// GETs through the proxy after the settle time answered by the backend.
    pub gets_ok: u32,
    /// ... failed.
    pub gets_failed: u32,
    /// The last failure, if any.
    pub get_error: Option<String>,
}

/// What S7 measured.
#[derive(Clone, Debug, Serialize)]
pub struct S7Report {
    /// Where it ran.
    pub machine: Machine,
    /// `release` or `debug`.
    pub profile: &'static str,
    /// Of the programs.
    pub versions: Versions,
    /// How.
    pub settings: Settings,
    /// The machine's limits.
    pub limits: Limits,
    /// Registration and the first connect.
    pub setup: Setup,
    /// The rounds.
    pub rounds: Vec<Round>,
    /// Memory and CPU at the end.
    pub end: Usage,
}

/// Median, min and max of the rounds' values (`None` left out).
fn spread(values: impl Iterator<Item = Option<f64>>) -> Option<Spread> {
    Spread::of_ms(values)
}

fn show_spread(spread: Option<Spread>) -> String {
    spread.map_or_else(
        || "-".to_owned(),
        |s| format!("{:.0} ({:.0}-{:.0})", s.median_ms, s.min_ms, s.max_ms),
    )
}

fn show_ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.0}"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The summary over rounds.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Per share (50, 90, 99, 100%): from the port's opening, median (min-max) ms.
    pub from_open: Vec<(u64, Option<Spread>)>,
    /// The same from the kill.
    pub from_kill: Vec<(u64, Option<Spread>)>,
    /// The connectors' side: every connector complete, from the kill.
    pub connectors_complete_from_kill: Option<Spread>,
    /// The proxy's CPU time per tunnel back, median (min-max) ms.
    pub proxy_cpu_per_tunnel: Option<Spread>,
    /// The hosts' CPU time per tunnel back, median (min-max) ms.
    pub hosts_cpu_per_tunnel: Option<Spread>,
    /// Rounds where not every tunnel came back in time.
    pub incomplete_rounds: u32,
}

impl S7Report {
    /// The summary over rounds.
    pub fn summary(&self) -> Summary {
        let over = |pick: &dyn Fn(&Round) -> Option<f64>| spread(self.rounds.iter().map(pick));
        Summary {
            from_open: PERCENTS
                .iter()
                .map(|&p| (p, over(&|r: &Round| r.from_open.get(p))))
                .collect(),
            from_kill: PERCENTS
                .iter()
                .map(|&p| (p, over(&|r: &Round| r.from_kill.get(p))))
                .collect(),
            connectors_complete_from_kill: over(&|r: &Round| r.connector_side.connectors.p100_ms),
            proxy_cpu_per_tunnel: over(&|r: &Round| r.proxy_cpu_per_tunnel_ms),
            hosts_cpu_per_tunnel: over(&|r: &Round| r.hosts_cpu_per_tunnel_ms),
            incomplete_rounds: self.rounds.iter().filter(|r| !r.complete).count() as u32,
        }
    }

    /// The goal, judged on the worst round: every tunnel back within 2 s of the proxy
    /// accepting connections again; and, stricter, of the kill (the proxy's own restart
    /// included).
    pub fn goals(&self) -> Vec<GoalOutcome> {
        let worst = |pick: &dyn Fn(&Round) -> Option<f64>| -> Option<f64> {
            self.rounds
                .iter()
                .map(pick)
                .try_fold(0.0f64, |worst, ms| ms.map(|ms| worst.max(ms)))
                .filter(|_| !self.rounds.is_empty())
        };
        let judge = |goal: &str, worst: Option<f64>| GoalOutcome {
            goal: goal.to_owned(),
            measured: worst.map_or_else(
                || "not every tunnel came back in some round".to_owned(),
                |ms| format!("worst round {ms:.0} ms"),
            ),
            met: worst.is_some_and(|ms| ms <= GOAL_MS),
        };
        vec![
            judge(
                &format!(
                    "S7: all {} tunnels of {} connectors re-established within 2 s of the proxy accepting again, every round",
                    self.settings.target_tunnels, self.settings.connectors
                ),
                worst(&|r: &Round| r.from_open.p100_ms),
            ),
            judge(
                "S7, stricter: within 2 s of the kill (the proxy's restart included)",
                worst(&|r: &Round| r.from_kill.p100_ms),
            ),
        ]
    }

    /// Prints the tables, then the report as one JSON line.
    pub fn write(&self, out: &mut impl Write) -> Result<(), DataplaneError> {
        let text = crate::report::written(|text| self.write_text(text));
        out.write_all(text.as_bytes())
            .map_err(DataplaneError::io("writing the report"))?;
        #[derive(Serialize)]
        struct Json<'a> {
            scenario: &'static str,
            #[serde(flatten)]
            report: &'a S7Report,
            summary: Summary,
            goals: Vec<GoalOutcome>,
        }
        let json = serde_json::to_string(&Json {
            scenario: "s7",
            report: self,
            summary: self.summary(),
            goals: self.goals(),
        })
        .map_err(|error| DataplaneError::Client {
            what: "encoding the report".to_owned(),
            message: error.to_string(),
        })?;
        writeln!(out, "{json}").map_err(DataplaneError::io("writing the report"))
    }

    fn write_text(&self, out: &mut String) -> std::fmt::Result {
        use std::fmt::Write as _;
        let s = &self.settings;
        crate::report::write_heading(
            out,
            "S7: connectors reconnecting at once",
            &self.machine,
            self.profile,
            "make bench-s7",
        )?;
        writeln!(
            out,
            "proxy: {}; connector: {}",
            self.versions.proxy, self.versions.connector
        )?;
        let l = &self.limits;
        writeln!(
            out,
            "{} connectors x {} tunnels = {} tunnels to one proxy; connectors as tasks in {} host processes ({} worker thread(s) each); {} rounds; gauge read every {} ms; open files {} (needed {}), ephemeral ports {} (needed {}), listen backlog {} (somaxconn {}, tcp_max_syn_backlog {})\n",
            s.connectors,
            s.tunnels_per_connector,
            s.target_tunnels,
            s.hosts,
            s.host_threads,
            s.rounds,
            s.poll_ms,
            l.open_files,
            l.open_files_needed,
            l.ephemeral_ports
                .map_or_else(|| "?".to_owned(), |p| p.to_string()),
            l.ephemeral_ports_needed,
            l.listen_backlog,
            l.somaxconn
                .map_or_else(|| "?".to_owned(), |p| p.to_string()),
            l.tcp_max_syn_backlog
                .map_or_else(|| "?".to_owned(), |p| p.to_string()),
        )?;

        let setup = &self.setup;
        writeln!(out, "Setup (not the goal):\n")?;
        writeln!(out, "| what | value |")?;
        writeln!(out, "|---|---|")?;
        writeln!(
            out,
            "| registration of {} connectors ({} at a time) | {:.1} s ({:.0}/s); proxy CPU {:.1} s |",
            s.connectors,
            s.register_concurrency,
            setup.registration_ms / 1000.0,
            setup.registrations_per_s,
            setup.proxy_cpu_registration_ms / 1000.0
        )?;
        writeln!(
            out,
            "| first connect, all started at once: 50/90/99/100% of tunnels, ms | {} / {} / {} / {} |",
            show_ms(setup.first_connect.p50_ms),
            show_ms(setup.first_connect.p90_ms),
            show_ms(setup.first_connect.p99_ms),
            show_ms(setup.first_connect.p100_ms)
        )?;
        writeln!(
            out,
            "| first connect: CPU of the proxy / hosts | {:.1} s / {:.1} s |",
            setup.proxy_cpu_ms / 1000.0,
            setup.hosts_cpu_ms / 1000.0
        )?;
        let c = &setup.connector_side;
        writeln!(
            out,
            "| first connect: connectors' dial failures (by kind); tunnels that came up and dropped | {} ({}); {} |",
            c.dial_failures,
            c.failures_by_kind
                .iter()
                .map(|(kind, count)| format!("{kind}: {count}"))
                .collect::<Vec<_>>()
                .join(", "),
            c.tunnels_lost
        )?;
        let u = &setup.usage;
        writeln!(
            out,
            "| all connected: RSS proxy / hosts (per connector) | {:.1} MiB / {:.1} MiB ({:.0} KiB) |\n",
            mib(u.proxy_rss_bytes),
            mib(u.hosts_rss_bytes),
            u.per_connector_rss_bytes as f64 / 1024.0
        )?;

        writeln!(
            out,
            "Rounds: SIGKILL to the proxy, started again at once; ms (gauge read every {} ms; connectors' side from their `tunnel up` lines):\n",
            s.poll_ms
        )?;
        writeln!(
            out,
            "| round | open before | kill to port open | 50% | 90% | 99% | 100% from port open | 100% from kill | connectors' side: all connectors, from kill | dial failures (deepest) | longest backoff | proxy CPU (cores) | hosts CPU | GETs ok/failed |"
        )?;
        writeln!(
            out,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        )?;
        for r in &self.rounds {
            let c = &r.connector_side;
            writeln!(
                out,
                "| {} | {} | {:.0} | {} | {} | {} | {}{} | {} | {} ({} of {}) | {} ({}) | {} | {:.0} ({:.2}) | {:.0} | {}/{} |",
                r.round,
                r.tunnels_before
                    .map_or_else(|| "?".to_owned(), |n| n.to_string()),
                r.port_open_ms,
                show_ms(r.from_open.p50_ms),
                show_ms(r.from_open.p90_ms),
                show_ms(r.from_open.p99_ms),
                show_ms(r.from_open.p100_ms),
                if r.complete {
                    String::new()
                } else {
                    format!(" ({} of {})", r.tunnels_reached, s.target_tunnels)
                },
                show_ms(r.from_kill.p100_ms),
                show_ms(c.connectors.p100_ms),
                c.connectors_complete,
                s.connectors,
                c.dial_failures,
                c.failures_by_depth.keys().max().copied().unwrap_or(0),
                show_ms(c.longest_backoff_ms),
                r.proxy_cpu_ms,
                r.proxy_busy_cores,
                r.hosts_cpu_ms,
                r.gets_ok,
                r.gets_failed
            )?;
        }

        writeln!(
            out,
            "\nThe reconnect curve: tunnels open (of {}) so many ms after the port opened:\n",
            s.target_tunnels
        )?;
        write!(out, "| round |")?;
        for ms in CURVE_POINTS_MS {
            write!(out, " {ms} |")?;
        }
        writeln!(out)?;
        writeln!(out, "|---|{}", "---|".repeat(CURVE_POINTS_MS.len()))?;
        for r in &self.rounds {
            write!(out, "| {} |", r.round)?;
            for (_, tunnels) in &r.curve_from_open {
                write!(out, " {tunnels} |")?;
            }
            writeln!(out)?;
        }
        writeln!(
            out,
            "\nBackoff after the kill: dial failures by depth (k failures in a row; the wait after the k-th is drawn from 0 to min(10 s, 100 ms x 2^(k-1))), and connectors still waiting out a backoff when the port opened:\n"
        )?;
        writeln!(
            out,
            "| round | failures by depth | by kind | waiting when the proxy was back | waited past its return, median / max ms |"
        )?;
        writeln!(out, "|---|---|---|---|---|")?;
        for r in &self.rounds {
            let c = &r.connector_side;
            let depths: Vec<String> = c
                .failures_by_depth
                .iter()
                .map(|(depth, count)| format!("{depth}: {count}"))
                .collect();
            let kinds: Vec<String> = c
                .failures_by_kind
                .iter()
                .map(|(kind, count)| format!("{kind}: {count}"))
                .collect();
            let list = |items: Vec<String>| {
                if items.is_empty() {
                    "-".to_owned()
                } else {
                    items.join(", ")
                }
            };
            writeln!(
                out,
                "| {} | {} | {} | {} | {} / {} |",
                r.round,
                list(depths),
                list(kinds),
                c.waiting_when_back,
                show_ms(c.waited_past_return_median_ms),
                show_ms(c.waited_past_return_max_ms)
            )?;
        }

        let summary = self.summary();
        writeln!(
            out,
            "\nOver {} rounds, ms, median (min-max):\n",
            self.rounds.len()
        )?;
        writeln!(
            out,
            "| share of tunnels | from the port's opening | from the kill |"
        )?;
        writeln!(out, "|---|---|---|")?;
        for ((percent, open), (_, kill)) in summary.from_open.iter().zip(&summary.from_kill) {
            writeln!(
                out,
                "| {percent}% | {} | {} |",
                show_spread(*open),
                show_spread(*kill)
            )?;
        }
        writeln!(
            out,
            "| every connector complete (connectors' side) | | {} |",
            show_spread(summary.connectors_complete_from_kill)
        )?;
        let per_tunnel = |spread: Option<Spread>| {
            spread.map_or_else(
                || "-".to_owned(),
                |s| format!("{:.2} ({:.2}-{:.2})", s.median_ms, s.min_ms, s.max_ms),
            )
        };
        writeln!(
            out,
            "| CPU per tunnel back: proxy (its start-up included) / connectors | {} / {} | |",
            per_tunnel(summary.proxy_cpu_per_tunnel),
            per_tunnel(summary.hosts_cpu_per_tunnel)
        )?;
        if summary.incomplete_rounds > 0 {
            writeln!(
                out,
                "\n{} round(s) did not get every tunnel back within {} s.",
                summary.incomplete_rounds, s.round_timeout_s
            )?;
        }
        let end = &self.end;
        writeln!(
            out,
            "\nAt the end: proxy RSS {:.1} MiB (peak {:.1}), hosts RSS {:.1} MiB (peak {:.1}), hosts CPU {:.1} s in all.\n",
            mib(end.proxy_rss_bytes),
            mib(end.proxy_peak_rss_bytes),
            mib(end.hosts_rss_bytes),
            mib(end.hosts_peak_rss_bytes),
            end.hosts_cpu_ms / 1000.0
        )?;
        writeln!(out, "| goal | measured | met |")?;
        writeln!(out, "|---|---|---|")?;
        for goal in self.goals() {
            writeln!(
                out,
                "| {} | {} | {} |",
                goal.goal,
                goal.measured,
                if goal.met { "yes" } else { "no" }
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_a_descriptor_per_tunnel_and_pull() {
        let limits = Limits::needed(1000, 2, 2, 20_000, Some(28_232), Some(4096), Some(2048));
        assert_eq!(limits.open_files_needed, 3256);
        assert_eq!(limits.ephemeral_ports_needed, 3000);
        assert_eq!(limits.listen_backlog, 1024);
        // One host holds every connector: the host needs more than the proxy.
        let one_host = Limits::needed(1000, 2, 1, 1024, None, Some(128), None);
        assert_eq!(one_host.open_files_needed, 4256);
        assert_eq!(one_host.listen_backlog, 128);
    }

    fn round(number: u32, from_open_100: Option<f64>, from_kill_100: Option<f64>) -> Round {
        Round {
            round: number,
            tunnels_before: Some(4),
            proxy_exited_ms: 1.0,
            proxy_spawned_ms: 2.0,
            port_open_ms: 30.0,
            from_open: Reach {
                p100_ms: from_open_100,
                ..Reach::default()
            },
            from_kill: Reach {
                p100_ms: from_kill_100,
                ..Reach::default()
            },
            tunnels_reached: 4,
            complete: from_open_100.is_some(),
            measured_for_ms: 100.0,
            scrape_errors: 0,
            tunnels_after_settle: Some(4),
            curve_from_open: CURVE_POINTS_MS.iter().map(|&ms| (ms, 4)).collect(),
            curve: vec![(50.0, 4)],
            connector_side: ConnectorSide::default(),
            connectors_seen: 2,
            proxy_cpu_ms: 10.0,
            proxy_busy_cores: 0.5,
            hosts_cpu_ms: 10.0,
            proxy_cpu_per_tunnel_ms: Some(2.5),
            hosts_cpu_per_tunnel_ms: Some(2.5),
            gets_ok: 20,
            gets_failed: 0,
            get_error: None,
        }
    }

    fn report(rounds: Vec<Round>) -> S7Report {
        let usage = Usage {
            proxy_rss_bytes: 1,
            proxy_peak_rss_bytes: 1,
            proxy_cpu_ms: 1.0,
            hosts_rss_bytes: 1,
            hosts_peak_rss_bytes: 1,
            hosts_cpu_ms: 1.0,
            per_connector_rss_bytes: 1,
        };
        S7Report {
            machine: Machine::default(),
            profile: "debug",
            versions: Versions {
                proxy: "p".to_owned(),
                connector: "c".to_owned(),
            },
            settings: Settings {
                connectors: 2,
                tunnels_per_connector: 2,
                target_tunnels: 4,
                rounds: 2,
                hosts: 1,
                host_threads: 1,
                register_concurrency: 1,
                poll_ms: 20,
                round_timeout_s: 60,
                settle_ms: 0,
                gets: 20,
                proxy_log_filter: "info".to_owned(),
                host_log_filter: "warn".to_owned(),
            },
            limits: Limits::needed(2, 2, 1, 1024, None, None, None),
            setup: Setup {
                registration_ms: 1.0,
                host_registration_ms: vec![1.0],
                registrations_per_s: 2.0,
                proxy_cpu_registration_ms: 1.0,
                first_connect: Reach::default(),
                first_connect_complete: false,
                connector_side: ConnectorSide::default(),
                proxy_cpu_ms: 1.0,
                hosts_cpu_ms: 1.0,
                curve: Vec::new(),
                usage: usage.clone(),
            },
            rounds,
            end: usage,
        }
    }

    #[test]
    fn the_goal_is_judged_on_the_worst_round() {
        let met = report(vec![
            round(1, Some(900.0), Some(1500.0)),
            round(2, Some(1999.0), Some(2100.0)),
        ]);
        let goals = met.goals();
        assert!(goals[0].met, "{:?}", goals[0]);
        assert_eq!(goals[0].measured, "worst round 1999 ms");
        assert!(!goals[1].met, "from the kill: 2100 ms");
        // A round that never got every tunnel back fails the goal.
        let missed = report(vec![
            round(1, Some(900.0), Some(1500.0)),
            round(2, None, None),
        ]);
        assert!(!missed.goals()[0].met);
        assert_eq!(missed.summary().incomplete_rounds, 1);
        assert!(!report(Vec::new()).goals()[0].met, "no rounds, no verdict");
    }

    #[test]
    fn writes_tables_then_one_json_line() {
        let report = report(vec![round(1, Some(900.0), Some(1500.0))]);
        let mut out = Vec::new();
        report
            .write(&mut out)
            .unwrap_or_else(|e| panic!("writing the report: {e}"));
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains("| 100% | 900 (900-900) | 1500 (1500-1500) |"),
            "{text}"
        );
        let last = text.lines().last().unwrap_or_default();
        let json: serde_json::Value =
            serde_json::from_str(last).unwrap_or_else(|e| panic!("the last line is JSON: {e}"));
        assert_eq!(json["scenario"], "s7");
        assert_eq!(json["rounds"][0]["from_open"]["p100_ms"], 900.0);
        assert_eq!(json["goals"][0]["met"], true);
    }
}
