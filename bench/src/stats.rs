//! Summaries of repeated measurements.

use std::time::Duration;

use serde::Serialize;

/// Minimum, median and maximum of a set of durations, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Spread {
    /// The smallest.
    pub min_ms: f64,
    /// The median (the mean of the middle two for an even count).
    pub median_ms: f64,
    /// The largest.
    pub max_ms: f64,
}

impl Spread {
    /// The spread of millisecond values, leaving out the absent ones (`None`), the
    /// negative and the non-finite; `None` when none is left.
    pub fn of_ms(values: impl Iterator<Item = Option<f64>>) -> Option<Self> {
        let durations: Vec<Duration> = values
            .flatten()
            .filter(|ms| ms.is_finite() && *ms >= 0.0)
            .map(|ms| Duration::from_secs_f64(ms / 1000.0))
            .collect();
        Self::of(&durations)
    }

    /// The spread of `samples`; `None` when there are none.
    pub fn of(samples: &[Duration]) -> Option<Self> {
        let mut sorted = samples.to_vec();
        sorted.sort();
        let (first, last) = (sorted.first()?, sorted.last()?);
        let middle = sorted.len() / 2;
        let median = if sorted.len().is_multiple_of(2) {
            (sorted[middle - 1] + sorted[middle]) / 2
        } else {
            sorted[middle]
        };
        Some(Self {
            min_ms: millis(*first),
            median_ms: millis(median),
            max_ms: millis(*last),
        })
    }
}

/// The `q`-quantile (0.0 to 1.0, nearest rank) of `samples`; `None` when there are none.
pub fn quantile(samples: &[Duration], q: f64) -> Option<Duration> {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.saturating_sub(1)).copied()
}

/// `duration` in milliseconds, rounded to microseconds.
pub fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// `duration` in seconds, rounded to milliseconds.
pub fn seconds(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().copied().map(Duration::from_millis).collect()
    }

    #[test]
    fn spread_of_odd_and_even_counts() {
        let odd = Spread::of(&ms(&[30, 10, 20]));
        assert_eq!(
            odd,
            Some(Spread {
                min_ms: 10.0,
                median_ms: 20.0,
                max_ms: 30.0
            })
        );
        let even = Spread::of(&ms(&[40, 10, 20, 30]));
        assert_eq!(even.map(|s| s.median_ms), Some(25.0));
        assert_eq!(Spread::of(&[]), None);
    }

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let samples = ms(&(1..=100).collect::<Vec<_>>());
        assert_eq!(quantile(&samples, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(quantile(&samples, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(quantile(&samples, 1.0), Some(Duration::from_millis(100)));
        assert_eq!(quantile(&samples, 0.0), Some(Duration::from_millis(1)));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
