//! A real nginx serving https with a certificate from a private CA, behind the tunnel:
//! an app whose `backend.tls.caSecretRef` names that CA reaches it (200); an app without
//! it does not (502: the certificate is not trusted); the CA Secret switched to another
//! CA and back takes effect in the running connector, without restarting anything; and
//! `serverName` verifies the certificate's name when the internal URL's host differs.
//! Secrets that do not resolve are reported in the app's ResolvedRefs condition, naming
//! the Secret and key, and a private key put in a CA Secret never reaches the fleet
//! configuration.
//!
//! nginx must be installed (Debian: `apt-get install -y nginx-light`; CI installs it with
//! `hack/install-test-packages.sh`). Without it the test fails and says how to install
//! it: it never skips.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
use sallyport_api::PublishedApp;
use sallyport_api::fleet_config::{FleetConfig, STORAGE_KEY};
use sallyport_e2e::dataplane::{
    Fleet, REACTION_TIMEOUT, StepError, eventually, find_nginx, free_port, https_get,
};
use sallyport_e2e::process::OwnedProcess;
use serde_json::{Value, json};

type TestResult = Result<(), StepError>;

/// The name in the backend's certificate (its only name: no IP address).
const BACKEND_NAME: &str = "localhost";
const PAGE: &[u8] = b"<!doctype html><title>tls</title><p>served over TLS by nginx</p>\n";

/// A private CA and a server certificate for [`BACKEND_NAME`] it signed.
struct Pki {
    ca_pem: String,
    server_pem: String,
    server_key_pem: String,
}

fn private_ca() -> Result<Pki, rcgen::Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "backend test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate()?;
    let server =
        CertificateParams::new(vec![BACKEND_NAME.to_owned()])?.signed_by(&server_key, &issuer)?;
    Ok(Pki {
        ca_pem: ca.pem(),
        server_pem: server.pem(),
        server_key_pem: server_key.serialize_pem(),
    })
}

/// nginx serving [`PAGE`] over https only, with `pki`'s server certificate.
struct TlsNginx {
    address: SocketAddr,
    process: OwnedProcess,
    _dir: tempfile::TempDir,
}

impl TlsNginx {
    async fn start(pki: &Pki) -> Result<Self, StepError> {
        let nginx = find_nginx()?;
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("www");
        std::fs::create_dir_all(&root)?;
        std::fs::write(root.join("index.html"), PAGE)?;
        let certificate = dir.path().join("server.crt");
        let key = dir.path().join("server.key");
        std::fs::write(&certificate, &pki.server_pem)?;
        std::fs::write(&key, &pki.server_key_pem)?;
        let temp_paths = sallyport_e2e::dataplane::nginx_temp_paths(&nginx, dir.path())?;
        let address = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let config = format!(
            "daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
    access_log {dir}/access.log;
    {temp_paths}
    types {{ text/html html; }}
    server {{
        listen {address} ssl;
        ssl_certificate {certificate};
        ssl_certificate_key {key};
        root {root};
        location / {{ }}
    }}
}}
",
            dir = dir.path().display(),
            certificate = certificate.display(),
            key = key.display(),
            root = root.display(),
        );
        let process =
            sallyport_e2e::dataplane::run_nginx(&nginx, dir.path(), &config, address).await?;
        Ok(Self {
            address,
            process,
            _dir: dir,
        })
    }
}

/// An Opaque Secret `name` holding `data` (key, text).
fn secret(name: &str, data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..Secret::default()
    }
}

