//! The data-plane results: per-round measurements, medians, ratios to direct, the goals
//! this run can judge, printed as Markdown tables for people and one JSON line for
//! machines.

use std::fmt::Write as _;
use std::io::Write;

use serde::Serialize;

use super::error::DataplaneError;
use super::oha::OhaResult;
use super::sampler::RssGrowth;
use crate::machine::Machine;
use crate::procfs;
pub use crate::report::GoalOutcome;

/// S1 goal: ten times the reference product's published 1,200 req/s per connector.
pub const S1_GOAL_REQ_PER_S: f64 = 12_000.0;
/// S3 goal: resident memory growth during a transfer, bytes.
pub const S3_MEMORY_GOAL_BYTES: u64 = 64 * MIB;

const MIB: u64 = 1024 * 1024;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// The median of `values` (the mean of the middle two for an even count); `None` when
/// there are none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => sorted.get(middle).copied(),
        _ => Some((sorted.get(middle - 1)? + sorted.get(middle)?) / 2.0),
    }
}

/// `part / whole`, `None` when `whole` is zero or either is unknown.
fn ratio(part: Option<f64>, whole: Option<f64>) -> Option<f64> {
    match (part, whole) {
        (Some(part), Some(whole)) if whole > 0.0 => Some(part / whole),
        _ => None,
    }
}

/// Versions of what ran.
#[derive(Clone, Debug, Serialize)]
pub struct Versions {
    /// `oha --version`, when S1 ran.
    pub oha: Option<String>,
    /// `sallyport-proxy --version`.
    pub proxy: String,
    /// `sallyport-connector --version`.
    pub connector: String,
}

/// The options of the run.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    /// Rounds (A B per round).
    pub rounds: u32,
    /// S1: oha's connections.
    pub connections: u32,
    /// S1: seconds per measurement.
    pub duration_s: u64,
    /// S3: bytes per transfer.
    pub transfer_bytes: u64,
    /// S3: chunk size of the generated bodies, KiB.
    pub chunk_kib: u32,
    /// Worker threads of the backend.
    pub backend_workers: u16,
    /// Tunnels the connector keeps.
    pub tunnels: u16,
    /// `RUST_LOG` of the proxy and the connector.
    pub log_filter: String,
}

/// Memory of the proxy and the connector when the measurements began and ended.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Memory {
    /// The proxy, after the first answer through it.
    pub proxy_start: procfs::Memory,
    /// The connector, then.
    pub connector_start: procfs::Memory,
    /// The proxy at the end of the run.
    pub proxy_end: procfs::Memory,
    /// The connector at the end.
    pub connector_end: procfs::Memory,
}

/// CPU time (user and system) used during one measurement, seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ProcessCpu {
    /// The proxy.
    pub proxy_s: f64,
    /// The connector.
    pub connector_s: f64,
    /// The backend.
    pub backend_s: f64,
    /// The client: oha for S1, this benchmark's own client for S3.
    pub client_s: f64,
    /// The whole machine (all CPUs, every process).
    pub machine_s: f64,
}

impl ProcessCpu {
    /// What processes outside the test used: the machine less proxy, connector, backend
    /// and client.
    pub fn others_s(&self) -> f64 {
        (self.machine_s - self.proxy_s - self.connector_s - self.backend_s - self.client_s).max(0.0)
    }

    /// The mean of `cpus`, field by field (zero for none).
    fn mean(cpus: &[ProcessCpu]) -> ProcessCpu {
        let n = cpus.len().max(1) as f64;
        let sum = |pick: fn(&ProcessCpu) -> f64| cpus.iter().map(pick).sum::<f64>() / n;
        ProcessCpu {
            proxy_s: sum(|c| c.proxy_s),
            connector_s: sum(|c| c.connector_s),
            backend_s: sum(|c| c.backend_s),
            client_s: sum(|c| c.client_s),
            machine_s: sum(|c| c.machine_s),
        }
    }
}

