//! The processes of the data-plane benchmark (backend, proxy, connector) as children
//! that log to a file, are killed (SIGKILL) when dropped, and die with the benchmark.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
