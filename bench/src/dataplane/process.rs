//! The processes of the data-plane benchmark (backend, proxy, connector) as children
//! that log to a file, are killed (SIGKILL) when dropped, and die with the benchmark.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::error::DataplaneError;
use crate::procfs::{self, Memory};

/// util-linux's `setpriv`, which makes the kernel kill a child when the benchmark dies.
const SETPRIV: &str = "/usr/bin/setpriv";

/// A running child process; killed when dropped.
pub struct ChildProcess {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl ChildProcess {
    /// Starts `program ARGS` with `envs` added, stdout and stderr into `log`. Call it from
    /// the thread that stays alive for the whole run (the main thread): the kernel kills
    /// the child when the thread that started it exits.
    pub fn start(
        name: &'static str,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        log: &Path,
    ) -> Result<Self, DataplaneError> {
        let out =
            File::create(log).map_err(DataplaneError::io(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(DataplaneError::io(format!("opening {}", log.display())))?;
        let mut command = if Path::new(SETPRIV).is_file() {
            let mut command = Command::new(SETPRIV);
            command.args(["--pdeathsig", "KILL", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        command
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = command.spawn().map_err(|source| DataplaneError::Spawn {
            program: program.to_owned(),
            source,
        })?;
        Ok(Self {
            name,
            child,
            log: log.to_owned(),
        })
    }

    /// The process id (`setpriv` execs the program, so the id is the program's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its name in reports and errors.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Fails when the process has exited.
    pub fn check_running(&mut self) -> Result<(), DataplaneError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(DataplaneError::Exited {
                name: self.name,
                status,
                log: self.log.clone(),
            }),
            Err(source) => Err(DataplaneError::Io {
                what: format!("checking on {}", self.name),
                source,
            }),
        }
    }

    /// Its peak and current resident memory.
    pub fn memory(&self) -> Result<Memory, DataplaneError> {
        Ok(procfs::memory(self.pid())?)
    }

    /// CPU time (user and system, all threads) it has used so far.
    pub fn cpu_time(&self) -> Result<Duration, DataplaneError> {
        Ok(procfs::cpu_time(self.pid())?)
    }

    /// Sends SIGTERM (what Kubernetes sends a pod it removes): the process drains and
    /// exits on its own; see [`ChildProcess::wait_exit`].
    pub fn terminate(&mut self) -> Result<(), DataplaneError> {
        self.signal(nix::sys::signal::Signal::SIGTERM)
    }

    /// Sends SIGKILL: the process ends at once, its connections cut by the kernel.
    pub fn kill(&mut self) -> Result<(), DataplaneError> {
        self.signal(nix::sys::signal::Signal::SIGKILL)
    }

    fn signal(&mut self, signal: nix::sys::signal::Signal) -> Result<(), DataplaneError> {
        if self.child.try_wait().ok().flatten().is_some() {
            // Already gone (and reaped): no signal to a recycled process id.
            return Ok(());
        }
        let pid = i32::try_from(self.pid()).map_err(|_| DataplaneError::Client {
            what: format!("signalling {}", self.name),
            message: format!("process id {} out of range", self.pid()),
        })?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).map_err(|errno| {
            DataplaneError::Io {
                what: format!("sending {signal} to {} ({pid})", self.name),
                source: std::io::Error::from(errno),
            }
        })
    }

    /// Waits (polling every millisecond) until the process has exited, at most `within`:
    /// its exit status, or `None` while it still runs.
    pub async fn wait_exit(
        &mut self,
        within: Duration,
    ) -> Result<Option<ExitStatus>, DataplaneError> {
        let deadline = std::time::Instant::now() + within;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(Some(status)),
                Ok(None) if std::time::Instant::now() >= deadline => return Ok(None),
                Ok(None) => tokio::time::sleep(Duration::from_millis(1)).await,
                Err(source) => {
                    return Err(DataplaneError::Io {
                        what: format!("waiting for {} to exit", self.name),
                        source,
                    });
                }
            }
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
