//! S5's report: a table per part, the goals, and the whole as one JSON line.

use std::io::Write;

use serde::Serialize;

use super::load::FailureWindow;
use super::no_teardown;
use super::observe::TunnelEvents;
use crate::dataplane::DataplaneError;
use crate::machine::Machine;
use crate::stats::Spread;

/// How the run was set up.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// Rounds.
    pub rounds: u32,
    /// Users of the failover and drain load.
    pub connections: u32,
    /// Load before the kill or SIGTERM, ms.
    pub load_before_ms: u64,
    /// Load after, ms.
    pub load_after_ms: u64,
    /// Users polling for the first response.
    pub pollers: u32,
    /// Their pause between requests, ms.
    pub poll_ms: u64,
    /// Requests cancelled at once.
    pub cancel_requests: u32,
    /// HTTP/2 connections carrying them.
    pub cancel_connections: u32,
    /// The backend's delay for them, ms.
    pub slow_ms: u64,
    /// Tunnels each connector keeps.
    pub tunnels_per_connector: u16,
}

/// A connector's start: milliseconds from its spawn.
#[derive(Clone, Debug, Serialize)]
pub struct StartRound {
    /// `registration` (empty state directory) or `restart` (the saved state).
    pub kind: &'static str,
    /// Until the first 200 through the proxy.
    pub first_ok_ms: f64,
    /// Until the connector's first log line (the process is up).
    pub first_log_ms: Option<f64>,
    /// Until it holds credentials (`registered` or `using the saved registration`).
    pub credentials_ms: Option<f64>,
    /// Until it starts dialling the fleet: the time spent before it could connect.
    pub dialling_ms: Option<f64>,
    /// Until the connector logs its first `tunnel up`.
    pub connector_tunnel_up_ms: Option<f64>,
    /// Until the proxy logs `tunnel opened`.
    pub proxy_tunnel_opened_ms: Option<f64>,
}

/// A connector killed (SIGKILL) under load.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverRound {
    /// What the users saw, from the kill.
    pub window: FailureWindow,
    /// From the kill until the proxy counted only the other connector's tunnels.
    pub proxy_noticed_ms: Option<f64>,
    /// Tunnel events in the proxy's log meanwhile (the killed connector's tunnels
    /// ending: what the mass cancellation counts as teardowns).
    pub proxy_events: TunnelEvents,
}

/// A connector drained (SIGTERM) under load.
#[derive(Clone, Debug, Serialize)]
pub struct DrainRound {
    /// What the users saw, from the SIGTERM.
    pub window: FailureWindow,
    /// From the SIGTERM until the process exited.
    pub drain_ms: f64,
    /// How it exited.
    pub exit_status: String,
}

/// Requests in flight, cancelled at once.
#[derive(Clone, Debug, Serialize)]
pub struct CancelRound {
    /// `all at the backend` or `right after sending`.
    pub mode: &'static str,
    /// Requests cancelled.
    pub requests: u32,
    /// How many the backend was serving when they were cancelled (not asked right after
    /// sending, which would delay the cancellation).
    pub at_backend_when_cancelled: Option<u64>,
    /// From the first request's send until the cancellation.
    pub sent_to_cancel_ms: f64,
    /// From the cancellation until the backend served none of them.
    pub backend_released_ms: Option<f64>,
    /// Small GETs right after (100 on 4 new connections): answered.
    pub after_ok: u64,
    /// ... failed.
    pub after_failed: u64,
    /// The proxy's `sallyport_proxy_tunnels_open` before.
    pub tunnels_before: u64,
    /// ... and a second after the cancellation.
    pub tunnels_after: u64,
    /// Tunnel events in the proxy's log from before to after.
    pub proxy_events: TunnelEvents,
    /// Tunnel events in the connectors' logs from before to after.
    pub connector_events: TunnelEvents,
}

impl CancelRound {
    /// No tunnel ended, no GOAWAY, as many tunnels after as before.
    pub fn no_teardown(&self) -> bool {
        no_teardown(&self.proxy_events)
            && no_teardown(&self.connector_events)
            && self.tunnels_after == self.tunnels_before
    }
}

/// The run.
#[derive(Clone, Debug, Serialize)]
pub struct S5Report {
    /// Where it ran.
    pub machine: Machine,
    /// How.
    pub settings: Settings,
    /// Starts on an empty state directory, one per round.
    pub registration: Vec<StartRound>,
    /// Starts on the saved state, one per round.
    pub restart: Vec<StartRound>,
    /// Kills under load.
    pub failover: Vec<FailoverRound>,
    /// Drains under load.
    pub drain: Vec<DrainRound>,
    /// Mass cancellations, two per round.
    pub cancel: Vec<CancelRound>,
}

