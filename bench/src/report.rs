//! What every scenario's report shares: goals judged against measurements, and numbers
//! written for people.

use serde::Serialize;

/// One goal of the performance design, against what was measured.
#[derive(Clone, Debug, Serialize)]
pub struct GoalOutcome {
    /// The goal, as stated for this run's sizes.
    pub goal: String,
    /// The number it is judged on.
    pub measured: String,
    /// Whether the goal is met.
    pub met: bool,
}

/// `1234567` as `1,234,567`.
pub fn grouped(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(11_037_483), "11,037,483");
    }
}
