//! Connector auto-update in the cluster, with real connectors: the e2e node agent runs
//! the connector Deployment's pods as local `sallyport-connector` processes while
//! kube-controller-manager rolls the Deployment.
//!
//! A restarted operator with a new `--connector-image` tag (what `helm upgrade` does)
//! rolls a 3-connector group one connector at a time under load, with never more than
//! one extra pod, never fewer than three ready connectors, and not one failed request;
//! the group's status shows the versions and ends Complete / UpToDate. A version whose
//! connector cannot start halts the rollout after one new pod, the old connectors keep
//! serving and the `UpToDate` condition says `RolloutHalted`; going back to a good
//! version completes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use sallyport_api::ConnectorGroup;
use sallyport_e2e::controlplane::Mode;
use sallyport_e2e::dataplane::{
    FLEET_TUNNEL_HOST, Fleet, LoadOutcome, LoadTarget, ProxyOptions, StepError, TrafficBackend,
    eventually, https_get, run_load,
};
use sallyport_e2e::node_agent::{
    NODE_LABEL, NODE_LABEL_VALUE, NodeAgent, NodeAgentConfig, PortValue, Program, waiting_reason,
};
use sallyport_e2e::process::{start_operator, workspace_binary};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

type TestResult = Result<(), StepError>;

const REPOSITORY: &str = "ghcr.io/sallyport-dev/sallyport-connector";
const GOOD: &str = "0.1.0";
const NEXT: &str = "0.2.0";
const BROKEN: &str = "0.3.0-broken";
const GROUP: &str = "dc";
const REPLICAS: usize = 3;
const APP_HOST: &str = "app.rollout.test";
/// Generous for a busy 2-core machine: each step of a rollout starts a connector,
/// registers it, waits for its tunnels and `minReadySeconds`, and drains an old one.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(300);
const WAIT: Duration = Duration::from_secs(120);
/// How long the halted rollout is watched for a second new pod or a lost old one.
const HALT_WATCH: Duration = Duration::from_secs(20);

fn image(version: &str) -> String {
    format!("{REPOSITORY}:{version}")
}

/// One look at the group's connector pods.
#[derive(Debug, Clone)]
struct Sample {
    /// Pods not being deleted, by version: (all, ready).
    live: BTreeMap<String, (usize, usize)>,
    /// Pods being deleted.
    terminating: usize,
    /// The group's `status.rollout.phase`, if any.
    phase: Option<String>,
}

impl Sample {
    fn live_total(&self) -> usize {
        self.live.values().map(|(all, _)| all).sum()
    }

    fn ready_total(&self) -> usize {
        self.live.values().map(|(_, ready)| ready).sum()
    }
}

fn version_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.as_deref())
        .and_then(|i| i.rsplit_once(':'))
        .map(|(_, tag)| tag.to_owned())
        .unwrap_or_default()
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

struct Cluster {
    pods: Api<Pod>,
    groups: Api<ConnectorGroup>,
}

impl Cluster {
    async fn connector_pods(&self) -> Result<Vec<Pod>, StepError> {
        let selector = format!(
            "app.kubernetes.io/name=sallyport-connector,app.kubernetes.io/instance={GROUP}"
        );
        Ok(self
            .pods
            .list(&ListParams::default().labels(&selector))
            .await?
            .items)
    }

    /// The group's status as JSON (read loosely: only the fields the test names).
    async fn group_status(&self) -> Result<Value, StepError> {
        let group = self.groups.get(GROUP).await?;
        Ok(serde_json::to_value(&group.status)?)
    }

    async fn sample(&self) -> Result<Sample, StepError> {
        let pods = self.connector_pods().await?;
        let mut live: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        let mut terminating = 0;
        for pod in &pods {
            if pod.metadata.deletion_timestamp.is_some() {
                terminating += 1;
                continue;
            }
            let entry = live.entry(version_of(pod)).or_default();
            entry.0 += 1;
            if is_ready(pod) {
                entry.1 += 1;
            }
        }
        let phase = self
            .group_status()
            .await
            .ok()
            .and_then(|s| s["rollout"]["phase"].as_str().map(str::to_owned));
        Ok(Sample {
            live,
            terminating,
            phase,
        })
    }

