//! One pod on the agent's Node: its containers as local processes, their probes,
//! restarts and termination, and the pod's status.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, Pod, ServiceAccount};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PostParams, Preconditions};
use kube::config::Kubeconfig;
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::env::{self, ApiKeys, EnvError};
use super::node::{apply, time};
use super::probe::{PortMap, ProbeSpec, ProbeState};
use super::{NodeAgentConfig, NodeAgentError, POD_IP, PortValue, Program, Shared};

/// How often a pod's containers, probes and status are looked at.
const TICK: Duration = Duration::from_millis(250);
/// The first restart back-off; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest restart back-off.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long a container whose configuration cannot be resolved waits before retrying.
const CONFIG_RETRY: Duration = Duration::from_secs(2);
/// `terminationGracePeriodSeconds` when the pod says nothing.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// `PATH` when the pod sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long a pod's ServiceAccount token is valid (tests are much shorter).
const TOKEN_SECONDS: i64 = 3600;

/// The latest version of a pod from the watch; `gone` once it was deleted from the API.
#[derive(Debug, Clone)]
pub(super) struct Update {
    /// The pod.
    pub pod: Pod,
    /// Whether it no longer exists.
    pub gone: bool,
}

/// The directory of pod `namespace/pod`: its kubeconfig, working directory and logs.
pub(super) fn pod_dir(config: &NodeAgentConfig, namespace: &str, pod: &str) -> PathBuf {
    config.work_dir.join(format!("{namespace}_{pod}"))
}

/// Deletes `pod` with grace period 0 (uid precondition), as the kubelet does once its
/// containers stopped.
pub(super) async fn delete_for_good(shared: &Shared, pod: &Pod) {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match Api::<Pod>::namespaced(shared.client.clone(), &namespace)
        .delete(&name, &params)
        .await
    {
        Ok(_) => info!(%namespace, pod = %name, "pod deleted"),
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {
            debug!(%namespace, pod = %name, "pod already gone");
        }
        Err(error) => warn!(%namespace, pod = %name, %error, "cannot delete the pod"),
    }
}

/// Runs the pod until it is deleted or the agent stops.
pub(super) async fn run(shared: Arc<Shared>, mut updates: watch::Receiver<Update>) {
    let pod = updates.borrow_and_update().pod.clone();
    let mut run = PodRun::new(shared.clone(), pod);
    let mut stopping = shared.stopping.clone();
    info!(namespace = %run.namespace, pod = %run.name, "pod admitted");
    loop {
        run.step().await;
        run.write_status().await;
        tokio::select! {
            changed = updates.changed() => {
                let update = updates.borrow_and_update().clone();
                if changed.is_err() || update.gone {
                    run.kill_all().await;
                    return;
                }
                run.pod = update.pod;
                if run.pod.metadata.deletion_timestamp.is_some() {
                    run.terminate(&mut updates).await;
                    return;
                }
            }
            _ = stopping.changed() => {
                run.kill_all().await;
                return;
            }
            () = tokio::time::sleep(TICK) => {}
        }
    }
}

/// A container's last run that ended.
#[derive(Debug, Clone)]
struct Ended {
    exit_code: i32,
    signal: Option<i32>,
    reason: &'static str,
    started: Timestamp,
    finished: Timestamp,
    id: String,
}

impl Ended {
    fn json(&self) -> serde_json::Value {
        let mut value = json!({
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": time(self.started),
            "finishedAt": time(self.finished),
            "containerID": self.id,
        });
        if let Some(signal) = self.signal {
            value["signal"] = json!(signal);
        }
        value
    }
}

enum State {
    /// Not running: why, and when to try again (never, for a missing image).
    Waiting {
        reason: &'static str,
        message: String,
        retry: Option<Instant>,
    },
    Running {
        child: Child,
        pid: u32,
        started: Timestamp,
    },
    /// Ended for good (restart policy `Never`, or `OnFailure` after a success).
    Terminated(Ended),
}

