//! The pipeline every event goes through: standard output, then each sink's queue.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::SharedRecord;
use crate::args::EventArgs;
use crate::audit::{Actor, AuditEvent, Outcome};
use crate::sink::{self, Sink, SinkSettings};

/// How serious an event is, for receivers that rank log records (OTLP's severity).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// Routine: an allowed sign-in, a registration.
    Info,
    /// Worth a look: a refused or denied request.
    Warn,
    /// Sallyport failed.
    Error,
}

/// One event, serialised once: what standard output and every sink receive.
#[derive(Clone, Debug)]
pub struct Record {
    /// The event's unique id (its `id` field).
    pub id: String,
    /// Its `schema` field, e.g. `sallyport.dev/audit/v1`.
    pub schema: String,
    /// A short name: an audit event's `action`, `signIn` for a sign-in event.
    pub name: String,
    /// When it happened.
    pub time: Timestamp,
    /// How serious it is.
    pub severity: Severity,
    /// The event as one JSON object, without a newline.
    pub line: String,
}

impl Record {
    /// `event` serialised, with its metadata.
    pub fn serialize<T: Serialize>(
        id: &str,
        schema: &str,
        name: &str,
        time: Timestamp,
        severity: Severity,
        event: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            id: id.to_owned(),
            schema: schema.to_owned(),
            name: name.to_owned(),
            time,
            severity,
            line: serde_json::to_string(event)?,
        })
    }
}

/// The pipeline could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// An endpoint flag is not an absolute `http://` or `https://` URL.
    #[error("--{flag} {value:?}: {reason}")]
    Endpoint {
        /// The flag.
        flag: String,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A CA file could not be read.
    #[error("--{flag} {path}: cannot read: {source}")]
    ReadCa {
        /// The flag.
        flag: String,
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A CA file holds no usable certificate.
    #[error("--{flag} {path}: {reason}")]
    BadCa {
        /// The flag.
        flag: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The TLS client could not be configured.
    #[error("the TLS client of event sink {sink} cannot be built: {source}")]
    Tls {
        /// The sink (`http`, `otlp`).
        sink: String,
        /// rustls' error.
        source: rustls::Error,
    },
}

/// What a sink has done so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// The sink: `http` or `otlp`.
    pub sink: String,
    /// Events the endpoint accepted.
    pub delivered: u64,
    /// Events dropped because the queue was full.
    pub dropped: u64,
    /// Events the endpoint refused for good (an answer other than 2xx, 408, 429, 5xx).
    pub rejected: u64,
    /// Events waiting in the queue or being sent.
    pub pending: u64,
}

/// The event pipeline of a process; cheap to clone (clones share everything).
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    actor: Actor,
    stdout: bool,
    sinks: Vec<Arc<Sink>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    closing: CancellationToken,
    shutdown_timeout: Duration,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("actor", &self.inner.actor)
            .field("stdout", &self.inner.stdout)
            .field("sinks", &self.stats())
            .finish()
    }
}

impl Events {
    /// A pipeline that writes to standard output only, as `actor`.
    pub fn stdout_only(actor: Actor) -> Self {
        Self::build(actor, true, Vec::new(), Duration::ZERO)
    }

    /// The pipeline `args` describe, as `actor`: standard output and the sinks it
    /// names, their delivery tasks started (call within a Tokio runtime).
    pub fn start(args: &EventArgs, actor: Actor) -> Result<Self, PipelineError> {
        let settings = args.sinks()?;
        let events = Self::with_sinks(actor.clone(), true, settings, args.events_shutdown_timeout)?;
        for stats in events.stats() {
            info!(sink = %stats.sink, "delivering security events");
        }
        Ok(events)
    }