/// Publishes a passthrough app `name` at `https://{name}.backend-ca.test/` served from
/// `internal_url` with `backend_tls` (JSON, or null); returns the host and the
/// certificate a user trusts for it.
async fn publish(
    fleet: &Fleet,
    name: &str,
    internal_url: &str,
    backend_tls: Value,
) -> Result<(String, Vec<u8>), StepError> {
    let host = format!("{name}.backend-ca.test");
    let tls = sallyport_e2e::manifests::self_signed_tls_secret(&format!("{name}-tls"), &host)?;
    let app_ca = tls
        .data
        .as_ref()
        .and_then(|d| d.get("tls.crt"))
        .map(|v| v.0.clone())
        .ok_or("the TLS Secret has no tls.crt")?;
    Api::<Secret>::namespaced(fleet.bed.client.clone(), &fleet.bed.namespace)
        .create(&PostParams::default(), &tls)
        .await?;
    let mut backend = json!({"timeout": "10s"});
    if !backend_tls.is_null() {
        backend["tls"] = backend_tls;
    }
    sallyport_e2e::manifests::create(
        fleet.bed.client.clone(),
        &fleet.bed.namespace,
        &json!({
            "apiVersion": "sallyport.dev/v1alpha1", "kind": "PublishedApp",
            "metadata": {"name": name},
            "spec": {
                "externalUrl": format!("https://{host}/"),
                "internalUrl": internal_url,
                "preAuthentication": {"type": "Passthrough"},
                "connectorGroup": {"name": "dc"},
                "tls": {"secretName": format!("{name}-tls")},
                "backend": backend,
            }
        }),
    )
    .await?;
    Ok((host, app_ca))
}

/// The ResolvedRefs condition of app `name`: (status, reason, message).
async fn resolved_refs(
    fleet: &Fleet,
    name: &str,
) -> Result<Option<(String, String, String)>, StepError> {
    let app = Api::<PublishedApp>::namespaced(fleet.bed.client.clone(), &fleet.bed.namespace)
        .get(name)
        .await?;
    Ok(app.status.and_then(|status| {
        status
            .conditions
            .into_iter()
            .find(|c| c.type_ == "ResolvedRefs")
            .map(|c| (c.status, c.reason, c.message))
    }))
}

