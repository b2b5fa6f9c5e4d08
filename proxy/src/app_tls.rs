//! The apps' TLS certificates: for every route, the certificate of the Secret it names
//! (`tls.crt`, `tls.key`), read from the cluster or, standalone, from a directory laid
//! out like Secrets (`<dir>/<namespace>/<name>/tls.crt` and `tls.key`).
//!
//! Certificates are indexed by the route's host (exact or wildcard), so a request's SNI
//! finds the certificate of the app it is for. A Secret that cannot be read or used is
//! logged and its hosts get no certificate (their handshakes fail); the others serve.
//! Each app's certificate expiry is exported for the metrics at every load (every new
//! configuration and every [`RELOAD_EVERY`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use rustls::sign::CertifiedKey;
use sallyport_api::fleet_config::{FleetConfig, SecretRef};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::certs::{CertError, CertificateStore, certified_key_from_pem, not_after_of};

/// How often certificates are re-read, to pick up renewals (e.g. by cert-manager).
pub const RELOAD_EVERY: Duration = Duration::from_secs(60);

/// Where the apps' TLS Secrets are read from.
#[derive(Clone)]
pub enum SecretSource {
    /// The cluster's Secrets.
    Cluster(kube::Client),
    /// A directory of `<namespace>/<name>/{tls.crt,tls.key}`.
    Dir(PathBuf),
}

/// A TLS Secret cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AppTlsError {
    /// The Secret could not be read.
    #[error("TLS Secret {namespace}/{name}: {reason}")]
    Read {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Why.
        reason: String,
    },
    /// Its certificate or key is unusable.
    #[error("TLS Secret {namespace}/{name}: {source}")]
    Unusable {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Why.
        source: Box<CertError>,
    },
}

impl SecretSource {
    /// The bytes of `key` in Secret `namespace`/`name` (standalone: the file
    /// `<dir>/<namespace>/<name>/<key>`).
    pub async fn read_key(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<Vec<u8>, AppTlsError> {
        let mut values = self.read_keys(namespace, name, &[key]).await?;
        Ok(values.pop().unwrap_or_default())
    }

    /// The bytes of each of `keys` in Secret `namespace`/`name`, in order, with one read
    /// of the Secret (standalone: the files `<dir>/<namespace>/<name>/<key>`).
    pub async fn read_keys(
        &self,
        namespace: &str,
        name: &str,
        keys: &[&str],
    ) -> Result<Vec<Vec<u8>>, AppTlsError> {
        let read = |reason: String| AppTlsError::Read {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            reason,
        };
        match self {
            Self::Cluster(client) => {
                let found = Api::<Secret>::namespaced(client.clone(), namespace)
                    .get_opt(name)
                    .await
                    .map_err(|e| read(e.to_string()))?
                    .ok_or_else(|| read("not found".to_owned()))?;
                let mut data = found.data.unwrap_or_default();
                keys.iter()
                    .map(|key| {
                        data.remove(*key)
                            .map(|bytes| bytes.0)
                            .ok_or_else(|| read(format!("no {key}")))
                    })
                    .collect()
            }
            Self::Dir(dir) => {
                let base = dir.join(namespace).join(name);
                keys.iter()
                    .map(|key| {
                        let path = base.join(key);
                        std::fs::read(&path).map_err(|e| read(format!("{}: {e}", path.display())))
                    })
                    .collect()
            }
        }
    }

    /// The certificate and key of `secret`.
    pub async fn certified_key(
        &self,
        secret: &SecretRef,
    ) -> Result<Arc<CertifiedKey>, AppTlsError> {
        let mut values = self
            .read_keys(&secret.namespace, &secret.name, &["tls.crt", "tls.key"])
            .await?;
        let key = values.pop().unwrap_or_default();
        let chain = values.pop().unwrap_or_default();
        certified_key_from_pem(&chain, &key).map_err(|source| AppTlsError::Unusable {
            namespace: secret.namespace.clone(),
            name: secret.name.clone(),
            source: Box::new(source),
        })
    }
}

/// Loads the certificate of every route of `config` into `store`, and sets each app's
/// certificate expiry in the metrics (`sallyport_proxy_app_certificate_expiry_timestamp_seconds`).
pub async fn load(store: &CertificateStore, source: &SecretSource, config: &FleetConfig) {
    let mut keys: BTreeMap<(String, String), Option<Arc<CertifiedKey>>> = BTreeMap::new();
    let mut entries = Vec::with_capacity(config.routes.len());
    let mut expiry = Vec::with_capacity(config.routes.len());
    for route in &config.routes {
        let secret = &route.tls.secret_ref;
        let id = (secret.namespace.clone(), secret.name.clone());
        let key = match keys.get(&id) {
            Some(key) => key.clone(),
            None => {
                let key = match source.certified_key(secret).await {
                    Ok(key) => Some(key),
                    Err(error) => {
                        warn!(app = %route.app, %error, "the app's TLS certificate is unusable; its host is not served");
                        None
                    }
                };
                keys.insert(id, key.clone());
                key
            }
        };
        if let Some(key) = key {
            let secret = format!("{}/{}", secret.namespace, secret.name);
            if let Some(not_after) = not_after_of(&key) {
                expiry.push((route.app.clone(), secret, not_after));
            }
            entries.push((route.host.clone(), key));
        }
    }
    debug!(
        hosts = entries.len(),
        secrets = keys.len(),
        "app certificates loaded"
    );
    store.replace(entries);
    // An app with several routes (ports, paths) is one series per Secret.
    expiry.sort();
    expiry.dedup();
    crate::metrics::app_certificate_expiry(&expiry);
}

/// Keeps `store` current: on every new configuration and every [`RELOAD_EVERY`].
pub async fn follow(
    store: Arc<CertificateStore>,
    source: SecretSource,
    mut configs: watch::Receiver<Option<Arc<FleetConfig>>>,
    shutdown: CancellationToken,
) {
    loop {
        let config = configs.borrow_and_update().clone();
        if let Some(config) = config {
            load(&store, &source, &config).await;
        }
        tokio::select! {
            changed = configs.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(RELOAD_EVERY) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