    /// A pipeline as `actor` with `sinks` (their tasks started: call within a Tokio
    /// runtime), writing to standard output when `stdout` is set; [`Events::close`]
    /// flushes for at most `shutdown_timeout`.
    pub fn with_sinks(
        actor: Actor,
        stdout: bool,
        sinks: Vec<SinkSettings>,
        shutdown_timeout: Duration,
    ) -> Result<Self, PipelineError> {
        let sinks = sinks
            .into_iter()
            .map(|settings| Sink::new(settings, &actor).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let events = Self::build(actor, stdout, sinks, shutdown_timeout);
        let tasks = events
            .inner
            .sinks
            .iter()
            .map(|sink| tokio::spawn(sink::deliver(sink.clone(), events.inner.closing.clone())))
            .collect();
        *events
            .inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = tasks;
        Ok(events)
    }

    fn build(
        actor: Actor,
        stdout: bool,
        sinks: Vec<Arc<Sink>>,
        shutdown_timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                actor,
                stdout,
                sinks,
                tasks: Mutex::new(Vec::new()),
                closing: CancellationToken::new(),
                shutdown_timeout,
            }),
        }
    }

    /// Who emits through this pipeline.
    pub fn actor(&self) -> &Actor {
        &self.inner.actor
    }

    /// Writes `record` to standard output (one line, written whole under stdout's lock)
    /// and queues it for every sink. Never waits for the network; a sink whose queue is
    /// full drops it and counts it.
    pub fn emit(&self, record: Record) {
        if self.inner.stdout {
            let mut line = String::with_capacity(record.line.len() + 1);
            line.push_str(&record.line);
            line.push('\n');
            if let Err(error) = std::io::stdout().lock().write_all(line.as_bytes()) {
                warn!(%error, id = %record.id, schema = %record.schema, "cannot write an event to standard output");
            }
        }
        if self.inner.sinks.is_empty() {
            return;
        }
        let record: SharedRecord = Arc::new(record);
        for sink in &self.inner.sinks {
            sink.enqueue(record.clone());
        }
    }

    /// Stamps `event` with this pipeline's actor (unless it has one) and emits it.
    pub fn audit(&self, mut event: AuditEvent) {
        if event.actor.component.is_empty() {
            event.actor = self.inner.actor.clone();
        }
        let severity = match event.outcome {
            Outcome::Success | Outcome::Deferred => Severity::Info,
            Outcome::Refused => Severity::Warn,
            Outcome::Failed => Severity::Error,
        };
        match Record::serialize(
            &event.id,
            &event.schema,
            &event.action,
            event.time,
            severity,
            &event,
        ) {
            Ok(record) => self.emit(record),
            Err(error) => {
                error!(%error, action = %event.action, "cannot serialise an audit event")
            }
        }
    }

    /// What each sink has done so far.
    pub fn stats(&self) -> Vec<SinkStats> {
        self.inner.sinks.iter().map(|sink| sink.stats()).collect()
    }

    /// Flushes: every sink sends what it holds without waiting for a fuller batch,
    /// retrying for at most the shutdown timeout; then its task ends. Returns how many
    /// events were left undelivered (logged). Events emitted afterwards still reach
    /// standard output, but no sink.
    pub async fn close(&self) -> u64 {
        self.close_within(self.inner.shutdown_timeout).await
    }

    /// [`Events::close`] with the deadline `within`.
    pub async fn close_within(&self, within: Duration) -> u64 {
        self.inner.closing.cancel();
        let tasks = std::mem::take(
            &mut *self
                .inner
                .tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
        let all = futures_join_all(tasks);
        if tokio::time::timeout(within, all).await.is_err() {
            for abort in aborts {
                abort.abort();
            }
        }
        let mut undelivered = 0;
        for stats in self.stats() {
            undelivered += stats.pending;
            if stats.pending > 0 || stats.dropped > 0 || stats.rejected > 0 {
                warn!(
                    sink = %stats.sink,
                    undelivered = stats.pending,
                    dropped = stats.dropped,
                    rejected = stats.rejected,
                    delivered = stats.delivered,
                    ?within,
                    "event sink closed with events lost"
                );
            } else {
                info!(sink = %stats.sink, delivered = stats.delivered, "event sink flushed and closed");
            }
        }
        undelivered
    }
}

/// Waits for every task (a panicked or aborted one counts as ended).
async fn futures_join_all(tasks: Vec<JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}
