//! One measurement of one scenario against one target: oha for the request scenarios
//! (S1, S1b, S2), the benchmark's own client for the transfers (S3), with the CPU time of
//! the hop's processes, the backend, the client and the whole machine, and (S3) the
//! resident memory of the hop's processes sampled during the transfer.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

use super::targets::Endpoint;
use crate::dataplane::DataplaneError;
use crate::dataplane::backend;
use crate::dataplane::cpu;
use crate::dataplane::oha::{OhaLoad, OhaResult};
use crate::dataplane::sampler::RssSampler;
use crate::procfs;

/// The scenarios the comparison runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioKind {
    /// Small GETs over keep-alive connections, as fast as they are answered.
    S1,
    /// Small GETs, a new connection (and TLS handshake) per request.
    S1b,
    /// Small GETs at fixed rates, latency corrected for coordinated omission.
    S2,
    /// One connection downloads, then uploads, a large generated body.
    S3,
    /// Small GETs at a fixed rate while one connection downloads bulk through the same
    /// hop, latency corrected for coordinated omission.
    S3b,
}

impl ScenarioKind {
    /// Every scenario, in the order they run.
    pub const ALL: [ScenarioKind; 5] = [
        ScenarioKind::S3,
        ScenarioKind::S1,
        ScenarioKind::S1b,
        ScenarioKind::S2,
        ScenarioKind::S3b,
    ];
}

/// What one measurement is.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case", tag = "scenario")]
pub enum Measurement {
    /// S1.
    S1,
    /// S1b.
    S1b,
    /// S2 at `rate` requests per second.
    S2 {
        /// The fixed rate.
        rate: u32,
    },
    /// S3, one download.
    S3Download,
    /// S3, one upload.
    S3Upload,
    /// S3b: small GETs at `rate` requests per second next to a bulk download.
    S3b {
        /// The fixed rate of the small GETs.
        rate: u32,
    },
}

impl Measurement {
    /// A short name for tables and progress lines.
    pub fn label(self) -> String {
        match self {
            Self::S1 => "S1 small GETs, keep-alive".to_owned(),
            Self::S1b => "S1b small GETs, new connection each".to_owned(),
            Self::S2 { rate } => format!("S2 fixed rate {rate} req/s"),
            Self::S3Download => "S3 download".to_owned(),
            Self::S3Upload => "S3 upload".to_owned(),
            Self::S3b { rate } => format!("S3b fixed rate {rate} req/s next to a bulk download"),
        }
    }

    /// The unit of [`Sample::value`].
    pub fn unit(self) -> &'static str {
        match self {
            Self::S3Download | Self::S3Upload => "GB/s",
            _ => "req/s",
        }
    }

    /// Whether a transfer (value in bytes per second).
    pub fn is_transfer(self) -> bool {
        matches!(self, Self::S3Download | Self::S3Upload)
    }
}

/// Latency percentiles, milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// 99.9th percentile.
    pub p999_ms: Option<f64>,
    /// When set, the percentiles cover only the requests that started this many seconds
    /// or more into the measurement (S2, S3b: once oha's connections are up).
    pub after_s: Option<f64>,
}

/// CPU seconds used during one measurement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Cpu {
    /// The hop's processes together (proxy and connector; a peer's processes).
    pub hop_s: f64,
    /// The backend.
    pub backend_s: f64,
    /// The client: oha, or this benchmark's own client for S3.
    pub client_s: f64,
    /// The whole machine.
    pub machine_s: f64,
}

/// One measurement of one target in one round.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// 1-based round.
    pub round: u32,
    /// Requests per second answered 200 (S1, S1b, S2), or bytes per second (S3).
    pub value: f64,
    /// Answers with status 200 (requests), or 1 for a complete transfer.
    pub ok: u64,
    /// Failed requests and answers other than 200.
    pub failed: u64,
    /// Latency, for the request scenarios.
    pub latency: Option<Latency>,
    /// CPU time.
    pub cpu: Cpu,
    /// Resident memory growth of each hop process during a transfer, bytes (name, growth).
    pub rss_growth: Vec<(String, u64)>,
    /// S3b: what the bulk download moved meanwhile, bytes per second.
    pub bulk_bytes_per_s: Option<f64>,
}

impl Sample {
    /// The hop's CPU per answered request, microseconds (per GiB for transfers: seconds).
    pub fn hop_cpu_per_unit(&self, measurement: Measurement, transfer_bytes: u64) -> Option<f64> {
        if measurement.is_transfer() {
            let gib = transfer_bytes as f64 / (1024.0 * 1024.0 * 1024.0);
            (gib > 0.0).then(|| self.cpu.hop_s / gib)
        } else {
            (self.ok > 0).then(|| self.cpu.hop_s * 1e6 / self.ok as f64)
        }
    }
}

