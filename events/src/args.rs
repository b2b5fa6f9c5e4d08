//! The command-line flags of event delivery, shared by the proxy and the operator
//! (`#[command(flatten)]`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use http::Uri;

use crate::backoff::Backoff;
use crate::otlp::LOGS_PATH;
use crate::pipeline::PipelineError;
use crate::sink::{Encoding, SinkSettings};

/// Where security events (sign-in and audit) are delivered besides standard output.
#[derive(Clone, Debug, Args)]
pub struct EventArgs {
    /// Deliver every sign-in and audit event to this URL (http:// or https://): POSTs of
    /// JSON lines (`application/x-ndjson`), batched, retried while the endpoint is down
    /// or answers 5xx/429. Unset: events go to standard output only.
    #[arg(long, env = "SALLYPORT_EVENTS_HTTP_ENDPOINT", value_name = "URL")]
    pub events_http_endpoint: Option<String>,

    /// The most events per POST to --events-http-endpoint.
    #[arg(long, env = "SALLYPORT_EVENTS_HTTP_BATCH_SIZE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub events_http_batch_size: u32,

    /// The longest an event waits for a fuller batch before it is sent to
    /// --events-http-endpoint.
    #[arg(long, env = "SALLYPORT_EVENTS_HTTP_MAX_WAIT", default_value = "1s", value_parser = sallyport_service::parse_duration)]
    pub events_http_max_wait: Duration,

    /// A file holding a bearer token for --events-http-endpoint (`Authorization: Bearer
    /// ...`), read before every POST so that a rotated token is picked up.
    #[arg(long, env = "SALLYPORT_EVENTS_HTTP_TOKEN_FILE", value_name = "FILE")]
    pub events_http_token_file: Option<PathBuf>,

    /// PEM file of CA certificates to trust for --events-http-endpoint, besides the
    /// system's.
    #[arg(long, env = "SALLYPORT_EVENTS_HTTP_CA_FILE", value_name = "FILE")]
    pub events_http_ca_file: Option<PathBuf>,

    /// Deliver every event as an OpenTelemetry log record to this OTLP/HTTP receiver
    /// (JSON encoding; `/v1/logs` is appended unless the URL already ends with it).
    #[arg(long, env = "SALLYPORT_EVENTS_OTLP_ENDPOINT", value_name = "URL")]
    pub events_otlp_endpoint: Option<String>,

    /// The most log records per OTLP export.
    #[arg(long, env = "SALLYPORT_EVENTS_OTLP_BATCH_SIZE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub events_otlp_batch_size: u32,

    /// The longest an event waits for a fuller OTLP export.
    #[arg(long, env = "SALLYPORT_EVENTS_OTLP_MAX_WAIT", default_value = "1s", value_parser = sallyport_service::parse_duration)]
    pub events_otlp_max_wait: Duration,

    /// A file holding a bearer token for --events-otlp-endpoint, read before every
    /// export.
    #[arg(long, env = "SALLYPORT_EVENTS_OTLP_TOKEN_FILE", value_name = "FILE")]
    pub events_otlp_token_file: Option<PathBuf>,

    /// PEM file of CA certificates to trust for --events-otlp-endpoint, besides the
    /// system's.
    #[arg(long, env = "SALLYPORT_EVENTS_OTLP_CA_FILE", value_name = "FILE")]
    pub events_otlp_ca_file: Option<PathBuf>,

    /// The most events each sink (HTTP, OTLP) holds while its endpoint is slow or down;
    /// beyond it new events are dropped for that sink (counted and logged), never
    /// slowing requests down. Standard output always gets every event.
    #[arg(long, env = "SALLYPORT_EVENTS_QUEUE_CAPACITY", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub events_queue_capacity: u32,

    /// The longest wait between two attempts to deliver a batch (waits start at 250 ms
    /// and double, with jitter).
    #[arg(long, env = "SALLYPORT_EVENTS_MAX_BACKOFF", default_value = "30s", value_parser = sallyport_service::parse_duration)]
    pub events_max_backoff: Duration,

    /// At shutdown (SIGTERM), how long the sinks may take to deliver what they hold;
    /// events still queued then are lost (and counted in the log).
    #[arg(long, env = "SALLYPORT_EVENTS_SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = sallyport_service::parse_duration)]
    pub events_shutdown_timeout: Duration,
}

