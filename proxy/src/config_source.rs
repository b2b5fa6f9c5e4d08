//! Where a proxy replica gets its fleet configuration: the operator's ConfigMap, watched
//! through the Kubernetes API, or a file (standalone mode, e.g. the output of
//! `sallyport-operator compile`), re-read when it changes.
//!
//! Either way the newest valid configuration is published on a `watch` channel; a
//! configuration that does not decode is logged and skipped, and the last good one keeps
//! serving.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use sallyport_api::fleet_config::{FleetConfig, FleetConfigError, STORAGE_KEY, VERSION_ANNOTATION};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often a configuration file is checked for changes.
pub const FILE_POLL: Duration = Duration::from_secs(1);

/// Where the configuration comes from.
#[derive(Clone)]
pub enum ConfigSource {
    /// A file holding the configuration as JSON or gzip-compressed JSON.
    File(PathBuf),
    /// The ConfigMap `name` in `namespace`, as the operator writes it.
    ConfigMap {
        /// A client of the cluster.
        client: kube::Client,
        /// The operator's namespace.
        namespace: String,
        /// The ConfigMap's name.
        name: String,
    },
}

impl std::fmt::Debug for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::ConfigMap {
                namespace, name, ..
            } => write!(f, "ConfigMap {namespace}/{name}"),
        }
    }
}

/// A configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigSourceError {
    /// The file could not be read.
    #[error("cannot read the fleet configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The content is not a configuration this build reads.
    #[error("the fleet configuration in {origin} is unusable: {source}")]
    Decode {
        /// The file or ConfigMap.
        origin: String,
        /// Why.
        source: FleetConfigError,
    },
    /// The ConfigMap has no configuration under the expected key.
    #[error("the ConfigMap {origin} has no binaryData key {STORAGE_KEY}")]
    MissingKey {
        /// The ConfigMap.
        origin: String,
    },
}

/// Reads a configuration from bytes: gzip-compressed JSON (as stored in the ConfigMap)
/// or plain JSON.
pub fn decode(origin: &str, bytes: &[u8]) -> Result<FleetConfig, ConfigSourceError> {
    let decoded = if bytes.starts_with(&[0x1f, 0x8b]) {
        FleetConfig::from_gzip_json(bytes)
    } else {
        FleetConfig::from_json(bytes)
    };
    decoded.map_err(|source| ConfigSourceError::Decode {
        origin: origin.to_owned(),
        source,
    })
}

/// Reads the configuration file at `path` once.
pub fn read_file(path: &std::path::Path) -> Result<FleetConfig, ConfigSourceError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigSourceError::Read {
        path: path.to_owned(),
        source,
    })?;
    decode(&path.display().to_string(), &bytes)
}

fn publish(sender: &watch::Sender<Option<Arc<FleetConfig>>>, config: FleetConfig, origin: &str) {
    let changed = sender
        .borrow()
        .as_ref()
        .is_none_or(|current| current.version != config.version);
    if changed {
        info!(
            version = %config.version,
            routes = config.routes.len(),
            groups = config.connector_groups.len(),
            %origin,
            "fleet configuration loaded"
        );
        sender.send_replace(Some(Arc::new(config)));
    }
}

impl ConfigSource {
    /// Follows the source until `shutdown`, publishing each new configuration on
    /// `sender`.
    pub async fn follow(
        self,
        sender: watch::Sender<Option<Arc<FleetConfig>>>,
        shutdown: CancellationToken,
    ) {
        match self {
            Self::File(path) => follow_file(path, sender, shutdown).await,
            Self::ConfigMap {
                client,
                namespace,
                name,
            } => follow_config_map(client, namespace, name, sender, shutdown).await,
        }
    }
}

