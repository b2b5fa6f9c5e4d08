//! Audit events: what the operator and the fleet API did to configuration and
//! connectors, and the requests of monitored sessions ([`SESSION_REQUEST`]), in the
//! stable schema [`AUDIT_SCHEMA`] (`docs/siem.md`).
//!
//! Fields are only ever added to this schema; a change that removes a field or changes
//! its meaning gets a new `schema` value.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::id::new_event_id;

/// The value of every audit event's `schema` field.
pub const AUDIT_SCHEMA: &str = "sallyport.dev/audit/v1";

/// The action of the audit event the proxy writes for every request of a session a
/// `monitor` session control applies to (`docs/siem.md` lists its details).
pub const SESSION_REQUEST: &str = "session.request";

/// Who did it: a Sallyport component and its replica.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Actor {
    /// `sallyport-proxy` or `sallyport-operator`.
    pub component: String,
    /// The replica (the pod's name).
    pub replica: String,
}

impl Actor {
    /// Replica `replica` of `component`.
    pub fn new(component: &str, replica: &str) -> Self {
        Self {
            component: component.to_owned(),
            replica: replica.to_owned(),
        }
    }
}

/// What it was done to: a Kubernetes object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    /// The kind, e.g. `Connector`, `ConnectorGroup`, `ConfigMap`.
    pub kind: String,
    /// The namespace; absent for cluster-wide objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The name; empty when the request never named one (a refused registration with
    /// a malformed body).
    pub name: String,
}

impl ObjectRef {
    /// `kind` `namespace/name`.
    pub fn namespaced(kind: &str, namespace: &str, name: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            namespace: Some(namespace.to_owned()),
            name: name.to_owned(),
        }
    }

    /// `kind` `id`, where `id` is `namespace/name` (or a bare name).
    pub fn from_id(kind: &str, id: &str) -> Self {
        match id.split_once('/') {
            Some((namespace, name)) => Self::namespaced(kind, namespace, name),
            None => Self {
                kind: kind.to_owned(),
                namespace: None,
                name: id.to_owned(),
            },
        }
    }
}

/// How it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// It was done.
    Success,
    /// It was refused: the caller is not allowed, or asked for something invalid.
    Refused,
    /// It failed on Sallyport's side (the caller may try again).
    Failed,
    /// It was put off: the caller was told to try again later.
    Deferred,
}

impl Outcome {
    /// The name in the schema (`success`, `refused`, `failed`, `deferred`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Refused => "refused",
            Self::Failed => "failed",
            Self::Deferred => "deferred",
        }
    }
}

/// One audit event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    /// Always [`AUDIT_SCHEMA`].
    pub schema: String,
    /// Unique per event (UUID v7); a receiver de-duplicates by it.
    pub id: String,
    /// When it happened (RFC 3339, UTC).
    pub time: Timestamp,
    /// Who did it; filled in by the pipeline that emits the event.
    pub actor: Actor,
    /// What was done, `noun.verb` in the past tense, e.g. `connector.registered`.
    pub action: String,
    /// What it was done to.
    pub object: ObjectRef,
    /// How it ended.
    pub outcome: Outcome,
    /// Why, as a stable machine-readable word (e.g. `TokenInvalid`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What happened, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The network address of the caller, for events caused by a request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<String>,
    /// Facts particular to the action (`docs/siem.md` lists them per action).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub details: Map<String, Value>,
}

impl AuditEvent {
    /// A new event (new id, the current time, no actor yet) of `action` on `object`
    /// that ended in `outcome`.
    pub fn new(action: &str, object: ObjectRef, outcome: Outcome) -> Self {
        Self {
            schema: AUDIT_SCHEMA.to_owned(),
            id: new_event_id(),
            time: Timestamp::now(),
            actor: Actor::default(),
            action: action.to_owned(),
            object,
            outcome,
            reason: None,
            message: None,
            source_address: None,
            details: Map::new(),
        }
    }

    /// Sets the reason.
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// Sets the message.
    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// Sets the caller's address, when known.
    pub fn source_address(mut self, address: Option<impl Into<String>>) -> Self {
        self.source_address = address.map(Into::into);
        self
    }

    /// Adds the detail `key` (skipped when `value` is `None` or does not serialise).
    pub fn detail(mut self, key: &str, value: impl Serialize) -> Self {
        match serde_json::to_value(value) {
            Ok(Value::Null) | Err(_) => {}
            Ok(value) => {
                self.details.insert(key.to_owned(), value);
            }
        }
        self
    }

    /// The event as one JSON line, without the newline.
    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_is_stable() {
        let mut event = AuditEvent::new(
            "connector.registered",
            ObjectRef::namespaced("Connector", "team-a", "dc-host-1"),
            Outcome::Success,
        )
        .reason("Registered")
        .source_address(Some("203.0.113.7:50000"))
        .detail("group", "team-a/dc")
        .detail("notThere", None::<String>);
        event.actor = Actor::new("sallyport-proxy", "proxy-0");
        event.id = "0193a4f2-5c1e-7b3d-9f00-2c4e6a8b0d1f".to_owned();
        event.time = "2026-11-29T12:00:03.51Z"
            .parse()
            .unwrap_or_else(|e| panic!("time: {e}"));
        let json = event.to_json().unwrap_or_else(|e| panic!("json: {e}"));
        assert_eq!(
            json,
            r#"{"schema":"sallyport.dev/audit/v1","id":"0193a4f2-5c1e-7b3d-9f00-2c4e6a8b0d1f","time":"2026-11-29T12:00:03.51Z","actor":{"component":"sallyport-proxy","replica":"proxy-0"},"action":"connector.registered","object":{"kind":"Connector","namespace":"team-a","name":"dc-host-1"},"outcome":"success","reason":"Registered","sourceAddress":"203.0.113.7:50000","details":{"group":"team-a/dc"}}"#
        );
        let back: AuditEvent = serde_json::from_str(&json).unwrap_or_else(|e| panic!("parse: {e}"));
        assert_eq!(back, event);
    }

    #[test]
    fn object_ids_split_into_namespace_and_name() {
        let object = ObjectRef::from_id("ConnectorGroup", "team-a/dc");
        assert_eq!(object.namespace.as_deref(), Some("team-a"));
        assert_eq!(object.name, "dc");
        assert_eq!(ObjectRef::from_id("Namespace", "x").namespace, None);
    }
}