/// One round of S3 for one direction (download or upload).
#[derive(Clone, Debug, Default, Serialize)]
pub struct TransferRound {
    /// 1-based.
    pub round: u32,
    /// Straight to the backend, bytes per second.
    pub direct_bytes_per_s: Option<f64>,
    /// Through the proxy and connector, bytes per second.
    pub proxy_bytes_per_s: Option<f64>,
    /// The proxy's resident memory during the transfer through it.
    pub proxy_rss: Option<RssGrowth>,
    /// The connector's.
    pub connector_rss: Option<RssGrowth>,
    /// CPU time during the direct transfer.
    pub direct_cpu: Option<ProcessCpu>,
    /// CPU time during the transfer through the proxy.
    pub proxy_cpu: Option<ProcessCpu>,
}

impl TransferRound {
    /// An empty round `round`.
    pub fn new(round: u32) -> Self {
        Self {
            round,
            ..Self::default()
        }
    }

    /// Records a transfer at `rate` bytes/s, direct or `through_proxy`, with the memory
    /// sampled (proxy, connector, backend) and the CPU time used.
    pub fn record(
        &mut self,
        through_proxy: bool,
        rate: f64,
        memory: &[RssGrowth],
        cpu: ProcessCpu,
    ) {
        if through_proxy {
            self.proxy_bytes_per_s = Some(rate);
            self.proxy_rss = memory.first().copied();
            self.connector_rss = memory.get(1).copied();
            self.proxy_cpu = Some(cpu);
        } else {
            self.direct_bytes_per_s = Some(rate);
            self.direct_cpu = Some(cpu);
        }
    }
}

/// One round of S1: oha direct, then through the proxy.
#[derive(Clone, Debug, Serialize)]
pub struct S1Round {
    /// 1-based.
    pub round: u32,
    /// Straight to the backend.
    pub direct: OhaResult,
    /// CPU time during the direct run.
    pub direct_cpu: ProcessCpu,
    /// Through the proxy and connector.
    pub proxy: OhaResult,
    /// CPU time during the run through the proxy.
    pub proxy_cpu: ProcessCpu,
}

impl S1Round {
    /// Round `round` from its two measurements.
    pub fn new(
        round: u32,
        (direct, direct_cpu): (OhaResult, ProcessCpu),
        (proxy, proxy_cpu): (OhaResult, ProcessCpu),
    ) -> Self {
        Self {
            round,
            direct,
            direct_cpu,
            proxy,
            proxy_cpu,
        }
    }
}

/// Medians of one measure, direct and through the proxy, and their ratio.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Comparison {
    /// Median, direct.
    pub direct: Option<f64>,
    /// Median, through the proxy.
    pub proxy: Option<f64>,
    /// `proxy / direct` of the medians.
    pub ratio: Option<f64>,
    /// The smallest and largest ratio within one round (each round's pair side by side).
    pub round_ratio_range: Option<(f64, f64)>,
}

impl Comparison {
    /// From (direct, proxy) pairs, one per round.
    pub fn of(pairs: &[(Option<f64>, Option<f64>)]) -> Self {
        let direct: Vec<f64> = pairs.iter().filter_map(|p| p.0).collect();
        let proxy: Vec<f64> = pairs.iter().filter_map(|p| p.1).collect();
        let ratios: Vec<f64> = pairs.iter().filter_map(|(d, p)| ratio(*p, *d)).collect();
        let (direct, proxy) = (median(&direct), median(&proxy));
        let range = ratios
            .iter()
            .copied()
            .fold(None, |range: Option<(f64, f64)>, r| {
                Some(range.map_or((r, r), |(lo, hi)| (lo.min(r), hi.max(r))))
            });
        Self {
            direct,
            proxy,
            ratio: ratio(proxy, direct),
            round_ratio_range: range,
        }
    }
}

/// S1 summarized.
#[derive(Clone, Debug, Serialize)]
pub struct S1Summary {
    /// 200 answers per second.
    pub req_per_s: Comparison,
    /// Median latency, ms (median over rounds).
    pub p50_ms: Comparison,
    /// 99th percentile latency, ms (median over rounds).
    pub p99_ms: Comparison,
    /// CPU µs per request through the proxy: proxy, connector, backend (medians).
    pub cpu_us_per_request_via_proxy: ProcessCpu,
    /// The backend's CPU µs per request served directly (median).
    pub backend_cpu_us_per_request_direct: Option<f64>,
    /// CPU seconds during one direct measurement (mean of rounds).
    pub cpu_direct: ProcessCpu,
    /// CPU seconds during one measurement through the proxy (mean of rounds).
    pub cpu_via_proxy: ProcessCpu,
    /// Failed requests and answers other than 200, all rounds: direct.
    pub failures_direct: u64,
    /// The same, through the proxy.
    pub failures_proxy: u64,
}

