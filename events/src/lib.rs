//! Sallyport's security events, and how they leave a process.
//!
//! Two kinds of events share one pipeline:
//!
//! - **sign-in events** (schema `sallyport.dev/sign-in/v1`, `docs/sign-in-log.md`): one
//!   per conditional access decision of the proxy; their type lives in
//!   `sallyport-policy`, the proxy hands them over as a [`Record`];
//! - **audit events** (schema [`AUDIT_SCHEMA`], [`AuditEvent`], `docs/siem.md`): what
//!   the control plane and the fleet API did to configuration and connectors.
//!
//! [`Events`] writes every event as one JSON line on standard output (as the sign-in log
//! always was) and hands it to each configured [`sink`]: an HTTP endpoint taking JSON
//! lines, or an OTLP/HTTP logs endpoint. Each sink has its own bounded queue and a task
//! that batches, retries with exponential backoff and jitter, and flushes on shutdown;
//! emitting never blocks and never waits for the network. Delivery is at least once:
//! every event carries a unique `id` ([`new_event_id`]) for receivers to de-duplicate.
//!
//! A process installs its pipeline once ([`Events::install`]); code anywhere in it then
//! emits through [`global`], the way `tracing` has a global dispatcher. Before an
//! install (unit tests, tools), [`global`] writes to standard output only.

pub mod args;
pub mod audit;
pub mod backoff;
pub mod id;
pub mod metrics;
pub mod otlp;
pub mod pipeline;
pub mod queue;
pub mod sink;

use std::sync::{Arc, OnceLock};

pub use args::EventArgs;
pub use audit::{AUDIT_SCHEMA, Actor, AuditEvent, ObjectRef, Outcome};
pub use id::new_event_id;
pub use metrics::EventMetrics;
pub use pipeline::{Events, PipelineError, Record, Severity, SinkStats};
pub use sink::{Encoding, SinkSettings};

static GLOBAL: OnceLock<Events> = OnceLock::new();
static STDOUT_ONLY: OnceLock<Events> = OnceLock::new();

/// The installed pipeline, or (before any install) one that writes to standard output
/// only.
pub fn global() -> &'static Events {
    GLOBAL.get().unwrap_or_else(|| {
        STDOUT_ONLY.get_or_init(|| Events::stdout_only(Actor::new("sallyport", "unknown")))
    })
}

impl Events {
    /// Makes this pipeline the one [`global`] answers, unless one was installed before:
    /// then `false`, and this one is not installed.
    pub fn install(&self) -> bool {
        GLOBAL.set(self.clone()).is_ok()
    }
}

/// Emits `event` through the [`global`] pipeline.
pub fn audit(event: AuditEvent) {
    global().audit(event);
}

/// A shared, immutable [`Record`], as the sinks' queues hold it.
pub type SharedRecord = Arc<Record>;