    /// Waits until every connector pod runs `version`, ready, `REPLICAS` of them, none
    /// other, and the group reports the rollout Complete and UpToDate.
    async fn wait_complete(&self, version: &str, within: Duration) -> Result<Value, StepError> {
        eventually(
            &format!("{REPLICAS} ready connectors of {version} and the rollout Complete"),
            within,
            async || {
                let sample = self.sample().await?;
                let only = sample.live.len() == 1
                    && sample.live.get(version) == Some(&(REPLICAS, REPLICAS))
                    && sample.terminating == 0;
                if !only {
                    return Ok(None);
                }
                let status = self.group_status().await?;
                let up_to_date = condition(&status, "UpToDate");
                let complete = status["rollout"]["phase"] == "Complete"
                    && status["rollout"]["targetVersion"] == version
                    && up_to_date.as_ref().is_some_and(|c| c["status"] == "True");
                Ok(complete.then_some(status))
            },
        )
        .await
    }
}

fn condition(status: &Value, type_: &str) -> Option<Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

/// Samples the group's pods every 250 ms until stopped; returns every sample.
fn sampler(cluster: Arc<Cluster>, stop: Arc<AtomicBool>) -> JoinHandle<Vec<Sample>> {
    tokio::spawn(async move {
        let mut samples = Vec::new();
        // Bounded even if never stopped: ten minutes of samples.
        for _ in 0..2400 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            if let Ok(sample) = cluster.sample().await {
                samples.push(sample);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        samples
    })
}

/// Runs load in 5 s rounds through every proxy replica until stopped.
fn load(targets: Vec<LoadTarget>, stop: Arc<AtomicBool>) -> JoinHandle<Vec<LoadOutcome>> {
    tokio::spawn(async move {
        let mut outcomes = Vec::new();
        // Bounded even if never stopped: ten minutes of rounds.
        for _ in 0..120 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let until = tokio::time::Instant::now() + Duration::from_secs(5);
            outcomes.extend(run_load(&targets, 4, until, Duration::from_secs(15)).await);
        }
        outcomes
    })
}

fn failures(outcomes: &[LoadOutcome]) -> Vec<&LoadOutcome> {
    outcomes.iter().filter(|o| o.result.is_err()).collect()
}

/// The invariants of a one-at-a-time rollout of `REPLICAS` connectors, checked on every
/// sample: at most one pod beyond the group's size, never fewer ready than its size.
fn check_one_at_a_time(samples: &[Sample]) -> Result<(), String> {
    for (index, sample) in samples.iter().enumerate() {
        if sample.live_total() > REPLICAS + 1 {
            return Err(format!(
                "sample {index}: {} pods not being deleted (more than one extra): {sample:?}",
                sample.live_total()
            ));
        }
        if sample.ready_total() < REPLICAS {
            return Err(format!(
                "sample {index}: only {} ready connectors: {sample:?}",
                sample.ready_total()
            ));
        }
    }
    Ok(())
}