struct ContainerRun {
    spec: Container,
    image: String,
    program: Option<Program>,
    ports: Option<PortMap>,
    state: State,
    restart_count: i32,
    last: Option<Ended>,
    backoff: Duration,
    readiness: Option<ProbeState>,
    liveness: Option<ProbeState>,
    ready: bool,
}

struct PodRun {
    shared: Arc<Shared>,
    pod: Pod,
    namespace: String,
    name: String,
    dir: PathBuf,
    start_time: Timestamp,
    containers: Vec<ContainerRun>,
    /// Each condition's status and when it last changed.
    conditions: BTreeMap<&'static str, (bool, Timestamp)>,
    kubeconfig: Option<PathBuf>,
    written: Option<serde_json::Value>,
}

impl PodRun {
    fn new(shared: Arc<Shared>, pod: Pod) -> Self {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let dir = pod_dir(&shared.config, &namespace, &name);
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|spec| {
                let image = spec.image.clone().unwrap_or_default();
                let program = shared.config.images.get(&image).cloned();
                let state = match &program {
                    Some(_) => State::Waiting {
                        reason: "ContainerCreating",
                        message: String::new(),
                        retry: Some(Instant::now()),
                    },
                    None => State::Waiting {
                        reason: "ErrImagePull",
                        message: format!("image {image:?} is not in the node agent's image table"),
                        retry: None,
                    },
                };
                ContainerRun {
                    spec,
                    image,
                    program,
                    ports: None,
                    state,
                    restart_count: 0,
                    last: None,
                    backoff: FIRST_BACKOFF,
                    readiness: None,
                    liveness: None,
                    ready: false,
                }
            })
            .collect();
        Self {
            shared,
            pod,
            namespace,
            name,
            dir,
            start_time: Timestamp::now(),
            containers,
            conditions: BTreeMap::new(),
            kubeconfig: None,
            written: None,
        }
    }

    fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".to_owned())
    }

    /// Starts due containers, notices exits, runs due probes.
    async fn step(&mut self) {
        let policy = self.restart_policy();
        for index in 0..self.containers.len() {
            self.step_container(index, &policy).await;
        }
    }

    async fn step_container(&mut self, index: usize, policy: &str) {
        let now = Instant::now();
        let reported = self.written.is_some();
        let container = &mut self.containers[index];
        match &mut container.state {
            State::Waiting {
                reason: "ErrImagePull",
                ..
            } if container.program.is_none() && reported => {
                // The kubelet's second word for an image it cannot pull, once the first
                // was reported.
                container.state = State::Waiting {
                    reason: "ImagePullBackOff",
                    message: format!(
                        "Back-off pulling image {:?}: not in the node agent's image table",
                        container.image
                    ),
                    retry: None,
                };
            }
            State::Waiting {
                retry: Some(at), ..
            } if *at <= now => {
                self.launch(index).await;
            }
            State::Waiting { .. } | State::Terminated(_) => {}
            State::Running {
                child,
                pid,
                started,
            } => {
                let (pid, started) = (*pid, *started);
                match child.try_wait() {
                    Ok(Some(status)) => {
                        self.shared.untrack(pid);
                        self.exited(index, status, pid, started, policy);
                    }
                    Ok(None) => self.probe(index).await,
                    Err(error) => warn!(pod = %self.name, %error, "cannot check a container"),
                }
            }
        }
    }

    fn exited(
        &mut self,
        index: usize,
        status: std::process::ExitStatus,
        pid: u32,
        started: Timestamp,
        policy: &str,
    ) {
        use std::os::unix::process::ExitStatusExt;
        let container = &mut self.containers[index];
        let exit_code = status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        let ended = Ended {
            exit_code,
            signal: status.signal(),
            reason: if exit_code == 0 { "Completed" } else { "Error" },
            started,
            finished: Timestamp::now(),
            id: container_id(pid),
        };
        warn!(
            namespace = %self.namespace, pod = %self.name, container = %container.spec.name,
            exit_code, restarts = container.restart_count, "container exited"
        );
        container.ready = false;
        container.readiness = None;
        container.liveness = None;
        let restart = match policy {
            "Never" => false,
            "OnFailure" => exit_code != 0,
            _ => true,
        };
        if restart {
            container.restart_count += 1;
            let backoff = container.backoff;
            container.backoff = (backoff * 2).min(MAX_BACKOFF);
            container.state = State::Waiting {
                reason: "CrashLoopBackOff",
                message: format!(
                    "back-off {backoff:?} restarting failed container={} pod={}",
                    container.spec.name, self.name
                ),
                retry: Some(Instant::now() + backoff),
            };
            container.last = Some(ended);
        } else {
            container.state = State::Terminated(ended);
        }
    }

    /// Runs the container's due probes.
    async fn probe(&mut self, index: usize) {
        let now = Instant::now();
        let container = &mut self.containers[index];
        if let Some(readiness) = &mut container.readiness
            && readiness.next <= now
        {
            let result = readiness.spec.run().await;
            if readiness.record(result, Instant::now()) {
                info!(
                    namespace = %self.namespace, pod = %self.name, container = %container.spec.name,
                    ready = readiness.passing, last_error = ?readiness.last_error, "readiness changed"
                );
            }
            container.ready = readiness.passing;
        }
        if let Some(liveness) = &mut container.liveness
            && liveness.next <= now
        {
            let result = liveness.spec.run().await;
            liveness.record(result, Instant::now());
            if !liveness.passing
                && let State::Running { child, .. } = &mut container.state
            {
                warn!(
                    namespace = %self.namespace, pod = %self.name, container = %container.spec.name,
                    last_error = ?liveness.last_error, "liveness probe failed; killing the container"
                );
                let _ = child.start_kill();
            }
        }
    }

    /// Resolves the container's configuration and starts it; on failure the container
    /// waits with the kubelet's reason.
    async fn launch(&mut self, index: usize) {
        let retry_later = |reason: &'static str, message: String| State::Waiting {
            reason,
            message,
            retry: Some(Instant::now() + CONFIG_RETRY),
        };
        match self.prepare(index).await {
            Ok(Ok(launch)) => match self.spawn(index, launch) {
                Ok(state) => self.containers[index].state = state,
                Err(error) => {
                    warn!(pod = %self.name, %error, "cannot start a container");
                    self.containers[index].state =
                        retry_later("RunContainerError", error.to_string());
                }
            },
            Ok(Err(error)) => {
                debug!(pod = %self.name, %error, "container configuration not ready");
                self.containers[index].state =
                    retry_later("CreateContainerConfigError", error.to_string());
            }
            Err(error) => {
                warn!(pod = %self.name, %error, "cannot prepare a container");
                self.containers[index].state =
                    retry_later("CreateContainerConfigError", error.to_string());
            }
        }
    }

    /// The argv and environment of container `index`.
    async fn prepare(&mut self, index: usize) -> Result<Result<Launch, EnvError>, NodeAgentError> {
        std::fs::create_dir_all(&self.dir).map_err(NodeAgentError::io(&self.dir))?;
        if self.containers[index].ports.is_none() {
            let ports = self.containers[index]
                .spec
                .ports
                .clone()
                .unwrap_or_default();
            let map = PortMap::allocate(&ports, free_port)
                .map_err(NodeAgentError::io(Path::new("127.0.0.1:0")))?;
            self.containers[index].ports = Some(map);
        }
        let automount = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.automount_service_account_token)
            != Some(false);
        if automount && self.kubeconfig.is_none() {
            self.kubeconfig = Some(self.write_kubeconfig().await?);
        }
        let container = &self.containers[index];
        let mut vars = match env::resolve(
            &self.pod,
            &container.spec,
            &ApiKeys(self.shared.client.clone()),
        )
        .await?
        {
            Ok(vars) => vars,
            Err(error) => return Ok(Err(error)),
        };
        let ports = container.ports.clone().unwrap_or_default();
        for port_env in &self.shared.config.port_envs {
            if let Some(number) = ports.names.get(&port_env.port_name)
                && let Some(local) = ports.local.get(number)
            {
                let value = match port_env.value {
                    PortValue::Address => format!("{POD_IP}:{local}"),
                    PortValue::Port => local.to_string(),
                };
                vars.insert(port_env.variable.clone(), value);
            }
        }
        for (variable, value) in &self.shared.config.env_overrides {
            vars.insert(variable.clone(), value.clone());
        }
        if let Some(kubeconfig) = &self.kubeconfig {
            vars.insert("KUBECONFIG".into(), kubeconfig.display().to_string());
        }
        vars.entry("HOSTNAME".into())
            .or_insert_with(|| self.name.clone());
        vars.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.to_owned());
        let program = container
            .program
            .clone()
            .unwrap_or_else(|| Program::new(""));
        let expand = |words: &Option<Vec<String>>| {
            words
                .iter()
                .flatten()
                .map(|w| env::expand(w, &vars))
                .collect::<Vec<_>>()
        };
        let command = expand(&container.spec.command);
        let args = expand(&container.spec.args);
        let (path, mut argv) = match command.split_first() {
            Some((first, rest)) => (PathBuf::from(first), rest.to_vec()),
            None => (program.path.clone(), program.args.clone()),
        };
        argv.extend(args);
        Ok(Ok(Launch {
            path,
            argv,
            env: vars,
            readiness: container.spec.readiness_probe.clone(),
            liveness: container.spec.liveness_probe.clone(),
        }))
    }

    /// A kubeconfig for the pod's ServiceAccount: the admin kubeconfig's server and CA,
    /// a TokenRequest token bound to the pod, the pod's namespace as the default.
    async fn write_kubeconfig(&self) -> Result<PathBuf, NodeAgentError> {
        let account = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: Vec::new(),
                expiration_seconds: Some(TOKEN_SECONDS),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(self.name.clone()),
                    uid: self.pod.metadata.uid.clone(),
                }),
            },
            ..TokenRequest::default()
        };
        let token = Api::<ServiceAccount>::namespaced(self.shared.client.clone(), &self.namespace)
            .create_token_request(&account, &PostParams::default(), &request)
            .await
            .map_err(NodeAgentError::api(format!(
                "requesting a token of ServiceAccount {}/{account} for pod {}",
                self.namespace, self.name
            )))?
            .status
            .map(|s| s.token)
            .unwrap_or_default();
        let admin_path = &self.shared.config.admin_kubeconfig;
        let mut kubeconfig =
            Kubeconfig::read_from(admin_path).map_err(|e| NodeAgentError::Kubeconfig {
                path: admin_path.clone(),
                reason: e.to_string(),
            })?;
        for named in &mut kubeconfig.auth_infos {
            named.auth_info = Some(kube::config::AuthInfo {
                token: Some(token.clone().into()),
                ..kube::config::AuthInfo::default()
            });
        }
        for named in &mut kubeconfig.contexts {
            if let Some(context) = named.context.as_mut() {
                context.namespace = Some(self.namespace.clone());
            }
        }
        let path = self.dir.join("kubeconfig");
        let yaml = serde_yaml::to_string(&kubeconfig).map_err(|e| NodeAgentError::Kubeconfig {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::write(&path, yaml).map_err(NodeAgentError::io(&path))?;
        Ok(path)
    }

    fn spawn(&mut self, index: usize, launch: Launch) -> Result<State, NodeAgentError> {
        let container = &mut self.containers[index];
        let log = self.dir.join(format!("{}.log", container.spec.name));
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
        };
        let stdout = open().map_err(NodeAgentError::io(&log))?;
        let stderr = open().map_err(NodeAgentError::io(&log))?;
        let setpriv = Path::new("/usr/bin/setpriv");
        let mut command = if setpriv.is_file() {
            // Dies with the agent's thread, even on SIGKILL of the test.
            let mut command = Command::new(setpriv);
            command
                .args(["--pdeathsig", "KILL", "--"])
                .arg(&launch.path);
            command
        } else {
            Command::new(&launch.path)
        };
        command
            .args(&launch.argv)
            .env_clear()
            .envs(&launch.env)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true);
        let child = command.spawn().map_err(NodeAgentError::io(&launch.path))?;
        let pid = child.id().unwrap_or_default();
        self.shared.track(pid);
        info!(
            namespace = %self.namespace, pod = %self.name, container = %container.spec.name,
            program = %launch.path.display(), pid, restarts = container.restart_count,
            log = %log.display(), "container started"
        );
        let started_at = Instant::now();
        let ports = container.ports.clone().unwrap_or_default();
        let parse = |probe: &Option<k8s_openapi::api::core::v1::Probe>, passing: bool| {
            probe.as_ref().map(|probe| {
                match ProbeSpec::parse(probe, &ports) {
                    Ok(spec) => ProbeState::new(spec, started_at, passing),
                    Err(error) => {
                        warn!(pod = %self.name, %error, "probe cannot run; it fails");
                        // A probe that never passes: an unreachable port.
                        let spec = ProbeSpec {
                            check: super::probe::Check::Tcp {
                                address: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                            },
                            initial_delay: Duration::ZERO,
                            period: Duration::from_secs(10),
                            timeout: Duration::from_secs(1),
                            success_threshold: 1,
                            failure_threshold: 1,
                        };
                        ProbeState::new(spec, started_at, passing)
                    }
                }
            })
        };
        container.readiness = parse(&launch.readiness, false);
        container.liveness = parse(&launch.liveness, true);
        container.ready = container.readiness.is_none();
        Ok(State::Running {
            child,
            pid,
            started: Timestamp::now(),
        })
    }

    /// SIGKILLs every running container and waits for them.
    async fn kill_all(&mut self) {
        for container in &mut self.containers {
            if let State::Running { child, pid, .. } = &mut container.state {
                let _ = child.kill().await;
                self.shared.untrack(*pid);
            }
        }
    }

    /// The kubelet's termination: not ready at once, SIGTERM, the grace period, SIGKILL,
    /// then the pod is deleted for good.
    async fn terminate(&mut self, updates: &mut watch::Receiver<Update>) {
        let grace = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .and_then(|s| u64::try_from(s).ok())
            .map_or(DEFAULT_GRACE, Duration::from_secs);
        info!(namespace = %self.namespace, pod = %self.name, ?grace, "terminating the pod");
        for container in &mut self.containers {
            container.ready = false;
            container.readiness = None;
            container.liveness = None;
            if let State::Running { child, .. } = &container.state
                && let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        self.write_status().await;
        let deadline = Instant::now() + grace;
        let mut gone = false;
        while Instant::now() < deadline && !gone {
            let mut running = false;
            for container in &mut self.containers {
                if let State::Running { child, pid, .. } = &mut container.state {
                    match child.try_wait() {
                        Ok(None) => running = true,
                        _ => self.shared.untrack(*pid),
                    }
                }
            }
            if !running {
                break;
            }
            tokio::select! {
                changed = updates.changed() => {
                    gone = changed.is_err() || updates.borrow_and_update().gone;
                }
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        self.kill_all().await;
        info!(namespace = %self.namespace, pod = %self.name, "pod's containers stopped");
        if !gone {
            delete_for_good(&self.shared, &self.pod).await;
        }
    }

    /// Writes the pod's status (server-side apply of `status`) when it changed.
    async fn write_status(&mut self) {
        let status = self.status();
        if self.written.as_ref() == Some(&status) {
            return;
        }
        let patch = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "status": status,
        });
        match Api::<Pod>::namespaced(self.shared.client.clone(), &self.namespace)
            .patch_status(&self.name, &apply(), &Patch::Apply(&patch))
            .await
        {
            Ok(_) => self.written = Some(status),
            Err(error) => {
                debug!(namespace = %self.namespace, pod = %self.name, %error, "cannot write the pod's status");
            }
        }
    }

    fn status(&mut self) -> serde_json::Value {
        let all_ended = !self.containers.is_empty()
            && self
                .containers
                .iter()
                .all(|c| matches!(c.state, State::Terminated(_)));
        let phase = if all_ended {
            let failed = self
                .containers
                .iter()
                .any(|c| matches!(&c.state, State::Terminated(e) if e.exit_code != 0));
            if failed { "Failed" } else { "Succeeded" }
        } else if self
            .containers
            .iter()
            .any(|c| matches!(c.state, State::Running { .. }) || c.restart_count > 0)
        {
            "Running"
        } else {
            "Pending"
        };
        let unready: Vec<&str> = self
            .containers
            .iter()
            .filter(|c| !c.ready)
            .map(|c| c.spec.name.as_str())
            .collect();
        let ready = unready.is_empty() && phase == "Running";
        let now = Timestamp::now();
        let mut condition = |type_: &'static str, status: bool| {
            let entry = self.conditions.entry(type_).or_insert((status, now));
            if entry.0 != status {
                *entry = (status, now);
            }
            let mut value = json!({
                "type": type_,
                "status": if status { "True" } else { "False" },
                "lastTransitionTime": time(entry.1),
            });
            if !status {
                value["reason"] = json!("ContainersNotReady");
                value["message"] = json!(format!(
                    "containers with unready status: [{}]",
                    unready.join(" ")
                ));
            }
            value
        };
        let conditions = vec![
            condition("PodReadyToStartContainers", true),
            condition("Initialized", true),
            condition("ContainersReady", ready),
            condition("Ready", ready),
        ];
        let statuses: Vec<serde_json::Value> = self
            .containers
            .iter()
            .map(|c| {
                let (state, id, started) = match &c.state {
                    State::Waiting {
                        reason, message, ..
                    } => (
                        json!({"waiting": {"reason": reason, "message": message}}),
                        None,
                        false,
                    ),
                    State::Running { pid, started, .. } => (
                        json!({"running": {"startedAt": time(*started)}}),
                        Some(container_id(*pid)),
                        true,
                    ),
                    State::Terminated(ended) => (
                        json!({"terminated": ended.json()}),
                        Some(ended.id.clone()),
                        false,
                    ),
                };
                let mut value = json!({
                    "name": c.spec.name,
                    "image": c.image,
                    "imageID": c.program.as_ref().map(|p| format!("sallyport-e2e://{}", p.path.display())).unwrap_or_default(),
                    "started": started,
                    "ready": c.ready,
                    "restartCount": c.restart_count,
                    "state": state,
                });
                if let Some(id) = id {
                    value["containerID"] = json!(id);
                }
                if let Some(last) = &c.last {
                    value["lastState"] = json!({"terminated": last.json()});
                }
                value
            })
            .collect();
        json!({
            "phase": phase,
            "hostIP": POD_IP,
            "hostIPs": [{"ip": POD_IP}],
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": time(self.start_time),
            "conditions": conditions,
            "containerStatuses": statuses,
        })
    }
}

/// What [`PodRun::prepare`] resolved for a start.
struct Launch {
    path: PathBuf,
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    readiness: Option<k8s_openapi::api::core::v1::Probe>,
    liveness: Option<k8s_openapi::api::core::v1::Probe>,
}

fn container_id(pid: u32) -> String {
    format!("sallyport-e2e://{pid}")
}

fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
