//! Which proxy replicas make up the fleet, so that connectors can hold tunnels to each.
//!
//! In a cluster every replica keeps a Lease `sallyport-proxy-<replica>` (label
//! [`REPLICA_LABEL`]) in the fleet's namespace renewed every [`RENEW_EVERY`]; the
//! replicas are those whose Lease was renewed within its duration. Standalone, the
//! replica set is given on the command line.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The label marking proxy replica Leases.
pub const REPLICA_LABEL: &str = "sallyport.dev/proxy-replica";
/// How often a replica renews its Lease and re-reads the others.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How long a Lease counts after its last renewal.
pub const LEASE_SECONDS: i32 = 15;

/// The field manager of the proxy's writes.
pub const FIELD_MANAGER: &str = "sallyport-proxy";

/// The name of the Lease of `replica`.
pub fn lease_name(replica: &str) -> String {
    format!("sallyport-proxy-{replica}")
}

fn lease(replica: &str, namespace: &str, now: Timestamp) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(lease_name(replica)),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                REPLICA_LABEL.to_owned(),
                "true".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(replica.to_owned()),
            lease_duration_seconds: Some(LEASE_SECONDS),
            renew_time: Some(MicroTime(now)),
            ..LeaseSpec::default()
        }),
    }
}

/// The replicas whose Lease is live at `now`, sorted.
pub fn live_replicas(leases: &[Lease], now: Timestamp) -> Vec<String> {
    let mut replicas: Vec<String> = leases
        .iter()
        .filter_map(|lease| {
            let spec = lease.spec.as_ref()?;
            let renewed = spec.renew_time.as_ref()?.0;
            let seconds = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
            let expires = renewed
                .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(seconds))
                .ok()?;
            (expires > now)
                .then(|| spec.holder_identity.clone())
                .flatten()
        })
        .collect();
    replicas.sort();
    replicas.dedup();
    replicas
}

/// Keeps this replica's Lease renewed and publishes the live replica set on `sender`
/// until `shutdown`; then deletes the Lease so connectors stop waiting for this replica.
pub async fn heartbeat(
    client: kube::Client,
    namespace: String,
    replica: String,
    sender: watch::Sender<Vec<String>>,
    shutdown: CancellationToken,
) {
    let api = Api::<Lease>::namespaced(client, &namespace);
    let name = lease_name(&replica);
    loop {
        let now = Timestamp::now();
        let renewed = api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&lease(&replica, &namespace, now)),
            )
            .await;
        if let Err(error) = renewed {
            warn!(lease = %name, %error, "cannot renew this replica's Lease");
        }
        match api
            .list(&ListParams::default().labels(&format!("{REPLICA_LABEL}=true")))
            .await
        {
            Ok(list) => {
                let mut replicas = live_replicas(&list.items, Timestamp::now());
                if !replicas.contains(&replica) {
                    replicas.push(replica.clone());
                    replicas.sort();
                }
                sender.send_if_modified(|current| {
                    if *current == replicas {
                        return false;
                    }
                    info!(?replicas, "proxy replicas changed");
                    *current = replicas;
                    true
                });
            }
            Err(error) => warn!(%error, "cannot list the proxy replicas' Leases"),
        }
        tokio::select! {
            () = tokio::time::sleep(RENEW_EVERY) => {}
            () = shutdown.cancelled() => break,
        }
    }
    if let Err(error) = api.delete(&name, &DeleteParams::default()).await {
        warn!(lease = %name, %error, "cannot delete this replica's Lease");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn only_recently_renewed_leases_count() {
        let now = at("2026-01-01T00:00:30Z");
        let leases = [
            lease("b", "ns", at("2026-01-01T00:00:20Z")),
            lease("a", "ns", at("2026-01-01T00:00:29Z")),
            lease("stale", "ns", at("2026-01-01T00:00:10Z")),
        ];
        assert_eq!(live_replicas(&leases, now), ["a", "b"]);
    }
}
