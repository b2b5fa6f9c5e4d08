//! Two operator replicas are safe, and the operator's probes tell the truth.
//!
//! Leader election against a real kube-apiserver: of two candidates for one Lease exactly
//! one leads; a release hands over at once; a leader that stops renewing is replaced once
//! the lease duration has passed; a leader cut off from the apiserver gives up before
//! that. The probe server, in process: `/readyz` stays 503 with a reason until the CRDs
//! are served, leadership is settled and the caches are synced; `/metrics` shows the
//! operator's metrics.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use sallyport_e2e::controlplane::{ControlPlane, Mode};
use sallyport_e2e::manifests::install_crds;
use sallyport_operator::leader::{
    LeaderElection, LeaderError, LeaderStatus, Leadership, LeaseTiming,
};
use sallyport_operator::metrics::Metrics;
use sallyport_operator::probes::{self, ProbeServer, Readiness};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const LEASE: &str = "sallyport-operator";

/// Short timings, so hand-overs take seconds; still roomy for a busy 2-core machine.
const TIMING: LeaseTiming = LeaseTiming {
    lease_duration: Duration::from_secs(3),
    renew_deadline: Duration::from_secs(2),
    retry_period: Duration::from_millis(400),
};

/// Slack for scheduling and apiserver latency on a busy machine.
const SLACK: Duration = Duration::from_secs(5);

async fn control_plane() -> Result<&'static ControlPlane, Box<dyn std::error::Error>> {
    Ok(ControlPlane::shared(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        Mode::ApiServer,
    )?)
}

fn candidate(
    client: &kube::Client,
    namespace: &str,
    identity: &str,
) -> Result<Arc<LeaderElection>, LeaderError> {
    Ok(Arc::new(LeaderElection::new(
        client.clone(),
        namespace,
        LEASE,
        identity,
        TIMING,
    )?))
}

type Acquiring = JoinHandle<Result<Leadership, LeaderError>>;

fn start_acquiring(election: &Arc<LeaderElection>) -> Acquiring {
    let election = election.clone();
    tokio::spawn(async move { election.acquire().await })
}

/// Starts both candidates at once; returns the winner's index and leadership, and the
/// loser's still-running acquisition.
async fn race(
    candidates: [&Arc<LeaderElection>; 2],
) -> Result<(usize, Leadership, Acquiring), Box<dyn std::error::Error>> {
    let (mut first, mut second) = (
        start_acquiring(candidates[0]),
        start_acquiring(candidates[1]),
    );
    let outcome = tokio::time::timeout(SLACK, async {
        tokio::select! {
            won = &mut first => (0, won, second),
            won = &mut second => (1, won, first),
        }
    })
    .await;
    let (winner, won, loser) = outcome.map_err(|_| "neither candidate acquired the Lease")?;
    Ok((winner, won??, loser))
}

async fn holder(leases: &Api<Lease>) -> Result<Option<String>, kube::Error> {
    Ok(leases
        .get(LEASE)
        .await?
        .spec
        .and_then(|s| s.holder_identity))
}

/// Waits for the loser's acquisition, for at most `bound`; returns it and how long it took.
async fn acquired_within(
    loser: Acquiring,
    bound: Duration,
) -> Result<(Leadership, Duration), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let leadership = tokio::time::timeout(bound, loser)
        .await
        .map_err(|_| format!("the other candidate did not take over within {bound:?}"))???;
    Ok((leadership, started.elapsed()))
}

#[tokio::test]
async fn exactly_one_of_two_candidates_leads_and_a_release_hands_over_at_once() -> TestResult {
    let control_plane = control_plane().await?;
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace("lease-release").await?;
    let leases = Api::<Lease>::namespaced(client.clone(), &namespace);
    let candidates = [
        candidate(&client, &namespace, "operator-a")?,
        candidate(&client, &namespace, "operator-b")?,
    ];

    let (winner, leadership, loser) = race([&candidates[0], &candidates[1]]).await?;
    let other = 1 - winner;
    let (winner_id, other_id) = (candidates[winner].identity(), candidates[other].identity());
    assert_eq!(holder(&leases).await?.as_deref(), Some(winner_id));

    // The other keeps standing by while the leader renews, and knows who leads.
    tokio::time::sleep(TIMING.lease_duration + TIMING.retry_period).await;
    assert!(!loser.is_finished(), "both candidates lead");
    assert!(!leadership.is_lost());
    assert_eq!(
        *candidates[other].status().borrow(),
        LeaderStatus::Following {
            leader: winner_id.to_owned()
        }
    );
    assert_eq!(*candidates[winner].status().borrow(), LeaderStatus::Leading);
    let transitions = leases
        .get(LEASE)
        .await?
        .spec
        .and_then(|s| s.lease_transitions);

    // A release clears the holder: the other takes over at its next attempt.
    leadership.release().await?;
    assert_eq!(*candidates[winner].status().borrow(), LeaderStatus::Ended);
    let bound = TIMING.retry_period.mul_f64(1.2) + SLACK;
    let (successor, took) = acquired_within(loser, bound).await?;
    assert!(
        took < TIMING.lease_duration,
        "took over after {took:?}, as if the Lease had expired instead of being released"
    );
    let lease = leases.get(LEASE).await?.spec.unwrap_or_default();
    assert_eq!(lease.holder_identity.as_deref(), Some(other_id));
    assert_eq!(
        lease.lease_transitions,
        transitions.map(|t| t + 1),
        "a hand-over is a transition"
    );
    successor.release().await?;
    assert_eq!(holder(&leases).await?, None);
    Ok(())
}

