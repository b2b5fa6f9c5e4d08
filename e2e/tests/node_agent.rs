//! The e2e node agent runs real pods: a Deployment scheduled onto its Node becomes
//! Available through readiness probes against real processes, which authenticate as
//! their pod's ServiceAccount; an unknown image never runs, a crashing container backs
//! off, and deleting the Deployment stops the processes and removes the pods, while the
//! Node stays Ready throughout.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use sallyport_e2e::controlplane::{ControlPlane, Mode};
use sallyport_e2e::dataplane::{StepError, eventually};
use sallyport_e2e::node_agent::{
    NODE_LABEL, NODE_LABEL_VALUE, NodeAgent, NodeAgentConfig, PortValue, Program, waiting_reason,
};
use serde_json::json;

type TestResult = Result<(), StepError>;

const IMAGE: &str = "e2e.test/workload:1";
const WAIT: Duration = Duration::from_secs(90);

fn deployment(name: &str, image: &str, replicas: i32, env: serde_json::Value) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": {NODE_LABEL: NODE_LABEL_VALUE},
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "main",
                        "image": image,
                        "args": ["--ignored-by-the-workload", "$(POD_NAME)"],
                        "env": env,
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {
                            "httpGet": {"path": "/healthz", "port": "http"},
                            "periodSeconds": 1,
                            "failureThreshold": 1,
                        },
                    }],
                },
            },
        },
    }))
    .unwrap_or_else(|e| panic!("deployment: {e}"))
}

fn pid_of(pod: &Pod) -> Option<i32> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .container_id
        .as_ref()?
        .rsplit('/')
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_run_as_local_processes_on_the_agent_node() -> TestResult {
    let control_plane = ControlPlane::shared(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        Mode::WithControllers,
    )?;
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace("node-agent").await?;
    let work = tempfile::tempdir()?;
    let config = NodeAgentConfig::new("local-node-0", control_plane.kubeconfig_path(), work.path())
        .image(
            IMAGE,
            Program::new(env!("CARGO_BIN_EXE_sallyport-e2e-workload")),
        )
        .port_env("http", "WORKLOAD_LISTEN", PortValue::Address);
    let agent = NodeAgent::start(client.clone(), config).await?;

    let deployments = Api::<Deployment>::namespaced(client.clone(), &namespace);
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    let pod_env =
        json!([{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]);
    deployments
        .create(
            &PostParams::default(),
            &deployment("web", IMAGE, 2, pod_env),
        )
        .await?;
    let available = eventually(
        "Deployment web Available with 2 replicas",
        WAIT,
        async || {
            let status = deployments.get("web").await?.status.unwrap_or_default();
            let available = status
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Available" && c.status == "True");
            Ok((available && status.available_replicas == Some(2)).then_some(()))
        },
    )
    .await;
    if let Err(error) = available {
        return Err(format!("{error}\n{}", agent.log_tails(&namespace, 20)).into());
    }

    let web = pods
        .list(&ListParams::default().labels("app=web"))
        .await?
        .items;
    assert_eq!(web.len(), 2, "two pods");
    let mut pids = Vec::new();
    for pod in &web {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        assert_eq!(status.phase.as_deref(), Some("Running"), "{name}");
        assert_eq!(status.pod_ip.as_deref(), Some("127.0.0.1"), "{name}");
        assert_eq!(
            pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some("local-node-0")
        );
        let pid = pid_of(pod).ok_or(format!("pod {name} has no container id"))?;
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "the process of {name} runs"
        );
        pids.push(pid);
        // The process runs as the pod's ServiceAccount.
        let kubeconfig = agent
            .log_path(&namespace, &name, "main")
            .with_file_name("kubeconfig");
        let as_pod = sallyport_e2e::controlplane::client(&kubeconfig).await?;
        let review = Api::<SelfSubjectReview>::all(as_pod)
            .create(&PostParams::default(), &SelfSubjectReview::default())
            .await?;
        let user = review
            .status
            .and_then(|s| s.user_info)
            .and_then(|u| u.username)
            .unwrap_or_default();
        assert_eq!(user, format!("system:serviceaccount:{namespace}:default"));
        let log = std::fs::read_to_string(agent.log_path(&namespace, &name, "main"))?;
        assert!(log.contains("listening on 127.0.0.1:"), "{name} log: {log}");
    }

    // An image the agent does not know never runs; a crashing container backs off.
    deployments
        .create(
            &PostParams::default(),
            &deployment("unknown", "e2e.test/nowhere:1", 1, json!([])),
        )
        .await?;
    deployments
        .create(
            &PostParams::default(),
            &deployment(
                "crash",
                IMAGE,
                1,
                json!([{"name": "WORKLOAD_EXIT_CODE", "value": "3"}]),
            ),
        )
        .await?;
    eventually(
        "the unknown image's pod in ImagePullBackOff",
        WAIT,
        async || {
            let list = pods
                .list(&ListParams::default().labels("app=unknown"))
                .await?;
            Ok(list
                .items
                .iter()
                .any(|p| waiting_reason(p).as_deref() == Some("ImagePullBackOff"))
                .then_some(()))
        },
    )
    .await?;
    let crashed = eventually(
        "the crashing pod restarted twice, in CrashLoopBackOff",
        WAIT,
        async || {
            let list = pods
                .list(&ListParams::default().labels("app=crash"))
                .await?;
            Ok(list.items.into_iter().find(|p| {
                let status = p
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .and_then(|c| c.first());
                waiting_reason(p).as_deref() == Some("CrashLoopBackOff")
                    && status.is_some_and(|s| s.restart_count >= 2 && !s.ready)
            }))
        },
    )
    .await?;
    let last_exit = crashed
        .status
        .and_then(|s| s.container_statuses)
        .and_then(|c| c.into_iter().next())
        .and_then(|c| c.last_state)
        .and_then(|s| s.terminated)
        .map(|t| t.exit_code);
    assert_eq!(last_exit, Some(3), "the last run's exit code is reported");

    // Deleting stops the processes (SIGTERM) and removes the pods.
    for name in ["web", "unknown", "crash"] {
        deployments
            .delete(name, &DeleteParams::background())
            .await?;
    }
    eventually("every pod gone", WAIT, async || {
        Ok(pods
            .list(&ListParams::default())
            .await?
            .items
            .is_empty()
            .then_some(()))
    })
    .await?;
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} stopped with its pod"
        );
    }

    let node = Api::<Node>::all(client.clone()).get("local-node-0").await?;
    let ready = node
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    assert!(ready, "the Node stays Ready");
    assert!(
        node.spec
            .and_then(|s| s.taints)
            .unwrap_or_default()
            .is_empty(),
        "the Node has no taint"
    );
    Api::<Lease>::namespaced(client, "kube-node-lease")
        .get("local-node-0")
        .await?;
    agent.stop().await;
    Ok(())
}
