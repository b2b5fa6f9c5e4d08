//! S4 of the performance design: many idle tunneled streams, and what each costs in
//! memory on either side of the tunnel.
//!
//! The system under test is the data-plane benchmark's ([`crate::dataplane::fleet`]):
//! a backend, `sallyport-proxy run` standalone (per-client and in-flight limits off:
//! every user is on loopback) and one `sallyport-connector run`. `--streams`
//! WebSockets are opened through the proxy to the backend's `/ws` (user TLS, HTTP/1.1
//! upgrade; the proxy carries each as one extended CONNECT stream on a tunnel, the
//! connector opens a connection of its own to the backend), from `--source-addresses`
//! loopback addresses (127.0.6.1 onwards), `--concurrency` handshakes at a time. Each
//! is checked end to end once (a masked WebSocket frame goes out and comes back from
//! the backend's echo), then left idle.
//!
//! The resident memory (`VmRSS`) of the proxy, the connector and the backend is read
//! before, with half the streams open, with all open (each after `--settle` seconds
//! idle), and after all are closed. Per stream: the growth from before to all open
//! divided by the streams (the goal's figure: <= 16 KiB per side), and the slope from
//! half to all (without costs paid once). Finally a sample of the streams is checked
//! again after the idle time.
//!
//! A tunnel carries at most 1,000 streams at once (the connector's HTTP/2
//! `max_concurrent_streams`), and an open WebSocket is a stream for as long as it
//! lives; the connector therefore keeps `--tunnels` tunnels (by default enough for the
//! streams with a spare). The benchmark raises its open-files limit to the hard limit
//! (the children inherit it) and opens no more streams than that allows.
//!
//! Everything is bounded: each handshake and echo by 30 s, opening all by
//! `--open-timeout`. It measures and reports; nothing is asserted about timing.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use clap::Args;
use futures::StreamExt as _;
use http::header::{
    CONNECTION, HOST, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

use crate::dataplane::DataplaneError;
use crate::dataplane::backend::{WEBSOCKET_PATH, websocket_accept};
use crate::dataplane::client::Target;
use crate::dataplane::fleet::{APP_HOST, BinaryArgs, Fleet, FleetOptions};
use crate::dataplane::process::ChildProcess;
use crate::machine::Machine;
use crate::s5::LIMITS_OFF;
use crate::s5::observe::wait_for_tunnels;

/// Streams one tunnel carries at once (`MAX_CONCURRENT_STREAMS` of `sallyport_tunnel::dial`).
const STREAMS_PER_TUNNEL: u32 = 1000;

/// Bound on one WebSocket's handshake and its echo.
const STREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// File descriptors kept free of streams in every process (logs, tunnels, listeners).
const SPARE_FILES: u64 = 1024;

/// The goal: bytes per idle stream per side.
const GOAL_BYTES_PER_STREAM: f64 = 16.0 * 1024.0;

/// Options of `sallyport-bench s4`.
#[derive(Clone, Debug, Args)]
pub struct S4Args {
    /// Idle WebSockets to open through the proxy.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(2..=100_000))]
    pub streams: u32,

    /// Seconds the streams stay idle before each memory reading.
    #[arg(long, value_name = "SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=600))]
    pub settle: u64,

    /// Loopback addresses the streams come from (127.0.6.1 onwards), in turn.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=250))]
    pub source_addresses: u8,

    /// Handshakes in progress at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,

    /// `--tunnels-per-replica` of the connector (default: one per 1,000 streams, plus one).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub tunnels: Option<u16>,

    /// Bound on opening all the streams, seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(10..=3600))]
    pub open_timeout: u64,

    /// Streams checked again (echo) after the idle time.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub recheck: u32,

    /// Worker threads of the backend.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub backend_workers: u16,

    /// `RUST_LOG` of the proxy and the connector.
    #[arg(long, value_name = "FILTER", default_value = "warn")]
    pub log_filter: String,

    /// Where the proxy and connector executables are.
    #[command(flatten)]
    pub binaries: BinaryArgs,
}

/// Resident memory of the three processes at one point, bytes.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Rss {
    /// Streams open at the time.
    pub streams: u64,
    /// The proxy.
    pub proxy: u64,
    /// The connector.
    pub connector: u64,
    /// The backend (for reference: it holds the other end of every stream).
    pub backend: u64,
}

