//! The pure part of S7: how many tunnels were back when, from the proxy's gauge readings
//! and from the connectors' own log lines, and what those lines say about the dialer's
//! backoff.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::stats;

/// The shares of the tunnels whose arrival S7 times, in percent.
pub const PERCENTS: [u64; 4] = [50, 90, 99, 100];

/// Points after the proxy accepted connections at which the report shows how many
/// tunnels were open (the shape of the reconnect curve), milliseconds.
pub const CURVE_POINTS_MS: [u64; 7] = [100, 250, 500, 1000, 2000, 4000, 8000];

/// One reading of the proxy's `sallyport_proxy_tunnels_open`: when the answer came
/// (from the round's event) and the count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// From the event to the answer.
    pub at: Duration,
    /// Tunnels open.
    pub tunnels: u64,
}

/// How many tunnels make `percent` of `target`: rounded up, so 99% of 150 is 149.
pub fn needed(target: u64, percent: u64) -> u64 {
    (target.saturating_mul(percent)).div_ceil(100)
}

/// When the readings first showed at least `percent` of `target` tunnels; `None` when
/// they never did (or `target` is zero).
pub fn time_to(samples: &[Sample], target: u64, percent: u64) -> Option<Duration> {
    if target == 0 {
        return None;
    }
    let needed = needed(target, percent);
    samples
        .iter()
        .find(|sample| sample.tunnels >= needed)
        .map(|sample| sample.at)
}

/// The tunnels open at `at`: the last reading at or before it (0 before the first).
pub fn open_at(samples: &[Sample], at: Duration) -> u64 {
    samples
        .iter()
        .take_while(|sample| sample.at <= at)
        .last()
        .map_or(0, |sample| sample.tunnels)
}

/// The readings that changed the count (and the last one): the curve without its flat
/// stretches, as `[ms, tunnels]` pairs.
pub fn compact(samples: &[Sample]) -> Vec<(f64, u64)> {
    let mut points: Vec<(f64, u64)> = Vec::new();
    for (index, sample) in samples.iter().enumerate() {
        let changed = points
            .last()
            .is_none_or(|(_, last)| *last != sample.tunnels);
        if changed || index + 1 == samples.len() {
            points.push((stats::millis(sample.at), sample.tunnels));
        }
    }
    points
}

/// Milliseconds until 50, 90, 99 and 100% of the tunnels were back; `None` where that
/// share never was.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Reach {
    /// Half of them.
    pub p50_ms: Option<f64>,
    /// 90%.
    pub p90_ms: Option<f64>,
    /// 99%.
    pub p99_ms: Option<f64>,
    /// All.
    pub p100_ms: Option<f64>,
}

impl Reach {
    /// From `time(percent)` for each of [`PERCENTS`], less `origin` (saturating at zero).
    pub fn from_fn(origin: Duration, time: impl Fn(u64) -> Option<Duration>) -> Self {
        let ms =
            |percent| time(percent).map(|at: Duration| stats::millis(at.saturating_sub(origin)));
        Self {
            p50_ms: ms(50),
            p90_ms: ms(90),
            p99_ms: ms(99),
            p100_ms: ms(100),
        }
    }

    /// The gauge readings' times to each share of `target`, counted from `origin`.
    pub fn of_samples(samples: &[Sample], target: u64, origin: Duration) -> Self {
        Self::from_fn(origin, |percent| time_to(samples, target, percent))
    }

    /// The value for `percent` (one of [`PERCENTS`]).
    pub fn get(&self, percent: u64) -> Option<f64> {
        match percent {
            50 => self.p50_ms,
            90 => self.p90_ms,
            99 => self.p99_ms,
            100 => self.p100_ms,
            _ => None,
        }
    }
}

/// The `rank`-th smallest (1-based) of `times`; `None` when there are fewer.
fn nth_smallest(times: &[Duration], rank: u64) -> Option<Duration> {
    let mut sorted = times.to_vec();
    sorted.sort();
    let index = usize::try_from(rank.checked_sub(1)?).ok()?;
    sorted.get(index).copied()
}

