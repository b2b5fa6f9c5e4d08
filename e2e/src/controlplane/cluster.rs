use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, NodeStatus, ServiceAccount};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use tracing::info;

use super::process::{Process, log_tail};
use super::{Binaries, Error, Mode, Pki, kubeconfig};

/// How long each readiness condition is awaited.
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// How long a component gets to exit after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// The name of the fake Node that kwok manages in [`Mode::WithControllers`].
pub const FAKE_NODE: &str = "kwok-node-0";

const SERVICE_CLUSTER_IP_RANGE: &str = "10.0.0.0/24";
const POLL: Duration = Duration::from_millis(250);

/// A control plane running as child processes of the calling process.
///
/// Its state directory holds `pki/`, `etcd/`, `logs/<component>.log` and the admin
/// `kubeconfig`. [`Cluster::stop`] stops the processes but leaves the directory to the caller.
pub struct Cluster {
    state_dir: PathBuf,
    kubeconfig: PathBuf,
    processes: Vec<Process>,
    /// How kube-apiserver was started, to start it again the same way.
    apiserver: Option<(PathBuf, Vec<String>)>,
}

impl Cluster {
    /// A cluster that will keep its state in `state_dir`; nothing runs yet.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        let state_dir = state_dir.into();
        Cluster {
            kubeconfig: state_dir.join("kubeconfig"),
            state_dir,
            processes: Vec::new(),
            apiserver: None,
        }
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The admin kubeconfig (user `sallyport-admin` in group `system:masters`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `<state dir>/bin/kubectl`: the kubectl built with the control plane (same version),
    /// present when the binaries directory holds one.
    pub fn kubectl_path(&self) -> PathBuf {
        self.state_dir.join("bin").join("kubectl")
    }

    /// Links the binaries' kubectl into the state directory, so tests and users find the
    /// kubectl that matches the apiserver next to its kubeconfig.
    fn link_kubectl(&self, binaries: &Binaries) -> Result<(), Error> {
        let kubectl = binaries.path("kubectl");
        if !kubectl.is_file() {
            return Ok(());
        }
        let link = self.kubectl_path();
        if let Some(bin) = link.parent() {
            std::fs::create_dir_all(bin).map_err(Error::io(bin))?;
        }
        std::os::unix::fs::symlink(&kubectl, &link).map_err(Error::io(&link))
    }

    /// Generates the PKI, starts etcd and kube-apiserver (and, for
    /// [`Mode::WithControllers`], the controllers and a fake Node), and returns once all
    /// are ready. Each readiness condition gets [`READY_TIMEOUT`].
    ///
    /// Children are started from the calling thread and get SIGKILL when it dies, so call
    /// this from a thread that lives as long as the cluster (e.g. a current-thread runtime
    /// on the main thread). If this fails or is cancelled, the processes started so far keep
    /// running until [`Cluster::stop`] or drop.
    pub async fn start(&mut self, binaries: &Binaries, mode: Mode) -> Result<(), Error> {
        let started = Instant::now();
        let pki = Pki::generate(&self.state_dir.join("pki"))?;
        let logs = self.state_dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(Error::io(&logs))?;
        self.link_kubectl(binaries)?;

        let [etcd_client, etcd_peer, apiserver] = free_ports()?;
        let etcd_data = self.state_dir.join("etcd").display().to_string();
        self.spawn(
            binaries,
            "etcd",
            vec![
                "--name=sallyport".to_owned(),
                format!("--data-dir={etcd_data}"),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-cluster=sallyport=http://127.0.0.1:{etcd_peer}"),
                "--unsafe-no-fsync=true".to_owned(),
            ],
        )?;

        let server = format!("https://127.0.0.1:{apiserver}");
        let mut args = vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
            "--bind-address=127.0.0.1".to_owned(),
            "--advertise-address=127.0.0.1".to_owned(),
            format!("--secure-port={apiserver}"),
            format!("--tls-cert-file={}", pki.serving_cert.display()),
            format!("--tls-private-key-file={}", pki.serving_key.display()),
            format!("--client-ca-file={}", pki.ca_cert.display()),
            format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
            "--allow-privileged=true".to_owned(),
            // 127.0.0.1 is not a valid Endpoints address; skip publishing it for the
            // `kubernetes` Service instead of logging that error every few seconds.
            "--endpoint-reconciler-type=none".to_owned(),
            "--authorization-mode=RBAC".to_owned(),
            format!("--service-account-issuer={server}"),
            format!(
                "--service-account-key-file={}",
                pki.service_account_pub.display()
            ),
            format!(
                "--service-account-signing-key-file={}",
                pki.service_account_key.display()
            ),
        ];
        if mode == Mode::ApiServer {
            // Without kube-controller-manager no `default` ServiceAccount appears, and this
            // plugin would then reject every Pod.
            args.push("--disable-admission-plugins=ServiceAccount".to_owned());
        }
        self.apiserver = Some((binaries.path("kube-apiserver"), args.clone()));
        self.spawn(binaries, "kube-apiserver", args)?;

        kubeconfig::write(&self.kubeconfig, &server, &pki)?;
        let client = kubeconfig::client(&self.kubeconfig).await?;
        self.wait_until("kube-apiserver", "GET /healthz answers ok", || {
            healthz(&client)
        })
        .await?;
        self.wait_until("kube-apiserver", "namespace default exists", || {
            exists::<Namespace>(Api::all(client.clone()), "default")
        })
        .await?;
        info!(%server, elapsed = ?started.elapsed(), "kube-apiserver ready");

        if mode == Mode::WithControllers {
            self.start_controllers(binaries, &pki, &client).await?;
            info!(elapsed = ?started.elapsed(), "controllers ready, node {FAKE_NODE} Ready");
        }
        Ok(())
    }

