//! Objects the operator owns: their common labels, and server-side apply that writes only
//! when the desired object changed.

use std::collections::BTreeMap;
use std::fmt::Debug;

use k8s_openapi::api::core::v1::{
    Capabilities, PodSecurityContext, SeccompProfile, SecurityContext,
};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tracing::info;

use crate::context::FIELD_MANAGER;
use crate::error::Error;

/// `app.kubernetes.io/managed-by`, set on every object the operator makes.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "sallyport-operator";
pub use sallyport_api::registration::CONNECTOR_GROUP_LABEL;
/// The hash of the desired object last applied: equal means nothing to write.
pub const APPLIED_HASH_ANNOTATION: &str = "sallyport.dev/applied-hash";

/// The uid every pod the operator makes runs as (the distroless `nonroot` user).
pub const NONROOT_UID: i64 = 65532;

/// The container security context of every pod the operator makes: no privilege
/// escalation, a read-only root filesystem, non-root, no capabilities, RuntimeDefault
/// seccomp.
pub fn hardened_container() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: None,
        }),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..SecurityContext::default()
    }
}

/// The pod security context of every pod the operator makes: non-root ([`NONROOT_UID`])
/// and RuntimeDefault seccomp.
pub fn hardened_pod() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(NONROOT_UID),
        run_as_group: Some(NONROOT_UID),
        fs_group: Some(NONROOT_UID),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..PodSecurityContext::default()
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        localhost_profile: None,
    }
}

/// The labels of an object the operator makes for ConnectorGroup `group`.
pub fn group_labels(group: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
        (CONNECTOR_GROUP_LABEL.to_owned(), group.to_owned()),
    ])
}

/// The label selector of the objects made for ConnectorGroup `group`.
pub fn group_selector(group: &str) -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY},{CONNECTOR_GROUP_LABEL}={group}")
}

/// A stable hash of `object`'s JSON form.
fn hash<K: Serialize>(object: &K) -> Result<String, Error> {
    let bytes = serde_json::to_vec(object).map_err(|source| Error::Serialize {
        what: "a desired object",
        source,
    })?;
    Ok(format!("{:x}", Sha256::digest(bytes)))
}

/// Applies `desired` (server-side apply, forced, under the operator's field manager)
/// unless `existing` already carries the same applied hash. Returns whether it wrote.
pub async fn apply_if_changed<K>(
    api: &Api<K>,
    mut desired: K,
    existing: Option<&K>,
) -> Result<bool, Error>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
    K::DynamicType: Default,
{
    let digest = hash(&desired)?;
    let unchanged =
        existing.is_some_and(|e| e.annotations().get(APPLIED_HASH_ANNOTATION) == Some(&digest));
    if unchanged {
        return Ok(false);
    }
    desired
        .annotations_mut()
        .insert(APPLIED_HASH_ANNOTATION.to_owned(), digest);
    let name = desired.name_any();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&desired),
    )
    .await?;
    info!(kind = %K::kind(&Default::default()), namespace = desired.namespace().unwrap_or_default(), %name, "applied");
    Ok(true)
}

/// Deletes the objects matching `selector` whose names are not in `keep`: what a
/// ConnectorGroup no longer needs.
pub async fn delete_orphans<K>(
    api: &Api<K>,
    selector: &str,
    keep: &[String],
) -> Result<usize, Error>
where
    K: Resource + Clone + Debug + DeserializeOwned,
    K::DynamicType: Default,
{
    let mut deleted = 0;
    for object in api.list(&ListParams::default().labels(selector)).await? {
        let name = object.name_any();
        if !keep.contains(&name) && object.meta().deletion_timestamp.is_none() {
            api.delete(&name, &DeleteParams::background()).await?;
            info!(kind = %K::kind(&Default::default()), namespace = object.namespace().unwrap_or_default(), %name, "deleted orphan");
            deleted += 1;
        }
    }
    Ok(deleted)
}