impl Rss {
    fn read(fleet: &Fleet, streams: u64) -> Result<Self, DataplaneError> {
        let rss = |process: &ChildProcess| process.memory().map(|memory| memory.rss_bytes);
        Ok(Self {
            streams,
            proxy: rss(&fleet.proxy)?,
            connector: rss(&fleet.connector)?,
            backend: rss(&fleet.backend)?,
        })
    }
}

/// Bytes per stream from `from` to `to`, per process.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct PerStream {
    /// The proxy.
    pub proxy: f64,
    /// The connector.
    pub connector: f64,
    /// The backend.
    pub backend: f64,
}

impl PerStream {
    /// The growth from `from` to `to` over the streams opened in between; `None` when none
    /// were.
    pub fn between(from: &Rss, to: &Rss) -> Option<Self> {
        let streams = to.streams.checked_sub(from.streams).filter(|n| *n > 0)? as f64;
        let per = |a: u64, b: u64| (b as f64 - a as f64) / streams;
        Some(Self {
            proxy: per(from.proxy, to.proxy),
            connector: per(from.connector, to.connector),
            backend: per(from.backend, to.backend),
        })
    }
}

/// The run.
#[derive(Clone, Debug, Serialize)]
pub struct S4Report {
    /// Where it ran.
    pub machine: Machine,
    /// Streams asked for.
    pub streams_asked: u32,
    /// Streams the open-files limit allowed (the hard limit less a spare).
    pub streams_allowed: u32,
    /// Streams open and checked end to end.
    pub streams_open: u64,
    /// Handshakes or echoes that failed, by reason.
    pub failures: Vec<(String, u64)>,
    /// The open-files limit (soft = hard) of every process.
    pub nofile_limit: u64,
    /// Tunnels the connector kept.
    pub tunnels: u16,
    /// Source addresses.
    pub source_addresses: u8,
    /// Seconds idle before each reading.
    pub settle_s: u64,
    /// Seconds to open all the streams.
    pub open_s: f64,
    /// Memory before any stream.
    pub before: Rss,
    /// With half open, idle.
    pub half: Rss,
    /// With all open, idle.
    pub all: Rss,
    /// After all were closed (and `--settle` seconds).
    pub closed: Rss,
    /// From before to all open, per stream: the goal's figure.
    pub per_stream: Option<PerStream>,
    /// From half to all open, per stream.
    pub per_stream_slope: Option<PerStream>,
    /// Of the streams checked again after the idle time, those that still echoed.
    pub recheck_ok: u64,
    /// Of those checked again.
    pub recheck: u64,
}

/// How the streams reach the app's `/ws` through the proxy.
#[derive(Clone)]
struct WsLink {
    proxy: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    host: HeaderValue,
}

/// One open stream: the user's end of the WebSocket.
type Stream = TokioIo<Upgraded>;

impl WsLink {
    fn to(fleet: &Fleet) -> Result<Self, DataplaneError> {
        let Target::Proxy { tls, port, .. } = fleet.via_proxy.clone() else {
            return Err(DataplaneError::Client {
                what: "S4's streams".to_owned(),
                message: "need the proxy target".to_owned(),
            });
        };
        Ok(Self {
            proxy: fleet.proxy_address,
            tls: tokio_rustls::TlsConnector::from(Arc::<rustls::ClientConfig>::clone(&tls)),
            name: ServerName::try_from(APP_HOST.to_owned())
                .map_err(DataplaneError::client("the app's host name"))?,
            host: HeaderValue::try_from(format!("{APP_HOST}:{port}"))
                .map_err(DataplaneError::client("the app's Host header"))?,
        })
    }

    /// Opens WebSocket `index` from `from` and checks it with one echo.
    async fn open(&self, from: IpAddr, index: u64) -> Result<Stream, &'static str> {
        let socket = TcpSocket::new_v4().map_err(|_| "socket")?;
        socket.bind(SocketAddr::new(from, 0)).map_err(|_| "bind")?;
        let tcp = socket.connect(self.proxy).await.map_err(|_| "connect")?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .tls
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|_| "TLS")?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
                .await
                .map_err(|_| "HTTP handshake")?;
        tokio::spawn(connection.with_upgrades());
        let key = base64::engine::general_purpose::STANDARD
            .encode([index.to_be_bytes(), (!index).to_be_bytes()].concat());
        let mut request = Request::new(Empty::new());
        if let Ok(uri) = WEBSOCKET_PATH.parse() {
            *request.uri_mut() = uri;
        }
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        headers.insert(
            SEC_WEBSOCKET_KEY,
            HeaderValue::try_from(key.as_str()).map_err(|_| "key")?,
        );
        let response = sender
            .send_request(request)
            .await
            .map_err(|_| "upgrade request")?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err("not 101");
        }
        let accepted = response
            .headers()
            .get(SEC_WEBSOCKET_ACCEPT)
            .is_some_and(|accept| accept.as_bytes() == websocket_accept(key.as_bytes()).as_bytes());
        if !accepted {
            return Err("wrong Sec-WebSocket-Accept");
        }
        let upgraded = hyper::upgrade::on(response).await.map_err(|_| "upgrade")?;
        let mut stream = TokioIo::new(upgraded);
        echo(&mut stream, index).await?;
        Ok(stream)
    }
}

