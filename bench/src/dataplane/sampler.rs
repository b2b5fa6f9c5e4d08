//! Resident memory of processes sampled from `/proc` on a thread of its own while a
//! transfer runs: the baseline before it, the highest value during it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

use crate::procfs;

/// How far one process's resident memory rose during a sampling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RssGrowth {
    /// `VmRSS` when the sampling started, bytes.
    pub baseline_bytes: u64,
    /// The highest `VmRSS` sampled, bytes.
    pub peak_bytes: u64,
    /// Samples taken.
    pub samples: u32,
}

impl RssGrowth {
    /// Peak minus baseline, bytes (0 when it never rose).
    pub fn growth_bytes(&self) -> u64 {
        self.peak_bytes.saturating_sub(self.baseline_bytes)
    }
}

/// Samples `VmRSS` of some processes every `interval` until [`RssSampler::finish`].
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<RssGrowth>>,
}

impl RssSampler {
    /// Takes the baseline of `pids` now and samples them from here on; at most `limit`
    /// samples each (so a forgotten sampler ends by itself).
    pub fn start(pids: &[u32], interval: Duration, limit: u32) -> Self {
        let pids = pids.to_vec();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let rss = |pid: u32| procfs::memory(pid).map(|m| m.rss_bytes).unwrap_or(0);
        let mut growth: Vec<RssGrowth> = pids
            .iter()
            .map(|pid| {
                let baseline = rss(*pid);
                RssGrowth {
                    baseline_bytes: baseline,
                    peak_bytes: baseline,
                    samples: 1,
                }
            })
            .collect();
        let thread = std::thread::spawn(move || {
            for _ in 0..limit {
                if stopped.load(Ordering::Acquire) {
                    break;
                }
                std::thread::sleep(interval);
                for (pid, growth) in pids.iter().zip(growth.iter_mut()) {
                    growth.peak_bytes = growth.peak_bytes.max(rss(*pid));
                    growth.samples += 1;
                }
            }
            growth
        });
        Self { stop, thread }
    }

    /// Stops sampling; one result per pid, in the order given.
    pub fn finish(self) -> Vec<RssGrowth> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or_default()
    }
}