/// The CPU clocks read before and after a measurement: the hop's processes, the backend,
/// this process with its reaped children (oha), the machine.
struct Clocks {
    hop: Duration,
    backend: Duration,
    client: Duration,
    machine: Duration,
}

impl Clocks {
    fn read(endpoint: &Endpoint, backend_pid: u32) -> Result<Self, DataplaneError> {
        let mut hop = Duration::ZERO;
        for pid in endpoint.pids() {
            hop += procfs::cpu_time(pid)?;
        }
        Ok(Self {
            hop,
            backend: procfs::cpu_time(backend_pid)?,
            client: procfs::own_cpu_time()? + cpu::reaped_children(),
            machine: cpu::machine_busy(),
        })
    }

    fn since(&self, before: &Clocks) -> Cpu {
        let delta = |a: Duration, b: Duration| a.saturating_sub(b).as_secs_f64();
        Cpu {
            hop_s: delta(self.hop, before.hop),
            backend_s: delta(self.backend, before.backend),
            client_s: delta(self.client, before.client),
            machine_s: delta(self.machine, before.machine),
        }
    }
}

/// At fixed rates (S2, S3b), latency counts the requests that started this long into a
/// measurement: before, oha is still opening its connections (TLS handshakes included)
/// while the schedule runs, and every request that waited for one would count as late.
pub const STEADY_AFTER: Duration = Duration::from_secs(1);

/// How request scenarios load a target.
#[derive(Clone, Debug)]
pub struct RequestLoad<'a> {
    /// oha.
    pub oha: &'a Path,
    /// oha's connections.
    pub connections: u32,
    /// How long.
    pub duration: Duration,
}

/// Runs `measurement` (S1, S1b or S2) against `endpoint` once.
pub async fn requests(
    load: &RequestLoad<'_>,
    measurement: Measurement,
    endpoint: &Endpoint,
    backend_pid: u32,
    round: u32,
) -> Result<Sample, DataplaneError> {
    let mut extra = endpoint.oha_args.clone();
    let steady_after = matches!(
        measurement,
        Measurement::S2 { .. } | Measurement::S3b { .. }
    )
    .then_some(STEADY_AFTER)
    .filter(|after| *after < load.duration);
    match measurement {
        Measurement::S1b => extra.push("--disable-keepalive".to_owned()),
        Measurement::S2 { rate } | Measurement::S3b { rate } => {
            extra.extend(["-q".to_owned(), rate.to_string()]);
            extra.push("--latency-correction".to_owned());
        }
        _ => {}
    }
    let oha = OhaLoad {
        oha: load.oha,
        url: endpoint.url.clone(),
        connections: load.connections,
        duration: load.duration,
        extra,
        steady_after,
    };
    let before = Clocks::read(endpoint, backend_pid)?;
    let result: OhaResult = oha.run().await?;
    let cpu = Clocks::read(endpoint, backend_pid)?.since(&before);
    Ok(Sample {
        round,
        value: result.ok_per_second,
        ok: result.ok,
        failed: result.errors + result.other_status,
        latency: Some(match result.steady {
            Some(steady) => Latency {
                p50_ms: steady.p50_ms,
                p99_ms: steady.p99_ms,
                p999_ms: steady.p999_ms,
                after_s: Some(steady.after_s),
            },
            None => Latency {
                p50_ms: result.p50_ms,
                p99_ms: result.p99_ms,
                p999_ms: result.p999_ms,
                after_s: None,
            },
        }),
        cpu,
        rss_growth: Vec::new(),
        bulk_bytes_per_s: None,
    })
}

/// How transfers run.
#[derive(Clone, Copy, Debug)]
pub struct TransferLoad {
    /// Bytes per transfer.
    pub bytes: u64,
    /// Upload chunk size, bytes.
    pub chunk: usize,
    /// Bound on one transfer.
    pub within: Duration,
}

/// How often resident memory is sampled during a transfer.
const RSS_INTERVAL: Duration = Duration::from_millis(20);
/// At most this many samples per transfer (an hour at [`RSS_INTERVAL`]).
const RSS_SAMPLES: u32 = 180_000;

