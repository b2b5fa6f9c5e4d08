//! The compiled fleet configuration, kept as one gzip-compressed ConfigMap in the
//! operator's namespace that every proxy replica watches (see docs/fleet-config.md).
//!
//! The loop here watches the controllers' caches: when any PublishedApp,
//! ConditionalAccessPolicy, ConnectorGroup, Connector or Namespace changes, or a Secret
//! an app names as its backend CA, it compiles within [`POLL`] and writes the ConfigMap
//! only when the compiled content's version differs from the one stored.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use sallyport_api::fleet_config::{
    SCHEMA_VERSION, SCHEMA_VERSION_ANNOTATION, STORAGE_KEY, VERSION_ANNOTATION,
};
use sallyport_api::{ConditionalAccessPolicy, Connector, ConnectorGroup, PublishedApp};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::compile::{CompileInputs, FleetDefaults, compile_with_backend_cas};
use crate::connector::{REVOCATIONS, Revocation};
use crate::context::FIELD_MANAGER;
use crate::error::Error;
use crate::managed::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::published_app::backend_ca::{self, BackendCaCache};

/// The ConfigMap holding the compiled configuration.
pub const CONFIG_MAP: &str = "sallyport-fleet-config";
/// How often the caches are checked for changes.
pub const POLL: Duration = Duration::from_millis(250);
/// The longest wait between attempts after failures.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A compile at least this often, as a safety net for inputs read outside the caches
/// (the revocation ConfigMap, which changes together with a Connector anyway).
pub const RECOMPILE_EVERY: Duration = Duration::from_secs(60);
/// A ConfigMap holds at most 1 MiB; the configuration is refused before it gets close.
pub const MAX_STORED_BYTES: usize = 900 * 1024;

/// The controllers' caches the configuration is compiled from.
#[derive(Clone)]
pub struct Sources {
    /// Every PublishedApp.
    pub apps: Store<PublishedApp>,
    /// Every ConditionalAccessPolicy.
    pub policies: Store<ConditionalAccessPolicy>,
    /// Every ConnectorGroup.
    pub groups: Store<ConnectorGroup>,
    /// Every Connector.
    pub connectors: Store<Connector>,
    /// Every Namespace's metadata: labels decide `allowedNamespaces.from: Selector`.
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    /// Every Secret's metadata: a change of a backend CA Secret (its `resourceVersion`)
    /// recompiles; its data is read only then.
    pub secrets: Store<PartialObjectMeta<Secret>>,
}

fn fingerprint_of<K: Resource + Clone>(store: &Store<K>, hasher: &mut DefaultHasher)
where
    K::DynamicType: Eq + Hash + Clone,
{
    // Order-independent: the sum of each object's (uid, resourceVersion) hash.
    let mut sum = 0u64;
    let objects = store.state();
    for object in &objects {
        let mut one = DefaultHasher::new();
        object.meta().uid.hash(&mut one);
        object.meta().resource_version.hash(&mut one);
        sum = sum.wrapping_add(one.finish());
    }
    sum.hash(hasher);
    objects.len().hash(hasher);
}

impl Sources {
    /// A value that changes whenever any cached object changes.
    pub fn fingerprint(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        fingerprint_of(&self.apps, &mut hasher);
        fingerprint_of(&self.policies, &mut hasher);
        fingerprint_of(&self.groups, &mut hasher);
        fingerprint_of(&self.connectors, &mut hasher);
        fingerprint_of(&self.namespaces, &mut hasher);
        backend_ca::fingerprint(&self.apps, &self.secrets, &mut hasher);
        hasher.finish()
    }
}

fn owned<K>(store: &Store<K>) -> Vec<K>
where
    K: Resource + Clone,
    K::DynamicType: Eq + Hash + Clone,
{
    store
        .state()
        .iter()
        .map(|object| (**object).clone())
        .collect()
}

