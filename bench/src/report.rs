//! What every scenario's report shares: goals judged against measurements, and numbers
//! written for people.

use std::fmt::Write as _;

use serde::Serialize;

use crate::machine::Machine;

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

/// How the benchmark was built: `release`, or `debug` (whose numbers mean little).
pub fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// What `write` writes: a report's table, say.
pub fn written(write: impl FnOnce(&mut String) -> std::fmt::Result) -> String {
    let mut out = String::new();
    let _ = write(&mut out);
    out
}

/// The first lines of a report's table: `title`, the machine, and for a `debug`
/// `profile` a warning that names the make target `make_target` for real numbers.
pub fn write_heading(
    out: &mut String,
    title: &str,
    machine: &Machine,
    profile: &str,
    make_target: &str,
) -> std::fmt::Result {
    writeln!(out, "{title}")?;
    writeln!(out, "machine: {machine}")?;
    if profile != "release" {
        writeln!(
            out,
            "WARNING: a debug build of the benchmark; use `{make_target}` for real numbers"
        )?;
    }
    Ok(())
}

/// Writes a Markdown table of the goals: the `header` row (three columns, `separator`
/// under it), then one row per goal (`| goal | measured | met / NOT met |`).
pub fn write_goal_rows(
    out: &mut String,
    header: &str,
    separator: &str,
    goals: &[GoalOutcome],
) -> std::fmt::Result {
    use std::fmt::Write as _;
    writeln!(out, "{header}")?;
    writeln!(out, "{separator}")?;
    for goal in goals {
        writeln!(
            out,
            "| {} | {} | {} |",
            goal.goal,
            goal.measured,
            if goal.met { "met" } else { "NOT met" }
        )?;
    }
    Ok(())
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
