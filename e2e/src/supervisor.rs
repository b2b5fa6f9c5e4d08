//! `sallyport-cluster`: runs a local control plane as its children and cleans up after it.
//!
//! `run` supervises one in the foreground (tests use it through
//! [`ControlPlane`](crate::controlplane::ControlPlane)); `up` and `down` manage one in the
//! background for interactive use.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::controlplane::{Binaries, Cluster, Error, Mode, cache_root, log_tail};

/// util-linux's `setsid`, which detaches `up`'s supervisor into a new session.
const SETSID: &str = "/usr/bin/setsid";
/// In a state directory: the supervisor's process id.
const PID_FILE: &str = "supervisor.pid";
/// In a state directory: written once the control plane is ready.
const READY_FILE: &str = "ready";
/// How long `up` waits for `run` to report ready (it bounds each of its own waits).
const UP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long `down` waits for `run` to stop its children (each gets a grace period).
const DOWN_TIMEOUT: Duration = Duration::from_secs(90);

/// Command-line interface of `sallyport-cluster`.
#[derive(Debug, Parser)]
#[command(
    name = "sallyport-cluster",
    version,
    about = "A real Kubernetes control plane on loopback, for Sallyport's tests and local use",
    long_about = "A real Kubernetes control plane on loopback, for Sallyport's tests and local use.\n\n\
        etcd and kube-apiserver (and with --with-controllers kube-controller-manager, \
        kube-scheduler and kwok with one fake Node) run as children of this command, on free \
        127.0.0.1 ports, with a throwaway CA and an admin kubeconfig (group system:masters).\n\n\
        Binaries come from $KUBEBUILDER_ASSETS when set, otherwise they are built once from the \
        Go module proxy into ${SALLYPORT_CACHE:-~/.cache/sallyport}/controlplane/ (KUBE_VERSION, \
        ETCD_VERSION, KWOK_VERSION pick the versions; a cold build takes 10+ minutes).\n\n\
        Quick start:\n  \
        export KUBECONFIG=$(sallyport-cluster up --with-controllers)\n  \
        kubectl get nodes\n  \
        sallyport-cluster down"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Subcommands,
}

#[derive(Debug, Subcommand)]
enum Subcommands {
    /// Make sure the control-plane binaries exist (building them if needed); print their directory.
    Build,
    /// Run a control plane in the foreground; print its kubeconfig path once ready.
    #[command(long_about = "Run a control plane in the foreground.\n\n\
        Once it is ready, the kubeconfig path is printed as the only line on stdout (logs go \
        to stderr). SIGUSR1 restarts kube-apiserver. It runs until SIGINT, SIGTERM or SIGHUP, or until stdin reaches EOF (so it \
        stops when the process feeding its stdin dies, even by SIGKILL); then it stops the \
        components (SIGTERM, SIGKILL after a grace period) and deletes the state directory. \
        Components also get SIGKILL if this process is killed (via `setpriv --pdeathsig`).")]
    Run(RunArgs),
    /// Start a control plane in the background and print its kubeconfig path.
    #[command(
        long_about = "Start a control plane in the background and print its kubeconfig \
        path as the last line on stdout, once it is ready.\n\n\
        Its state lives in ${SALLYPORT_CACHE:-~/.cache/sallyport}/cluster/local, its \
        supervisor's log in cluster/local.log. If one is up already, its kubeconfig path is \
        printed. Stop it with `sallyport-cluster down`."
    )]
    Up(UpArgs),
    /// Stop the control plane started by `up` and delete its state (no-op if none is up).
    Down,
    /// Print `export KUBECONFIG=...` (and a PATH with the matching kubectl) for the control
    /// plane started by `up`; use it as `eval "$(sallyport-cluster env)"`.
    Env,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Also run kube-controller-manager, kube-scheduler and kwok (one fake Node), so that
    /// Deployments roll out and become Available without containers.
    #[arg(long)]
    with_controllers: bool,
    /// Keep the state here instead of in a new temporary directory. It must be new or empty;
    /// it is deleted on exit.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Keep running when stdin reaches EOF (`up` uses this for its detached control plane).
    #[arg(long)]
    ignore_stdin: bool,
}