/// What a connector logged that S7 reads.
#[derive(Clone, Debug, PartialEq)]
pub enum ConnectorEventKind {
    /// `tunnel up`: the fleet's notice arrived on a new tunnel.
    TunnelUp,
    /// `tunnel lost; redialling` or `tunnel closed by the fleet; redialling`.
    TunnelLost,
    /// `dial failed`: the failures in a row and the backoff drawn.
    DialFailed {
        /// Consecutive failures, this one included.
        failures: u32,
        /// The wait before the next dial.
        wait: Option<Duration>,
        /// What failed ([`dial_error_kind`]).
        error: &'static str,
    },
}

/// The kind of a `dial failed` error: `refused` (nothing listening), `timeout` (no TLS
/// session within the dial's 5 s: an overloaded proxy), `reset`, `closed before notice`
/// (TLS up, then dropped), or `other`.
pub fn dial_error_kind(error: &str) -> &'static str {
    if error.contains("Connection refused") {
        "refused"
    } else if error.contains("no TLS session within") {
        "timeout"
    } else if error.contains("reset by peer") {
        "reset"
    } else if error.contains("before its notice") {
        "closed before notice"
    } else {
        "other"
    }
}

/// One connector log line S7 reads.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectorEvent {
    /// Its timestamp.
    pub at: SystemTime,
    /// The connector (`namespace/name`, from the dialer's span), when named.
    pub connector: Option<String>,
    /// What happened.
    pub kind: ConnectorEventKind,
}

/// One line of the connectors' JSON log (tracing-subscriber's format, the dialer's span
/// in `spans`); `None` for other lines.
pub fn parse_connector_line(line: &str) -> Option<ConnectorEvent> {
    if !(line.contains("tunnel up") || line.contains("redialling") || line.contains("dial failed"))
    {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = value.get("fields")?;
    let kind = match fields.get("message")?.as_str()? {
        "tunnel up" => ConnectorEventKind::TunnelUp,
        "tunnel lost; redialling" | "tunnel closed by the fleet; redialling" => {
            ConnectorEventKind::TunnelLost
        }
        "dial failed" => ConnectorEventKind::DialFailed {
            failures: fields
                .get("failures")
                .and_then(serde_json::Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            wait: fields
                .get("wait")
                .and_then(serde_json::Value::as_str)
                .and_then(parse_debug_duration),
            error: dial_error_kind(
                fields
                    .get("error")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or_default(),
            ),
        },
        _ => return None,
    };
    let timestamp: jiff::Timestamp = value.get("timestamp")?.as_str()?.parse().ok()?;
    let nanos = u64::try_from(timestamp.as_nanosecond()).ok()?;
    let connector = value
        .get("spans")
        .and_then(serde_json::Value::as_array)
        .and_then(|spans| {
            spans
                .iter()
                .find_map(|span| span.get("connector")?.as_str().map(str::to_owned))
        });
    Some(ConnectorEvent {
        at: SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos),
        connector,
        kind,
    })
}

/// A `Duration` as its `Debug` form writes it (`412.5ms`, `1.2s`, `37µs`, `0ns`).
pub fn parse_debug_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => value,
        "ms" => value / 1e3,
        "µs" | "us" => value / 1e6,
        "ns" => value / 1e9,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds).ok()
}

/// What the connectors' logs say about one round, counted from the event.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ConnectorSide {
    /// `tunnel up` lines after the event.
    pub tunnels_up: u64,
    /// Tunnels the connectors saw drop (`... redialling`).
    pub tunnels_lost: u64,
    /// Until each share of the expected tunnels was up, from the event, ms.
    pub tunnels: Reach,
    /// Connectors with all their tunnels up again.
    pub connectors_complete: u64,
    /// Until each share of the connectors had all their tunnels up, from the event, ms.
    pub connectors: Reach,
    /// `dial failed` lines (dials refused or failed while the proxy was away or busy).
    pub dial_failures: u64,
    /// Dial failures by how many failures in a row they made (the depth of the backoff:
    /// the wait after the k-th is drawn from 0 to 100 ms x 2^(k-1), at most 10 s).
    pub failures_by_depth: BTreeMap<u32, u64>,
    /// Dial failures by kind ([`dial_error_kind`]).
    pub failures_by_kind: BTreeMap<&'static str, u64>,
    /// The longest backoff drawn, ms.
    pub longest_backoff_ms: Option<f64>,
    /// Connectors whose last failure's backoff ended after the proxy accepted
    /// connections: those that sat out part of the time the proxy was back.
    pub waiting_when_back: u64,
    /// The median and the longest of those waits past the proxy's return, ms.
    pub waited_past_return_median_ms: Option<f64>,
    /// ... the longest.
    pub waited_past_return_max_ms: Option<f64>,
}