/// One S3 direction summarized.
#[derive(Clone, Debug, Serialize)]
pub struct TransferSummary {
    /// Bytes per second.
    pub bytes_per_s: Comparison,
    /// The proxy's RSS growth, bytes: median and max over rounds.
    pub proxy_growth_bytes: (u64, u64),
    /// The connector's RSS growth, bytes: median and max over rounds.
    pub connector_growth_bytes: (u64, u64),
    /// The proxy's RSS growth in the first round (processes fresh from start), bytes.
    pub proxy_growth_first_bytes: u64,
    /// The connector's, in the first round.
    pub connector_growth_first_bytes: u64,
    /// CPU seconds per GiB through the proxy: proxy, connector, backend (medians).
    pub cpu_s_per_gib_via_proxy: ProcessCpu,
    /// The backend's CPU seconds per GiB served directly (median).
    pub backend_cpu_s_per_gib_direct: Option<f64>,
    /// CPU seconds during one direct transfer (mean of rounds).
    pub cpu_direct: ProcessCpu,
    /// CPU seconds during one transfer through the proxy (mean of rounds).
    pub cpu_via_proxy: ProcessCpu,
}

fn median_u64(values: &[u64]) -> u64 {
    let floats: Vec<f64> = values.iter().map(|v| *v as f64).collect();
    median(&floats).unwrap_or(0.0).round() as u64
}

impl TransferSummary {
    fn of(rounds: &[TransferRound], bytes: u64) -> Option<Self> {
        if rounds.is_empty() {
            return None;
        }
        let pairs: Vec<_> = rounds
            .iter()
            .map(|r| (r.direct_bytes_per_s, r.proxy_bytes_per_s))
            .collect();
        let growth = |pick: fn(&TransferRound) -> Option<RssGrowth>| -> Vec<u64> {
            rounds
                .iter()
                .filter_map(pick)
                .map(|g| g.growth_bytes())
                .collect()
        };
        let proxy = growth(|r| r.proxy_rss);
        let connector = growth(|r| r.connector_rss);
        let gib = bytes as f64 / GIB;
        let per_gib = |pick: fn(&ProcessCpu) -> f64| {
            let values: Vec<f64> = rounds
                .iter()
                .filter_map(|r| r.proxy_cpu.as_ref())
                .map(|c| pick(c) / gib)
                .collect();
            median(&values).unwrap_or(0.0)
        };
        let backend_direct: Vec<f64> = rounds
            .iter()
            .filter_map(|r| r.direct_cpu.as_ref())
            .map(|c| c.backend_s / gib)
            .collect();
        Some(Self {
            bytes_per_s: Comparison::of(&pairs),
            proxy_growth_bytes: (median_u64(&proxy), proxy.iter().copied().max().unwrap_or(0)),
            connector_growth_bytes: (
                median_u64(&connector),
                connector.iter().copied().max().unwrap_or(0),
            ),
            proxy_growth_first_bytes: proxy.first().copied().unwrap_or(0),
            connector_growth_first_bytes: connector.first().copied().unwrap_or(0),
            cpu_s_per_gib_via_proxy: ProcessCpu {
                proxy_s: per_gib(|c| c.proxy_s),
                connector_s: per_gib(|c| c.connector_s),
                backend_s: per_gib(|c| c.backend_s),
                client_s: per_gib(|c| c.client_s),
                machine_s: per_gib(|c| c.machine_s),
            },
            cpu_direct: ProcessCpu::mean(
                &rounds
                    .iter()
                    .filter_map(|r| r.direct_cpu)
                    .collect::<Vec<_>>(),
            ),
            cpu_via_proxy: ProcessCpu::mean(
                &rounds
                    .iter()
                    .filter_map(|r| r.proxy_cpu)
                    .collect::<Vec<_>>(),
            ),
            backend_cpu_s_per_gib_direct: median(&backend_direct),
        })
    }
}