#[tokio::test]
async fn a_leader_that_stops_renewing_is_replaced_after_the_lease_duration() -> TestResult {
    let control_plane = control_plane().await?;
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace("lease-expiry").await?;
    let leases = Api::<Lease>::namespaced(client.clone(), &namespace);
    let candidates = [
        candidate(&client, &namespace, "operator-a")?,
        candidate(&client, &namespace, "operator-b")?,
    ];
    let (winner, leadership, loser) = race([&candidates[0], &candidates[1]]).await?;
    // Let it renew a few times, then stop renewing without releasing (a crash).
    tokio::time::sleep(TIMING.retry_period * 3).await;
    drop(leadership);

    let bound = TIMING.lease_duration + TIMING.retry_period * 2 + SLACK;
    let (successor, took) = acquired_within(loser, bound).await?;
    // The last renewal was sent at most a retry period and a slow request before the drop.
    let earliest = TIMING.lease_duration - TIMING.retry_period - Duration::from_secs(1);
    assert!(
        took >= earliest,
        "took over after {took:?}, before the lease could have expired ({earliest:?})"
    );
    assert_eq!(
        holder(&leases).await?.as_deref(),
        Some(candidates[1 - winner].identity())
    );
    successor.release().await?;
    Ok(())
}

#[tokio::test]
async fn a_leader_loses_leadership_when_the_lease_is_taken_or_unreachable() -> TestResult {
    let control_plane = control_plane().await?;
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace("lease-lost").await?;
    let leases = Api::<Lease>::namespaced(client.clone(), &namespace);

    // 1. Someone else writes the Lease: the leader notices at its next renewal.
    let leader = candidate(&client, &namespace, "operator-a")?;
    let leadership = tokio::time::timeout(SLACK, leader.acquire()).await??;
    let intruder = json!({"spec": {"holderIdentity": "intruder"}});
    leases
        .patch(LEASE, &PatchParams::default(), &Patch::Merge(&intruder))
        .await?;
    tokio::time::timeout(TIMING.retry_period * 2 + SLACK, leadership.lost())
        .await
        .map_err(|_| "the leader did not notice that another holds the Lease")?;
    assert_eq!(*leader.status().borrow(), LeaderStatus::Ended);
    // Releasing a lost leadership leaves the other holder alone.
    leadership.release().await?;
    assert_eq!(holder(&leases).await?.as_deref(), Some("intruder"));

    // 2. The apiserver becomes unreachable: the leader gives up by the renew deadline,
    // before anyone else may take over (lease duration).
    let proxy = CuttableProxy::start(control_plane.kubeconfig_path()).await?;
    let cut_off_namespace = control_plane.create_namespace("lease-cut").await?;
    let leader = candidate(&proxy.client, &cut_off_namespace, "operator-a")?;
    let leadership = tokio::time::timeout(SLACK, leader.acquire()).await??;
    tokio::time::sleep(TIMING.retry_period * 2).await;
    assert!(!leadership.is_lost(), "lost leadership while connected");
    let cut = Instant::now();
    proxy.cut.cancel();
    tokio::time::timeout(TIMING.renew_deadline + SLACK, leadership.lost())
        .await
        .map_err(|_| "the leader kept leading without renewing")?;
    let gave_up = cut.elapsed();
    assert!(
        gave_up <= TIMING.renew_deadline + Duration::from_secs(1),
        "gave up after {gave_up:?}, later than the renew deadline {:?}",
        TIMING.renew_deadline
    );
    assert!(
        leadership.release().await.is_ok(),
        "a lost leadership releases nothing"
    );
    Ok(())
}

