//! The objects the operator part applies: one ConnectorGroup with one connected Connector,
//! a wildcard certificate for every app host, and N PublishedApps.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

use crate::error::BenchError;

/// The domain every app host is a label of; the wildcard certificate covers it.
pub const APPS_DOMAIN: &str = "apps.bench.example.com";
/// The ConnectorGroup of every app.
pub const GROUP: &str = "bench";
/// The Connector of the group, reported connected.
pub const CONNECTOR: &str = "bench-connector-1";
/// The kubernetes.io/tls Secret every app names.
pub const TLS_SECRET: &str = "bench-wildcard-tls";
/// The label every app carries.
pub const APP_LABEL: (&str, &str) = ("sallyport.dev/bench", "s8");

/// The name of app number `i`.
pub fn app_name(i: usize) -> String {
    format!("app-{i:05}")
}

/// PublishedApp number `i`: its own host under [`APPS_DOMAIN`], the group [`GROUP`], the
/// TLS Secret [`TLS_SECRET`], and the fleet's default OpenID Connect provider.
pub fn app(i: usize) -> Value {
    let name = app_name(i);
    json!({
        "apiVersion": "sallyport.dev/v1alpha1",
        "kind": "PublishedApp",
        "metadata": {"name": name, "labels": {APP_LABEL.0: APP_LABEL.1}},
        "spec": {
            "externalUrl": format!("https://{name}.{APPS_DOMAIN}/"),
            "internalUrl": format!("http://{name}.corp.internal:8080/"),
            "connectorGroup": {"name": GROUP},
            "tls": {"secretName": TLS_SECRET},
        },
    })
}

/// The ConnectorGroup [`GROUP`], with default settings.
pub fn group() -> Value {
    json!({
        "apiVersion": "sallyport.dev/v1alpha1",
        "kind": "ConnectorGroup",
        "metadata": {"name": GROUP},
        "spec": {},
    })
}

/// The Connector [`CONNECTOR`] of [`GROUP`].
pub fn connector() -> Value {
    json!({
        "apiVersion": "sallyport.dev/v1alpha1",
        "kind": "Connector",
        "metadata": {"name": CONNECTOR},
        "spec": {"connectorGroup": GROUP},
    })
}

/// A status patch saying that a proxy replica holds tunnels of the connector, renewed
/// now, as the replica would report it; the operator then sets `Connected` (run it with
/// a `--tunnel-stale-after` longer than the benchmark, as nothing renews the entry).
pub fn connector_connected() -> Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    json!({"status": {"tunnels": [{
        "proxy": "sallyport-bench",
        "since": now,
        "renewedAt": now,
    }]}})
}

/// The kubernetes.io/tls Secret [`TLS_SECRET`]: a self-signed certificate for
/// `*.`[`APPS_DOMAIN`], which covers every app host.
pub fn wildcard_tls_secret() -> Result<Secret, BenchError> {
    let failed = |error: rcgen::Error| BenchError::Fixture {
        what: "the wildcard certificate".into(),
        message: error.to_string(),
    };
    let key = rcgen::KeyPair::generate().map_err(failed)?;
    let certificate = rcgen::CertificateParams::new(vec![format!("*.{APPS_DOMAIN}")])
        .and_then(|params| params.self_signed(&key))
        .map_err(failed)?;
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(TLS_SECRET.to_owned()),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            (
                "tls.crt".to_owned(),
                ByteString(certificate.pem().into_bytes()),
            ),
            (
                "tls.key".to_owned(),
                ByteString(key.serialize_pem().into_bytes()),
            ),
        ])),
        ..Secret::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apps_deserialize_as_published_apps() -> Result<(), serde_json::Error> {
        let app: sallyport_api::PublishedApp = serde_json::from_value(app(7))?;
        assert_eq!(app.metadata.name.as_deref(), Some("app-00007"));
        assert_eq!(
            app.spec.external_url,
            "https://app-00007.apps.bench.example.com/"
        );
        assert_eq!(app.spec.connector_group.name, GROUP);
        Ok(())
    }

    #[test]
    fn the_certificate_is_a_wildcard_for_the_app_domain() -> Result<(), BenchError> {
        let secret = wildcard_tls_secret()?;
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        let data = secret.data.unwrap_or_default();
        assert!(data.get("tls.crt").is_some_and(|crt| !crt.0.is_empty()));
        assert!(data.get("tls.key").is_some_and(|key| !key.0.is_empty()));
        Ok(())
    }
}