impl S1Summary {
    fn of(rounds: &[S1Round]) -> Option<Self> {
        if rounds.is_empty() {
            return None;
        }
        let pairs = |pick: fn(&OhaResult) -> Option<f64>| -> Vec<(Option<f64>, Option<f64>)> {
            rounds
                .iter()
                .map(|r| (pick(&r.direct), pick(&r.proxy)))
                .collect()
        };
        let per_request =
            |cpu: f64, result: &OhaResult| (result.ok > 0).then(|| cpu * 1e6 / result.ok as f64);
        let via = |pick: fn(&ProcessCpu) -> f64| {
            let values: Vec<f64> = rounds
                .iter()
                .filter_map(|r| per_request(pick(&r.proxy_cpu), &r.proxy))
                .collect();
            median(&values).unwrap_or(0.0)
        };
        let backend_direct: Vec<f64> = rounds
            .iter()
            .filter_map(|r| per_request(r.direct_cpu.backend_s, &r.direct))
            .collect();
        let failures = |pick: fn(&S1Round) -> &OhaResult| {
            rounds
                .iter()
                .map(|r| pick(r).errors + pick(r).other_status)
                .sum()
        };
        Some(Self {
            req_per_s: Comparison::of(&pairs(|r| Some(r.ok_per_second))),
            p50_ms: Comparison::of(&pairs(|r| r.p50_ms)),
            p99_ms: Comparison::of(&pairs(|r| r.p99_ms)),
            cpu_us_per_request_via_proxy: ProcessCpu {
                proxy_s: via(|c| c.proxy_s),
                connector_s: via(|c| c.connector_s),
                backend_s: via(|c| c.backend_s),
                client_s: via(|c| c.client_s),
                machine_s: via(|c| c.machine_s),
            },
            cpu_direct: ProcessCpu::mean(&rounds.iter().map(|r| r.direct_cpu).collect::<Vec<_>>()),
            cpu_via_proxy: ProcessCpu::mean(
                &rounds.iter().map(|r| r.proxy_cpu).collect::<Vec<_>>(),
            ),
            backend_cpu_us_per_request_direct: median(&backend_direct),
            failures_direct: failures(|r| &r.direct),
            failures_proxy: failures(|r| &r.proxy),
        })
    }
}

/// Everything one data-plane run measured.
#[derive(Clone, Debug, Serialize)]
pub struct DataplaneReport {
    /// Always `"dataplane"` (S1 and S3).
    pub scenario: &'static str,
    /// How this benchmark was built (`release` or `debug`).
    pub profile: &'static str,
    /// Where it ran.
    pub machine: Machine,
    /// What ran.
    pub versions: Versions,
    /// The options.
    pub settings: Settings,
    /// The proxy's and connector's memory at the start and the end.
    pub memory: Memory,
    /// S3 downloads, per round.
    pub downloads: Vec<TransferRound>,
    /// S3 uploads, per round.
    pub uploads: Vec<TransferRound>,
    /// S1, per round.
    pub s1: Vec<S1Round>,
    /// S1 summarized.
    pub s1_summary: Option<S1Summary>,
    /// S3 downloads summarized.
    pub download_summary: Option<TransferSummary>,
    /// S3 uploads summarized.
    pub upload_summary: Option<TransferSummary>,
    /// The goals this run can judge.
    pub goals: Vec<GoalOutcome>,
}

