//! S8, operator part: a real control plane, the operator as a real (release) process, and
//! N PublishedApps applied at once, timed until every app is Ready and the published
//! fleet configuration holds every route.
//!
//! The steps:
//!
//! 1. a control plane (etcd and kube-apiserver on loopback) through the `sallyport-cluster`
//!    supervisor, the CRDs, two namespaces;
//! 2. one ConnectorGroup, a wildcard kubernetes.io/tls Secret and one Connector reported
//!    connected, so apps can become Ready;
//! 3. the operator; it counts as up once the group is Ready and the (empty) fleet
//!    configuration is published;
//! 4. watches on the apps and on the fleet configuration ConfigMap, then N server-side
//!    applies, at most `concurrency` in flight;
//! 5. the clock runs from the first apply until every app has `Ready=True` and until the
//!    ConfigMap holds all N routes; every wait is bounded.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use sallyport_api::fleet_config::STORAGE_KEY;
use sallyport_api::{Connector, ConnectorGroup, FleetConfig, PublishedApp};
use sallyport_e2e::controlplane::{ControlPlane, Mode};
use sallyport_e2e::manifests::install_crds;
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;

use super::{apiserver_requests, fixtures};
use crate::error::BenchError;
use crate::operator_process::{OperatorOptions, OperatorProcess};
use crate::procfs::{self, Memory};
use crate::stats::{quantile, seconds};

/// The operator's namespace.
pub const OPERATOR_NAMESPACE: &str = "sallyport-system";
/// The namespace of the group, the Secret, the Connector and the apps.
pub const APPS_NAMESPACE: &str = "bench-apps";
/// The ConfigMap the operator publishes the fleet configuration in.
pub const FLEET_CONFIG: &str = "sallyport-fleet-config";
/// The field manager of the benchmark's server-side applies.
const FIELD_MANAGER: &str = "sallyport-bench";
/// Bound on the operator coming up (PKI, leader election, caches, first reconciles).
const SETUP_TIMEOUT: Duration = Duration::from_secs(180);
/// How often progress is re-checked while waiting (watch updates wake the wait earlier).
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// How the operator part runs.
#[derive(Clone, Debug)]
pub struct OperatorBenchOptions {
    /// PublishedApps to apply.
    pub apps: usize,
    /// Applies in flight at once.
    pub concurrency: usize,
    /// Bound from the first apply until all are applied, Ready and published.
    pub timeout: Duration,
    /// The `sallyport-cluster` executable; by default next to this benchmark's.
    pub cluster_bin: Option<PathBuf>,
    /// The `sallyport-operator` executable; by default next to this benchmark's.
    pub operator_bin: Option<PathBuf>,
    /// Where to keep the operator's log; by default a temporary file, kept on failure.
    pub operator_log: Option<PathBuf>,
    /// `RUST_LOG` for the operator.
    pub operator_log_filter: String,
}

/// Per-app latency from the app's apply returning to the app being seen Ready.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Latency {
    /// Median, seconds.
    pub p50_s: f64,
    /// 99th percentile, seconds.
    pub p99_s: f64,
    /// Slowest app, seconds.
    pub max_s: f64,
}

/// What the operator part measured. Times are seconds from the first apply unless
/// said otherwise.
#[derive(Clone, Debug, Serialize)]
pub struct OperatorReport {
    /// PublishedApps applied.
    pub apps: usize,
    /// Applies in flight at once.
    pub concurrency: usize,
    /// The `sallyport-operator` executable measured.
    pub operator_binary: String,
    /// Control plane start (etcd, kube-apiserver), seconds; not part of the scenario.
    pub control_plane_start_s: f64,
    /// Operator process start until its group is Ready and the first fleet configuration
    /// is published, seconds; not part of the scenario.
    pub operator_up_s: f64,
    /// Until the last apply returned.
    pub all_applied_s: f64,
    /// Applies per second over that time.
    pub apply_rate_per_s: f64,
    /// Until every app was seen with `Ready=True`: the S8 number.
    pub all_ready_s: f64,
    /// Until the fleet configuration ConfigMap held every app's route.
    pub config_all_routes_s: f64,
    /// Per app: its apply returning to it being seen Ready.
    pub ready_latency: Latency,
    /// Versions of the fleet configuration ConfigMap seen from the first apply until it
    /// held every route (how well the operator coalesces a burst).
    pub config_writes: usize,
    /// Size of the stored (gzip) configuration with every route.
    pub config_gzip_bytes: usize,
    /// The operator's memory at the end (peak and current resident set).
    pub operator_memory: Memory,
    /// Where the CPU went during the burst.
    pub cpu: BurstCpu,
    /// Requests the apiserver served during the burst (from everyone: the operator, this
    /// benchmark's applies and watches, the apiserver's own controllers), by
    /// `"<resource>[/<subresource>] <VERB>"`.
    pub apiserver_requests: BTreeMap<String, u64>,
    /// Their sum.
    pub apiserver_requests_total: u64,
}

