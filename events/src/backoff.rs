//! Exponential backoff with jitter between delivery attempts.

use std::time::Duration;

/// Waits between attempts: `initial`, doubling per failed attempt up to `max`, each
/// drawn at random from its upper half ("equal jitter"), so that replicas whose
/// endpoint came back do not all retry in the same instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The wait after the first failure (before jitter).
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The ceiling of the wait after `failures` failed attempts (1 for the first).
    pub fn ceiling(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.initial
            .saturating_mul(1u32 << doublings)
            .min(self.max)
            .max(Duration::from_millis(1))
    }

    /// The wait after `failures` failed attempts: between half the [`ceiling`] and the
    /// ceiling.
    ///
    /// [`ceiling`]: Backoff::ceiling
    pub fn delay(&self, failures: u32) -> Duration {
        let ceiling = self.ceiling(failures);
        let half = ceiling / 2;
        half + (ceiling - half).mul_f64(rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_maximum_with_jitter() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        let ceilings: Vec<u128> = (1..=7).map(|n| backoff.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(2));
        let mut seen = std::collections::HashSet::new();
        for failures in 1..=10 {
            for _ in 0..100 {
                let delay = backoff.delay(failures);
                let ceiling = backoff.ceiling(failures);
                assert!(
                    delay >= ceiling / 2 && delay <= ceiling,
                    "{delay:?} of {ceiling:?}"
                );
                seen.insert(delay);
            }
        }
        // Jitter: the waits are spread, not a handful of fixed values.
        assert!(seen.len() > 100, "only {} distinct waits", seen.len());
    }
}