impl DataplaneReport {
    /// A report of the rounds that ran, summarized and judged against the goals.
    pub fn new(
        settings: Settings,
        versions: Versions,
        memory: Memory,
        downloads: Vec<TransferRound>,
        uploads: Vec<TransferRound>,
        s1: Vec<S1Round>,
    ) -> Self {
        let s1_summary = S1Summary::of(&s1);
        let download_summary = TransferSummary::of(&downloads, settings.transfer_bytes);
        let upload_summary = TransferSummary::of(&uploads, settings.transfer_bytes);
        let mut goals = Vec::new();
        if let Some(rate) = s1_summary.as_ref().and_then(|s| s.req_per_s.proxy) {
            goals.push(GoalOutcome {
                goal: format!(
                    "S1 through the proxy >= 10x the reference connector's 1,200 req/s ({} req/s)",
                    grouped(S1_GOAL_REQ_PER_S)
                ),
                measured: format!("{} req/s (median)", grouped(rate)),
                met: rate >= S1_GOAL_REQ_PER_S,
            });
        }
        let transfers = [("download", &download_summary), ("upload", &upload_summary)];
        for (what, summary) in transfers {
            if let Some(summary) = summary {
                let worst = summary
                    .proxy_growth_bytes
                    .1
                    .max(summary.connector_growth_bytes.1);
                goals.push(GoalOutcome {
                    goal: format!(
                        "S3 memory growth during a {} {what} <= 64 MiB (proxy and connector)",
                        size(settings.transfer_bytes)
                    ),
                    measured: format!(
                        "proxy {} MiB, connector {} MiB (max of rounds)",
                        mib(summary.proxy_growth_bytes.1),
                        mib(summary.connector_growth_bytes.1)
                    ),
                    met: worst <= S3_MEMORY_GOAL_BYTES,
                });
            }
        }
        Self {
            scenario: "dataplane",
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            machine: Machine::here(),
            versions,
            settings,
            memory,
            downloads,
            uploads,
            s1,
            s1_summary,
            download_summary,
            upload_summary,
            goals,
        }
    }