#[tokio::test]
async fn the_probe_server_is_honest_about_readiness_and_serves_metrics() -> TestResult {
    let control_plane = control_plane().await?;
    let client = control_plane.client().await?;
    let namespace = control_plane.create_namespace("probes").await?;
    let readiness = Readiness::new();
    let metrics = Metrics::new()?;
    let server =
        ProbeServer::bind("127.0.0.1:0".parse()?, readiness.clone(), metrics.clone()).await?;
    let address = server.local_addr()?;
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(server.serve(shutdown.clone()));

    let (status, body) = get(address, "/livez").await?;
    assert_eq!(status, 200, "{body}");
    // 1. The CRDs: the operator checks the apiserver for them.
    expect_not_ready(address, "CustomResourceDefinitions").await?;
    install_crds(&client).await?;
    assert!(
        probes::wait_until_crds_served(&client, Duration::from_millis(200), &shutdown).await,
        "the CRDs were not found served"
    );
    readiness.set_crds_served();

    // 2. Leadership, from a real election.
    expect_not_ready(address, "leadership is not settled").await?;
    let election = candidate(&client, &namespace, "operator-a")?;
    let following = tokio::spawn(probes::follow_leadership(
        election.status(),
        readiness.clone(),
        metrics.clone(),
    ));
    let leadership = tokio::time::timeout(SLACK, election.acquire()).await??;
    let leading = async {
        while readiness.report().checks.leadership != "leading" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(SLACK, leading).await?;

    // 3. The caches.
    expect_not_ready(address, "caches").await?;
    readiness.set_caches_synced();
    let (status, body) = get(address, "/readyz").await?;
    assert_eq!(status, 200, "{body}");
    let report: Value = serde_json::from_str(&body)?;
    assert_eq!(report["ready"], true);
    assert_eq!(report["role"], "leader");

    // /metrics carries every metric, the leader gauge set by the election.
    drop(metrics.reconcile_started("PublishedApp"));
    metrics.reconcile_failed("PublishedApp", "api_error");
    let (status, text) = get(address, "/metrics").await?;
    assert_eq!(status, 200, "{text}");
    for name in [
        "sallyport_operator_reconciles_total{controller=\"PublishedApp\"} 1",
        "sallyport_operator_reconcile_failures_total{controller=\"PublishedApp\",error=\"api_error\"} 1",
        "sallyport_operator_reconcile_duration_seconds_bucket",
        "sallyport_operator_leader 1",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }

    // Releasing ends readiness and the gauge; shutdown stops the listener.
    leadership.release().await?;
    drop(election);
    tokio::time::timeout(SLACK, following).await??;
    let (status, _) = get(address, "/readyz").await?;
    assert_eq!(status, 503);
    let (_, text) = get(address, "/metrics").await?;
    assert!(text.contains("sallyport_operator_leader 0"), "{text}");
    shutdown.cancel();
    tokio::time::timeout(SLACK, serving).await??;
    assert!(
        TcpStream::connect(address).await.is_err(),
        "still listening after shutdown"
    );
    Ok(())
}

/// `/readyz` answers 503, not ready because of `expected`.
async fn expect_not_ready(
    address: SocketAddr,
    expected: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let (status, body) = get(address, "/readyz").await?;
    let report: Value = serde_json::from_str(&body)?;
    let reason = report["reason"].as_str().unwrap_or_default();
    if status != 503 || report["ready"] != false || !reason.contains(expected) {
        return Err(format!("expected 503 because of {expected:?}, got {status}: {body}").into());
    }
    Ok(())
}

/// `GET path` over a fresh connection: the status code and the body.
async fn get(address: SocketAddr, path: &str) -> Result<(u16, String), Box<dyn std::error::Error>> {
    let mut stream = TcpStream::connect(address).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: probes\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status code in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// A TCP proxy to the apiserver that the test can cut: afterwards every connection,
/// open or new, is dropped at once.
struct CuttableProxy {
    /// A client that talks to the apiserver through the proxy.
    client: kube::Client,
    /// Cancel to cut the apiserver off.
    cut: CancellationToken,
}

impl CuttableProxy {
    async fn start(kubeconfig: &Path) -> Result<Self, Box<dyn std::error::Error>> {
        let mut config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(kubeconfig)?,
            &KubeConfigOptions::default(),
        )
        .await?;
        let upstream = config
            .cluster_url
            .authority()
            .ok_or("the kubeconfig's server has no host:port")?
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        // Same host (the serving certificate is for 127.0.0.1), another port.
        config.cluster_url = format!("https://127.0.0.1:{port}").parse()?;
        let cut = CancellationToken::new();
        let cut_accepting = cut.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if cut_accepting.is_cancelled() {
                    continue;
                }
                let (upstream, cut) = (upstream.clone(), cut_accepting.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = cut.cancelled() => {}
                    }
                });
            }
        });
        Ok(Self {
            client: kube::Client::try_from(config)?,
            cut,
        })
    }
}
