//! What the Prometheus metrics of every binary share: registering a collector under its
//! name, and encoding a registry so that every metric is named from the first scrape.

use prometheus::core::Collector;
use prometheus::proto::MetricType;
use prometheus::{Encoder, Registry, TextEncoder};

/// The metrics could not be set up or encoded.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A metric could not be created or registered (a bad name or a duplicate).
    #[error("cannot register metric {metric}: {source}")]
    Register {
        /// The metric's name.
        metric: &'static str,
        /// The Prometheus client's error.
        source: prometheus::Error,
    },
    /// Encoding the metrics as Prometheus text failed.
    #[error("cannot encode the metrics as Prometheus text: {0}")]
    Encode(#[source] prometheus::Error),
}

/// Makes the collector `metric` with `make` (which receives the name) and registers it
/// in `registry`; returns it for recording.
pub fn register<M>(
    registry: &Registry,
    metric: &'static str,
    make: impl FnOnce(&'static str) -> Result<M, prometheus::Error>,
) -> Result<M, MetricsError>
where
    M: Collector + Clone + 'static,
{
    let error = |source| MetricsError::Register { metric, source };
    let collector = make(metric).map_err(error)?;
    registry
        .register(Box::new(collector.clone()))
        .map_err(error)?;
    Ok(collector)
}

/// Every metric of `registry` in the Prometheus text exposition format, followed by
/// `# HELP` and `# TYPE` of each family of `declared` that has no sample yet (the
/// Prometheus client leaves those out), so that a scrape names every metric from the
/// start, before its first request, sign-in or limit.
pub fn encode(registry: &Registry, declared: &[&dyn Collector]) -> Result<String, MetricsError> {
    let mut buffer = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut buffer)
        .map_err(MetricsError::Encode)?;
    let mut text = String::from_utf8_lossy(&buffer).into_owned();
    for family in declared.iter().flat_map(|collector| collector.collect()) {
        if !family.get_metric().is_empty() {
            continue;
        }
        let kind = match family.get_field_type() {
            MetricType::COUNTER => "counter",
            MetricType::GAUGE => "gauge",
            MetricType::HISTOGRAM => "histogram",
            MetricType::SUMMARY => "summary",
            MetricType::UNTYPED => "untyped",
        };
        let help = family.help().replace('\\', "\\\\").replace('\n', "\\n");
        let name = family.name();
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    }
    Ok(text)
}

/// `2xx`, `4xx`, ...: the class of `status`, a low-cardinality label.
pub fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The `notAfter` of the first certificate of the PEM text `pem`, in Unix seconds, for
/// certificate expiry gauges; `None` when `pem` holds no readable certificate.
pub fn not_after_of_pem(pem: &[u8]) -> Option<i64> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let certificate = block.parse_x509().ok()?;
    Some(certificate.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use http::StatusCode;
    use prometheus::{IntCounter, IntCounterVec, Opts};

    use super::*;

    #[test]
    fn metrics_without_samples_are_still_named() -> Result<(), MetricsError> {
        let registry = Registry::new();
        let counted = register(&registry, "test_counted_total", |name| {
            IntCounter::new(name, "Counted.")
        })?;
        let empty = register(&registry, "test_empty_total", |name| {
            IntCounterVec::new(Opts::new(name, "Empty until labelled."), &["kind"])
        })?;
        counted.inc();
        let text = encode(&registry, &[&counted, &empty])?;
        assert!(text.contains("test_counted_total 1"), "{text}");
        assert!(
            text.contains(
                "# HELP test_empty_total Empty until labelled.\n# TYPE test_empty_total counter\n"
            ),
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE test_counted_total").count(),
            1,
            "{text}"
        );
        Ok(())
    }

    #[test]
    fn a_metric_registered_twice_is_an_error_naming_it() {
        let registry = Registry::new();
        let make = |name| IntCounter::new(name, "Twice.");
        assert!(register(&registry, "test_twice_total", make).is_ok());
        match register(&registry, "test_twice_total", make) {
            Err(MetricsError::Register { metric, .. }) => assert_eq!(metric, "test_twice_total"),
            other => panic!("expected a registration error, got {other:?}"),
        }
    }

    #[test]
    fn status_classes() {
        assert_eq!(status_class(StatusCode::SWITCHING_PROTOCOLS), "1xx");
        assert_eq!(status_class(StatusCode::NO_CONTENT), "2xx");
        assert_eq!(status_class(StatusCode::FOUND), "3xx");
        assert_eq!(status_class(StatusCode::TOO_MANY_REQUESTS), "4xx");
        assert_eq!(status_class(StatusCode::BAD_GATEWAY), "5xx");
    }

    #[test]
    fn certificate_not_after_is_read_from_pem() {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut params = rcgen::CertificateParams::new(vec!["tunnel.example".to_owned()])
            .unwrap_or_else(|e| panic!("{e}"));
        params.not_after = rcgen::date_time_ymd(2031, 1, 2);
        let pem = params
            .self_signed(&key)
            .unwrap_or_else(|e| panic!("{e}"))
            .pem();
        assert_eq!(not_after_of_pem(pem.as_bytes()), Some(1_925_078_400));
        assert_eq!(not_after_of_pem(b"not a certificate"), None);
    }
}