    /// Starts kube-controller-manager, kube-scheduler and kwok, registers the fake Node,
    /// and waits until all are healthy, the Node is Ready with a Lease, and the `default`
    /// ServiceAccount exists (Pods are admitted only then).
    async fn start_controllers(
        &mut self,
        binaries: &Binaries,
        pki: &Pki,
        client: &kube::Client,
    ) -> Result<(), Error> {
        let [controller_manager, scheduler, kwok] = free_ports()?;
        let kubeconfig = self.kubeconfig.display().to_string();
        let state_dir = self.state_dir.clone();
        let serving = |component: &str, port: u16| {
            vec![
                format!("--kubeconfig={kubeconfig}"),
                format!("--authentication-kubeconfig={kubeconfig}"),
                format!("--authorization-kubeconfig={kubeconfig}"),
                "--bind-address=127.0.0.1".to_owned(),
                format!("--secure-port={port}"),
                format!("--cert-dir={}", state_dir.join(component).display()),
                "--leader-elect=false".to_owned(),
            ]
        };

        let mut args = serving("kube-controller-manager", controller_manager);
        args.extend([
            format!("--root-ca-file={}", pki.ca_cert.display()),
            format!("--cluster-signing-cert-file={}", pki.ca_cert.display()),
            format!("--cluster-signing-key-file={}", pki.ca_key.display()),
        ]);
        self.spawn(binaries, "kube-controller-manager", args)?;
        let args = serving("kube-scheduler", scheduler);
        self.spawn(binaries, "kube-scheduler", args)?;
        self.spawn(
            binaries,
            "kwok",
            vec![
                format!("--kubeconfig={kubeconfig}"),
                "--manage-all-nodes=false".to_owned(),
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".to_owned(),
                "--manage-nodes-with-label-selector=".to_owned(),
                "--disregard-status-with-annotation-selector=kwok.x-k8s.io/status=custom"
                    .to_owned(),
                "--disregard-status-with-label-selector=".to_owned(),
                "--cidr=10.1.0.1/16".to_owned(),
                "--node-ip=10.1.0.1".to_owned(),
                format!("--server-address=127.0.0.1:{kwok}"),
                // Renew the Node's Lease; without it kube-controller-manager marks the Node
                // unreachable after 50 s and its Pods NotReady.
                "--node-lease-duration-seconds=40".to_owned(),
                format!("--config={}", binaries.path("kwok-stages.yaml").display()),
            ],
        )?;

        Api::<Node>::all(client.clone())
            .create(&PostParams::default(), &fake_node())
            .await?;

        for (component, url) in [
            (
                "kube-controller-manager",
                format!("https://127.0.0.1:{controller_manager}"),
            ),
            ("kube-scheduler", format!("https://127.0.0.1:{scheduler}")),
            ("kwok", format!("http://127.0.0.1:{kwok}")),
        ] {
            let health = health_client(&url)?;
            self.wait_until(component, "GET /healthz answers ok", || healthz(&health))
                .await?;
        }
        self.wait_until("kwok", "the fake Node is Ready", || node_ready(client))
            .await?;
        self.wait_until("kwok", "the fake Node's Lease exists", || {
            exists::<Lease>(
                Api::namespaced(client.clone(), "kube-node-lease"),
                FAKE_NODE,
            )
        })
        .await?;
        self.wait_until(
            "kube-controller-manager",
            "ServiceAccount default/default exists",
            || exists::<ServiceAccount>(Api::namespaced(client.clone(), "default"), "default"),
        )
        .await
    }

    /// Returns the error describing the first component found to have exited; pending
    /// while all run.
    pub async fn exited(&mut self) -> Error {
        loop {
            for process in &mut self.processes {
                if let Err(error) = process.check_running() {
                    return error;
                }
            }
            tokio::time::sleep(POLL * 4).await;
        }
    }

    /// Stops the components, newest first: SIGTERM, then SIGKILL after [`STOP_GRACE`].
    pub async fn stop(&mut self) {
        while let Some(mut process) = self.processes.pop() {
            process.stop(STOP_GRACE).await;
        }
    }

