//! The agent's Node: registration, the heartbeat (Lease and Ready condition), and the
//! wait for the node lifecycle controller to lift the `not-ready` taint.

use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tracing::{debug, warn};

use super::{
    HEARTBEAT, NODE_LABEL, NODE_LABEL_VALUE, NODE_READY_TIMEOUT, NodeAgentError, POD_IP, Shared,
};

/// The field manager of everything the agent writes.
pub(super) const MANAGER: &str = "sallyport-e2e-node-agent";

/// How long the Lease is valid (the kubelet's default).
const LEASE_SECONDS: i64 = 40;

/// `at` as a Kubernetes `Time` (RFC 3339, whole seconds, UTC).
pub(super) fn time(at: Timestamp) -> String {
    at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

pub(super) fn apply() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

/// The Node's status at `now`: Ready since `since`, with room for many pods.
fn status(name: &str, since: Timestamp, now: Timestamp) -> serde_json::Value {
    let resources = json!({"cpu": "16", "memory": "64Gi", "pods": "110"});
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": type_, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": time(now), "lastTransitionTime": time(since),
        })
    };
    json!({
        "capacity": resources,
        "allocatable": resources,
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "sallyport e2e node agent"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "sallyport e2e node agent"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "sallyport e2e node agent"),
            condition("Ready", "True", "KubeletReady", "sallyport e2e node agent is posting ready status"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": POD_IP},
            {"type": "Hostname", "address": name},
        ],
        "nodeInfo": {
            "machineID": "", "systemUUID": "", "bootID": "",
            "kernelVersion": "", "osImage": "local processes",
            "containerRuntimeVersion": "sallyport-e2e://0",
            "kubeletVersion": "v1.34.0-sallyport-e2e", "kubeProxyVersion": "",
            "operatingSystem": "linux", "architecture": "amd64",
        },
    })
}

/// Creates or updates the Node (labels, no taints, Ready status) and its Lease; returns
/// the time it became Ready.
pub(super) async fn register(shared: &Shared) -> Result<Timestamp, NodeAgentError> {
    let name = &shared.config.node_name;
    let nodes = Api::<Node>::all(shared.client.clone());
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                NODE_LABEL: NODE_LABEL_VALUE,
            },
        },
        "spec": {},
    });
    nodes
        .patch(name, &apply(), &Patch::Apply(&node))
        .await
        .map_err(NodeAgentError::api(format!("registering Node {name}")))?;
    let since = Timestamp::now();
    beat(shared, since).await?;
    Ok(since)
}

/// Renews the Lease and the Node's conditions once.
async fn beat(shared: &Shared, since: Timestamp) -> Result<(), NodeAgentError> {
    let name = &shared.config.node_name;
    let now = Timestamp::now();
    let nodes = Api::<Node>::all(shared.client.clone());
    let node = nodes
        .patch_status(
            name,
            &apply(),
            &Patch::Apply(&json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name},
                "status": status(name, since, now),
            })),
        )
        .await
        .map_err(NodeAgentError::api(format!(
            "updating the status of Node {name}"
        )))?;
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {
            "name": name,
            "namespace": "kube-node-lease",
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Node", "name": name,
                "uid": node.metadata.uid.unwrap_or_default(),
            }],
        },
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": LEASE_SECONDS,
            // MicroTime: the apiserver wants microseconds.
            "renewTime": now.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        },
    });
    Api::<Lease>::namespaced(shared.client.clone(), "kube-node-lease")
        .patch(name, &apply(), &Patch::Apply(&lease))
        .await
        .map_err(NodeAgentError::api(format!(
            "renewing the Lease of Node {name}"
        )))?;
    debug!(node = %name, "heartbeat");
    Ok(())
}

/// Renews the Lease and the Ready heartbeat every [`HEARTBEAT`] until the agent stops.
pub(super) async fn heartbeat(shared: Arc<Shared>, since: Timestamp) {
    let mut stopping = shared.stopping.clone();
    loop {
        tokio::select! {
            _ = stopping.changed() => return,
            () = tokio::time::sleep(HEARTBEAT) => {}
        }
        if let Err(error) = beat(&shared, since).await {
            warn!(node = %shared.config.node_name, %error, "heartbeat failed; next one in {HEARTBEAT:?}");
        }
    }
}

/// Waits until the Node is Ready and has no taint (the node lifecycle controller lifts
/// `node.kubernetes.io/not-ready` once it sees the Ready condition).
pub(super) async fn wait_ready(shared: &Shared) -> Result<(), NodeAgentError> {
    let name = &shared.config.node_name;
    let nodes = Api::<Node>::all(shared.client.clone());
    let deadline = tokio::time::Instant::now() + NODE_READY_TIMEOUT;
    loop {
        let node = nodes
            .get(name)
            .await
            .map_err(NodeAgentError::api(format!("reading Node {name}")))?;
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        if ready && taints.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(NodeAgentError::NodeNotReady {
                node: name.clone(),
                timeout: NODE_READY_TIMEOUT,
                state: format!(
                    "ready {ready}, taints {:?}",
                    taints.iter().map(|t| &t.key).collect::<Vec<_>>()
                ),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}
