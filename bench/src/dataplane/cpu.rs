//! CPU time beyond single processes, from `/proc`: what this benchmark's reaped children
//! used (oha, once it has exited), and how busy the whole machine was, so that a run can
//! show how much of the two cores went to processes outside the test.

use std::time::Duration;

/// Clock ticks per second of `/proc` times (`USER_HZ`, 100 on x86_64 and arm64).
const USER_HZ: f64 = 100.0;

/// CPU time used by this process's children that have exited and been waited for
/// (`cutime + cstime` of `/proc/self/stat`); zero when unreadable.
pub fn reaped_children() -> Duration {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| children_ticks(&stat))
        .map_or(Duration::ZERO, |ticks| {
            Duration::from_secs_f64(ticks as f64 / USER_HZ)
        })
}

/// Busy CPU time of the whole machine, all CPUs (`/proc/stat`'s `cpu` line less idle and
/// iowait); zero when unreadable.
pub fn machine_busy() -> Duration {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|stat| busy_ticks(&stat))
        .map_or(Duration::ZERO, |ticks| {
            Duration::from_secs_f64(ticks as f64 / USER_HZ)
        })
}

/// `cutime + cstime` (fields 16 and 17) of a `/proc/<pid>/stat` line; fields are counted
/// after the command name's last `)`.
fn children_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(13);
    let cutime: u64 = fields.next()?.parse().ok()?;
    let cstime: u64 = fields.next()?.parse().ok()?;
    Some(cutime + cstime)
}

/// The aggregate `cpu` line of `/proc/stat`: every field but idle (4th) and iowait (5th),
/// leaving out guest time, which user time already counts.
fn busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    Some(total.saturating_sub(idle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_children_times_after_a_command_name_with_spaces() {
        let stat = "4242 (odd) name) S 1 4242 4242 0 -1 4194560 500 0 0 0 123 45 70 30 20 0 9 0";
        assert_eq!(children_ticks(stat), Some(100));
        assert_eq!(children_ticks("garbage"), None);
    }

    #[test]
    fn machine_busy_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 5 50 1000 20 3 2 1 40 0\ncpu0 50 2 25 500 10 1 1 0 20 0\n";
        assert_eq!(busy_ticks(stat), Some(161));
        assert_eq!(busy_ticks("intr 1 2 3\n"), None);
    }
}
