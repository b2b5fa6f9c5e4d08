use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};

use super::{Error, Mode, kubeconfig};

/// How long dropping a [`ControlPlane`] waits for its supervisor to clean up.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A control plane for tests, supervised by a `sallyport-cluster run` child process.
///
/// The supervisor stops the control plane and deletes its (temporary) state directory when
/// its stdin reaches EOF, which happens when this handle is dropped or when the test
/// process exits in any way, including a panic or SIGKILL.
pub struct ControlPlane {
    supervisor: Child,
    kubeconfig: PathBuf,
}

impl ControlPlane {
    /// Starts `supervisor run` (the `sallyport-cluster` executable; integration tests get it
    /// from `env!("CARGO_BIN_EXE_sallyport-cluster")`) and blocks until the control plane
    /// is ready. Progress, including a first build of the binaries, goes to stderr.
    pub fn start(supervisor: &Path, mode: Mode) -> Result<Self, Error> {
        let mut command = Command::new(supervisor);
        command.arg("run");
        if mode == Mode::WithControllers {
            command.arg("--with-controllers");
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| Error::Spawn {
                program: supervisor.to_owned(),
                source,
            })?;

        // `run` prints one line on stdout, the kubeconfig path, once the control plane is
        // ready; EOF means it gave up (its error went to stderr).
        let mut line = String::new();
        if let Some(stdout) = child.stdout.take() {
            BufReader::new(stdout)
                .read_line(&mut line)
                .map_err(|source| Error::Wait {
                    process: "sallyport-cluster run".into(),
                    source,
                })?;
        }
        let kubeconfig = PathBuf::from(line.trim_end());
        if line.trim_end().is_empty() || !kubeconfig.is_file() {
            let _ = child.kill();
            let status = child.wait().map_err(|source| Error::Wait {
                process: "sallyport-cluster run".into(),
                source,
            })?;
            return Err(Error::SupervisorExited {
                status,
                details: format!("; its error is on stderr above (stdout: {line:?})"),
            });
        }
        Ok(ControlPlane {
            supervisor: child,
            kubeconfig,
        })
    }

    /// The control plane in `mode` shared by every test of this process, started by the
    /// first caller (later callers wait for it; `supervisor` is used only by the first).
    /// It is never dropped: it stops when the process exits and closes the supervisor's
    /// stdin. A failed start is remembered and reported to every caller.
    pub fn shared(supervisor: &Path, mode: Mode) -> Result<&'static Self, Error> {
        static API_SERVER: OnceLock<Result<ControlPlane, Arc<Error>>> = OnceLock::new();
        static WITH_CONTROLLERS: OnceLock<Result<ControlPlane, Arc<Error>>> = OnceLock::new();
        let cell = match mode {
            Mode::ApiServer => &API_SERVER,
            Mode::WithControllers => &WITH_CONTROLLERS,
        };
        cell.get_or_init(|| ControlPlane::start(supervisor, mode).map_err(Arc::new))
            .as_ref()
            .map_err(|error| Error::SharedFailed(Arc::clone(error)))
    }

    /// The admin kubeconfig, usable by kubectl and [`kube::Config`].
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The directory holding the control plane's state and logs (deleted when it stops).
    pub fn state_dir(&self) -> Option<&Path> {
        self.kubeconfig.parent()
    }

    /// A `kubectl` command for this control plane: `KUBECONFIG` is set, and the program is
    /// `$KUBECTL` when set, else the kubectl built with the control plane (same version),
    /// else `kubectl` from `PATH`.
    pub fn kubectl(&self) -> std::process::Command {
        let bundled = self.kubeconfig.with_file_name("bin").join("kubectl");
        let program = std::env::var_os("KUBECTL")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                if bundled.is_file() {
                    bundled
                } else {
                    PathBuf::from("kubectl")
                }
            });
        let mut command = std::process::Command::new(program);
        command.env("KUBECONFIG", &self.kubeconfig);
        command
    }

    /// Restarts kube-apiserver (same flags, same etcd) and returns once it serves again.
    /// Clients see their connections and watches drop, as in a real apiserver restart.
    pub async fn restart_apiserver(&self) -> Result<(), Error> {
        let counter = self
            .kubeconfig
            .with_file_name(crate::supervisor::RESTARTS_FILE);
        let count = || {
            std::fs::read_to_string(&counter)
                .ok()
                .and_then(|c| c.trim().parse::<u32>().ok())
                .unwrap_or(0)
        };
        let before = count();
        let pid =
            nix::unistd::Pid::from_raw(i32::try_from(self.supervisor.id()).unwrap_or(i32::MAX));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1)
            .map_err(|errno| Error::Signal(std::io::Error::from(errno)))?;
        let deadline = tokio::time::Instant::now() + super::READY_TIMEOUT + super::STOP_GRACE;
        while count() == before {
            if tokio::time::Instant::now() > deadline {
                return Err(Error::NotReady {
                    component: "kube-apiserver",
                    condition: "restarted",
                    timeout: super::READY_TIMEOUT + super::STOP_GRACE,
                    tail: String::new(),
                    log: self
                        .kubeconfig
                        .with_file_name("logs")
                        .join("kube-apiserver.log"),
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// A new admin client. Make one per test: a client is tied to the Tokio runtime it was
    /// made on, and each `#[tokio::test]` has its own.
    pub async fn client(&self) -> Result<kube::Client, Error> {
        kubeconfig::client(&self.kubeconfig).await
    }

    /// Creates a namespace named `<prefix>-<random suffix>` and returns its name, so tests
    /// sharing a control plane do not see each other's objects.
    pub async fn create_namespace(&self, prefix: &str) -> Result<String, Error> {
        let namespace = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{prefix}-")),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let created = Api::<Namespace>::all(self.client().await?)
            .create(&PostParams::default(), &namespace)
            .await?;
        Ok(created.metadata.name.unwrap_or_default())
    }
}

impl Drop for ControlPlane {
    /// Closes the supervisor's stdin and waits for it to stop the control plane and delete
    /// its state; kills it if that takes longer than a minute.
    fn drop(&mut self) {
        drop(self.supervisor.stdin.take());
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match self.supervisor.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                Ok(Some(_)) | Err(_) => return,
            }
        }
        let _ = self.supervisor.kill();
        let _ = self.supervisor.wait();
    }
}