    /// The tables, as printed.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = self.write_table(&mut out);
        out
    }

    fn write_table(&self, out: &mut String) -> std::fmt::Result {
        let s = &self.settings;
        writeln!(
            out,
            "Data plane (S1, S3): straight to the backend vs through sallyport-proxy and sallyport-connector"
        )?;
        writeln!(out)?;
        writeln!(out, "machine: {}", self.machine)?;
        if self.profile != "release" {
            writeln!(
                out,
                "WARNING: a debug build of the benchmark; use `make bench` for real numbers"
            )?;
        }
        writeln!(
            out,
            "versions: {}, {}, {}",
            self.versions.proxy,
            self.versions.connector,
            self.versions.oha.as_deref().unwrap_or("oha not used")
        )?;
        writeln!(
            out,
            "settings: {} rounds, each direct then through the proxy (A B A B); S1: {} keep-alive \
             connections x {} s; S3: {} over one connection, {} KiB chunks; backend {} worker \
             threads; connector {} tunnels; RUST_LOG={}",
            s.rounds,
            s.connections,
            s.duration_s,
            size(s.transfer_bytes),
            s.chunk_kib,
            s.backend_workers,
            s.tunnels,
            s.log_filter
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "| median of {} rounds | direct (plain HTTP) | through proxy + connector (user TLS) | ratio to direct (range over rounds) |",
            s.rounds
        )?;
        writeln!(out, "| --- | ---: | ---: | ---: |")?;
        let row = |out: &mut String, name: String, c: &Comparison, format: fn(f64) -> String| {
            let cell = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), format);
            let ratio = match (c.ratio, c.round_ratio_range) {
                (Some(r), Some((lo, hi))) => format!("{r:.3}x ({lo:.3}-{hi:.3})"),
                (Some(r), None) => format!("{r:.3}x"),
                _ => "-".to_owned(),
            };
            writeln!(
                out,
                "| {name} | {} | {} | {ratio} |",
                cell(c.direct),
                cell(c.proxy)
            )
        };
        if let Some(s1) = &self.s1_summary {
            row(
                out,
                format!(
                    "S1 small GETs, {} keep-alive connections: req/s",
                    s.connections
                ),
                &s1.req_per_s,
                grouped,
            )?;
            row(out, "S1 latency p50, ms".to_owned(), &s1.p50_ms, |v| {
                format!("{v:.2}")
            })?;
            row(out, "S1 latency p99, ms".to_owned(), &s1.p99_ms, |v| {
                format!("{v:.2}")
            })?;
        }
        if let Some(d) = &self.download_summary {
            row(
                out,
                format!(
                    "S3 {} download, one connection: GB/s",
                    size(s.transfer_bytes)
                ),
                &d.bytes_per_s,
                gbps,
            )?;
        }
        if let Some(u) = &self.upload_summary {
            row(
                out,
                format!("S3 {} upload, one connection: GB/s", size(s.transfer_bytes)),
                &u.bytes_per_s,
                gbps,
            )?;
        }

        writeln!(out)?;
        writeln!(
            out,
            "| through proxy + connector (median of rounds) | proxy | connector | backend |"
        )?;
        writeln!(out, "| --- | ---: | ---: | ---: |")?;
        if let Some(s1) = &self.s1_summary {
            let c = &s1.cpu_us_per_request_via_proxy;
            writeln!(
                out,
                "| S1 CPU per small GET, µs (oha: {:.1}) | {:.1} | {:.1} | {:.1} (direct: {}) |",
                c.client_s,
                c.proxy_s,
                c.connector_s,
                c.backend_s,
                s1.backend_cpu_us_per_request_direct
                    .map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
            )?;
        }
        let transfers = [
            ("download", &self.download_summary),
            ("upload", &self.upload_summary),
        ];
        for (what, summary) in transfers {
            if let Some(t) = summary {
                let c = &t.cpu_s_per_gib_via_proxy;
                writeln!(
                    out,
                    "| S3 {what}: CPU seconds per GiB | {:.2} | {:.2} | {:.2} (direct: {}) |",
                    c.proxy_s,
                    c.connector_s,
                    c.backend_s,
                    t.backend_cpu_s_per_gib_direct
                        .map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"))
                )?;
                writeln!(
                    out,
                    "| S3 {what}: RSS growth during the transfer, MiB: first round / median / max | {} / {} / {} | {} / {} / {} | |",
                    mib(t.proxy_growth_first_bytes),
                    mib(t.proxy_growth_bytes.0),
                    mib(t.proxy_growth_bytes.1),
                    mib(t.connector_growth_first_bytes),
                    mib(t.connector_growth_bytes.0),
                    mib(t.connector_growth_bytes.1),
                )?;
            }
        }
        let m = &self.memory;
        writeln!(
            out,
            "| RSS after the first request -> at the end (peak), MiB | {} -> {} ({}) | {} -> {} ({}) | |",
            mib(m.proxy_start.rss_bytes),
            mib(m.proxy_end.rss_bytes),
            mib(m.proxy_end.peak_rss_bytes),
            mib(m.connector_start.rss_bytes),
            mib(m.connector_end.rss_bytes),
            mib(m.connector_end.peak_rss_bytes),
        )?;

        writeln!(out)?;
        writeln!(
            out,
            "| CPU seconds during one measurement (mean of rounds) | proxy | connector | backend | client | other processes | whole machine |"
        )?;
        writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")?;
        let mut shares: Vec<(String, ProcessCpu)> = Vec::new();
        if let Some(s1) = &self.s1_summary {
            shares.push((
                format!("S1 direct ({} s, client oha)", s.duration_s),
                s1.cpu_direct,
            ));
            shares.push((
                format!("S1 through the proxy ({} s)", s.duration_s),
                s1.cpu_via_proxy,
            ));
        }
        for (what, summary) in transfers {
            if let Some(t) = summary {
                shares.push((
                    format!("S3 {what} direct (client: this benchmark)"),
                    t.cpu_direct,
                ));
                shares.push((format!("S3 {what} through the proxy"), t.cpu_via_proxy));
            }
        }
        for (name, c) in shares {
            writeln!(
                out,
                "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                c.proxy_s,
                c.connector_s,
                c.backend_s,
                c.client_s,
                c.others_s(),
                c.machine_s
            )?;
        }

        writeln!(out)?;
        writeln!(
            out,
            "| round | S1 direct req/s | S1 proxy req/s | ratio | download direct GB/s | download proxy GB/s | ratio | upload direct GB/s | upload proxy GB/s | ratio |"
        )?;
        writeln!(
            out,
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        )?;
        for round in 1..=s.rounds {
            let s1 = self.s1.iter().find(|r| r.round == round);
            let down = self.downloads.iter().find(|r| r.round == round);
            let up = self.uploads.iter().find(|r| r.round == round);
            let cell = |v: Option<f64>, format: fn(f64) -> String| {
                v.map_or_else(|| "-".to_owned(), format)
            };
            let times = |v: f64| format!("{v:.3}x");
            let s1_direct = s1.map(|r| r.direct.ok_per_second);
            let s1_proxy = s1.map(|r| r.proxy.ok_per_second);
            let down_direct = down.and_then(|r| r.direct_bytes_per_s);
            let down_proxy = down.and_then(|r| r.proxy_bytes_per_s);
            let up_direct = up.and_then(|r| r.direct_bytes_per_s);
            let up_proxy = up.and_then(|r| r.proxy_bytes_per_s);
            writeln!(
                out,
                "| {round} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                cell(s1_direct, grouped),
                cell(s1_proxy, grouped),
                cell(ratio(s1_proxy, s1_direct), times),
                cell(down_direct, gbps),
                cell(down_proxy, gbps),
                cell(ratio(down_proxy, down_direct), times),
                cell(up_direct, gbps),
                cell(up_proxy, gbps),
                cell(ratio(up_proxy, up_direct), times),
            )?;
        }
        if let Some(s1) = &self.s1_summary
            && (s1.failures_direct > 0 || s1.failures_proxy > 0)
        {
            writeln!(out)?;
            writeln!(
                out,
                "WARNING: S1 failures (errors and answers other than 200): direct {}, through the proxy {}",
                s1.failures_direct, s1.failures_proxy
            )?;
        }

        if !self.goals.is_empty() {
            writeln!(out)?;
            crate::report::write_goal_rows(
                out,
                "| goal (performance.md) | measured | |",
                "| --- | --- | --- |",
                &self.goals,
            )?;
        }
        Ok(())
    }

    /// Writes the tables, then the whole report as one JSON line.
    pub fn write(&self, out: &mut impl Write) -> Result<(), DataplaneError> {
        let json = serde_json::to_string(self).map_err(|error| DataplaneError::Io {
            what: "encoding the report".to_owned(),
            source: std::io::Error::other(error),
        })?;
        write!(out, "{}\n{json}\n", self.table())
            .and_then(|()| out.flush())
            .map_err(DataplaneError::io("writing the report"))
    }
}

