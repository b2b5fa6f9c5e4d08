//! What `kubectl sallyport status` reads: the PublishedApps, ConnectorGroups and
//! ConditionalAccessPolicies in scope, the groups and baseline policies those apps use
//! elsewhere, the groups' Connectors, and the operator's leader Lease and Pod.

use std::collections::BTreeSet;

use clap::Args;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::{Client, Resource, ResourceExt};
use sallyport_api::{ConditionalAccessPolicy, Connector, ConnectorGroup, PublishedApp};
use serde::de::DeserializeOwned;

use super::report::{OperatorView, Snapshot};
use crate::leader::OPERATOR_LEASE_NAME;

/// Settings of `kubectl sallyport status`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
kubectl sallyport status\n  \
kubectl sallyport status -n team-a\n  \
kubectl sallyport status -A --operator-namespace sallyport-system\n  \
kubectl sallyport status -A || echo 'something needs fixing'\n\n\
Exit status: 0 when everything shown is ready; 3 when anything is not (an app, a group, a \
policy, or no live operator leader); 1 when the cluster cannot be read.")]
pub struct StatusArgs {
    /// The namespace to report on. Default: the kubeconfig context's namespace. The
    /// ConnectorGroups its apps use and the fleet-wide baseline policies are shown
    /// wherever they live.
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,

    /// Report on every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,

    /// The operator's namespace: its leader Lease, and the fleet-wide baseline policies.
    #[arg(long, value_name = "NAMESPACE", default_value = "sallyport-system")]
    pub operator_namespace: String,
}

impl StatusArgs {
    /// The namespaces reported on; `default_namespace` is the context's.
    pub fn scope(&self, default_namespace: &str) -> Scope {
        if self.all_namespaces {
            Scope::All
        } else {
            Scope::Namespace(
                self.namespace
                    .clone()
                    .unwrap_or_else(|| default_namespace.to_owned()),
            )
        }
    }
}

/// The namespaces a summary covers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// One namespace.
    Namespace(String),
    /// Every namespace.
    All,
}

impl Scope {
    fn api<K>(&self, client: &Client) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match self {
            Self::Namespace(namespace) => Api::namespaced(client.clone(), namespace),
            Self::All => Api::all(client.clone()),
        }
    }

    fn covers(&self, namespace: &str) -> bool {
        match self {
            Self::Namespace(scope) => scope == namespace,
            Self::All => true,
        }
    }
}

/// `status` cannot report at all.
#[derive(Debug, thiserror::Error)]
#[error("cannot list {what}: {source}")]
pub struct StatusError {
    /// What was listed.
    what: String,
    /// The API's answer.
    source: kube::Error,
}

async fn list<K>(api: &Api<K>, what: &str) -> Result<Vec<K>, String>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    api.list(&ListParams::default())
        .await
        .map(|list| list.items)
        .map_err(|error| format!("cannot list {what}: {error}"))
}

/// Reads what the summary of `scope` needs. Only the PublishedApps of the scope must be
/// readable; anything else that cannot be read is named in the snapshot.
pub async fn read(
    client: &Client,
    scope: &Scope,
    operator_namespace: &str,
) -> Result<Snapshot, StatusError> {
    let where_ = match scope {
        Scope::Namespace(namespace) => format!("in namespace {namespace}"),
        Scope::All => "in any namespace".to_owned(),
    };
    let apps = scope
        .api::<PublishedApp>(client)
        .list(&ListParams::default())
        .await
        .map_err(|source| StatusError {
            what: format!("PublishedApps {where_} (are the Sallyport CRDs installed?)"),
            source,
        })?
        .items;
    let mut unreadable = Vec::new();

    let mut groups = list(
        &scope.api::<ConnectorGroup>(client),
        &format!("ConnectorGroups {where_}"),
    )
    .await
    .unwrap_or_else(|error| {
        unreadable.push(error);
        Vec::new()
    });
    // The groups the apps use outside the scope.
    let elsewhere: BTreeSet<(String, String)> = apps
        .iter()
        .map(|app| {
            let reference = &app.spec.connector_group;
            let namespace = reference
                .namespace
                .clone()
                .unwrap_or_else(|| app.namespace().unwrap_or_default());
            (namespace, reference.name.clone())
        })
        .filter(|(namespace, _)| !scope.covers(namespace))
        .collect();
    for (namespace, name) in &elsewhere {
        match Api::<ConnectorGroup>::namespaced(client.clone(), namespace)
            .get_opt(name)
            .await
        {
            Ok(Some(group)) => groups.push(group),
            // The app's own status says the group does not exist.
            Ok(None) => {}
            Err(error) => unreadable.push(format!(
                "cannot read ConnectorGroup {namespace}/{name}: {error}"
            )),
        }
    }

    let mut connectors = Vec::new();
    let connector_scopes: BTreeSet<Scope> = match scope {
        Scope::All => BTreeSet::from([Scope::All]),
        Scope::Namespace(_) => groups
            .iter()
            .map(|g| Scope::Namespace(g.namespace().unwrap_or_default()))
            .collect(),
    };
    for connector_scope in &connector_scopes {
        let what = match connector_scope {
            Scope::Namespace(namespace) => format!("Connectors in namespace {namespace}"),
            Scope::All => "Connectors in any namespace".to_owned(),
        };
        match list(&connector_scope.api::<Connector>(client), &what).await {
            Ok(found) => connectors.extend(found),
            Err(error) => unreadable.push(error),
        }
    }

    let mut policies = list(
        &scope.api::<ConditionalAccessPolicy>(client),
        &format!("ConditionalAccessPolicies {where_}"),
    )
    .await
    .unwrap_or_else(|error| {
        unreadable.push(error);
        Vec::new()
    });
    if !scope.covers(operator_namespace) {
        let baseline =
            Api::<ConditionalAccessPolicy>::namespaced(client.clone(), operator_namespace);
        match list(
            &baseline,
            &format!("the baseline ConditionalAccessPolicies of namespace {operator_namespace}"),
        )
        .await
        {
            Ok(found) => policies.extend(found),
            Err(error) => unreadable.push(error),
        }
    }

    let lease = Api::<Lease>::namespaced(client.clone(), operator_namespace)
        .get_opt(OPERATOR_LEASE_NAME)
        .await
        .map_err(|error| {
            format!("cannot read the Lease {operator_namespace}/{OPERATOR_LEASE_NAME}: {error}")
        });
    let holder = lease
        .as_ref()
        .ok()
        .and_then(Option::as_ref)
        .and_then(|lease| lease.spec.as_ref())
        .and_then(|spec| spec.holder_identity.clone())
        .filter(|holder| !holder.is_empty());
    let leader_pod = match &holder {
        None => None,
        Some(holder) => Some(
            Api::<Pod>::namespaced(client.clone(), operator_namespace)
                .get_opt(holder)
                .await
                .map_err(|error| {
                    format!("cannot read the leader's Pod {operator_namespace}/{holder}: {error}")
                }),
        ),
    };

    Ok(Snapshot {
        now: Timestamp::now(),
        scope: scope.clone(),
        operator: OperatorView {
            namespace: operator_namespace.to_owned(),
            lease,
            leader_pod,
        },
        apps,
        groups,
        connectors,
        policies,
        unreadable,
    })
}
