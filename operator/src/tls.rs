//! Checks that a `kubernetes.io/tls` Secret can serve an app's external host.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::parse_x509_pem;

use crate::external_url::ExternalUrl;

/// Why a TLS Secret cannot serve a host; the text is written into a condition message.
pub fn check_tls_secret(secret: &Secret, url: &ExternalUrl, now: Timestamp) -> Result<(), String> {
    if secret.type_.as_deref() != Some("kubernetes.io/tls") {
        return Err(format!(
            "has type {:?}, expected kubernetes.io/tls",
            secret.type_.as_deref().unwrap_or("")
        ));
    }
    let data = secret.data.as_ref();
    let field = |key: &str| {
        data.and_then(|d| d.get(key))
            .map(|bytes| bytes.0.as_slice())
    };
    let certificate = field("tls.crt")
        .filter(|b| !b.is_empty())
        .ok_or("has no tls.crt")?;
    field("tls.key")
        .filter(|b| !b.is_empty())
        .ok_or("has no tls.key")?;

    let (_, pem) = parse_x509_pem(certificate).map_err(|e| format!("tls.crt is not PEM: {e}"))?;
    let leaf = pem
        .parse_x509()
        .map_err(|e| format!("tls.crt is not an X.509 certificate: {e}"))?;
    let not_after = leaf.validity().not_after.timestamp();
    if not_after <= now.as_second() {
        return Err(format!(
            "its certificate expired at {}",
            leaf.validity().not_after
        ));
    }
    let mut names = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push((*dns).to_owned());
            }
        }
    }
    if !url.is_covered_by(&names) {
        return Err(format!(
            "its certificate is valid for {names:?}, not for {}",
            url.host
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;
    use rcgen::{CertificateParams, KeyPair};

    use super::*;

    fn tls_secret(names: &[&str], days_valid: i64) -> Secret {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap_or_else(|e| panic!("{e}"));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(2);
        params.not_after = now + time::Duration::days(days_valid);
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
        Secret {
            type_: Some("kubernetes.io/tls".into()),
            data: Some(BTreeMap::from([
                ("tls.crt".to_owned(), ByteString(cert.pem().into_bytes())),
                (
                    "tls.key".to_owned(),
                    ByteString(key.serialize_pem().into_bytes()),
                ),
            ])),
            ..Secret::default()
        }
    }

    fn url(text: &str) -> ExternalUrl {
        ExternalUrl::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn accepts_a_current_certificate_for_the_host() {
        let secret = tls_secret(&["*.apps.example.com"], 30);
        assert_eq!(
            check_tls_secret(
                &secret,
                &url("https://wiki.apps.example.com/"),
                Timestamp::now()
            ),
            Ok(())
        );
    }

    #[test]
    fn refuses_another_host_an_expired_certificate_and_a_wrong_type() {
        let secret = tls_secret(&["other.example.com"], 30);
        let error = check_tls_secret(
            &secret,
            &url("https://wiki.apps.example.com/"),
            Timestamp::now(),
        );
        assert!(error.is_err_and(|e| e.contains("not for wiki.apps.example.com")));

        let expired = tls_secret(&["wiki.apps.example.com"], -1);
        let error = check_tls_secret(
            &expired,
            &url("https://wiki.apps.example.com/"),
            Timestamp::now(),
        );
        assert!(error.is_err_and(|e| e.contains("expired")));

        let mut opaque = tls_secret(&["wiki.apps.example.com"], 30);
        opaque.type_ = Some("Opaque".into());
        let error = check_tls_secret(
            &opaque,
            &url("https://wiki.apps.example.com/"),
            Timestamp::now(),
        );
        assert!(error.is_err_and(|e| e.contains("expected kubernetes.io/tls")));
    }

    #[test]
    fn refuses_garbage() {
        let mut secret = tls_secret(&["wiki.apps.example.com"], 30);
        if let Some(data) = secret.data.as_mut() {
            data.insert("tls.crt".into(), ByteString(b"not a certificate".to_vec()));
        }
        let error = check_tls_secret(
            &secret,
            &url("https://wiki.apps.example.com/"),
            Timestamp::now(),
        );
        assert!(error.is_err_and(|e| e.contains("not PEM")));
    }
}
