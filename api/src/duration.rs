//! Durations in the Kubernetes/Go form (`85s`, `15m`, `4320h`), kept as the user wrote them.

use std::{borrow::Cow, fmt, str::FromStr};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The CEL rule every duration field carries: a positive Go-style duration.
const DURATION_RULE: &str =
    r"self.matches(r'^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$') && duration(self) > duration('0s')";

/// The message shown when [`DURATION_RULE`] rejects a value.
const DURATION_MESSAGE: &str =
    "must be a positive duration such as 85s, 15m or 4320h (units: ns, us, ms, s, m, h)";

/// A positive duration written the Kubernetes/Go way, such as `85s`, `15m` or `4320h`.
///
/// The text is kept exactly as written so that objects round-trip unchanged; use
/// [`Duration::to_std`] to read its length.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Duration(String);

/// The text of a [`Duration`] is not a valid Go-style duration.
#[derive(Debug, thiserror::Error)]
#[error("{value:?} is not a duration such as 85s, 15m or 4320h: {reason}")]
pub struct InvalidDuration {
    /// The text that failed to parse.
    pub value: String,
    /// Why it failed.
    pub reason: String,
}

impl Duration {
    /// A duration from its Go-style text, such as `"4320h"`. The text is checked.
    pub fn parse(text: &str) -> Result<Self, InvalidDuration> {
        let duration = Self(text.to_owned());
        duration.to_std()?;
        Ok(duration)
    }

    /// The text as written in the object.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The length of this duration; an error for malformed text and for durations that
    /// are not positive, as the CRD schema demands.
    pub fn to_std(&self) -> Result<std::time::Duration, InvalidDuration> {
        let invalid = |reason: String| InvalidDuration {
            value: self.0.clone(),
            reason,
        };
        let parsed = kube::core::Duration::from_str(&self.0).map_err(|e| invalid(e.to_string()))?;
        let length: std::time::Duration = parsed.into();
        if parsed.is_negative() || length.is_zero() {
            return Err(invalid("it is not positive".to_owned()));
        }
        Ok(length)
    }

    /// A constant duration for defaults; only used with literal, valid text.
    pub(crate) fn from_static(text: &'static str) -> Self {
        Self(text.to_owned())
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": 32,
            "x-kubernetes-validations": [{
                "rule": DURATION_RULE,
                "message": DURATION_MESSAGE,
            }],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        let d = Duration::parse("4320h").map(|d| d.to_std().ok());
        assert_eq!(
            d.ok().flatten(),
            Some(std::time::Duration::from_secs(4320 * 3600))
        );
        let d = Duration::parse("1h30m").ok().and_then(|d| d.to_std().ok());
        assert_eq!(d, Some(std::time::Duration::from_secs(5400)));
    }

    #[test]
    fn rejects_malformed_and_negative() {
        for text in ["", "0s", "10", "ten minutes", "-5m", "5 m"] {
            assert!(Duration::parse(text).is_err(), "{text:?} must be rejected");
        }
    }

    #[test]
    fn serializes_as_written() {
        let d = Duration::from_static("85s");
        assert_eq!(serde_json::to_string(&d).ok().as_deref(), Some("\"85s\""));
    }
}