/// Sends one masked text frame (`ping` and the index's low byte as the mask) and reads
/// the same bytes back from the backend's echo.
async fn echo(stream: &mut Stream, index: u64) -> Result<(), &'static str> {
    let mask = (index as u32).to_be_bytes();
    let mut frame = vec![0x81, 0x80 | 4];
    frame.extend_from_slice(&mask);
    frame.extend(b"ping".iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    stream.write_all(&frame).await.map_err(|_| "echo write")?;
    let mut back = vec![0; frame.len()];
    stream
        .read_exact(&mut back)
        .await
        .map_err(|_| "echo read")?;
    if back == frame {
        Ok(())
    } else {
        Err("echo differs")
    }
}

/// Source address `index` of `count`: 127.0.6.1 onwards.
pub fn source_address(index: u64, count: u8) -> IpAddr {
    let host = 1 + (index % u64::from(count.max(1))) as u8;
    IpAddr::V4(Ipv4Addr::new(127, 0, 6, host))
}

/// Tunnels for `streams` concurrent streams: one per 1,000, plus a spare, at least 2.
pub fn tunnels_for(streams: u32) -> u16 {
    u16::try_from(streams.div_ceil(STREAMS_PER_TUNNEL) + 1)
        .unwrap_or(u16::MAX)
        .max(2)
}

/// Raises this process's open-files limit to its hard limit (children inherit it);
/// returns the limit.
fn raise_nofile() -> Result<u64, DataplaneError> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|errno| DataplaneError::Io {
        what: "reading the open-files limit".to_owned(),
        source: std::io::Error::from(errno),
    })?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|errno| DataplaneError::Io {
        what: format!("raising the open-files limit to {hard}"),
        source: std::io::Error::from(errno),
    })?;
    Ok(hard)
}

/// Opens streams `range` (indices), `concurrency` at a time, into `open`; failures
/// counted into `failures`.
async fn open_streams(
    link: &WsLink,
    args: &S4Args,
    range: std::ops::Range<u64>,
    deadline: Instant,
    open: &mut Vec<Stream>,
    failures: &mut std::collections::BTreeMap<String, u64>,
) {
    let count = range.end - range.start;
    let mut done = 0u64;
    let mut results = futures::stream::iter(range)
        .map(|index| {
            let link = link.clone();
            let from = source_address(index, args.source_addresses);
            async move {
                match tokio::time::timeout(STREAM_TIMEOUT, link.open(from, index)).await {
                    Ok(result) => result,
                    Err(_) => Err("timeout"),
                }
            }
        })
        .buffer_unordered(args.concurrency as usize);
    while let Some(result) =
        tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), results.next())
            .await
            .ok()
            .flatten()
    {
        match result {
            Ok(stream) => open.push(stream),
            Err(reason) => *failures.entry(reason.to_owned()).or_default() += 1,
        }
        done += 1;
        if done.is_multiple_of(1000) {
            eprintln!("s4:   {done}/{count} handshakes done ({} open)", open.len());
        }
    }
    if done < count {
        *failures.entry("not opened in time".to_owned()).or_default() += count - done;
    }
}