impl ConnectorSide {
    /// Sums up `events` at or after `since` (the event): `connectors` connectors of
    /// `tunnels` tunnels each; `back` is when the proxy accepted connections again (from
    /// `since`).
    pub fn of(
        events: &[ConnectorEvent],
        since: SystemTime,
        connectors: u64,
        tunnels: u64,
        back: Duration,
    ) -> Self {
        let after = |event: &ConnectorEvent| event.at.duration_since(since).ok();
        let mut side = Self::default();
        let mut up_times = Vec::new();
        let mut per_connector: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
        let mut last_failure: BTreeMap<&str, (Duration, Option<Duration>)> = BTreeMap::new();
        let mut longest_backoff: Option<Duration> = None;
        for event in events {
            let Some(at) = after(event) else { continue };
            let connector = event.connector.as_deref().unwrap_or("?");
            match &event.kind {
                ConnectorEventKind::TunnelUp => {
                    side.tunnels_up += 1;
                    up_times.push(at);
                    per_connector.entry(connector).or_default().push(at);
                }
                ConnectorEventKind::TunnelLost => side.tunnels_lost += 1,
                ConnectorEventKind::DialFailed {
                    failures,
                    wait,
                    error,
                } => {
                    side.dial_failures += 1;
                    *side.failures_by_depth.entry(*failures).or_insert(0) += 1;
                    *side.failures_by_kind.entry(error).or_insert(0) += 1;
                    longest_backoff = longest_backoff.max(*wait);
                    let latest = last_failure.entry(connector).or_insert((at, *wait));
                    if at >= latest.0 {
                        *latest = (at, *wait);
                    }
                }
            }
        }
        let expected = connectors.saturating_mul(tunnels);
        side.tunnels = Reach::from_fn(Duration::ZERO, |percent| {
            nth_smallest(&up_times, needed(expected, percent))
        });
        let complete: Vec<Duration> = per_connector
            .values()
            .filter_map(|times| nth_smallest(times, tunnels))
            .collect();
        side.connectors_complete = complete.len() as u64;
        side.connectors = Reach::from_fn(Duration::ZERO, |percent| {
            nth_smallest(&complete, needed(connectors, percent))
        });
        side.longest_backoff_ms = longest_backoff.map(stats::millis);
        let past_return: Vec<Duration> = last_failure
            .values()
            .filter_map(|(at, wait)| (*at + (*wait)?).checked_sub(back))
            .filter(|past| !past.is_zero())
            .collect();
        side.waiting_when_back = past_return.len() as u64;
        side.waited_past_return_median_ms = stats::quantile(&past_return, 0.5).map(stats::millis);
        side.waited_past_return_max_ms = past_return.iter().max().copied().map(stats::millis);
        side
    }
}