fn connector_binary() -> Result<PathBuf, StepError> {
    Ok(workspace_binary("sallyport-connector")?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_upgrade_rolls_connectors_one_at_a_time_and_a_bad_version_halts() -> TestResult
{
    let supervisor = Path::new(env!("CARGO_BIN_EXE_sallyport-cluster"));
    let first_image = image(GOOD);
    let mut fleet = Fleet::start_in(
        supervisor,
        Mode::WithControllers,
        "rollout",
        &["proxy-a", "proxy-b"],
        &["--connector-image", &first_image],
        &ProxyOptions::default(),
    )
    .await?;
    let fleet_addresses = fleet
        .addresses()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let connector = Program::new(connector_binary()?);
    let work = tempfile::tempdir()?;
    let config = NodeAgentConfig::new(
        "local-node-0",
        fleet.bed.control_plane.kubeconfig_path(),
        work.path(),
    )
    .image(image(GOOD), connector.clone())
    .image(image(NEXT), connector)
    .image(image(BROKEN), Program::new("/bin/false"))
    // What cluster DNS gives the proxy Service's name in a cluster.
    .env("SALLYPORT_FLEET_ADDRESS", fleet_addresses)
    // A bounded drain: an old connector with nothing in flight exits at once anyway.
    .env("SALLYPORT_DRAIN_TIMEOUT", "10s")
    .env("RUST_LOG", "info,kube=warn")
    .port_env("metrics", "SALLYPORT_METRICS_ADDRESS", PortValue::Address);
    let agent = NodeAgent::start(fleet.bed.client.clone(), config).await?;
    let namespace = fleet.bed.namespace.clone();
    let with_logs = |error: StepError| -> StepError {
        format!(
            "{error}\nconnector logs:\n{}",
            agent.log_tails(&namespace, 15)
        )
        .into()
    };

    let backend = TrafficBackend::start("app").await?;
    fleet
        .create_group(
            GROUP,
            json!({"deployment": {
                "replicas": REPLICAS,
                "nodeSelector": {NODE_LABEL: NODE_LABEL_VALUE},
            }}),
        )
        .await?;
    let app_ca = fleet
        .publish_app("app", APP_HOST, &backend.url(), GROUP)
        .await?;
    let cluster = Arc::new(Cluster {
        pods: Api::namespaced(fleet.bed.client.clone(), &namespace),
        groups: Api::namespaced(fleet.bed.client.clone(), &namespace),
    });
    let status = cluster
        .wait_complete(GOOD, ROLLOUT_TIMEOUT)
        .await
        .map_err(with_logs)?;
    eprintln!("group running {GOOD}: {}", status["versions"]);
    let addresses = fleet.addresses();
    eventually("the app served through every replica", WAIT, async || {
        for address in &addresses {
            if https_get(*address, APP_HOST, &app_ca, "/").await?.status != 200 {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await
    .map_err(with_logs)?;
    let targets = LoadTarget::per_replica(&addresses, APP_HOST, &app_ca, "/", "backend=app");

    // The operator's version changes: it restarts with a new --connector-image tag.
    let stop = Arc::new(AtomicBool::new(false));
    let samples = sampler(cluster.clone(), stop.clone());
    let traffic = load(targets.clone(), stop.clone());
    fleet.operator.terminate()?;
    fleet.operator.wait_for_exit(Duration::from_secs(15)).await;
    let next_image = image(NEXT);
    fleet.operator = start_operator(
        &fleet.bed.operator_kubeconfig,
        &fleet.bed.operator_namespace,
        &[
            "--tunnel-hostname",
            FLEET_TUNNEL_HOST,
            "--connector-image",
            &next_image,
        ],
    )?;
    let done = cluster.wait_complete(NEXT, ROLLOUT_TIMEOUT).await;
    stop.store(true, Ordering::SeqCst);
    let samples = samples.await?;
    let outcomes = traffic.await?;
    let status = done.map_err(with_logs)?;
    let failed = failures(&outcomes);
    eprintln!(
        "rollout {GOOD} -> {NEXT}: {} samples, {} requests, {} failed; final status {status}",
        samples.len(),
        outcomes.len(),
        failed.len()
    );
    for failure in failed.iter().take(10) {
        eprintln!("failed: {:?}", failure.result);
    }
    eprintln!(
        "during the rollout: at most {} pods not being deleted, at least {} ready, at most {} being deleted",
        samples
            .iter()
            .map(Sample::live_total)
            .max()
            .unwrap_or_default(),
        samples
            .iter()
            .map(Sample::ready_total)
            .min()
            .unwrap_or_default(),
        samples
            .iter()
            .map(|s| s.terminating)
            .max()
            .unwrap_or_default(),
    );
    check_one_at_a_time(&samples)?;
    assert!(
        samples
            .iter()
            .any(|s| s.live.contains_key(GOOD) && s.live.contains_key(NEXT)),
        "the rollout was seen with both versions running"
    );
    assert!(
        samples
            .iter()
            .any(|s| s.phase.as_deref() == Some("Progressing")),
        "the group reported the rollout Progressing: {:?}",
        samples.iter().map(|s| &s.phase).collect::<BTreeSet<_>>()
    );
    assert!(
        failed.is_empty(),
        "{} requests failed during the rollout",
        failed.len()
    );
    assert!(outcomes.len() >= 50, "the load ran during the rollout");
    assert_eq!(
        status["versions"],
        json!([{"version": NEXT, "connectors": REPLICAS, "ready": REPLICAS}]),
        "status.versions after the rollout"
    );

    // A version whose connector exits at once: one new pod crash loops, nothing more.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(targets.clone(), stop.clone());
    cluster
        .groups
        .patch(
            GROUP,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"version": BROKEN}})),
        )
        .await?;
    let halted = eventually(
        "the rollout to the broken version Halted after one crash-looping pod",
        WAIT,
        async || {
            let pods = cluster.connector_pods().await?;
            let broken: Vec<&Pod> = pods.iter().filter(|p| version_of(p) == BROKEN).collect();
            let crash_looping = broken.len() == 1
                && waiting_reason(broken[0]).as_deref() == Some("CrashLoopBackOff");
            let status = cluster.group_status().await?;
            let halted = status["rollout"]["phase"] == "Halted"
                && condition(&status, "UpToDate")
                    .is_some_and(|c| c["status"] == "False" && c["reason"] == "RolloutHalted");
            Ok((crash_looping && halted).then_some(status))
        },
    )
    .await;
    let halted = match halted {
        Ok(status) => status,
        Err(error) => {
            stop.store(true, Ordering::SeqCst);
            return Err(with_logs(error));
        }
    };
    let up_to_date = condition(&halted, "UpToDate").unwrap_or_default();
    eprintln!("halted: {up_to_date}; rollout {}", halted["rollout"]);
    let message = up_to_date["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("CrashLoopBackOff"),
        "the UpToDate condition says why the rollout halted: {message:?}"
    );
    // Watched for a while: the old connectors stay, ready, and no second new pod comes.
    let watch_until = tokio::time::Instant::now() + HALT_WATCH;
    while tokio::time::Instant::now() < watch_until {
        let sample = cluster.sample().await?;
        let broken = sample.live.get(BROKEN).copied().unwrap_or_default();
        assert_eq!(
            broken.0, 1,
            "exactly one pod of the broken version: {sample:?}"
        );
        assert_eq!(broken.1, 0, "the broken pod is never ready: {sample:?}");
        assert_eq!(
            sample.live.get(NEXT),
            Some(&(REPLICAS, REPLICAS)),
            "the old connectors stay and serve: {sample:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Back to a good version: the rollout completes.
    cluster
        .groups
        .patch(
            GROUP,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"version": NEXT}})),
        )
        .await?;
    let done = cluster.wait_complete(NEXT, ROLLOUT_TIMEOUT).await;
    stop.store(true, Ordering::SeqCst);
    let outcomes = traffic.await?;
    done.map_err(with_logs)?;
    let failed = failures(&outcomes);
    for failure in failed.iter().take(10) {
        eprintln!("failed: {:?}", failure.result);
    }
    assert!(
        failed.is_empty(),
        "{} of {} requests failed while the rollout was halted",
        failed.len(),
        outcomes.len()
    );
    assert!(
        outcomes.len() >= 50,
        "the load ran while the rollout was halted"
    );
    agent.stop().await;
    Ok(())
}