/// Runs S4 and returns what it measured.
pub fn run(args: &S4Args) -> Result<S4Report, DataplaneError> {
    let binaries = args.binaries.locate()?;
    let nofile = raise_nofile()?;
    let allowed = u32::try_from(nofile.saturating_sub(SPARE_FILES)).unwrap_or(u32::MAX);
    let streams = args.streams.min(allowed);
    if streams < args.streams {
        eprintln!(
            "s4: the open-files limit is {nofile}: {streams} streams at most (each process holds one socket per stream)"
        );
    }
    let tunnels = args.tunnels.unwrap_or_else(|| tunnels_for(streams));
    let runtime = crate::dataplane::single_thread_runtime()?;
    let dir = tempfile::Builder::new()
        .prefix("sallyport-bench-s4-")
        .tempdir()
        .map_err(DataplaneError::io("creating a temporary directory"))?;
    let options = FleetOptions {
        backend_workers: args.backend_workers,
        chunk_kib: 64,
        log_filter: args.log_filter.clone(),
        tunnels,
        proxy_args: LIMITS_OFF.iter().map(|a| (*a).to_owned()).collect(),
        authenticated_app: false,
    };
    let settle = Duration::from_secs(args.settle);
    runtime.block_on(async {
        let mut fleet = Fleet::start(dir.path(), &binaries, &options).await?;
        wait_for_tunnels(
            fleet.probe_address,
            u64::from(tunnels),
            Duration::from_secs(60),
        )
        .await?;
        let link = WsLink::to(&fleet)?;
        // One stream opened and closed first: what is paid once is not counted per stream.
        let mut failures = std::collections::BTreeMap::new();
        let mut warm = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(args.open_timeout);
        open_streams(&link, args, 0..1, deadline, &mut warm, &mut failures).await;
        if warm.is_empty() {
            return Err(DataplaneError::Client {
                what: "the first WebSocket through the proxy".to_owned(),
                message: format!("{failures:?}"),
            });
        }
        drop(warm);
        tokio::time::sleep(settle).await;
        let before = Rss::read(&fleet, 0)?;
        eprintln!("s4: before: {before:?}; opening {streams} WebSockets over {tunnels} tunnels");

        let started = Instant::now();
        let mut open = Vec::with_capacity(streams as usize);
        let half = u64::from(streams / 2);
        open_streams(&link, args, 1..1 + half, deadline, &mut open, &mut failures).await;
        tokio::time::sleep(settle).await;
        fleet.check_running()?;
        let half_rss = Rss::read(&fleet, open.len() as u64)?;
        eprintln!("s4: half: {half_rss:?}");
        open_streams(
            &link,
            args,
            1 + half..1 + u64::from(streams),
            deadline,
            &mut open,
            &mut failures,
        )
        .await;
        let open_s = started.elapsed().as_secs_f64() - settle.as_secs_f64();
        tokio::time::sleep(settle).await;
        fleet.check_running()?;
        let all = Rss::read(&fleet, open.len() as u64)?;
        eprintln!("s4: all: {all:?}; failures: {failures:?}");

        let mut recheck_ok = 0;
        let recheck = open.len().min(args.recheck as usize);
        let step = (open.len() / recheck.max(1)).max(1);
        for (position, stream) in open.iter_mut().step_by(step).take(recheck).enumerate() {
            let echoed = tokio::time::timeout(STREAM_TIMEOUT, echo(stream, position as u64)).await;
            if matches!(echoed, Ok(Ok(()))) {
                recheck_ok += 1;
            }
        }
        let streams_open = open.len() as u64;
        drop(open);
        tokio::time::sleep(settle + Duration::from_secs(2)).await;
        fleet.check_running()?;
        let closed = Rss::read(&fleet, 0)?;
        Ok(S4Report {
            machine: Machine::here(),
            streams_asked: args.streams,
            streams_allowed: allowed,
            streams_open,
            failures: failures.into_iter().collect(),
            nofile_limit: nofile,
            tunnels,
            source_addresses: args.source_addresses,
            settle_s: args.settle,
            open_s,
            per_stream: PerStream::between(&before, &all),
            per_stream_slope: PerStream::between(&half_rss, &all),
            before,
            half: half_rss,
            all,
            closed,
            recheck_ok,
            recheck: recheck as u64,
        })
    })
}

impl S4Report {
    /// Whether the proxy and the connector each stay within 16 KiB per idle stream.
    pub fn goal_met(&self) -> Option<bool> {
        self.per_stream
            .map(|per| per.proxy <= GOAL_BYTES_PER_STREAM && per.connector <= GOAL_BYTES_PER_STREAM)
    }