/// Names of the connectors seen in `events` (to check every connector took part).
pub fn connectors_seen(events: &[ConnectorEvent]) -> BTreeSet<&str> {
    events
        .iter()
        .filter_map(|event| event.connector.as_deref())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(value: u64) -> Duration {
        Duration::from_millis(value)
    }

    fn samples(points: &[(u64, u64)]) -> Vec<Sample> {
        points
            .iter()
            .map(|&(at, tunnels)| Sample {
                at: ms(at),
                tunnels,
            })
            .collect()
    }

    #[test]
    fn shares_round_up_in_integers() {
        assert_eq!(needed(2000, 50), 1000);
        // 0.9 * 2000 in floating point is 1800.0000000000002: integers avoid 1801.
        assert_eq!(needed(2000, 90), 1800);
        assert_eq!(needed(2000, 99), 1980);
        assert_eq!(needed(150, 99), 149);
        assert_eq!(needed(3, 50), 2);
        assert_eq!(needed(7, 100), 7);
    }

    #[test]
    fn times_to_each_share_of_the_tunnels() {
        let curve = samples(&[
            (20, 0),
            (40, 300),
            (60, 1100),
            (80, 1850),
            (100, 1990),
            (140, 2000),
        ]);
        assert_eq!(time_to(&curve, 2000, 50), Some(ms(60)));
        assert_eq!(time_to(&curve, 2000, 90), Some(ms(80)));
        assert_eq!(time_to(&curve, 2000, 99), Some(ms(100)));
        assert_eq!(time_to(&curve, 2000, 100), Some(ms(140)));
        assert_eq!(time_to(&curve[..4], 2000, 100), None);
        assert_eq!(time_to(&curve, 0, 100), None);
        let reach = Reach::of_samples(&curve, 2000, ms(30));
        assert_eq!(reach.p50_ms, Some(30.0));
        assert_eq!(reach.p100_ms, Some(110.0));
        // A share reached before the origin counts as zero, not a negative time.
        assert_eq!(Reach::of_samples(&curve, 2000, ms(500)).p50_ms, Some(0.0));
        assert_eq!(reach.get(99), Some(70.0));
        assert_eq!(reach.get(75), None);
    }

    #[test]
    fn the_curve_at_points_and_compacted() {
        let curve = samples(&[(20, 0), (40, 0), (60, 5), (80, 5), (100, 9)]);
        assert_eq!(open_at(&curve, ms(10)), 0);
        assert_eq!(open_at(&curve, ms(70)), 5);
        assert_eq!(open_at(&curve, ms(1000)), 9);
        assert_eq!(
            compact(&curve),
            vec![(20.0, 0), (60.0, 5), (100.0, 9)],
            "flat stretches dropped"
        );
        assert_eq!(compact(&curve[..4]), vec![(20.0, 0), (60.0, 5), (80.0, 5)]);
        assert!(compact(&[]).is_empty());
    }

    #[test]
    fn reads_debug_durations() {
        assert_eq!(
            parse_debug_duration("412.5ms"),
            Some(Duration::from_micros(412_500))
        );
        assert_eq!(parse_debug_duration("1.25s"), Some(ms(1250)));
        assert_eq!(
            parse_debug_duration("37µs"),
            Some(Duration::from_micros(37))
        );
        assert_eq!(parse_debug_duration("0ns"), Some(Duration::ZERO));
        assert_eq!(parse_debug_duration("soon"), None);
        assert_eq!(parse_debug_duration("12"), None);
    }

    #[test]
    fn dial_errors_by_kind() {
        let kind = dial_error_kind;
        assert_eq!(
            kind("dialling the fleet at 127.0.0.1:4: Connection refused (os error 111)"),
            "refused"
        );
        assert_eq!(
            kind("dialling the fleet at 127.0.0.1:4: no TLS session within 5s"),
            "timeout"
        );
        assert_eq!(
            kind(
                "TLS handshake with the fleet at 127.0.0.1:4: Connection reset by peer (os error 104)"
            ),
            "reset"
        );
        assert_eq!(
            kind("the fleet at 127.0.0.1:4 closed the tunnel before its notice"),
            "closed before notice"
        );
        assert_eq!(
            kind("tunnel to the fleet at 127.0.0.1:4: http2 error"),
            "other"
        );
    }

    const UP: &str = r#"{"timestamp":"2026-11-30T10:00:00.250000Z","level":"INFO","fields":{"message":"tunnel up","tunnel":3,"replica":"bench-proxy","address":"127.0.0.1:4000"},"target":"sallyport_tunnel::dial","span":{"connector":"bench/h-1","name":"dialer"},"spans":[{"connector":"bench/h-1","name":"dialer"}]}"#;
    const FAILED: &str = r#"{"timestamp":"2026-11-30T10:00:00.100000Z","level":"WARN","fields":{"message":"dial failed","tunnel":2,"error":"refused","failures":3,"wait":"350.5ms"},"target":"sallyport_tunnel::dial","spans":[{"connector":"bench/h-1","name":"dialer"},{"address":"127.0.0.1:4000","name":"tunnel","tunnel":2}]}"#;
    const LOST: &str = r#"{"timestamp":"2026-11-30T10:00:00.001000Z","level":"WARN","fields":{"message":"tunnel lost; redialling","tunnel":1,"replica":"bench-proxy","error":"x"},"target":"sallyport_tunnel::dial","spans":[{"connector":"bench/h-1","name":"dialer"}]}"#;

    #[test]
    fn reads_the_connectors_json_lines() {
        let Some(up) = parse_connector_line(UP) else {
            panic!("a tunnel up line parses");
        };
        assert_eq!(up.kind, ConnectorEventKind::TunnelUp);
        assert_eq!(up.connector.as_deref(), Some("bench/h-1"));
        let Some(failed) = parse_connector_line(FAILED) else {
            panic!("a dial failed line parses");
        };
        assert_eq!(
            failed.kind,
            ConnectorEventKind::DialFailed {
                failures: 3,
                wait: Some(Duration::from_micros(350_500)),
                error: "other",
            }
        );
        assert_eq!(
            parse_connector_line(LOST).map(|event| event.kind),
            Some(ConnectorEventKind::TunnelLost)
        );
        assert_eq!(parse_connector_line("dial failed, not JSON"), None);
        assert_eq!(
            parse_connector_line(
                r#"{"timestamp":"2026-11-30T10:00:00Z","fields":{"message":"configuration loaded"}}"#
            ),
            None
        );
    }

    fn event(at_ms: u64, connector: &str, kind: ConnectorEventKind) -> ConnectorEvent {
        ConnectorEvent {
            at: SystemTime::UNIX_EPOCH + ms(1_000_000 + at_ms),
            connector: Some(connector.to_owned()),
            kind,
        }
    }

    #[test]
    fn sums_up_a_round_from_the_connectors_side() {
        let since = SystemTime::UNIX_EPOCH + ms(1_000_000);
        let failed = |failures, wait| ConnectorEventKind::DialFailed {
            failures,
            wait: Some(ms(wait)),
            error: "refused",
        };
        let events = vec![
            // Before the event: ignored.
            ConnectorEvent {
                at: since - ms(5),
                connector: Some("a".to_owned()),
                kind: ConnectorEventKind::TunnelUp,
            },
            event(1, "a", ConnectorEventKind::TunnelLost),
            event(1, "a", ConnectorEventKind::TunnelLost),
            event(1, "b", ConnectorEventKind::TunnelLost),
            event(1, "b", ConnectorEventKind::TunnelLost),
            event(2, "a", failed(1, 50)),
            event(2, "a", failed(2, 150)),
            event(10, "b", failed(1, 20)),
            event(152, "a", failed(3, 390)),
            event(200, "b", ConnectorEventKind::TunnelUp),
            event(210, "b", ConnectorEventKind::TunnelUp),
            event(560, "a", ConnectorEventKind::TunnelUp),
            event(600, "a", ConnectorEventKind::TunnelUp),
        ];
        // The proxy accepted again 190 ms after the event.
        let side = ConnectorSide::of(&events, since, 2, 2, ms(190));
        assert_eq!(side.tunnels_up, 4);
        assert_eq!(side.tunnels_lost, 4);
        assert_eq!(side.dial_failures, 4);
        assert_eq!(
            side.failures_by_depth,
            BTreeMap::from([(1, 2), (2, 1), (3, 1)])
        );
        assert_eq!(side.failures_by_kind, BTreeMap::from([("refused", 4)]));
        assert_eq!(side.longest_backoff_ms, Some(390.0));
        assert_eq!(side.tunnels.p50_ms, Some(210.0));
        assert_eq!(side.tunnels.p100_ms, Some(600.0));
        assert_eq!(side.connectors_complete, 2);
        assert_eq!(side.connectors.p50_ms, Some(210.0));
        assert_eq!(side.connectors.p100_ms, Some(600.0));
        // a's last backoff ran to 542 ms, 352 ms past the proxy's return; b's ended before.
        assert_eq!(side.waiting_when_back, 1);
        assert_eq!(side.waited_past_return_max_ms, Some(352.0));
        assert_eq!(connectors_seen(&events).len(), 2);
        // Fewer tunnels than expected: the last shares are not reached.
        let short = ConnectorSide::of(&events, since, 3, 2, ms(190));
        assert_eq!(short.tunnels.p100_ms, None);
        assert_eq!(short.connectors.p100_ms, None);
    }
}
