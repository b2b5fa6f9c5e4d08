//! Status conditions: what the operator concluded, merged into what an object already
//! says so that `lastTransitionTime` only moves when a condition's status does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// A condition as the operator concludes it, before timestamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The condition type, e.g. `Accepted`.
    pub type_: &'static str,
    /// Whether the condition holds.
    pub status: bool,
    /// A PascalCase reason, e.g. `ConnectorGroupNotFound`.
    pub reason: &'static str,
    /// What a person should know, naming the objects involved.
    pub message: String,
}

impl Verdict {
    /// A condition that holds.
    pub fn ok(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status: true,
            reason,
            message: message.into(),
        }
    }

    /// A condition that does not hold.
    pub fn failed(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status: false,
            reason,
            message: message.into(),
        }
    }

    fn status_string(&self) -> &'static str {
        if self.status { "True" } else { "False" }
    }
}

/// The conditions to write: `verdicts` in order, each keeping the `lastTransitionTime` of
/// the existing condition of its type when the status is unchanged, else stamped `now`.
pub fn merge(
    existing: &[Condition],
    verdicts: &[Verdict],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    verdicts
        .iter()
        .map(|verdict| {
            let previous = existing.iter().find(|c| c.type_ == verdict.type_);
            let last_transition_time = match previous {
                Some(previous) if previous.status == verdict.status_string() => {
                    previous.last_transition_time.clone()
                }
                _ => Time(now),
            };
            Condition {
                type_: verdict.type_.to_owned(),
                status: verdict.status_string().to_owned(),
                reason: verdict.reason.to_owned(),
                message: verdict.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// The verdicts whose status or reason differ from `existing`: the transitions worth an
/// Event.
pub fn transitions<'a>(existing: &[Condition], verdicts: &'a [Verdict]) -> Vec<&'a Verdict> {
    verdicts
        .iter()
        .filter(|verdict| {
            !existing.iter().any(|c| {
                c.type_ == verdict.type_
                    && c.status == verdict.status_string()
                    && c.reason == verdict.reason
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn keeps_the_transition_time_while_the_status_holds() {
        let first = merge(
            &[],
            &[Verdict::failed("Ready", "NoConnectors", "none yet")],
            Some(1),
            at(100),
        );
        assert_eq!(first[0].last_transition_time, Time(at(100)));

        let same = merge(
            &first,
            &[Verdict::failed("Ready", "Other", "still not")],
            Some(2),
            at(200),
        );
        assert_eq!(same[0].last_transition_time, Time(at(100)));
        assert_eq!(same[0].observed_generation, Some(2));

        let flipped = merge(
            &same,
            &[Verdict::ok("Ready", "Ready", "serving")],
            Some(2),
            at(300),
        );
        assert_eq!(flipped[0].last_transition_time, Time(at(300)));
        assert_eq!(flipped[0].status, "True");
    }

    #[test]
    fn transitions_are_new_statuses_or_reasons() {
        let existing = merge(
            &[],
            &[Verdict::failed("Ready", "NoConnectors", "x")],
            None,
            at(1),
        );
        let same = [Verdict::failed("Ready", "NoConnectors", "other words")];
        assert!(transitions(&existing, &same).is_empty());
        let new_reason = [Verdict::failed("Ready", "GroupNotFound", "x")];
        assert_eq!(transitions(&existing, &new_reason).len(), 1);
        let new_type = [Verdict::ok("Accepted", "Accepted", "x")];
        assert_eq!(transitions(&existing, &new_type).len(), 1);
    }
}