/// CPU time (user and system) used from the first apply until both waits ended, by
/// process, seconds; with the wall time of that span, to compare with the cores.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct BurstCpu {
    /// The span, seconds.
    pub wall_s: f64,
    /// `sallyport-operator`.
    pub operator_s: f64,
    /// `kube-apiserver`, when found.
    pub kube_apiserver_s: Option<f64>,
    /// `etcd`, when found.
    pub etcd_s: Option<f64>,
    /// This benchmark (its applies, watches and decoding).
    pub bench_s: f64,
}

/// The executables the operator part starts.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `sallyport-cluster`, the control plane's supervisor.
    pub cluster: PathBuf,
    /// `sallyport-operator`.
    pub operator: PathBuf,
}

impl Binaries {
    /// The paths `options` gives, else the executables next to this benchmark's own
    /// (cargo puts them all in `target/<profile>/`); fails when one does not exist.
    pub fn locate(options: &OperatorBenchOptions) -> Result<Self, BenchError> {
        Ok(Self {
            cluster: locate(
                options.cluster_bin.as_deref(),
                "sallyport-cluster",
                "--cluster-bin",
            )?,
            operator: locate(
                options.operator_bin.as_deref(),
                "sallyport-operator",
                "--operator-bin",
            )?,
        })
    }
}

