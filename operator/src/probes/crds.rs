//! Whether the apiserver serves the Sallyport CustomResourceDefinitions: the first
//! readiness check, since no controller can watch a kind that is not served.

use std::time::Duration;

use kube::api::{Api, ListParams};
use kube::{Client, Resource};
use sallyport_api::{ConditionalAccessPolicy, Connector, ConnectorGroup, PublishedApp};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Why a kind is not usable yet: `<plural>.<group>: <error>`.
async fn check<K>(client: &Client) -> Result<(), String>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    Api::<K>::all(client.clone())
        .list_metadata(&ListParams::default().limit(1))
        .await
        .map(|_| ())
        .map_err(|error| format!("{}.{}: {error}", K::plural(&()), K::group(&())))
}

/// The Sallyport kinds that cannot be listed yet (not served, or not allowed), each with
/// the apiserver's answer; empty when all are served.
pub async fn unserved_kinds(client: &Client) -> Vec<String> {
    let (apps, groups, policies, connectors) = futures::join!(
        check::<PublishedApp>(client),
        check::<ConnectorGroup>(client),
        check::<ConditionalAccessPolicy>(client),
        check::<Connector>(client),
    );
    [apps, groups, policies, connectors]
        .into_iter()
        .filter_map(Result::err)
        .collect()
}

/// Waits until every Sallyport kind can be listed, checking every `interval`. Returns
/// `false` if `shutdown` came first.
pub async fn wait_until_crds_served(
    client: &Client,
    interval: Duration,
    shutdown: &CancellationToken,
) -> bool {
    let mut last_reported = Vec::new();
    loop {
        let missing = tokio::select! {
            biased;
            () = shutdown.cancelled() => return false,
            missing = unserved_kinds(client) => missing,
        };
        if missing.is_empty() {
            info!("the Sallyport CustomResourceDefinitions are served");
            return true;
        }
        if missing != last_reported {
            warn!(
                unserved = ?missing,
                "waiting for the Sallyport CustomResourceDefinitions; install them with `sallyport-operator crds | kubectl apply --server-side -f -`"
            );
            last_reported = missing;
        } else {
            debug!(unserved = ?missing, "still waiting for the Sallyport CustomResourceDefinitions");
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
