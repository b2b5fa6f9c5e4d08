//! A tiny kubelet for e2e tests: a Node of its own whose pods run as local processes.
//!
//! The control plane's kwok Node runs nothing, so workloads that must really run (the
//! connector Deployments of a ConnectorGroup, say) are scheduled onto the agent's Node
//! instead, with a `nodeSelector` on [`NODE_LABEL`]. The agent:
//!
//! - registers its Node (Ready, with allocatable resources, no kwok annotation) and keeps
//!   it Ready: it renews the Node's Lease in `kube-node-lease` and the Ready condition's
//!   heartbeat every few seconds, so the node lifecycle controller never taints it;
//! - watches the pods bound to its Node and runs each container as a local process: the
//!   image is looked up in a table the test gives ([`Program`]; an image not in it gets
//!   `ErrImagePull`), the environment is resolved as the kubelet does (values with
//!   `$(VAR)`, Secret and ConfigMap keys, the downward API, plus the test's overrides),
//!   every container port gets a free loopback port, and the process authenticates as
//!   the pod's ServiceAccount through a TokenRequest token bound to the pod, in a
//!   kubeconfig passed as `KUBECONFIG`;
//! - writes the pod's status as a kubelet does (phase, podIP `127.0.0.1`, conditions,
//!   container statuses), runs readiness and liveness probes, restarts crashed
//!   containers with a doubling back-off (`CrashLoopBackOff`), and on deletion sends
//!   SIGTERM, waits the grace period, sends SIGKILL and deletes the pod for good.
//!
//! Dropping the [`NodeAgent`] kills every process it started.

mod env;
mod node;
mod pod;
mod probe;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use env::{EnvError, POD_IP, expand, pod_field};
pub use probe::{Check, PortMap, ProbeError, ProbeSpec, ProbeState};

/// The label every agent Node carries (value [`NODE_LABEL_VALUE`]): a workload's
/// `nodeSelector` picks the agent's Nodes with it.
pub const NODE_LABEL: &str = "sallyport.dev/e2e-node";

/// The value of [`NODE_LABEL`] on an agent's Node.
pub const NODE_LABEL_VALUE: &str = "local";

/// How often the agent renews its Lease and the Ready condition's heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// How long [`NodeAgent::start`] waits for its Node to be Ready and free of taints.
pub const NODE_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the first container of `pod` waits (`CrashLoopBackOff`, `ImagePullBackOff`, ...),
/// as the agent (or a kubelet) wrote it.
pub fn waiting_reason(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .waiting
        .as_ref()?
        .reason
        .clone()
}

/// The local program an image stands for: its entrypoint and default arguments.
///
/// A container runs `path`, then `args`, then the container's `args`; a container with a
/// `command` runs that instead of `path` and `args` (its first word a local path), as
/// `command` replaces an image's entrypoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    /// The executable.
    pub path: PathBuf,
    /// Arguments before the container's `args`.
    pub args: Vec<String>,
}

impl Program {
    /// `path` with no arguments of its own.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            args: Vec::new(),
        }
    }
}

/// How a port variable is written ([`PortEnv`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortValue {
    /// `127.0.0.1:<local port>`, a listen address.
    Address,
    /// `<local port>` alone.
    Port,
}

/// An environment variable that tells a container where to listen for one of its
/// container ports, since every pod of the agent shares the host's loopback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortEnv {
    /// The container port's name (e.g. `metrics`).
    pub port_name: String,
    /// The variable (e.g. `SALLYPORT_METRICS_ADDRESS`).
    pub variable: String,
    /// How its value is written.
    pub value: PortValue,
}

/// What a [`NodeAgent`] runs and how.
#[derive(Debug, Clone)]
pub struct NodeAgentConfig {
    /// The Node's name, e.g. `local-node-0`.
    pub node_name: String,
    /// The admin kubeconfig: the pods' kubeconfigs copy its server and CA.
    pub admin_kubeconfig: PathBuf,
    /// Image (exactly as in the pod spec) to program.
    pub images: BTreeMap<String, Program>,
    /// Variables set in every container (replacing the pod's), e.g. a Service's name
    /// mapped to a loopback address, as cluster DNS would resolve it.
    pub env_overrides: BTreeMap<String, String>,
    /// Variables that tell containers their loopback ports.
    pub port_envs: Vec<PortEnv>,
    /// Where the pods' directories and logs go (`<namespace>_<pod>/<container>.log`).
    pub work_dir: PathBuf,
}

impl NodeAgentConfig {
    /// A configuration for Node `node_name` with no images yet, its pods' files under
    /// `work_dir`.
    pub fn new(
        node_name: impl Into<String>,
        admin_kubeconfig: impl Into<PathBuf>,
        work_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            node_name: node_name.into(),
            admin_kubeconfig: admin_kubeconfig.into(),
            images: BTreeMap::new(),
            env_overrides: BTreeMap::new(),
            port_envs: Vec::new(),
            work_dir: work_dir.into(),
        }
    }

    /// Adds `image` running `program`.
    pub fn image(mut self, image: impl Into<String>, program: Program) -> Self {
        self.images.insert(image.into(), program);
        self
    }

    /// Sets `variable` to `value` in every container.
    pub fn env(mut self, variable: impl Into<String>, value: impl Into<String>) -> Self {
        self.env_overrides.insert(variable.into(), value.into());
        self
    }

    /// Tells containers the loopback port of their port `port_name` in `variable`.
    pub fn port_env(
        mut self,
        port_name: impl Into<String>,
        variable: impl Into<String>,
        value: PortValue,
    ) -> Self {
        self.port_envs.push(PortEnv {
            port_name: port_name.into(),
            variable: variable.into(),
            value,
        });
        self
    }
}