#[derive(Debug, Args)]
struct UpArgs {
    /// Also run kube-controller-manager, kube-scheduler and kwok (one fake Node).
    #[arg(long)]
    with_controllers: bool,
}

impl Cli {
    /// Runs the chosen subcommand.
    pub async fn run(self) -> Result<(), Error> {
        match self.command {
            Subcommands::Build => {
                let binaries = Binaries::locate(Mode::WithControllers).await?;
                print_line(&binaries.dir().display().to_string())
            }
            Subcommands::Run(args) => run(args).await,
            Subcommands::Up(args) => up(mode(args.with_controllers)).await,
            Subcommands::Down => down().await,
            Subcommands::Env => env(),
        }
    }
}

/// Logs to stderr; `RUST_LOG` filters. The default hides kube-client's errors, which are
/// expected while polling a starting component (failures are reported as [`Error`]s).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_client=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn mode(with_controllers: bool) -> Mode {
    if with_controllers {
        Mode::WithControllers
    } else {
        Mode::ApiServer
    }
}

async fn run(args: RunArgs) -> Result<(), Error> {
    let mut shutdown = shutdown_requests(!args.ignore_stdin)?;
    let state_dir = match args.state_dir {
        Some(dir) => claim_state_dir(dir)?,
        None => tempfile::Builder::new()
            .prefix("sallyport-cluster-")
            .tempdir()
            .map_err(Error::io(std::env::temp_dir()))?
            .keep(),
    };
    let outcome = supervise(&state_dir, mode(args.with_controllers), &mut shutdown).await;
    if let Err(error) = std::fs::remove_dir_all(&state_dir) {
        warn!(state_dir = %state_dir.display(), %error, "could not delete the state directory");
    }
    outcome
}

/// The file in the state directory counting completed kube-apiserver restarts.
pub const RESTARTS_FILE: &str = "apiserver-restarts";

/// Starts the control plane, reports it ready, and stops it on request or when a component
/// exits. Stops whatever was started in every case.
async fn supervise(
    state_dir: &Path,
    mode: Mode,
    shutdown: &mut mpsc::UnboundedReceiver<&'static str>,
) -> Result<(), Error> {
    let pid_file = state_dir.join(PID_FILE);
    std::fs::write(&pid_file, std::process::id().to_string()).map_err(Error::io(pid_file))?;
    let mut cluster = Cluster::new(state_dir);
    let outcome = async {
        let start = async {
            let binaries = Binaries::locate(mode).await?;
            cluster.start(&binaries, mode).await
        };
        tokio::select! {
            started = start => started?,
            reason = shutdown.recv() => {
                info!(reason, "stopping before the control plane was ready");
                return Ok(());
            }
        }
        let kubeconfig = cluster.kubeconfig_path().display().to_string();
        let ready = state_dir.join(READY_FILE);
        std::fs::write(&ready, &kubeconfig).map_err(Error::io(ready))?;
        print_line(&kubeconfig)?;
        info!(%kubeconfig, "control plane ready; stop it with Ctrl-C, SIGTERM or by closing stdin");
        // SIGUSR1 restarts kube-apiserver; each completed restart is counted in a file
        // of the state directory, for tests that wait for it.
        let mut restart = signal(SignalKind::user_defined1()).map_err(Error::Signal)?;
        let mut restarts = 0u32;
        loop {
            tokio::select! {
                reason = shutdown.recv() => {
                    info!(reason, "stopping");
                    break Ok(());
                }
                error = cluster.exited() => break Err(error),
                Some(()) = restart.recv() => {
                    cluster.restart_apiserver().await?;
                    restarts += 1;
                    let counter = state_dir.join(RESTARTS_FILE);
                    std::fs::write(&counter, restarts.to_string()).map_err(Error::io(counter))?;
                    info!(restarts, "kube-apiserver restarted");
                }
            }
        }
    }
    .await;
    cluster.stop().await;
    outcome
}

