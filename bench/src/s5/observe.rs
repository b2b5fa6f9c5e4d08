//! What S5 reads from the processes: the proxy's `/metrics` (tunnels open for the
//! group) and the JSON log lines of the proxy and the connectors (tunnel events, with
//! their timestamps).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::dataplane::DataplaneError;

/// The proxy's gauge of tunnels open to it, by group.
const TUNNELS_OPEN: &str = "sallyport_proxy_tunnels_open";

/// `GET /metrics` from `address` (plain HTTP/1.0, read to the end, bounded by 5 s).
pub async fn scrape(address: SocketAddr) -> Result<String, DataplaneError> {
    let what = format!("GET http://{address}/metrics");
    let exchange = async {
        let mut stream = TcpStream::connect(address).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&answer).into_owned())
    };
    match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(source)) => Err(DataplaneError::Io { what, source }),
        Err(_) => Err(DataplaneError::Timeout {
            what,
            waited: Duration::from_secs(5),
            last: None,
        }),
    }
}

/// The sum of the samples of metric `name` (every label set) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            // The name itself, not a longer one sharing its prefix.
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            line.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .sum()
}

/// Tunnels open to the proxy (all groups; the benchmark has one).
pub async fn tunnels_open(probe: SocketAddr) -> Result<u64, DataplaneError> {
    let text = scrape(probe).await?;
    Ok(metric_sum(&text, TUNNELS_OPEN) as u64)
}

/// Waits until the proxy counts `count` tunnels, at most `within`.
pub async fn wait_for_tunnels(
    probe: SocketAddr,
    count: u64,
    within: Duration,
) -> Result<Duration, DataplaneError> {
    let started = std::time::Instant::now();
    let mut last = None;
    while started.elapsed() < within {
        match tunnels_open(probe).await {
            Ok(open) if open == count => return Ok(started.elapsed()),
            Ok(open) => last = Some(format!("{open} open")),
            Err(error) => last = Some(error.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err(DataplaneError::Timeout {
        what: format!("{count} tunnels open at the proxy"),
        waited: within,
        last,
    })
}

/// One JSON log line: when, and its message.
#[derive(Clone, Debug, PartialEq)]
pub struct LogLine {
    /// Its timestamp.
    pub at: SystemTime,
    /// `fields.message`.
    pub message: String,
}

/// Reads the JSON log lines of `path` (lines that are not JSON are skipped).
pub fn read_log(path: &Path) -> Vec<LogLine> {
    std::fs::read_to_string(path)
        .map(|text| text.lines().filter_map(parse_line).collect())
        .unwrap_or_default()
}

/// One line of tracing-subscriber's JSON format: `timestamp` (RFC 3339) and
/// `fields.message`.
pub fn parse_line(line: &str) -> Option<LogLine> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let timestamp: jiff::Timestamp = value.get("timestamp")?.as_str()?.parse().ok()?;
    let message = value
        .get("fields")
        .and_then(|fields| fields.get("message"))
        .or_else(|| value.get("message"))?
        .as_str()?
        .to_owned();
    let nanos = u64::try_from(timestamp.as_nanosecond()).ok()?;
    Some(LogLine {
        at: SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos),
        message,
    })
}

/// The first line at or after `since` whose message is one of `messages`: how long after
/// `since`.
pub fn first_after(lines: &[LogLine], since: SystemTime, messages: &[&str]) -> Option<Duration> {
    lines
        .iter()
        .filter(|line| messages.contains(&line.message.as_str()))
        .filter_map(|line| line.at.duration_since(since).ok())
        .min()
}

/// Tunnel events counted in log lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TunnelEvents {
    /// Tunnels opened (the proxy's `tunnel opened`; a connector's `tunnel up`).
    pub opened: u64,
    /// Tunnels that ended: closed, ended, failed, lost, drained.
    pub ended: u64,
    /// Lines that name a GOAWAY or `ENHANCE_YOUR_CALM`.
    pub goaway: u64,
}

impl TunnelEvents {
    /// Counts the events in `lines`.
    pub fn count(lines: &[LogLine]) -> Self {
        let mut events = Self::default();
        for line in lines {
            let message = line.message.as_str();
            match message {
                "tunnel opened" | "tunnel up" => events.opened += 1,
                "tunnel closed"
                | "tunnel ended"
                | "tunnel failed"
                | "tunnel closed by the fleet"
                | "tunnel lost; redialling"
                | "tunnel drained" => events.ended += 1,
                _ => {}
            }
            if message.contains("GOAWAY") || message.contains("ENHANCE_YOUR_CALM") {
                events.goaway += 1;
            }
        }
        events
    }

    /// What happened from `self` to `later`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            opened: self.opened.saturating_sub(earlier.opened),
            ended: self.ended.saturating_sub(earlier.ended),
            goaway: self.goaway.saturating_sub(earlier.goaway),
        }
    }
}

/// The tunnel events in the logs of `paths` together.
pub fn tunnel_events(paths: &[&Path]) -> TunnelEvents {
    let lines: Vec<LogLine> = paths.iter().flat_map(|path| read_log(path)).collect();
    TunnelEvents::count(&lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_a_metric_over_its_labels_only() {
        let text = "# TYPE sallyport_proxy_tunnels_open gauge\n\
            sallyport_proxy_tunnels_open{group=\"bench/bench\"} 2\n\
            sallyport_proxy_tunnels_open{group=\"other/x\"} 1\n\
            sallyport_proxy_tunnels_opened_total 7\n";
        assert_eq!(metric_sum(text, TUNNELS_OPEN), 3.0);
        assert_eq!(metric_sum(text, "absent"), 0.0);
    }

    #[test]
    fn reads_json_lines_and_counts_tunnel_events() {
        let lines: Vec<LogLine> = [
            r#"{"timestamp":"2026-11-29T23:00:00.001Z","level":"INFO","fields":{"message":"tunnel opened","peer":"127.0.0.1:5"},"target":"sallyport_proxy::serve"}"#,
            r#"{"timestamp":"2026-11-29T23:00:00.500Z","level":"INFO","fields":{"message":"tunnel ended","error":"x"},"target":"sallyport_proxy::serve"}"#,
            r#"{"timestamp":"2026-11-29T23:00:01Z","level":"INFO","fields":{"message":"draining tunnel (GOAWAY)"}}"#,
            "not json",
        ]
        .iter()
        .filter_map(|line| parse_line(line))
        .collect();
        assert_eq!(lines.len(), 3);
        let events = TunnelEvents::count(&lines);
        assert_eq!(
            events,
            TunnelEvents {
                opened: 1,
                ended: 1,
                goaway: 1
            }
        );
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_993_200);
        assert_eq!(
            first_after(&lines, start, &["tunnel opened"]),
            Some(Duration::from_millis(1))
        );
        assert_eq!(
            first_after(&lines, start + Duration::from_secs(1), &["tunnel opened"]),
            None
        );
    }
}
