//! The machine a benchmark ran on, as `/proc` describes it.

use std::fmt;

use serde::Serialize;

/// CPUs, CPU model and memory of this machine; a field is `None` when it cannot be read.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    /// CPUs this process may use.
    pub cpus: Option<usize>,
    /// The first `model name` of `/proc/cpuinfo`.
    pub cpu_model: Option<String>,
    /// `MemTotal` of `/proc/meminfo`, bytes.
    pub memory_bytes: Option<u64>,
    /// The kernel release (`/proc/sys/kernel/osrelease`).
    pub kernel: Option<String>,
}

impl Machine {
    /// This machine.
    pub fn here() -> Self {
        let read = |path| std::fs::read_to_string(path).ok();
        Self {
            cpus: std::thread::available_parallelism().ok().map(usize::from),
            cpu_model: read("/proc/cpuinfo").and_then(|info| cpu_model(&info)),
            memory_bytes: read("/proc/meminfo").and_then(|info| mem_total(&info)),
            kernel: read("/proc/sys/kernel/osrelease").map(|release| release.trim().to_owned()),
        }
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unknown = || "?".to_owned();
        write!(
            f,
            "{} CPUs ({}), {} GiB memory, Linux {}",
            self.cpus.map_or_else(unknown, |c| c.to_string()),
            self.cpu_model.clone().unwrap_or_else(unknown),
            self.memory_bytes.map_or_else(unknown, |b| format!(
                "{:.1}",
                b as f64 / (1024.0 * 1024.0 * 1024.0)
            )),
            self.kernel.clone().unwrap_or_else(unknown),
        )
    }
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_owned())
    })
}

fn mem_total(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let kib: u64 = line
            .strip_prefix("MemTotal:")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kib * 1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_model_and_memory() {
        let cpuinfo =
            "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Some CPU @ 2.00GHz\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("Some CPU @ 2.00GHz"));
        assert_eq!(
            mem_total("MemTotal:       16384 kB\nMemFree: 1 kB\n"),
            Some(16_777_216)
        );
        assert_eq!(mem_total(""), None);
    }
}