/// Why to shut down, as it happens: SIGINT, SIGTERM, SIGHUP, or (if `watch_stdin`) EOF on
/// stdin.
fn shutdown_requests(watch_stdin: bool) -> Result<mpsc::UnboundedReceiver<&'static str>, Error> {
    let (requests, receiver) = mpsc::unbounded_channel();
    for (kind, name) in [
        (SignalKind::interrupt(), "SIGINT"),
        (SignalKind::terminate(), "SIGTERM"),
        (SignalKind::hangup(), "SIGHUP"),
    ] {
        let mut signals = signal(kind).map_err(Error::Signal)?;
        let requests = requests.clone();
        tokio::spawn(async move {
            while signals.recv().await.is_some() {
                let _ = requests.send(name);
            }
        });
    }
    if watch_stdin {
        // A plain thread: a blocked read must not keep the runtime from shutting down.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            let _ = requests.send("stdin reached EOF");
        });
    }
    Ok(receiver)
}

/// Creates `dir` if needed, insists that it is empty (it is deleted on exit), and returns
/// it as an absolute path (the kubeconfig refers to files in it).
fn claim_state_dir(dir: PathBuf) -> Result<PathBuf, Error> {
    std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
    let mut entries = std::fs::read_dir(&dir).map_err(Error::io(&dir))?;
    if entries.next().is_some() {
        return Err(Error::StateDirNotEmpty { path: dir });
    }
    std::path::absolute(&dir).map_err(Error::io(dir))
}