/// The fleet configuration the proxies read, as JSON text.
async fn fleet_config_json(fleet: &Fleet) -> Result<String, StepError> {
    let config_map =
        Api::<ConfigMap>::namespaced(fleet.bed.client.clone(), &fleet.bed.operator_namespace)
            .get("sallyport-fleet-config")
            .await?;
    let bytes = config_map
        .binary_data
        .and_then(|mut data| data.remove(STORAGE_KEY))
        .ok_or("the fleet ConfigMap holds no configuration")?;
    Ok(serde_json::to_string(&FleetConfig::from_gzip_json(
        &bytes.0,
    )?)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_backend_ca_from_a_secret_reaches_the_connector() -> TestResult {
    let pki = private_ca()?;
    let other = private_ca()?;
    let nginx = TlsNginx::start(&pki).await?;
    let fleet = Fleet::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "backend-ca",
        &["proxy-a"],
    )
    .await?;
    let secrets = Api::<Secret>::namespaced(fleet.bed.client.clone(), &fleet.bed.namespace);
    secrets
        .create(
            &PostParams::default(),
            &secret("backend-ca", &[("ca.crt", &pki.ca_pem)]),
        )
        .await?;
    let stray_key = KeyPair::generate()?.serialize_pem();
    secrets
        .create(
            &PostParams::default(),
            &secret("not-a-ca", &[("ca.crt", &stray_key)]),
        )
        .await?;
    let group = fleet.create_group("dc", json!({})).await?;

    let port = nginx.address.port();
    let by_name = format!("https://{BACKEND_NAME}:{port}/");
    let by_ip = format!("https://127.0.0.1:{port}/");
    let ca_ref = |name: &str, key: &str| json!({"caSecretRef": {"name": name, "key": key}});
    let (trusted, trusted_ca) =
        publish(&fleet, "trusted", &by_name, ca_ref("backend-ca", "ca.crt")).await?;
    let (plain, plain_ca) = publish(&fleet, "plain", &by_name, Value::Null).await?;
    let mut renamed_tls = ca_ref("backend-ca", "ca.crt");
    renamed_tls["serverName"] = json!(BACKEND_NAME);
    let (renamed, renamed_ca) = publish(&fleet, "renamed", &by_ip, renamed_tls).await?;
    let (unnamed, unnamed_ca) =
        publish(&fleet, "unnamed", &by_ip, ca_ref("backend-ca", "ca.crt")).await?;
    publish(
        &fleet,
        "no-key",
        &by_name,
        ca_ref("backend-ca", "missing.crt"),
    )
    .await?;
    publish(&fleet, "no-secret", &by_name, ca_ref("nowhere", "ca.crt")).await?;
    publish(&fleet, "with-key", &by_name, ca_ref("not-a-ca", "ca.crt")).await?;

    let state = tempfile::tempdir()?;
    let mut connector = fleet.connector(&group, state.path()).start()?;
    let address = fleet.proxies[0].ports.listen;
    let status_of = async |host: &str, app_ca: &[u8]| -> Result<u16, StepError> {
        Ok(https_get(address, host, app_ca, "/").await?.status.as_u16())
    };

    // The app that names the CA reaches nginx; its page comes through.
    let page = eventually("the trusted app's page", REACTION_TIMEOUT, async || {
        let answer = https_get(address, &trusted, &trusted_ca, "/").await?;
        Ok((answer.status == 200).then_some(answer))
    })
    .await?;
    assert_eq!(&page.body[..], PAGE);
    // The other apps were created after `trusted` and may reach the proxy's routes a
    // configuration later: until then their host has no certificate (TLS refused).
    let served = async |host: &str, app_ca: &[u8]| -> Result<u16, StepError> {
        eventually(&format!("{host} routed"), REACTION_TIMEOUT, async || {
            status_of(host, app_ca).await.map(Some)
        })
        .await
    };
    // serverName: the certificate's name is verified, not the URL's IP address.
    assert_eq!(served(&renamed, &renamed_ca).await?, 200);
    // Without the CA, or without serverName on an IP address, nginx is not trusted.
    assert_eq!(served(&plain, &plain_ca).await?, 502);
    assert_eq!(served(&unnamed, &unnamed_ca).await?, 502);

    // References that do not resolve are reported, naming the Secret and key.
    let namespace = &fleet.bed.namespace;
    for (app, reason, named) in [
        (
            "no-key",
            "BackendCASecretNotFound",
            format!("backend CA Secret {namespace}/backend-ca has no key missing.crt"),
        ),
        (
            "no-secret",
            "BackendCASecretNotFound",
            format!("backend CA Secret {namespace}/nowhere does not exist"),
        ),
        (
            "with-key",
            "BackendCASecretInvalid",
            format!("backend CA Secret {namespace}/not-a-ca key ca.crt holds a PRIVATE KEY"),
        ),
    ] {
        let condition = eventually(
            &format!("app {app}'s ResolvedRefs {reason}"),
            REACTION_TIMEOUT,
            async || {
                Ok(resolved_refs(&fleet, app)
                    .await?
                    .filter(|(status, found, _)| status == "False" && found == reason))
            },
        )
        .await?;
        assert!(condition.2.contains(&named), "{app}: {}", condition.2);
    }
    let config = fleet_config_json(&fleet).await?;
    let key_body: String = stray_key
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    assert!(
        !config.contains(&key_body),
        "the private key reached the fleet configuration"
    );
    assert!(!config.contains("PRIVATE KEY"));
    for left_out in ["no-key", "no-secret", "with-key"] {
        assert!(
            !config.contains(&format!("\"{namespace}/{left_out}\"")),
            "{left_out} is served: {config}"
        );
    }

    // Another CA in the Secret: the running connector stops trusting nginx...
    let switch_to = async |ca: &str| -> Result<(), StepError> {
        secrets
            .patch(
                "backend-ca",
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"ca.crt": ByteString(ca.as_bytes().to_vec())}})),
            )
            .await?;
        Ok(())
    };
    switch_to(&other.ca_pem).await?;
    eventually(
        "the trusted app failing with another CA",
        REACTION_TIMEOUT,
        async || Ok((status_of(&trusted, &trusted_ca).await? == 502).then_some(())),
    )
    .await?;
    assert_eq!(status_of(&renamed, &renamed_ca).await?, 502);
    // ... and the right CA back makes it trust nginx again, with nothing restarted.
    switch_to(&pki.ca_pem).await?;
    eventually(
        "the trusted app served again",
        REACTION_TIMEOUT,
        async || Ok((status_of(&trusted, &trusted_ca).await? == 200).then_some(())),
    )
    .await?;
    assert_eq!(status_of(&renamed, &renamed_ca).await?, 200);
    assert!(
        connector.is_running(),
        "the connector was restarted or died"
    );
    assert!(fleet.proxies.iter().all(|p| p.process.pid() > 0));
    let mut nginx = nginx;
    assert!(nginx.process.is_running(), "{}", nginx.process.output());
    Ok(())
}