/// Runs the operator part with `binaries`; the control plane and the operator are
/// stopped before it returns, whatever the outcome.
pub fn run(
    options: &OperatorBenchOptions,
    binaries: &Binaries,
) -> Result<OperatorReport, BenchError> {
    let (cluster_bin, operator_bin) = (&binaries.cluster, &binaries.operator);
    let log_dir = tempfile::Builder::new()
        .prefix("sallyport-bench-")
        .tempdir()
        .map_err(BenchError::io(
            "creating a directory for the operator's log",
        ))?;
    let log = options
        .operator_log
        .clone()
        .unwrap_or_else(|| log_dir.path().join("operator.log"));

    eprintln!("S8 operator: starting a control plane (etcd, kube-apiserver) on loopback");
    let started = Instant::now();
    let control_plane = ControlPlane::start(cluster_bin, Mode::ApiServer)?;
    let control_plane_start = started.elapsed();
    eprintln!(
        "S8 operator: control plane up in {control_plane_start:.1?}: {}",
        control_plane.kubeconfig_path().display()
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(BenchError::io("starting the async runtime"))?;
    // The operator is started on this thread (inside `block_on`), which outlives it.
    let outcome = runtime.block_on(measure(
        &control_plane,
        operator_bin,
        &log,
        options,
        control_plane_start,
    ));
    drop(runtime);
    eprintln!("S8 operator: stopping the control plane");
    drop(control_plane);
    if outcome.is_err() && options.operator_log.is_none() {
        let kept = log_dir.keep();
        eprintln!(
            "S8 operator: the operator's log is kept in {}",
            kept.join("operator.log").display()
        );
    }
    outcome
}

/// `explicit`, else the executable `name` next to this benchmark's own (both live in
/// `target/<profile>/`).
fn locate(
    explicit: Option<&Path>,
    name: &'static str,
    flag: &'static str,
) -> Result<PathBuf, BenchError> {
    let path = match explicit {
        Some(path) => path.to_owned(),
        None => std::env::current_exe()
            .map_err(BenchError::CurrentExe)?
            .parent()
            .map(|dir| dir.join(name))
            .unwrap_or_else(|| PathBuf::from(name)),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(BenchError::BinaryNotFound { name, path, flag })
    }
}

async fn measure(
    control_plane: &ControlPlane,
    operator_bin: &Path,
    log: &Path,
    options: &OperatorBenchOptions,
    control_plane_start: Duration,
) -> Result<OperatorReport, BenchError> {
    let n = options.apps;
    let client = control_plane.client().await?;
    install_crds(&client).await?;
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let namespaces = Api::<Namespace>::all(client.clone());
    for name in [OPERATOR_NAMESPACE, APPS_NAMESPACE] {
        let namespace =
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        namespaces
            .patch(name, &apply, &Patch::Apply(&namespace))
            .await
            .map_err(BenchError::kube(format!("creating namespace {name}")))?;
    }

    // The group, its certificate and a connected connector, before the operator starts.
    let groups = Api::<ConnectorGroup>::namespaced(client.clone(), APPS_NAMESPACE);
    groups
        .patch(fixtures::GROUP, &apply, &Patch::Apply(fixtures::group()))
        .await
        .map_err(BenchError::kube("applying the ConnectorGroup"))?;
    Api::<Secret>::namespaced(client.clone(), APPS_NAMESPACE)
        .patch(
            fixtures::TLS_SECRET,
            &apply,
            &Patch::Apply(fixtures::wildcard_tls_secret()?),
        )
        .await
        .map_err(BenchError::kube("applying the wildcard TLS Secret"))?;
    let connectors = Api::<Connector>::namespaced(client.clone(), APPS_NAMESPACE);
    connectors
        .patch(
            fixtures::CONNECTOR,
            &apply,
            &Patch::Apply(fixtures::connector()),
        )
        .await
        .map_err(BenchError::kube("applying the Connector"))?;
    connectors
        .patch_status(
            fixtures::CONNECTOR,
            &PatchParams::default(),
            &Patch::Merge(fixtures::connector_connected()),
        )
        .await
        .map_err(BenchError::kube("reporting the Connector connected"))?;

    eprintln!("S8 operator: starting {}", operator_bin.display());
    let mut operator = OperatorProcess::start(&OperatorOptions {
        program: operator_bin.to_owned(),
        kubeconfig: control_plane.kubeconfig_path().to_owned(),
        namespace: OPERATOR_NAMESPACE.into(),
        extra_args: vec![
            "--default-oidc-issuer".into(),
            "https://login.example.com/".into(),
            // The Connector's tunnel entry (fixtures::connector_connected) is never renewed.
            "--tunnel-stale-after".into(),
            "24h".into(),
        ],
        log_filter: options.operator_log_filter.clone(),
        log: log.to_owned(),
    })?;
    let operator_started = Instant::now();
    let (config_sender, mut config) = watch::channel(ConfigProgress::default());
    tokio::spawn(track_config(
        Api::namespaced(client.clone(), OPERATOR_NAMESPACE),
        n,
        config_sender,
    ));
    let setup_deadline = operator_started + SETUP_TIMEOUT;
    poll_group_ready(&groups, &mut operator, setup_deadline).await?;
    wait_for(
        &mut config,
        "the first fleet configuration",
        setup_deadline,
        &mut operator,
        |c| c.writes > 0,
    )
    .await?;
    let operator_up = operator_started.elapsed();
    eprintln!(
        "S8 operator: operator up in {operator_up:.1?} (group Ready, configuration published)"
    );

    let apps = Api::<PublishedApp>::namespaced(client.clone(), APPS_NAMESPACE);
    let (ready_handle, mut ready) = {
        let (sender, receiver) = watch::channel(ReadyProgress::default());
        let handle = tokio::spawn(track_ready(apps.clone(), n, sender));
        (handle, receiver)
    };
    wait_for(
        &mut ready,
        "the watch of PublishedApps to start",
        setup_deadline,
        &mut operator,
        |r| r.synced,
    )
    .await?;

    // The scenario: from the first apply.
    eprintln!(
        "S8 operator: applying {n} PublishedApps, {} in flight",
        options.concurrency
    );
    let writes_before = config.borrow().writes;
    let control_plane_processes: Vec<(u32, String)> = control_plane
        .state_dir()
        .map(|dir| procfs::processes_mentioning(&dir.display().to_string()))
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, name)| name == "kube-apiserver" || name == "etcd")
        .collect();
    let control_plane_cpu = || {
        control_plane_processes
            .iter()
            .map(|(pid, name)| (name.clone(), procfs::cpu_time(*pid).ok()))
            .collect::<Vec<_>>()
    };
    let control_plane_cpu_before = control_plane_cpu();
    let requests_before = apiserver_requests::read(&client).await?;
    let bench_cpu_before = procfs::own_cpu_time()?;
    let operator_cpu_before = operator.cpu_time()?;
    let t0 = Instant::now();
    let deadline = t0 + options.timeout;
    let mut applied: HashMap<String, Instant> = HashMap::with_capacity(n);
    let applies = futures::stream::iter(0..n)
        .map(|i| {
            let (apps, apply) = (apps.clone(), apply.clone());
            async move {
                let name = fixtures::app_name(i);
                match apps
                    .patch(&name, &apply, &Patch::Apply(fixtures::app(i)))
                    .await
                {
                    Ok(_) => Ok((name, Instant::now())),
                    Err(source) => Err(BenchError::Kube {
                        what: format!("applying PublishedApp {name}"),
                        source,
                    }),
                }
            }
        })
        .buffer_unordered(options.concurrency);
    let applying = async {
        let mut applies = pin!(applies);
        while let Some(outcome) = applies.next().await {
            let (name, at) = outcome?;
            applied.insert(name, at);
        }
        Ok::<(), BenchError>(())
    };
    match tokio::time::timeout_at(deadline.into(), applying).await {
        Ok(outcome) => outcome?,
        Err(_) => {
            return Err(BenchError::Timeout {
                what: format!("applying {n} PublishedApps"),
                waited: options.timeout,
                progress: format!("{} applied", applied.len()),
            });
        }
    }
    let all_applied = t0.elapsed();
    eprintln!("S8 operator: all {n} applied in {all_applied:.1?}; waiting for Ready");

    let ready_progress = wait_for(
        &mut ready,
        &format!("all {n} PublishedApps Ready"),
        deadline,
        &mut operator,
        |r| r.all_ready_at.is_some(),
    )
    .await?;
    let all_ready = ready_progress
        .all_ready_at
        .map(|at| at.saturating_duration_since(t0))
        .unwrap_or_default();
    eprintln!(
        "S8 operator: all {n} Ready after {all_ready:.1?}; waiting for the fleet configuration"
    );
    let config_progress = wait_for(
        &mut config,
        &format!("a fleet configuration with all {n} routes"),
        deadline,
        &mut operator,
        |c| c.complete_at.is_some(),
    )
    .await?;
    let config_all_routes = config_progress
        .complete_at
        .map(|at| at.saturating_duration_since(t0))
        .unwrap_or_default();
    let wall = t0.elapsed();
    let operator_cpu = operator.cpu_time()?.saturating_sub(operator_cpu_before);
    let bench_cpu = procfs::own_cpu_time()?.saturating_sub(bench_cpu_before);
    let control_plane_cpu_after = control_plane_cpu();
    let component_cpu = |component: &str| {
        let used = control_plane_cpu_before
            .iter()
            .zip(&control_plane_cpu_after)
            .filter(|((name, _), _)| name == component)
            .map(|((_, before), (_, after))| {
                Some(after.as_ref()?.saturating_sub(*before.as_ref()?))
            })
            .collect::<Option<Vec<Duration>>>()?;
        (!used.is_empty()).then(|| seconds(used.iter().sum()))
    };
    let cpu = BurstCpu {
        wall_s: seconds(wall),
        operator_s: seconds(operator_cpu),
        kube_apiserver_s: component_cpu("kube-apiserver"),
        etcd_s: component_cpu("etcd"),
        bench_s: seconds(bench_cpu),
    };
    let operator_memory = operator.memory()?;
    let requests =
        apiserver_requests::growth(&requests_before, &apiserver_requests::read(&client).await?);

    let first_ready = match tokio::time::timeout(Duration::from_secs(10), ready_handle).await {
        Ok(Ok(first_ready)) => first_ready,
        _ => {
            return Err(BenchError::WatchEnded {
                what: "PublishedApps",
            });
        }
    };
    let latencies: Vec<Duration> = applied
        .iter()
        .filter_map(|(name, at)| Some(first_ready.get(name)?.saturating_duration_since(*at)))
        .collect();
    let latency = |q| quantile(&latencies, q).map(seconds).unwrap_or_default();
    drop(operator);

    Ok(OperatorReport {
        apps: n,
        concurrency: options.concurrency,
        operator_binary: operator_bin.display().to_string(),
        control_plane_start_s: seconds(control_plane_start),
        operator_up_s: seconds(operator_up),
        all_applied_s: seconds(all_applied),
        apply_rate_per_s: (n as f64 / all_applied.as_secs_f64().max(1e-9)).round(),
        all_ready_s: seconds(all_ready),
        config_all_routes_s: seconds(config_all_routes),
        ready_latency: Latency {
            p50_s: latency(0.5),
            p99_s: latency(0.99),
            max_s: latency(1.0),
        },
        config_writes: config_progress.writes.saturating_sub(writes_before),
        config_gzip_bytes: config_progress.gzip_bytes,
        operator_memory,
        cpu,
        apiserver_requests_total: requests.values().sum(),
        apiserver_requests: requests,
    })
}