    /// Stops kube-apiserver (SIGTERM, then SIGKILL after the grace period), starts it again
    /// with the same flags and state, and waits until it answers `/healthz`: for tests of
    /// clients that must ride out an apiserver restart.
    pub async fn restart_apiserver(&mut self) -> Result<(), Error> {
        const COMPONENT: &str = "kube-apiserver";
        let (program, args) = self.apiserver.clone().ok_or(Error::NotStarted {
            component: COMPONENT,
        })?;
        let index = self
            .processes
            .iter()
            .position(|p| p.name() == COMPONENT)
            .ok_or(Error::NotStarted {
                component: COMPONENT,
            })?;
        self.processes[index].stop(STOP_GRACE).await;
        info!(component = COMPONENT, "restarting");
        self.processes[index] =
            Process::spawn(COMPONENT, &program, &args, self.log_path(COMPONENT))?;
        let client = kubeconfig::client(&self.kubeconfig).await?;
        self.wait_until(COMPONENT, "GET /healthz answers ok after a restart", || {
            healthz(&client)
        })
        .await
    }

    fn spawn(
        &mut self,
        binaries: &Binaries,
        component: &'static str,
        args: Vec<String>,
    ) -> Result<(), Error> {
        let log = self.log_path(component);
        info!(component, log = %log.display(), "starting");
        let process = Process::spawn(component, &binaries.path(component), &args, log)?;
        self.processes.push(process);
        Ok(())
    }

    fn log_path(&self, component: &str) -> PathBuf {
        self.state_dir.join("logs").join(format!("{component}.log"))
    }

    /// Polls `ready` until it holds, failing when a component exits or after
    /// [`READY_TIMEOUT`] (with the tail of `component`'s log).
    async fn wait_until<F, Fut>(
        &mut self,
        component: &'static str,
        condition: &'static str,
        mut ready: F,
    ) -> Result<(), Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            for process in &mut self.processes {
                process.check_running()?;
            }
            let attempt = tokio::time::timeout_at(deadline.into(), ready()).await;
            if attempt.unwrap_or(false) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let log = self.log_path(component);
                return Err(Error::NotReady {
                    component,
                    condition,
                    timeout: READY_TIMEOUT,
                    tail: log_tail(&log),
                    log,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The processes are `kill_on_drop`; say so, since it skips the graceful stop.
        if !self.processes.is_empty() {
            tracing::warn!(
                components = ?self.processes.iter().map(Process::name).collect::<Vec<_>>(),
                "cluster dropped without stop(); killing its processes"
            );
        }
    }
}

/// `N` distinct free ports on 127.0.0.1 (held open together, so they differ).
fn free_ports<const N: usize>() -> Result<[u16; N], Error> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Error::NoFreePort)?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr().map_err(Error::NoFreePort)?.port();
    }
    Ok(ports)
}

/// A client for a component's own HTTP(S) server, which serves a self-signed certificate.
fn health_client(url: &str) -> Result<kube::Client, Error> {
    let invalid = |reason: String| Error::HealthEndpoint {
        url: url.to_owned(),
        reason,
    };
    let uri = url
        .parse()
        .map_err(|error: http::uri::InvalidUri| invalid(error.to_string()))?;
    let mut config = kube::Config::new(uri);
    // Only /healthz is read, and the certificate is generated by the component itself.
    config.accept_invalid_certs = true;
    kube::Client::try_from(config).map_err(|error| invalid(error.to_string()))
}

async fn healthz(client: &kube::Client) -> bool {
    let Ok(request) = http::Request::get("/healthz").body(Vec::new()) else {
        return false;
    };
    client
        .request_text(request)
        .await
        .is_ok_and(|body| body == "ok")
}

async fn exists<K>(api: Api<K>, name: &str) -> bool
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    matches!(api.get_opt(name).await, Ok(Some(_)))
}

async fn node_ready(client: &kube::Client) -> bool {
    let Ok(Some(node)) = Api::<Node>::all(client.clone()).get_opt(FAKE_NODE).await else {
        return false;
    };
    node.status
        .and_then(|status| status.conditions)
        .unwrap_or_default()
        .iter()
        .any(|condition| condition.type_ == "Ready" && condition.status == "True")
}

/// A Node for kwok to manage (it matches kwok's `--manage-nodes-with-annotation-selector`).
/// It has no taint, so ordinary Pods schedule onto it.
fn fake_node() -> Node {
    let map = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect::<BTreeMap<_, _>>()
    };
    let resources = [("cpu", "32"), ("memory", "256Gi"), ("pods", "110")]
        .map(|(name, amount)| (name.to_owned(), Quantity(amount.to_owned())))
        .into_iter()
        .collect::<BTreeMap<_, _>>();
    Node {
        metadata: ObjectMeta {
            name: Some(FAKE_NODE.to_owned()),
            annotations: Some(map(&[
                ("kwok.x-k8s.io/node", "fake"),
                ("node.alpha.kubernetes.io/ttl", "0"),
            ])),
            labels: Some(map(&[
                ("kubernetes.io/hostname", FAKE_NODE),
                ("kubernetes.io/os", "linux"),
                ("kubernetes.io/arch", "amd64"),
                ("type", "kwok"),
            ])),
            ..ObjectMeta::default()
        },
        status: Some(NodeStatus {
            allocatable: Some(resources.clone()),
            capacity: Some(resources),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}