/// The agent failed; the message names the object and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum NodeAgentError {
    /// The apiserver refused or failed a request.
    #[error("{what}: {source}")]
    Api {
        /// What was being done.
        what: String,
        /// The apiserver's answer.
        source: kube::Error,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The admin kubeconfig could not be read, or a pod's written.
    #[error("kubeconfig {}: {reason}", path.display())]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The Node did not become Ready and untainted in time.
    #[error("node {node} was not Ready without taints within {timeout:?}: {state}")]
    NodeNotReady {
        /// The Node.
        node: String,
        /// The bound.
        timeout: Duration,
        /// Its last conditions and taints.
        state: String,
    },
}

impl NodeAgentError {
    fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let what = what.into();
        move |source| Self::Api { what, source }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// What the agent's tasks share.
struct Shared {
    client: kube::Client,
    config: NodeAgentConfig,
    /// The pids of the processes running now, killed when the agent is dropped.
    pids: Mutex<BTreeSet<u32>>,
    /// Set to true when the agent stops.
    stopping: watch::Receiver<bool>,
}

impl Shared {
    fn track(&self, pid: u32) {
        self.pids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(pid);
    }

    fn untrack(&self, pid: u32) {
        self.pids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&pid);
    }

    fn kill_all(&self) {
        let pids = std::mem::take(&mut *self.pids.lock().unwrap_or_else(PoisonError::into_inner));
        for pid in pids {
            if let Ok(raw) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(raw),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A running agent; see the module documentation. Dropping it stops its tasks and kills
/// its processes (SIGKILL); [`NodeAgent::stop`] does the same and waits for the tasks.
pub struct NodeAgent {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl NodeAgent {
    /// Registers the Node (replacing a stale one of the same name), starts its heartbeat
    /// and the pod watch, and returns once the Node is Ready with no taint.
    pub async fn start(
        client: kube::Client,
        config: NodeAgentConfig,
    ) -> Result<Self, NodeAgentError> {
        std::fs::create_dir_all(&config.work_dir).map_err(NodeAgentError::io(&config.work_dir))?;
        let (stop, stopping) = watch::channel(false);
        let shared = Arc::new(Shared {
            client,
            config,
            pids: Mutex::new(BTreeSet::new()),
            stopping,
        });
        let since = node::register(&shared).await?;
        let tasks = vec![
            tokio::spawn(node::heartbeat(shared.clone(), since)),
            tokio::spawn(watch_pods(shared.clone())),
        ];
        let agent = Self {
            shared,
            stop,
            tasks,
        };
        node::wait_ready(&agent.shared).await?;
        info!(node = %agent.node_name(), "node agent ready");
        Ok(agent)
    }

    /// The Node's name.
    pub fn node_name(&self) -> &str {
        &self.shared.config.node_name
    }

    /// The log file of `container` of pod `namespace/pod` (all its runs, appended).
    pub fn log_path(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        pod::pod_dir(&self.shared.config, namespace, pod).join(format!("{container}.log"))
    }

    /// The last `lines` lines of every container log of the pods in `namespace`, for a
    /// failing test's message.
    pub fn log_tails(&self, namespace: &str, lines: usize) -> String {
        let mut out = String::new();
        let Ok(entries) = std::fs::read_dir(&self.shared.config.work_dir) else {
            return out;
        };
        let prefix = format!("{namespace}_");
        let mut dirs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix))
            })
            .collect();
        dirs.sort();
        for dir in dirs {
            let Ok(files) = std::fs::read_dir(&dir) else {
                continue;
            };
            for file in files.flatten().map(|f| f.path()) {
                if file.extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(&file).unwrap_or_default();
                    let all: Vec<&str> = text.lines().collect();
                    let tail = all[all.len().saturating_sub(lines)..].join("\n");
                    out.push_str(&format!("--- {} ---\n{tail}\n", file.display()));
                }
            }
        }
        out
    }

    /// Stops the pod watch and the heartbeat and kills every process (SIGKILL). The Node
    /// and its pods stay in the API.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
        self.shared.kill_all();
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for task in &self.tasks {
            task.abort();
        }
        self.shared.kill_all();
    }
}

/// Watches the pods bound to the Node and hands each to a task of its own (by uid).
async fn watch_pods(shared: Arc<Shared>) {
    let node = shared.config.node_name.clone();
    let api = Api::<Pod>::all(shared.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher(api, config).boxed();
    let mut pods: BTreeMap<String, watch::Sender<pod::Update>> = BTreeMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                warn!(%node, %error, "pod watch failed; it retries");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let (object, gone) = match event {
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => (pod, false),
            watcher::Event::Delete(pod) => (pod, true),
            watcher::Event::Init | watcher::Event::InitDone => continue,
        };
        let Some(uid) = object.metadata.uid.clone() else {
            continue;
        };
        let update = pod::Update { pod: object, gone };
        if let Some(sender) = pods.get(&uid) {
            if gone {
                let _ = sender.send(update);
                pods.remove(&uid);
                continue;
            }
            if sender.send(update).is_ok() {
                continue;
            }
            // The pod's task has ended (it deleted the pod, or it was dropped): nothing
            // more to run for it.
            continue;
        }
        if gone {
            continue;
        }
        if update.pod.metadata.deletion_timestamp.is_some() {
            // A pod being deleted that runs nothing here (it never started, or ran under
            // an earlier agent): nothing to stop, so delete it for good.
            pod::delete_for_good(&shared, &update.pod).await;
            continue;
        }
        let (sender, receiver) = watch::channel(update);
        pods.insert(uid, sender);
        tasks.spawn(pod::run(shared.clone(), receiver));
        // Reap finished tasks.
        while tasks.try_join_next().is_some() {}
    }
}