/// Polls the ConnectorGroup until the operator reports it Ready with its connector.
async fn poll_group_ready(
    groups: &Api<ConnectorGroup>,
    operator: &mut OperatorProcess,
    deadline: Instant,
) -> Result<(), BenchError> {
    let mut last = None;
    loop {
        let group = groups
            .get_opt(fixtures::GROUP)
            .await
            .map_err(BenchError::kube("reading the ConnectorGroup"))?;
        let status = group.and_then(|g| g.status);
        let ready = status.as_ref().is_some_and(|s| {
            s.connected_connectors >= 1
                && s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if ready {
            return Ok(());
        }
        last = status.map(|s| format!("{s:?}")).or(last);
        operator.check_running()?;
        if Instant::now() >= deadline {
            return Err(BenchError::Timeout {
                what: format!("the ConnectorGroup {} Ready", fixtures::GROUP),
                waited: SETUP_TIMEOUT,
                progress: last.unwrap_or_else(|| "no status yet".into()),
            });
        }
        tokio::time::sleep(CHECK_EVERY).await;
    }
}

/// Waits until `done` holds for the tracker's progress, failing when the operator exits,
/// the tracker stops, or `deadline` passes.
async fn wait_for<T: Clone + std::fmt::Debug>(
    progress: &mut watch::Receiver<T>,
    what: &str,
    deadline: Instant,
    operator: &mut OperatorProcess,
    done: impl Fn(&T) -> bool,
) -> Result<T, BenchError> {
    let started = Instant::now();
    loop {
        let current = progress.borrow_and_update().clone();
        if done(&current) {
            return Ok(current);
        }
        operator.check_running()?;
        let now = Instant::now();
        if now >= deadline {
            return Err(BenchError::Timeout {
                what: what.to_owned(),
                waited: now.saturating_duration_since(started),
                progress: format!("{current:?}"),
            });
        }
        let wake = (now + CHECK_EVERY).min(deadline);
        if let Ok(Err(_)) = tokio::time::timeout_at(wake.into(), progress.changed()).await {
            let last = progress.borrow().clone();
            return if done(&last) {
                Ok(last)
            } else {
                Err(BenchError::WatchEnded { what: "a tracker" })
            };
        }
    }
}

/// How far the apps are, as their watch shows.
#[derive(Clone, Debug, Default)]
struct ReadyProgress {
    /// The initial list is done: no later change is missed.
    synced: bool,
    /// Apps seen.
    apps: usize,
    /// Apps currently `Ready=True`.
    ready: usize,
    /// When the last of the expected apps became Ready.
    all_ready_at: Option<Instant>,
    /// Watch errors (the watch retries with backoff).
    watch_errors: usize,
}

fn is_ready(app: &PublishedApp) -> bool {
    app.status.as_ref().is_some_and(|status| {
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// Watches the apps until `expected` are Ready at once; returns when each was first
/// seen Ready.
async fn track_ready(
    apps: Api<PublishedApp>,
    expected: usize,
    progress: watch::Sender<ReadyProgress>,
) -> HashMap<String, Instant> {
    let mut first_ready = HashMap::with_capacity(expected);
    let mut seen = HashSet::with_capacity(expected);
    let mut ready = HashSet::with_capacity(expected);
    let mut events = pin!(watcher(apps, watcher::Config::default()).default_backoff());
    while let Some(event) = events.next().await {
        let now = Instant::now();
        match event {
            Ok(Event::Apply(app) | Event::InitApply(app)) => {
                let name = app.name_any();
                if is_ready(&app) {
                    first_ready.entry(name.clone()).or_insert(now);
                    ready.insert(name.clone());
                } else {
                    ready.remove(&name);
                }
                seen.insert(name);
            }
            Ok(Event::Delete(app)) => {
                let name = app.name_any();
                ready.remove(&name);
                seen.remove(&name);
            }
            Ok(Event::InitDone) => progress.send_modify(|p| p.synced = true),
            Ok(Event::Init) => {}
            Err(error) => {
                eprintln!("S8 operator: watching PublishedApps: {error} (retrying)");
                progress.send_modify(|p| p.watch_errors += 1);
            }
        }
        let all = expected > 0 && ready.len() >= expected;
        progress.send_modify(|p| {
            p.apps = seen.len();
            p.ready = ready.len();
            if all && p.all_ready_at.is_none() {
                p.all_ready_at = Some(now);
            }
        });
        if all {
            break;
        }
    }
    first_ready
}

/// How far the published fleet configuration is, as its watch shows.
#[derive(Clone, Debug, Default)]
struct ConfigProgress {
    /// Versions of the ConfigMap seen.
    writes: usize,
    /// Routes of the apps' namespace in the latest version.
    routes: usize,
    /// Size of the latest stored (gzip) configuration.
    gzip_bytes: usize,
    /// When a version first held every expected route.
    complete_at: Option<Instant>,
    /// Why the latest version could not be read, if it could not.
    problem: Option<String>,
    /// Watch errors (the watch retries with backoff).
    watch_errors: usize,
}

/// Watches the fleet configuration ConfigMap until a version holds the routes of
/// `expected` apps of [`APPS_NAMESPACE`].
async fn track_config(
    config_maps: Api<ConfigMap>,
    expected: usize,
    progress: watch::Sender<ConfigProgress>,
) {
    let prefix = format!("{APPS_NAMESPACE}/");
    let config = watcher::Config::default().fields(&format!("metadata.name={FLEET_CONFIG}"));
    let mut events = pin!(watcher(config_maps, config).default_backoff());
    let mut last_version = None;
    while let Some(event) = events.next().await {
        let config_map = match event {
            Ok(Event::Apply(config_map) | Event::InitApply(config_map)) => config_map,
            Ok(_) => continue,
            Err(error) => {
                eprintln!("S8 operator: watching the fleet configuration: {error} (retrying)");
                progress.send_modify(|p| p.watch_errors += 1);
                continue;
            }
        };
        let now = Instant::now();
        let version = config_map.resource_version();
        if version == last_version {
            continue;
        }
        last_version = version;
        let stored = config_map
            .binary_data
            .as_ref()
            .and_then(|data| data.get(STORAGE_KEY))
            .map(|bytes| bytes.0.as_slice());
        let decoded = match stored {
            Some(bytes) => FleetConfig::from_gzip_json(bytes)
                .map(|c| (c, bytes.len()))
                .map_err(|e| e.to_string()),
            None => Err(format!("no binaryData key {STORAGE_KEY}")),
        };
        let mut complete = false;
        progress.send_modify(|p| {
            p.writes += 1;
            match decoded {
                Ok((config, size)) => {
                    p.routes = config
                        .routes
                        .iter()
                        .filter(|r| r.app.starts_with(&prefix))
                        .count();
                    p.gzip_bytes = size;
                    p.problem = None;
                }
                Err(problem) => p.problem = Some(problem),
            }
            complete = expected > 0 && p.routes >= expected;
            if complete && p.complete_at.is_none() {
                p.complete_at = Some(now);
            }
        });
        if complete {
            break;
        }
    }
}
