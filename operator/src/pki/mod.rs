//! The fleet's PKI and keys, kept in Secrets of the operator's namespace: created when
//! missing, reissued before they expire or when their host names change, and the session
//! key ring rotated, writing nothing when nothing is due.

pub mod build;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use tracing::{info, warn};

use self::build::{
    ASSERTION_SIGNING, CONNECTOR_ISSUER, ISSUER_LIFETIME, KeyRing, Plan, ROOT_CA, ROOT_LIFETIME,
    Root, Rotation, SESSION_KEYS, TUNNEL_LIFETIME, TUNNEL_TLS, plan_certificate,
};
use crate::context::FIELD_MANAGER;
use crate::error::Error;

/// What the PKI should look like.
#[derive(Debug, Clone)]
pub struct PkiSettings {
    /// The namespace holding the PKI Secrets (the operator's).
    pub namespace: String,
    /// Host names connectors dial; the tunnel serving certificate covers them.
    pub tunnel_hostnames: Vec<String>,
    /// Session key rotation.
    pub session_key_rotation: Rotation,
}

/// How often the PKI is checked.
pub const CHECK_EVERY: Duration = Duration::from_secs(600);

async fn write(api: &Api<Secret>, secret: &Secret, name: &str, reason: &str) -> Result<(), Error> {
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(secret),
    )
    .await?;
    info!(secret = name, reason, "PKI Secret written");
    Ok(())
}

/// Brings the PKI Secrets to what `settings` asks for. Returns how many it wrote.
pub async fn reconcile(client: &kube::Client, settings: &PkiSettings) -> Result<usize, Error> {
    let namespace = settings.namespace.as_str();
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    let now = Timestamp::now();
    let mut written = 0;

    // The root CA is made once. Replacing it would invalidate every certificate it
    // signed, so near expiry it is only reported.
    let existing_root = api.get_opt(ROOT_CA).await?;
    let plan = plan_certificate(existing_root.as_ref(), now, ROOT_LIFETIME.1, &[], None);
    let root_secret = match (existing_root, plan) {
        (Some(root), Plan::Keep) => root,
        (Some(root), Plan::Issue("near expiry")) => {
            warn!(
                secret = ROOT_CA,
                "the root CA expires within a year; plan its rotation"
            );
            root
        }
        (existing, plan) => {
            let reason = match plan {
                Plan::Issue(reason) => reason,
                Plan::Keep => "missing",
            };
            if existing.is_some() {
                warn!(secret = ROOT_CA, reason, "replacing an unusable root CA");
            }
            let root = build::root_ca(namespace, now).map_err(Error::Pki)?;
            write(&api, &root, ROOT_CA, reason).await?;
            written += 1;
            root
        }
    };
    let root = Root::from_secret(&root_secret).map_err(Error::Pki)?;

    let issuer = api.get_opt(CONNECTOR_ISSUER).await?;
    if let Plan::Issue(reason) = plan_certificate(
        issuer.as_ref(),
        now,
        ISSUER_LIFETIME.1,
        &[],
        Some(&root.certificate_pem),
    ) {
        write(
            &api,
            &build::connector_issuer(namespace, &root, now).map_err(Error::Pki)?,
            CONNECTOR_ISSUER,
            reason,
        )
        .await?;
        written += 1;
    }

    let tunnel = api.get_opt(TUNNEL_TLS).await?;
    let names = &settings.tunnel_hostnames;
    if let Plan::Issue(reason) = plan_certificate(
        tunnel.as_ref(),
        now,
        TUNNEL_LIFETIME.1,
        names,
        Some(&root.certificate_pem),
    ) {
        write(
            &api,
            &build::tunnel_serving(namespace, &root, names, now).map_err(Error::Pki)?,
            TUNNEL_TLS,
            reason,
        )
        .await?;
        written += 1;
    }

    let ring = KeyRing::from_secret(api.get_opt(SESSION_KEYS).await?.as_ref());
    if let Some(rotated) = ring
        .rotated(now, settings.session_key_rotation)
        .map_err(Error::Pki)?
    {
        let reason = if ring.0.is_none() {
            "missing or unreadable"
        } else {
            "rotation due"
        };
        write(
            &api,
            &build::session_keys_secret(&rotated, namespace),
            SESSION_KEYS,
            reason,
        )
        .await?;
        written += 1;
    }

    let assertion_usable = api
        .get_opt(ASSERTION_SIGNING)
        .await?
        .as_ref()
        .and_then(|s| s.data.as_ref()?.get(build::ASSERTION_KEY).cloned())
        .and_then(|pem| String::from_utf8(pem.0).ok())
        .is_some_and(|pem| sallyport_identity::AssertionKeys::from_pem(&pem).is_ok());
    if !assertion_usable {
        write(
            &api,
            &build::assertion_signing_key(namespace).map_err(Error::Pki)?,
            ASSERTION_SIGNING,
            "missing or unusable",
        )
        .await?;
        written += 1;
    }
    Ok(written)
}