/// `bytes` as GiB or MiB, e.g. `1 GiB`.
fn size(bytes: u64) -> String {
    if bytes >= 1024 * MIB && bytes.is_multiple_of(1024 * MIB) {
        format!("{} GiB", bytes / (1024 * MIB))
    } else {
        format!("{} MiB", bytes as f64 / MIB as f64)
    }
}

/// Bytes as MiB with one decimal.
fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / MIB as f64)
}

/// Bytes per second as decimal GB/s.
fn gbps(bytes_per_s: f64) -> String {
    format!("{:.2}", bytes_per_s / 1e9)
}

/// A rounded number with thousands separators, e.g. `45,123`.
fn grouped(value: f64) -> String {
    crate::report::grouped(value.max(0.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_even_and_no_values() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.5]), Some(7.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn ratios_are_of_the_medians_with_the_per_round_range() {
        let pairs = [
            (Some(100.0), Some(30.0)),
            (Some(90.0), Some(36.0)),
            (Some(110.0), Some(33.0)),
            (None, Some(1.0)),
        ];
        let c = Comparison::of(&pairs);
        assert_eq!(c.direct, Some(100.0));
        assert_eq!(c.proxy, Some(31.5));
        assert_eq!(c.ratio, Some(0.315));
        assert_eq!(c.round_ratio_range, Some((0.3, 0.4)));
        assert_eq!(Comparison::of(&[]), Comparison::default());
    }

    #[test]
    fn numbers_are_grouped_and_sizes_named() {
        assert_eq!(grouped(45_123.4), "45,123");
        assert_eq!(grouped(999.0), "999");
        assert_eq!(grouped(1_000_000.0), "1,000,000");
        assert_eq!(size(1024 * MIB), "1 GiB");
        assert_eq!(size(256 * MIB), "256 MiB");
        assert_eq!(gbps(5.4e9), "5.40");
    }
}
