//! TLS material of the peers: a CA of their own and a server certificate it signs
//! (ECDSA P-256, as Sallyport's app certificate; rcgen's default), written as PEM files;
//! and, for rathole (native-tls reads a PKCS#12 identity), the same key and chain as a
//! PKCS#12 bundle made by the `openssl` command (Debian's `openssl`; OpenSSL 3's default
//! AES-256 encryption, which the OpenSSL rathole links reads).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use super::write_file;
use crate::dataplane::DataplaneError;

/// The password of the PKCS#12 bundle (rathole's `pkcs12_password`).
pub const PKCS12_PASSWORD: &str = "sallyport-bench";

/// Where [`write_server_tls`] put the material.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The CA certificate, PEM (what clients trust).
    pub ca_pem: String,
    /// The CA certificate file.
    pub ca_file: PathBuf,
    /// The server certificate followed by the CA's, PEM.
    pub chain_file: PathBuf,
    /// The server's private key, PEM (PKCS#8).
    pub key_file: PathBuf,
}

/// Generates a CA and a server certificate for `host` signed by it, and writes `ca.crt`,
/// `tls.crt` (the chain) and `tls.key` into `dir`.
pub fn write_server_tls(dir: &Path, host: &str) -> Result<ServerTls, DataplaneError> {
    let failed = |what: &'static str| {
        move |error: rcgen::Error| DataplaneError::Pki {
            what,
            message: error.to_string(),
        }
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(failed("peer CA"))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sallyport-bench peers CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().map_err(failed("peer CA key"))?;
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(failed("peer CA"))?;

    let mut params =
        CertificateParams::new(vec![host.to_owned()]).map_err(failed("peer certificate"))?;
    params.distinguished_name.push(DnType::CommonName, host);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().map_err(failed("peer certificate key"))?;
    let certificate = params
        .signed_by(&key, &*ca)
        .map_err(failed("peer certificate"))?;

    let ca_pem = ca.pem();
    let tls = ServerTls {
        ca_file: dir.join("ca.crt"),
        chain_file: dir.join("tls.crt"),
        key_file: dir.join("tls.key"),
        ca_pem: ca_pem.clone(),
    };
    write_file(&tls.ca_file, ca_pem.as_bytes())?;
    write_file(
        &tls.chain_file,
        format!("{}{}", certificate.pem(), ca_pem).as_bytes(),
    )?;
    write_file(&tls.key_file, key.serialize_pem().as_bytes())?;
    Ok(tls)
}

/// Writes `tls`'s key and chain as a PKCS#12 bundle `path` with [`PKCS12_PASSWORD`], by
/// `openssl pkcs12 -export` (bounded by 30 s).
pub async fn write_pkcs12(tls: &ServerTls, path: &Path) -> Result<(), DataplaneError> {
    let program = Path::new("openssl");
    let run = tokio::process::Command::new(program)
        .args(["pkcs12", "-export", "-in"])
        .arg(&tls.chain_file)
        .arg("-inkey")
        .arg(&tls.key_file)
        .arg("-out")
        .arg(path)
        .arg("-passout")
        .arg(format!("pass:{PKCS12_PASSWORD}"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .map_err(|_| DataplaneError::Timeout {
            what: "openssl pkcs12 -export".to_owned(),
            waited: Duration::from_secs(30),
            last: None,
        })?
        .map_err(|source| DataplaneError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    if !output.status.success() {
        return Err(DataplaneError::Pki {
            what: "PKCS#12 bundle (openssl pkcs12 -export)",
            message: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(())
}
