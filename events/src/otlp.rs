//! Events as OpenTelemetry log records: the OTLP/HTTP JSON encoding of an
//! `ExportLogsServiceRequest` (POSTed to an OTLP receiver's `/v1/logs`).
//!
//! The mapping, small and stable (`docs/siem.md`):
//!
//! - one `resourceLogs` entry whose resource has `service.name` (the component,
//!   `sallyport-proxy` or `sallyport-operator`), `service.instance.id` (the replica) and
//!   `service.version`; one `scopeLogs` entry of scope `sallyport.events`;
//! - one `logRecords` entry per event: `timeUnixNano` the event's time,
//!   `observedTimeUnixNano` when it was sent, `severityNumber`/`severityText` (`INFO` 9,
//!   `WARN` 13, `ERROR` 17), `eventName` the event's name (an audit `action`, or
//!   `signIn`), `body` a string holding the event's JSON line exactly as on standard
//!   output, and the attributes `event.id`, `event.schema` and `event.name`.
//!
//! A receiver de-duplicates by the `event.id` attribute, and parses the body for the
//! event's fields.

use jiff::Timestamp;
use serde_json::{Value, json};

use crate::SharedRecord;
use crate::audit::Actor;
use crate::pipeline::Severity;

/// The instrumentation scope of every record.
pub const SCOPE: &str = "sallyport.events";

/// The path an OTLP/HTTP receiver takes logs at.
pub const LOGS_PATH: &str = "/v1/logs";

fn attribute(key: &str, value: &str) -> Value {
    json!({"key": key, "value": {"stringValue": value}})
}

fn nanos(time: Timestamp) -> String {
    time.as_nanosecond().max(0).to_string()
}

/// The `ExportLogsServiceRequest` of `batch` emitted by `actor`, as JSON.
pub fn encode(actor: &Actor, batch: &[SharedRecord]) -> Vec<u8> {
    let observed = nanos(Timestamp::now());
    let records: Vec<Value> = batch
        .iter()
        .map(|record| {
            let (number, text) = match record.severity {
                Severity::Info => (9, "INFO"),
                Severity::Warn => (13, "WARN"),
                Severity::Error => (17, "ERROR"),
            };
            json!({
                "timeUnixNano": nanos(record.time),
                "observedTimeUnixNano": observed,
                "severityNumber": number,
                "severityText": text,
                "eventName": record.name,
                "body": {"stringValue": record.line},
                "attributes": [
                    attribute("event.id", &record.id),
                    attribute("event.schema", &record.schema),
                    attribute("event.name", &record.name),
                ],
            })
        })
        .collect();
    let request = json!({
        "resourceLogs": [{
            "resource": {"attributes": [
                attribute("service.name", &actor.component),
                attribute("service.instance.id", &actor.replica),
                attribute("service.version", env!("CARGO_PKG_VERSION")),
            ]},
            "scopeLogs": [{
                "scope": {"name": SCOPE, "version": env!("CARGO_PKG_VERSION")},
                "logRecords": records,
            }],
        }]
    });
    serde_json::to_vec(&request).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::pipeline::Record;

    #[test]
    fn records_carry_the_event_line_and_id() {
        let record = Arc::new(Record {
            id: "0193a4f2-5c1e-7b3d-9f00-2c4e6a8b0d1f".to_owned(),
            schema: "sallyport.dev/audit/v1".to_owned(),
            name: "connector.registered".to_owned(),
            time: "2026-11-29T12:00:03Z"
                .parse()
                .unwrap_or_else(|e| panic!("time: {e}")),
            severity: Severity::Warn,
            line: r#"{"schema":"sallyport.dev/audit/v1"}"#.to_owned(),
        });
        let encoded = encode(&Actor::new("sallyport-proxy", "proxy-0"), &[record]);
        let value: Value = serde_json::from_slice(&encoded).unwrap_or_else(|e| panic!("json: {e}"));
        let logs = &value["resourceLogs"][0];
        assert_eq!(
            logs["resource"]["attributes"][0],
            json!({"key": "service.name", "value": {"stringValue": "sallyport-proxy"}})
        );
        let log = &logs["scopeLogs"][0]["logRecords"][0];
        assert_eq!(log["timeUnixNano"], "1795953603000000000");
        assert_eq!(log["severityNumber"], 13);
        assert_eq!(
            log["body"]["stringValue"],
            r#"{"schema":"sallyport.dev/audit/v1"}"#
        );
        assert_eq!(
            log["attributes"][0],
            json!({"key": "event.id", "value": {"stringValue": "0193a4f2-5c1e-7b3d-9f00-2c4e6a8b0d1f"}})
        );
    }
}