async fn up(mode: Mode) -> Result<(), Error> {
    let dir = local_state_dir()?;
    let kubeconfig = dir.join("kubeconfig");
    if let Some(pid) = supervisor_pid(&dir) {
        eprintln!(
            "a control plane is already up (sallyport-cluster pid {pid}, state in {})",
            dir.display()
        );
        wait_ready(&dir, pid).await?;
        return print_line(&kubeconfig.display().to_string());
    }
    remove_if_exists(&dir)?; // left behind by a supervisor that was killed

    // Build in the foreground, where the progress shows.
    Binaries::locate(mode).await?;
    // Next to the state directory, so that it survives a failed start.
    let log_path = dir.with_extension("log");
    let mut child = spawn_detached(&dir, mode, &log_path)?;
    info!(pid = child.id(), log = %log_path.display(), "started sallyport-cluster run");

    let deadline = Instant::now() + UP_TIMEOUT;
    while !dir.join(READY_FILE).is_file() {
        let exited = child.try_wait().map_err(|source| Error::Wait {
            process: "sallyport-cluster run".into(),
            source,
        })?;
        if let Some(status) = exited {
            let tail = log_tail(&log_path);
            let details = format!("; last lines of {}:\n{tail}", log_path.display());
            return Err(Error::SupervisorExited { status, details });
        }
        if Instant::now() >= deadline {
            let pid = child.id();
            send(pid, Signal::SIGTERM);
            return Err(Error::SupervisorTimeout {
                pid,
                what: "become ready",
                timeout: UP_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("control plane up; stop it with `sallyport-cluster down`");
    print_line(&kubeconfig.display().to_string())
}

/// Starts `sallyport-cluster run --state-dir <dir>` in a new session (no terminal, no
/// signals meant for the caller's process group), stdin from /dev/null, output to `log`.
fn spawn_detached(dir: &Path, mode: Mode, log: &Path) -> Result<Child, Error> {
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
    }
    let stdout = File::create(log).map_err(Error::io(log))?;
    let stderr = stdout.try_clone().map_err(Error::io(log))?;
    let exe = std::env::current_exe().map_err(Error::io("/proc/self/exe"))?;
    let mut command = if Path::new(SETSID).is_file() {
        let mut command = Command::new(SETSID);
        command.arg(&exe);
        command
    } else {
        let mut command = Command::new(&exe);
        command.process_group(0);
        command
    };
    command
        .arg("run")
        .arg("--state-dir")
        .arg(dir)
        .arg("--ignore-stdin");
    if mode == Mode::WithControllers {
        command.arg("--with-controllers");
    }
    command
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .map_err(|source| Error::Spawn {
            program: exe,
            source,
        })
}

/// Waits until the supervisor `pid` of `dir`, which another `up` may still be starting,
/// reports ready.
async fn wait_ready(dir: &Path, pid: u32) -> Result<(), Error> {
    let deadline = Instant::now() + UP_TIMEOUT;
    while !dir.join(READY_FILE).is_file() {
        if Instant::now() >= deadline || !is_supervisor(pid, dir) {
            return Err(Error::SupervisorTimeout {
                pid,
                what: "become ready",
                timeout: UP_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

async fn down() -> Result<(), Error> {
    let dir = local_state_dir()?;
    match supervisor_pid(&dir) {
        Some(pid) => {
            eprintln!("stopping the control plane (sallyport-cluster pid {pid})");
            send(pid, Signal::SIGTERM);
            if !wait_gone(pid, &dir, DOWN_TIMEOUT).await {
                warn!(pid, "still running after {DOWN_TIMEOUT:?}; sending SIGKILL");
                send(pid, Signal::SIGKILL);
                if !wait_gone(pid, &dir, Duration::from_secs(10)).await {
                    return Err(Error::SupervisorTimeout {
                        pid,
                        what: "exit",
                        timeout: DOWN_TIMEOUT,
                    });
                }
            }
        }
        None => eprintln!("no control plane is up in {}", dir.display()),
    }
    remove_if_exists(&dir)?;
    remove_if_exists(&dir.with_extension("log"))
}

async fn wait_gone(pid: u32, dir: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while is_supervisor(pid, dir) {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

fn env() -> Result<(), Error> {
    let dir = local_state_dir()?;
    if supervisor_pid(&dir).is_none() || !dir.join(READY_FILE).is_file() {
        return Err(Error::NotUp { state_dir: dir });
    }
    let kubeconfig = dir.join("kubeconfig");
    let bin = dir.join("bin");
    if bin.join("kubectl").is_file() {
        print_line(&format!("export PATH={}:$PATH", bin.display()))?;
    }
    print_line(&format!("export KUBECONFIG={}", kubeconfig.display()))
}

/// `${SALLYPORT_CACHE:-~/.cache/sallyport}/cluster/local`, the state directory of `up`,
/// made absolute (it is matched against the supervisor's command line).
fn local_state_dir() -> Result<PathBuf, Error> {
    let dir = cache_root()?.join("cluster").join("local");
    std::path::absolute(&dir).map_err(Error::io(dir))
}

/// The pid of the live supervisor of `dir`, if any.
fn supervisor_pid(dir: &Path) -> Option<u32> {
    let pid = std::fs::read_to_string(dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    is_supervisor(pid, dir).then_some(pid)
}

/// Whether `pid` is a live process whose command line names `dir` (guarding against a
/// reused pid; a zombie's command line is empty).
fn is_supervisor(pid: u32, dir: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        cmdline
            .split(|byte| *byte == 0)
            .any(|arg| OsStr::from_bytes(arg) == dir)
    })
}

fn send(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

fn remove_if_exists(path: &Path) -> Result<(), Error> {
    let removed = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match removed {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path)(error)),
        _ => Ok(()),
    }
}

/// Prints `line` on stdout and flushes, so a reader waiting for it sees it now.
fn print_line(line: &str) -> Result<(), Error> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .map_err(Error::io("stdout"))
}
