use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use super::Error;

/// The files of a throwaway PKI for one control plane, all PEM.
#[derive(Clone, Debug)]
pub struct Pki {
    /// The CA certificate: trusted for the apiserver's serving certificate and for client
    /// certificates.
    pub ca_cert: PathBuf,
    /// The CA key (kube-controller-manager signs CertificateSigningRequests with it).
    pub ca_key: PathBuf,
    /// kube-apiserver's serving certificate, for 127.0.0.1, localhost and ::1.
    pub serving_cert: PathBuf,
    /// The key of [`Pki::serving_cert`].
    pub serving_key: PathBuf,
    /// The admin client certificate: CN=sallyport-admin, O=system:masters.
    pub admin_cert: PathBuf,
    /// The key of [`Pki::admin_cert`].
    pub admin_key: PathBuf,
    /// The private key signing ServiceAccount tokens.
    pub service_account_key: PathBuf,
    /// The public key verifying ServiceAccount tokens.
    pub service_account_pub: PathBuf,
}

impl Pki {
    /// Generates a CA, the certificates it signs and a ServiceAccount signing key, and
    /// writes them into `dir` (keys readable by the owner only).
    pub fn generate(dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let pki = Pki {
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            serving_cert: dir.join("apiserver.crt"),
            serving_key: dir.join("apiserver.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            service_account_key: dir.join("service-account.key"),
            service_account_pub: dir.join("service-account.pub"),
        };

        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, "sallyport-local-ca");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca =
            CertifiedIssuer::self_signed(ca, key_pair("CA key")?).map_err(|source| Error::Pki {
                what: "CA certificate",
                source,
            })?;
        write(&pki.ca_cert, &ca.pem(), false)?;
        write(&pki.ca_key, &ca.key().serialize_pem(), true)?;

        let mut serving = CertificateParams::new([
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
            "localhost".to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default".to_owned(),
            "kubernetes.default.svc".to_owned(),
        ])
        .map_err(|source| Error::Pki {
            what: "serving certificate",
            source,
        })?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = key_pair("serving key")?;
        let cert = serving.signed_by(&key, &ca).map_err(|source| Error::Pki {
            what: "serving certificate",
            source,
        })?;
        write(&pki.serving_cert, &cert.pem(), false)?;
        write(&pki.serving_key, &key.serialize_pem(), true)?;

        let mut admin = CertificateParams::default();
        admin.distinguished_name = rcgen::DistinguishedName::new();
        admin
            .distinguished_name
            .push(DnType::CommonName, "sallyport-admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = key_pair("admin key")?;
        let cert = admin.signed_by(&key, &ca).map_err(|source| Error::Pki {
            what: "admin certificate",
            source,
        })?;
        write(&pki.admin_cert, &cert.pem(), false)?;
        write(&pki.admin_key, &key.serialize_pem(), true)?;

        let key = key_pair("ServiceAccount signing key")?;
        write(&pki.service_account_key, &key.serialize_pem(), true)?;
        write(&pki.service_account_pub, &key.public_key_pem(), false)?;

        Ok(pki)
    }
}

/// A new ECDSA P-256 key pair.
fn key_pair(what: &'static str) -> Result<KeyPair, Error> {
    KeyPair::generate().map_err(|source| Error::Pki { what, source })
}

fn write(path: &Path, pem: &str, secret: bool) -> Result<(), Error> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .and_then(|mut file| file.write_all(pem.as_bytes()))
        .map_err(Error::io(path))
}