/// Runs one S3 transfer (download or upload) against `endpoint` on a fresh connection.
pub async fn transfer(
    load: &TransferLoad,
    upload: bool,
    endpoint: &Endpoint,
    backend_pid: u32,
    round: u32,
) -> Result<Sample, DataplaneError> {
    let mut connection = endpoint.client.connect().await?;
    let pids = endpoint.pids();
    let before = Clocks::read(endpoint, backend_pid)?;
    let sampler = RssSampler::start(&pids, RSS_INTERVAL, RSS_SAMPLES);
    let done = if upload {
        let chunk = Bytes::from(vec![b'u'; load.chunk.max(1)]);
        connection
            .upload(backend::UPLOAD_PATH, load.bytes, chunk, load.within)
            .await
    } else {
        let path = format!("{}{}", backend::BYTES_PATH, load.bytes);
        connection.get(&path, load.within).await
    };
    let memory = sampler.finish();
    let done = done?;
    let cpu = Clocks::read(endpoint, backend_pid)?.since(&before);
    let complete = if upload {
        done.head.trim() == load.bytes.to_string()
    } else {
        done.received == load.bytes
    };
    if done.status != http::StatusCode::OK || !complete {
        return Err(DataplaneError::Client {
            what: format!(
                "{} through {}",
                if upload { "upload" } else { "download" },
                endpoint.kind.label()
            ),
            message: format!(
                "status {}, {} bytes received of {}: {}",
                done.status,
                done.received,
                load.bytes,
                done.head.chars().take(200).collect::<String>()
            ),
        });
    }
    Ok(Sample {
        round,
        value: done.rate(load.bytes),
        ok: 1,
        failed: 0,
        latency: None,
        cpu,
        rss_growth: endpoint
            .processes
            .iter()
            .zip(memory)
            .map(|((name, _), growth)| (name.clone(), growth.growth_bytes()))
            .collect(),
        bulk_bytes_per_s: None,
    })
}

/// S3b: [`requests`] at `rate` while one connection downloads `bulk.bytes` at a time,
/// again and again, through the same hop; the sample's `bulk_bytes_per_s` is what the
/// download moved meanwhile.
pub async fn requests_next_to_bulk(
    load: &RequestLoad<'_>,
    rate: u32,
    bulk: &TransferLoad,
    endpoint: &Endpoint,
    backend_pid: u32,
    round: u32,
) -> Result<Sample, DataplaneError> {
    let mut connection = endpoint.client.connect().await?;
    let stop = stop_flag();
    let path = format!("{}{}", backend::BYTES_PATH, bulk.bytes);
    let within = bulk.within;
    let flag = stop.clone();
    let started = std::time::Instant::now();
    let downloads = async move {
        let mut moved: u64 = 0;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let done = connection.get(&path, within).await?;
            if done.status != http::StatusCode::OK {
                return Err(DataplaneError::Client {
                    what: "the bulk download of S3b".to_owned(),
                    message: format!("status {}", done.status),
                });
            }
            moved += done.received;
        }
        Ok::<u64, DataplaneError>(moved)
    };
    let small = async {
        // Let the download reach full speed first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let result = requests(
            load,
            Measurement::S3b { rate },
            endpoint,
            backend_pid,
            round,
        )
        .await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        result
    };
    let (moved, sample) = tokio::join!(downloads, small);
    let mut sample = sample?;
    sample.bulk_bytes_per_s = Some(moved? as f64 / started.elapsed().as_secs_f64().max(1e-9));
    Ok(sample)
}

/// A flag the bulk download polls between transfers.
fn stop_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ok: u64, hop_s: f64) -> Sample {
        Sample {
            round: 1,
            value: 0.0,
            ok,
            failed: 0,
            latency: None,
            cpu: Cpu {
                hop_s,
                ..Cpu::default()
            },
            rss_growth: Vec::new(),
            bulk_bytes_per_s: None,
        }
    }

    #[test]
    fn cpu_per_request_is_in_microseconds_and_per_gib_in_seconds() {
        assert_eq!(
            sample(40_000, 2.0).hop_cpu_per_unit(Measurement::S1, 0),
            Some(50.0)
        );
        assert_eq!(sample(0, 2.0).hop_cpu_per_unit(Measurement::S1, 0), None);
        let gib = 1024 * 1024 * 1024;
        assert_eq!(
            sample(1, 3.0).hop_cpu_per_unit(Measurement::S3Download, 2 * gib),
            Some(1.5)
        );
    }

    #[test]
    fn labels_name_the_rate_and_units_follow_the_kind() {
        assert_eq!(
            Measurement::S2 { rate: 10_000 }.label(),
            "S2 fixed rate 10000 req/s"
        );
        assert_eq!(Measurement::S3Upload.unit(), "GB/s");
        assert_eq!(Measurement::S1b.unit(), "req/s");
    }
}