fn spread(values: impl Iterator<Item = Option<f64>>) -> Option<Spread> {
    Spread::of_ms(values)
}

fn show(spread: Option<Spread>) -> String {
    spread.map_or_else(
        || "-".to_owned(),
        |s| format!("{:.1} ({:.1}-{:.1})", s.median_ms, s.min_ms, s.max_ms),
    )
}

/// The goals of S5, judged.
#[derive(Clone, Debug, Serialize)]
pub struct Goals {
    /// Median first response after a restart <= 50 ms.
    pub first_response_restart: Option<bool>,
    /// The same after a first registration (the goal names no case; shown for both).
    pub first_response_registration: Option<bool>,
    /// New requests succeed within 1 s of every kill.
    pub failover_within_1s: Option<bool>,
    /// No request failed in any drain.
    pub drain_loses_none: bool,
    /// No tunnel torn down in any mass cancellation.
    pub cancel_no_teardown: bool,
}

impl S5Report {
    /// The goals.
    pub fn goals(&self) -> Goals {
        let median_ok = |rounds: &[StartRound]| {
            spread(rounds.iter().map(|r| Some(r.first_ok_ms))).map(|s| s.median_ms <= 50.0)
        };
        Goals {
            first_response_restart: median_ok(&self.restart),
            first_response_registration: median_ok(&self.registration),
            failover_within_1s: (!self.failover.is_empty()).then(|| {
                self.failover.iter().all(|r| {
                    r.window
                        .new_requests_succeed_ms
                        .is_some_and(|ms| ms <= 1000.0)
                })
            }),
            drain_loses_none: self.drain.iter().all(|r| r.window.failed == 0),
            cancel_no_teardown: self.cancel.iter().all(CancelRound::no_teardown),
        }
    }

