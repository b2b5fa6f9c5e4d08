//! The TLS material of a standalone fleet, written out as the proxy and the connector
//! read it: the fleet's PKI as the operator builds it (`sallyport_operator::pki::build`:
//! a root CA, the connector issuer with `tls.crt`/`tls.key`/`ca.crt`, the tunnel serving
//! certificate with `ca.crt`), laid out like the mounted Secrets, and a self-signed
//! certificate for the benchmark's app (ECDSA P-256, as rcgen makes by default) laid out
//! as `--tls-dir <namespace>/<name>/tls.{crt,key}`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use sallyport_operator::pki::build::{self, Root};

use super::error::DataplaneError;

/// Where [`write_fleet_pki`] put the fleet's material.
#[derive(Clone, Debug)]
pub struct FleetPki {
    /// `tls.crt`, `tls.key`, `ca.crt` of the tunnel serving certificate
    /// (`--tunnel-tls-dir` of the proxy).
    pub tunnel_tls_dir: PathBuf,
    /// `tls.crt`, `tls.key`, `ca.crt` of the connector issuer (`--connector-issuer-dir`).
    pub connector_issuer_dir: PathBuf,
    /// The fleet's root CA certificate, PEM (`--fleet-ca-file` of the connector).
    pub root_ca_file: PathBuf,
}

/// Generates the fleet's PKI for the tunnel host name `tunnel_hostname` and writes it
/// under `dir`.
pub fn write_fleet_pki(dir: &Path, tunnel_hostname: &str) -> Result<FleetPki, DataplaneError> {
    let failed = |what: &'static str| {
        move |error: build::PkiError| DataplaneError::Pki {
            what,
            message: error.to_string(),
        }
    };
    let now = Timestamp::now();
    let namespace = "sallyport-system";
    let root_secret = build::root_ca(namespace, now).map_err(failed("root CA"))?;
    let root = Root::from_secret(&root_secret).map_err(failed("root CA"))?;
    let issuer =
        build::connector_issuer(namespace, &root, now).map_err(failed("connector issuer"))?;
    let tunnel = build::tunnel_serving(namespace, &root, &[tunnel_hostname.to_owned()], now)
        .map_err(failed("tunnel serving certificate"))?;

    let pki = FleetPki {
        tunnel_tls_dir: dir.join("tunnel-tls"),
        connector_issuer_dir: dir.join("connector-issuer"),
        root_ca_file: dir.join("fleet-ca.crt"),
    };
    write_secret(&tunnel, &pki.tunnel_tls_dir)?;
    write_secret(&issuer, &pki.connector_issuer_dir)?;
    write_file(&pki.root_ca_file, &root.certificate_pem)?;
    Ok(pki)
}

/// A self-signed certificate for `host`, written as `<tls_dir>/<namespace>/<name>/tls.crt`
/// and `tls.key`; returns the certificate, PEM (the CA a user trusts).
pub fn write_app_certificate(
    tls_dir: &Path,
    namespace: &str,
    name: &str,
    host: &str,
) -> Result<Vec<u8>, DataplaneError> {
    let failed = |error: rcgen::Error| DataplaneError::Pki {
        what: "app certificate",
        message: error.to_string(),
    };
    let key = rcgen::KeyPair::generate().map_err(failed)?;
    let certificate = rcgen::CertificateParams::new(vec![host.to_owned()])
        .map_err(failed)?
        .self_signed(&key)
        .map_err(failed)?;
    let dir = tls_dir.join(namespace).join(name);
    let pem = certificate.pem().into_bytes();
    write_file(&dir.join("tls.crt"), &pem)?;
    write_file(&dir.join("tls.key"), key.serialize_pem().as_bytes())?;
    Ok(pem)
}

/// Writes every key of `secret` as a file in `dir`, as a pod sees it mounted.
fn write_secret(secret: &Secret, dir: &Path) -> Result<(), DataplaneError> {
    let data: BTreeMap<_, _> = secret.data.clone().unwrap_or_default();
    for (key, value) in data {
        write_file(&dir.join(key), &value.0)?;
    }
    Ok(())
}

fn write_file(path: &Path, content: &[u8]) -> Result<(), DataplaneError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(DataplaneError::io(format!("creating {}", parent.display())))?;
    }
    std::fs::write(path, content).map_err(DataplaneError::io(format!("writing {}", path.display())))
}
