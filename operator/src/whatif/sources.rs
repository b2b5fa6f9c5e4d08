//! Where the what-if tool reads the Sallyport objects: the cluster or manifests on disk.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use sallyport_api::{ConditionalAccessPolicy, ConnectorGroup, PublishedApp};

use super::WhatIfError;
use crate::compile::manifests::Manifests;

/// Reads every file or directory of `paths` (as `sallyport-operator compile -f` does);
/// objects that name no namespace are put in `default_namespace`.
pub fn from_files(paths: &[PathBuf], default_namespace: &str) -> Result<Manifests, WhatIfError> {
    let mut manifests = Manifests::default();
    for path in paths {
        manifests.read_path(path, default_namespace)?;
    }
    Ok(manifests)
}

/// Lists what the compile step needs from the cluster: every PublishedApp,
/// ConnectorGroup and ConditionalAccessPolicy, and the namespaces' labels. Connectors are
/// left out: they only name revoked connectors, which no decision depends on.
pub async fn from_cluster(client: &kube::Client) -> Result<Manifests, WhatIfError> {
    let list = ListParams::default();
    let failed = |what: &'static str| move |source| WhatIfError::List { what, source };
    let apps = Api::<PublishedApp>::all(client.clone())
        .list(&list)
        .await
        .map_err(failed("PublishedApps"))?;
    let groups = Api::<ConnectorGroup>::all(client.clone())
        .list(&list)
        .await
        .map_err(failed("ConnectorGroups"))?;
    let policies = Api::<ConditionalAccessPolicy>::all(client.clone())
        .list(&list)
        .await
        .map_err(failed("ConditionalAccessPolicies"))?;
    let namespaces = Api::<Namespace>::all(client.clone())
        .list_metadata(&list)
        .await
        .map_err(failed("Namespaces"))?;
    Ok(Manifests {
        apps: apps.items,
        connector_groups: groups.items,
        policies: policies.items,
        namespace_labels: namespaces
            .items
            .iter()
            .map(|namespace| (namespace.name_any(), namespace.labels().clone()))
            .collect(),
        ..Manifests::default()
    })
}