/// `text` as an absolute http(s) URL, for `flag`.
fn endpoint(flag: &str, text: &str) -> Result<Uri, PipelineError> {
    let invalid = |reason: &str| PipelineError::Endpoint {
        flag: flag.to_owned(),
        value: text.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: Uri = text.trim().parse().map_err(|_| invalid("not a URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(invalid("expected an http:// or https:// URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("the URL has no host"));
    }
    Ok(uri)
}

/// `uri` with [`LOGS_PATH`] appended, unless its path ends with it.
fn otlp_logs(flag: &str, uri: Uri) -> Result<Uri, PipelineError> {
    let path = uri.path().trim_end_matches('/');
    if path.ends_with(LOGS_PATH) {
        return Ok(uri);
    }
    let mut parts = uri.clone().into_parts();
    let path_and_query = format!(
        "{path}{LOGS_PATH}{}",
        uri.query().map(|q| format!("?{q}")).unwrap_or_default()
    );
    parts.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|_| PipelineError::Endpoint {
                flag: flag.to_owned(),
                value: uri.to_string(),
                reason: "cannot append /v1/logs".to_owned(),
            })?,
    );
    Uri::from_parts(parts).map_err(|e| PipelineError::Endpoint {
        flag: flag.to_owned(),
        value: uri.to_string(),
        reason: e.to_string(),
    })
}

impl EventArgs {
    /// The sinks these flags ask for.
    pub fn sinks(&self) -> Result<Vec<SinkSettings>, PipelineError> {
        let backoff = Backoff {
            max: self.events_max_backoff,
            ..Backoff::default()
        };
        let mut sinks = Vec::new();
        if let Some(url) = &self.events_http_endpoint {
            let mut sink = SinkSettings::new(
                "http",
                endpoint("events-http-endpoint", url)?,
                Encoding::JsonLines,
            );
            sink.batch_size = self.events_http_batch_size as usize;
            sink.max_wait = self.events_http_max_wait;
            sink.token_file = self.events_http_token_file.clone();
            sink.ca_file = self.events_http_ca_file.clone();
            sink.queue_capacity = self.events_queue_capacity as usize;
            sink.backoff = backoff;
            sinks.push(sink);
        }
        if let Some(url) = &self.events_otlp_endpoint {
            let flag = "events-otlp-endpoint";
            let mut sink = SinkSettings::new(
                "otlp",
                otlp_logs(flag, endpoint(flag, url)?)?,
                Encoding::OtlpJson,
            );
            sink.batch_size = self.events_otlp_batch_size as usize;
            sink.max_wait = self.events_otlp_max_wait;
            sink.token_file = self.events_otlp_token_file.clone();
            sink.ca_file = self.events_otlp_ca_file.clone();
            sink.queue_capacity = self.events_queue_capacity as usize;
            sink.backoff = backoff;
            sinks.push(sink);
        }
        Ok(sinks)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        events: EventArgs,
    }

    fn parse(args: &[&str]) -> Result<Vec<SinkSettings>, String> {
        let command =
            Command::try_parse_from([&["run"][..], args].concat()).map_err(|e| e.to_string())?;
        command.events.sinks().map_err(|e| e.to_string())
    }

    #[test]
    fn without_endpoints_there_is_no_sink() {
        assert!(parse(&[]).unwrap_or_else(|e| panic!("{e}")).is_empty());
    }

    #[test]
    fn endpoints_become_sinks() {
        let sinks = parse(&[
            "--events-http-endpoint",
            "https://siem.example:8088/ingest?source=sallyport",
            "--events-http-batch-size",
            "500",
            "--events-http-max-wait",
            "250ms",
            "--events-queue-capacity",
            "20",
            "--events-otlp-endpoint",
            "http://collector:4318",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let [http, otlp] = sinks.as_slice() else {
            panic!("two sinks: {sinks:?}");
        };
        assert_eq!(
            http.endpoint.to_string(),
            "https://siem.example:8088/ingest?source=sallyport"
        );
        assert_eq!(http.batch_size, 500);
        assert_eq!(http.max_wait, Duration::from_millis(250));
        assert_eq!(http.queue_capacity, 20);
        assert_eq!(http.encoding, Encoding::JsonLines);
        assert_eq!(otlp.endpoint.to_string(), "http://collector:4318/v1/logs");
        assert_eq!(otlp.encoding, Encoding::OtlpJson);
        let kept = parse(&["--events-otlp-endpoint", "http://collector:4318/v1/logs"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            kept.first().map(|s| s.endpoint.to_string()).as_deref(),
            Some("http://collector:4318/v1/logs")
        );
    }

    #[test]
    fn bad_endpoints_are_refused_naming_the_flag() {
        for url in ["siem.example/ingest", "ftp://siem.example/", "http://"] {
            let error = parse(&["--events-http-endpoint", url])
                .err()
                .unwrap_or_default();
            assert!(error.contains("--events-http-endpoint"), "{url}: {error}");
        }
        assert!(parse(&["--events-http-batch-size", "0"]).is_err());
    }
}