async fn follow_file(
    path: PathBuf,
    sender: watch::Sender<Option<Arc<FleetConfig>>>,
    shutdown: CancellationToken,
) {
    let origin = path.display().to_string();
    let mut seen: Option<(SystemTime, u64)> = None;
    loop {
        match std::fs::metadata(&path) {
            Ok(metadata) => {
                let stamp = (
                    metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    metadata.len(),
                );
                if seen != Some(stamp) {
                    seen = Some(stamp);
                    match read_file(&path) {
                        Ok(config) => publish(&sender, config, &origin),
                        Err(error) => {
                            warn!(%error, "keeping the last fleet configuration")
                        }
                    }
                }
            }
            Err(error) => warn!(file = %origin, %error, "cannot stat the fleet configuration file"),
        }
        tokio::select! {
            () = tokio::time::sleep(FILE_POLL) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn follow_config_map(
    client: kube::Client,
    namespace: String,
    name: String,
    sender: watch::Sender<Option<Arc<FleetConfig>>>,
    shutdown: CancellationToken,
) {
    let origin = format!("{namespace}/{name}");
    let api = Api::<ConfigMap>::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            () = shutdown.cancelled() => return,
        };
        match event {
            Some(Ok(Event::Apply(config_map) | Event::InitApply(config_map))) => {
                let announced = config_map.annotations().get(VERSION_ANNOTATION).cloned();
                let current = sender.borrow().as_ref().map(|c| c.version.clone());
                if announced.is_some() && announced == current {
                    continue;
                }
                let bytes = config_map
                    .binary_data
                    .as_ref()
                    .and_then(|data| data.get(STORAGE_KEY))
                    .map(|b| b.0.as_slice());
                let decoded = match bytes {
                    Some(bytes) => decode(&origin, bytes),
                    None => Err(ConfigSourceError::MissingKey {
                        origin: origin.clone(),
                    }),
                };
                match decoded {
                    Ok(config) => publish(&sender, config, &origin),
                    Err(error) => warn!(%error, "keeping the last fleet configuration"),
                }
            }
            Some(Ok(Event::Delete(_))) => {
                warn!(config_map = %origin, "the fleet configuration was deleted; keeping the last one");
            }
            Some(Ok(Event::Init | Event::InitDone)) => {}
            Some(Err(error)) => {
                warn!(config_map = %origin, %error, "watching the fleet configuration failed; retrying")
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> FleetConfig {
        FleetConfig::new(vec![], vec![], vec![], vec!["infra/old".to_owned()])
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn decodes_json_and_gzip_and_names_the_origin_of_garbage() {
        let config = config();
        let json = serde_json::to_vec(&config).unwrap_or_default();
        let gzip = config.to_gzip_json().unwrap_or_default();
        assert_eq!(decode("a", &json).ok(), Some(config.clone()));
        assert_eq!(decode("a", &gzip).ok(), Some(config));
        let error = decode("cm sallyport/x", b"{nope")
            .err()
            .map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("cm sallyport/x")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_file_is_followed_and_a_broken_rewrite_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("fleet.json");
        let first = config();
        std::fs::write(&path, serde_json::to_vec(&first).unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
        let (sender, mut receiver) = watch::channel(None);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(ConfigSource::File(path.clone()).follow(sender, shutdown.clone()));
        let wait = tokio::time::timeout(Duration::from_secs(10), receiver.changed()).await;
        assert!(matches!(wait, Ok(Ok(()))));
        assert_eq!(
            receiver.borrow().as_ref().map(|c| c.version.clone()),
            Some(first.version.clone())
        );

        // A broken file is skipped; a good one afterwards is picked up.
        std::fs::write(&path, b"{broken").unwrap_or_else(|e| panic!("{e}"));
        tokio::time::sleep(FILE_POLL * 2).await;
        assert_eq!(
            receiver.borrow().as_ref().map(|c| c.version.clone()),
            Some(first.version.clone())
        );
        let second =
            FleetConfig::new(vec![], vec![], vec![], vec![]).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&path, second.to_gzip_json().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}"));
        let wait = tokio::time::timeout(Duration::from_secs(10), receiver.changed()).await;
        assert!(matches!(wait, Ok(Ok(()))));
        assert_eq!(
            receiver.borrow().as_ref().map(|c| c.version.clone()),
            Some(second.version)
        );
        shutdown.cancel();
        let _ = task.await;
    }
}
