//! Memory and CPU time of processes, from `/proc`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::error::BenchError;

/// Clock ticks per second of the times in `/proc/<pid>/stat` (`USER_HZ`, fixed at 100 in
/// the Linux ABI on x86_64 and arm64).
const USER_HZ: f64 = 100.0;

/// Memory of a process, from `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Memory {
    /// Peak resident set size (`VmHWM`), bytes.
    pub peak_rss_bytes: u64,
    /// Current resident set size (`VmRSS`), bytes.
    pub rss_bytes: u64,
}

/// The peak and current resident memory of process `pid`.
pub fn memory(pid: u32) -> Result<Memory, BenchError> {
    let path = PathBuf::from(format!("/proc/{pid}/status"));
    let status = read(&path)?;
    let field = |name: &str| {
        parse_kib_field(&status, name)
            .map(|kib| kib * 1024)
            .ok_or_else(|| BenchError::Proc {
                path: path.clone(),
                message: format!("no {name} line"),
            })
    };
    Ok(Memory {
        peak_rss_bytes: field("VmHWM")?,
        rss_bytes: field("VmRSS")?,
    })
}

/// The CPU time (user and system, all threads) process `pid` has used so far.
pub fn cpu_time(pid: u32) -> Result<Duration, BenchError> {
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    let stat = read(&path)?;
    parse_cpu_ticks(&stat)
        .map(|ticks| Duration::from_secs_f64(ticks as f64 / USER_HZ))
        .ok_or_else(|| BenchError::Proc {
            path,
            message: "no utime and stime fields".into(),
        })
}

/// The CPU time this process has used so far.
pub fn own_cpu_time() -> Result<Duration, BenchError> {
    cpu_time(std::process::id())
}

/// Live processes with an argument containing `fragment`, as `(pid, command name)`; for
/// finding a control plane's components by their state directory.
pub fn processes_mentioning(fragment: &str) -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<(u32, String)> = entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let mentions = cmdline
                .split(|byte| *byte == 0)
                .any(|arg| String::from_utf8_lossy(arg).contains(fragment));
            if !mentions {
                return None;
            }
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            Some((pid, comm.trim().to_owned()))
        })
        .collect();
    found.sort();
    found
}

fn read(path: &Path) -> Result<String, BenchError> {
    std::fs::read_to_string(path).map_err(|error| BenchError::Proc {
        path: path.to_owned(),
        message: error.to_string(),
    })
}

/// The value of a `Name:   1234 kB` line of `/proc/<pid>/status`, in KiB.
fn parse_kib_field(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(':')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// `utime + stime` (fields 14 and 15) of `/proc/<pid>/stat`, in clock ticks. The command
/// name (field 2) may hold spaces and parentheses, so fields are counted after its last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_memory_lines_of_proc_status() {
        let status =
            "Name:\tsallyport-opera\nVmPeak:\t  900 kB\nVmHWM:\t   45056 kB\nVmRSS:\t   40960 kB\n";
        assert_eq!(parse_kib_field(status, "VmHWM"), Some(45056));
        assert_eq!(parse_kib_field(status, "VmRSS"), Some(40960));
        assert_eq!(parse_kib_field(status, "VmSwap"), None);
    }

    #[test]
    fn reads_cpu_ticks_after_a_command_name_with_spaces() {
        let stat = "4242 (odd) name) S 1 4242 4242 0 -1 4194560 500 0 0 0 123 45 0 0 20 0 9 0";
        assert_eq!(parse_cpu_ticks(stat), Some(168));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn reads_this_process() -> Result<(), BenchError> {
        let own = memory(std::process::id())?;
        assert!(own.peak_rss_bytes >= own.rss_bytes && own.rss_bytes > 0);
        own_cpu_time()?;
        Ok(())
    }
}