    /// Prints the tables, then the report as one JSON line.
    pub fn write(&self, out: &mut impl Write) -> Result<(), DataplaneError> {
        let io = || DataplaneError::io("writing the report");
        let s = &self.settings;
        writeln!(out, "Machine: {}\n", self.machine).map_err(io())?;
        writeln!(
            out,
            "S5: {} rounds; {} tunnels per connector; load: {} users back to back, {} ms before and {} ms after the event; mass cancellation: {} requests to /slow/{} on {} HTTP/2 connections\n",
            s.rounds,
            s.tunnels_per_connector,
            s.connections,
            s.load_before_ms,
            s.load_after_ms,
            s.cancel_requests,
            s.slow_ms,
            s.cancel_connections
        )
        .map_err(io())?;

        writeln!(
            out,
            "First response after a connector's start, ms from spawn, median (min-max):\n"
        )
        .map_err(io())?;
        writeln!(
            out,
            "| start | first 200 | first log line | credentials | dialling the fleet | connector: tunnel up | proxy: tunnel opened |"
        )
        .map_err(io())?;
        writeln!(out, "|---|---|---|---|---|---|---|").map_err(io())?;
        for (label, rounds) in [
            ("first registration", &self.registration),
            ("restart (saved state)", &self.restart),
        ] {
            writeln!(
                out,
                "| {label} | {} | {} | {} | {} | {} | {} |",
                show(spread(rounds.iter().map(|r| Some(r.first_ok_ms)))),
                show(spread(rounds.iter().map(|r| r.first_log_ms))),
                show(spread(rounds.iter().map(|r| r.credentials_ms))),
                show(spread(rounds.iter().map(|r| r.dialling_ms))),
                show(spread(rounds.iter().map(|r| r.connector_tunnel_up_ms))),
                show(spread(rounds.iter().map(|r| r.proxy_tunnel_opened_ms))),
            )
            .map_err(io())?;
        }

        writeln!(
            out,
            "\nFailover (SIGKILL) and drain (SIGTERM) of one of two connectors under load, per round (ms from the signal):\n"
        )
        .map_err(io())?;
        writeln!(
            out,
            "| round | event | requests | failed | first failure | last failure | failing for | new requests succeed | slowest answer around | proxy dropped its tunnels | proxy: tunnels ended | drain time |"
        )
        .map_err(io())?;
        writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|").map_err(io())?;
        let opt = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
        for (index, round) in self.failover.iter().enumerate() {
            let w = &round.window;
            writeln!(
                out,
                "| {} | SIGKILL | {} | {} | {} | {} | {} | {} | {} | {} | {} | - |",
                index + 1,
                w.requests,
                w.failed,
                opt(w.first_failure_ms),
                opt(w.last_failure_ms),
                opt(w.failing_for_ms),
                opt(w.new_requests_succeed_ms),
                opt(w.slowest_around_ms),
                opt(round.proxy_noticed_ms),
                round.proxy_events.ended,
            )
            .map_err(io())?;
        }
        for (index, round) in self.drain.iter().enumerate() {
            let w = &round.window;
            writeln!(
                out,
                "| {} | SIGTERM | {} | {} | {} | {} | {} | {} | {} | - | - | {:.0} ({}) |",
                index + 1,
                w.requests,
                w.failed,
                opt(w.first_failure_ms),
                opt(w.last_failure_ms),
                opt(w.failing_for_ms),
                opt(w.new_requests_succeed_ms),
                opt(w.slowest_around_ms),
                round.drain_ms,
                round.exit_status,
            )
            .map_err(io())?;
        }

        writeln!(out, "\nMass cancellation, per round:\n").map_err(io())?;
        writeln!(
            out,
            "| round | mode | at the backend when cancelled | sent to cancel ms | backend released ms | tunnels before -> after | proxy: tunnels ended / opened / GOAWAY lines | connectors: ended / up / GOAWAY lines | GETs right after ok / failed |"
        )
        .map_err(io())?;
        writeln!(out, "|---|---|---|---|---|---|---|---|---|").map_err(io())?;
        for (index, round) in self.cancel.iter().enumerate() {
            writeln!(
                out,
                "| {} | {} | {}/{} | {:.1} | {} | {} -> {} | {} / {} / {} | {} / {} / {} | {} / {} |",
                index / 2 + 1,
                round.mode,
                round
                    .at_backend_when_cancelled
                    .map_or_else(|| "-".to_owned(), |count| count.to_string()),
                round.requests,
                round.sent_to_cancel_ms,
                opt(round.backend_released_ms),
                round.tunnels_before,
                round.tunnels_after,
                round.proxy_events.ended,
                round.proxy_events.opened,
                round.proxy_events.goaway,
                round.connector_events.ended,
                round.connector_events.opened,
                round.connector_events.goaway,
                round.after_ok,
                round.after_failed,
            )
            .map_err(io())?;
        }

        let goals = self.goals();
        let judge = |met: Option<bool>| match met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        let restart = spread(self.restart.iter().map(|r| Some(r.first_ok_ms)));
        let registration = spread(self.registration.iter().map(|r| Some(r.first_ok_ms)));
        let recovered = spread(
            self.failover
                .iter()
                .map(|r| r.window.new_requests_succeed_ms),
        );
        writeln!(out, "\n| goal | measured | verdict |").map_err(io())?;
        writeln!(out, "|---|---|---|").map_err(io())?;
        writeln!(
            out,
            "| first response <= 50 ms median after a connector's restart | {} ms | {} |",
            show(restart),
            judge(goals.first_response_restart)
        )
        .map_err(io())?;
        writeln!(
            out,
            "| (the same after a first registration) | {} ms | {} |",
            show(registration),
            judge(goals.first_response_registration)
        )
        .map_err(io())?;
        writeln!(
            out,
            "| new requests succeed within 1 s of a connector kill | {} ms; failed requests per kill: {} | {} |",
            show(recovered),
            self.failover
                .iter()
                .map(|r| r.window.failed.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            judge(goals.failover_within_1s)
        )
        .map_err(io())?;
        writeln!(
            out,
            "| zero loss on graceful drain | failed: {} | {} |",
            self.drain
                .iter()
                .map(|r| r.window.failed.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            judge(Some(goals.drain_loses_none))
        )
        .map_err(io())?;
        writeln!(
            out,
            "| zero tunnel teardowns when {} in-flight requests are cancelled at once | tunnels ended (proxy + connectors): {} | {} |",
            self.settings.cancel_requests,
            self.cancel
                .iter()
                .map(|r| (r.proxy_events.ended + r.connector_events.ended).to_string())
                .collect::<Vec<_>>()
                .join(", "),
            judge(Some(goals.cancel_no_teardown))
        )
        .map_err(io())?;

        #[derive(Serialize)]
        struct Line<'a> {
            scenario: &'static str,
            #[serde(flatten)]
            report: &'a S5Report,
            goals: Goals,
        }
        let json = serde_json::to_string(&Line {
            scenario: "s5",
            report: self,
            goals,
        })
        .map_err(|e| DataplaneError::Client {
            what: "encoding the report".to_owned(),
            message: e.to_string(),
        })?;
        writeln!(out, "\n{json}").map_err(io())?;
        Ok(())
    }
}