/// Compiles the configuration from `sources` (reading the backend CA Secrets that changed
/// since `backend_cas` last read them) and writes it unless the stored version is the
/// same. Returns the version now stored.
pub async fn publish(
    client: &kube::Client,
    sources: &Sources,
    backend_cas: &mut BackendCaCache,
    operator_namespace: &str,
    defaults: &FleetDefaults,
    stored_version: Option<&str>,
) -> Result<String, Error> {
    let namespace_labels: BTreeMap<String, BTreeMap<String, String>> = sources
        .namespaces
        .state()
        .iter()
        .map(|ns| (ns.name_any(), ns.labels().clone()))
        .collect();
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), operator_namespace);
    let revoked: Vec<String> = config_maps
        .get_opt(REVOCATIONS)
        .await?
        .and_then(|cm| cm.data)
        .into_iter()
        .flatten()
        .filter_map(|(_, entry)| serde_json::from_str::<Revocation>(&entry).ok())
        .map(|r| format!("{}/{}", r.namespace, r.name))
        .collect();

    let (apps, policies, groups, connectors) = (
        owned(&sources.apps),
        owned(&sources.policies),
        owned(&sources.groups),
        owned(&sources.connectors),
    );
    let wanted = backend_ca::references(&apps);
    let cas = backend_cas
        .resolve(client, &sources.secrets, &wanted)
        .await?;
    let compiled = compile_with_backend_cas(
        &CompileInputs {
            apps: &apps,
            connector_groups: &groups,
            policies: &policies,
            connectors: &connectors,
            namespace_labels: &namespace_labels,
            revoked_connectors: &revoked,
            operator_namespace,
            defaults,
        },
        &cas,
    )
    .map_err(Error::Compile)?;
    let version = compiled.config.version.clone();
    if stored_version == Some(version.as_str()) {
        return Ok(version);
    }
    let bytes = compiled.config.to_gzip_json().map_err(Error::FleetConfig)?;
    if bytes.len() > MAX_STORED_BYTES {
        return Err(Error::FleetConfigTooLarge {
            bytes: bytes.len(),
            limit: MAX_STORED_BYTES,
        });
    }
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIG_MAP.to_owned()),
            namespace: Some(operator_namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                MANAGED_BY.to_owned(),
            )])),
            annotations: Some(BTreeMap::from([
                (VERSION_ANNOTATION.to_owned(), version.clone()),
                (
                    SCHEMA_VERSION_ANNOTATION.to_owned(),
                    SCHEMA_VERSION.to_string(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        binary_data: Some(BTreeMap::from([(
            STORAGE_KEY.to_owned(),
            ByteString(bytes.clone()),
        )])),
        ..ConfigMap::default()
    };
    config_maps
        .patch(
            CONFIG_MAP,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&config_map),
        )
        .await?;
    info!(
        %version,
        routes = compiled.config.routes.len(),
        policies = compiled.config.policies.len(),
        skipped = compiled.skipped.len(),
        bytes = bytes.len(),
        "fleet configuration published"
    );
    sallyport_events::audit(
        sallyport_events::AuditEvent::new(
            "configuration.published",
            sallyport_events::ObjectRef::namespaced("ConfigMap", operator_namespace, CONFIG_MAP),
            sallyport_events::Outcome::Success,
        )
        .message(format!(
            "fleet configuration {version} published for the proxies"
        ))
        .detail("version", &version)
        .detail("previousVersion", stored_version)
        .detail("routes", compiled.config.routes.len())
        .detail("policies", compiled.config.policies.len())
        .detail("connectorGroups", compiled.config.connector_groups.len())
        .detail(
            "revokedConnectors",
            compiled.config.revoked_connectors.len(),
        )
        .detail("skipped", compiled.skipped.len())
        .detail("bytes", bytes.len()),
    );
    for skipped in &compiled.skipped {
        debug!(kind = skipped.kind, id = %skipped.id, reason = %skipped.reason, message = %skipped.message, "left out of the fleet configuration");
    }
    Ok(version)
}

/// Keeps the fleet configuration current until `shutdown`.
pub async fn run(
    client: kube::Client,
    sources: Sources,
    operator_namespace: String,
    defaults: FleetDefaults,
    shutdown: CancellationToken,
) {
    let ready = async {
        let _ = futures::join!(
            sources.apps.wait_until_ready(),
            sources.policies.wait_until_ready(),
            sources.groups.wait_until_ready(),
            sources.connectors.wait_until_ready(),
            sources.namespaces.wait_until_ready(),
            sources.secrets.wait_until_ready(),
        );
    };
    tokio::select! {
        () = ready => {}
        () = shutdown.cancelled() => return,
    }
    let config_maps = Api::<ConfigMap>::namespaced(client.clone(), &operator_namespace);
    let mut stored = match config_maps.get_opt(CONFIG_MAP).await {
        Ok(existing) => existing.and_then(|cm| cm.annotations().get(VERSION_ANNOTATION).cloned()),
        Err(error) => {
            warn!(%error, "cannot read the stored fleet configuration");
            None
        }
    };
    let mut compiled_from = None;
    let mut backend_cas = BackendCaCache::new();
    let mut last_compile = tokio::time::Instant::now();
    // After a failure, wait longer each time (up to MAX_BACKOFF) before trying again.
    let mut backoff = POLL;
    loop {
        let fingerprint = sources.fingerprint();
        let due = compiled_from != Some(fingerprint) || last_compile.elapsed() >= RECOMPILE_EVERY;
        let mut wait = POLL;
        if due {
            let published = publish(
                &client,
                &sources,
                &mut backend_cas,
                &operator_namespace,
                &defaults,
                stored.as_deref(),
            )
            .await;
            match published {
                Ok(version) => {
                    stored = Some(version);
                    compiled_from = Some(fingerprint);
                    backoff = POLL;
                }
                Err(error) => {
                    warn!(reason = error.metric_label(), %error, retry_in = ?backoff, "cannot publish the fleet configuration");
                    wait = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            last_compile = tokio::time::Instant::now();
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