    /// Prints the tables, then the report as one JSON line.
    pub fn write(&self, out: &mut impl Write) -> Result<(), DataplaneError> {
        let io = || DataplaneError::io("writing the report");
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        writeln!(out, "Machine: {}\n", self.machine).map_err(io())?;
        writeln!(
            out,
            "S4: {} idle WebSockets through the proxy and {} tunnels to the backend's echo ({} asked, open-files limit {}), from {} loopback addresses, opened in {:.1} s; {} s idle before each reading\n",
            self.streams_open,
            self.tunnels,
            self.streams_asked,
            self.nofile_limit,
            self.source_addresses,
            self.open_s,
            self.settle_s
        )
        .map_err(io())?;
        writeln!(
            out,
            "| point | streams | proxy RSS MiB | connector RSS MiB | backend RSS MiB |"
        )
        .map_err(io())?;
        writeln!(out, "|---|---|---|---|---|").map_err(io())?;
        for (label, rss) in [
            ("before", &self.before),
            ("half open", &self.half),
            ("all open", &self.all),
            ("all closed", &self.closed),
        ] {
            writeln!(
                out,
                "| {label} | {} | {:.1} | {:.1} | {:.1} |",
                rss.streams,
                mib(rss.proxy),
                mib(rss.connector),
                mib(rss.backend)
            )
            .map_err(io())?;
        }
        writeln!(
            out,
            "\n| per idle stream, KiB | proxy | connector | backend |"
        )
        .map_err(io())?;
        writeln!(out, "|---|---|---|---|").map_err(io())?;
        for (label, per) in [
            ("before -> all open (the goal's figure)", self.per_stream),
            ("half -> all open (slope)", self.per_stream_slope),
        ] {
            match per {
                Some(per) => writeln!(
                    out,
                    "| {label} | {:.1} | {:.1} | {:.1} |",
                    per.proxy / 1024.0,
                    per.connector / 1024.0,
                    per.backend / 1024.0
                ),
                None => writeln!(out, "| {label} | - | - | - |"),
            }
            .map_err(io())?;
        }
        let failures = if self.failures.is_empty() {
            "none".to_owned()
        } else {
            self.failures
                .iter()
                .map(|(reason, count)| format!("{reason}: {count}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            out,
            "\nFailed handshakes or echoes: {failures}. Checked again after the idle time: {}/{} echoed.",
            self.recheck_ok, self.recheck
        )
        .map_err(io())?;
        let verdict = match self.goal_met() {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        writeln!(
            out,
            "\n| goal | verdict |\n|---|---|\n| <= 16 KiB per idle stream per side (proxy, connector) | {verdict} |"
        )
        .map_err(io())?;
        #[derive(Serialize)]
        struct Line<'a> {
            scenario: &'static str,
            #[serde(flatten)]
            report: &'a S4Report,
            goal_met: Option<bool>,
        }
        let json = serde_json::to_string(&Line {
            scenario: "s4",
            report: self,
            goal_met: self.goal_met(),
        })
        .map_err(|e| DataplaneError::Client {
            what: "encoding the report".to_owned(),
            message: e.to_string(),
        })?;
        writeln!(out, "\n{json}").map_err(io())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnels_cover_the_streams_with_a_spare() {
        assert_eq!(tunnels_for(2), 2);
        assert_eq!(tunnels_for(1000), 2);
        assert_eq!(tunnels_for(1001), 3);
        assert_eq!(tunnels_for(10_000), 11);
    }

    #[test]
    fn per_stream_is_the_growth_over_the_streams_opened() {
        let before = Rss {
            streams: 0,
            proxy: 10 << 20,
            connector: 8 << 20,
            backend: 4 << 20,
        };
        let all = Rss {
            streams: 1000,
            proxy: (10 << 20) + 1000 * 20_000,
            connector: (8 << 20) + 1000 * 10_000,
            backend: 4 << 20,
        };
        let per = PerStream::between(&before, &all).unwrap_or_else(|| panic!("streams opened"));
        assert_eq!(per.proxy, 20_000.0);
        assert_eq!(per.connector, 10_000.0);
        assert_eq!(per.backend, 0.0);
        assert!(PerStream::between(&all, &all).is_none());
        let report_goal = |per: PerStream| {
            per.proxy <= GOAL_BYTES_PER_STREAM && per.connector <= GOAL_BYTES_PER_STREAM
        };
        assert!(!report_goal(per));
    }

    #[test]
    fn sources_cycle_through_their_addresses() {
        assert_eq!(
            source_address(0, 8),
            IpAddr::V4(Ipv4Addr::new(127, 0, 6, 1))
        );
        assert_eq!(
            source_address(7, 8),
            IpAddr::V4(Ipv4Addr::new(127, 0, 6, 8))
        );
        assert_eq!(
            source_address(8, 8),
            IpAddr::V4(Ipv4Addr::new(127, 0, 6, 1))
        );
    }
}
