use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tracing::{debug, warn};

use super::Error;

/// util-linux's `setpriv`, used to give children a parent-death signal without `unsafe`.
const SETPRIV: &str = "/usr/bin/setpriv";

/// How much of a log file's end goes into error messages.
const TAIL_BYTES: u64 = 4096;

/// One control-plane component running as a child process, its output in a log file.
pub(crate) struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `program` with its stdout and stderr appended to `log`.
    ///
    /// The child runs in its own process group (a Ctrl-C in the terminal reaches only the
    /// supervisor, which then stops the children in order) and, where `setpriv` exists,
    /// gets SIGKILL when the spawning *thread* dies, so call this from a thread that lives
    /// as long as the child should (the supervisor's main thread).
    pub(crate) fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<Self, Error> {
        let output = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(Error::io(&log))?;
        let output2 = output.try_clone().map_err(Error::io(&log))?;
        let mut command = if Path::new(SETPRIV).is_file() {
            let mut command = Command::new(SETPRIV);
            command.args(["--pdeathsig", "KILL", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(output2)
            .process_group(0)
            .kill_on_drop(true);
        debug!(name, ?command, "starting");
        let child = command.spawn().map_err(|source| Error::Spawn {
            program: program.to_owned(),
            source,
        })?;
        Ok(Process { name, child, log })
    }

    /// The component's name.
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// An [`Error::Exited`] if the process has exited.
    pub(crate) fn check_running(&mut self) -> Result<(), Error> {
        let status = self.child.try_wait().map_err(|source| Error::Wait {
            process: self.name.to_owned(),
            source,
        })?;
        match status {
            Some(status) => Err(self.exited(status)),
            None => Ok(()),
        }
    }

    /// An [`Error::Exited`] for this process having exited with `status`.
    fn exited(&self, status: ExitStatus) -> Error {
        Error::Exited {
            component: self.name,
            status,
            log: self.log.clone(),
            tail: log_tail(&self.log),
        }
    }

    /// Stops the process: SIGTERM, then SIGKILL if it is still running after `grace`.
    pub(crate) async fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        if let Some(pid) = self.child.id().and_then(|id| i32::try_from(id).ok()) {
            // The pid is our unreaped child, so it cannot have been reused.
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => debug!(name = self.name, %status, "stopped"),
            Ok(Err(error)) => warn!(name = self.name, %error, "waiting for it failed"),
            Err(_) => {
                warn!(
                    name = self.name,
                    ?grace,
                    "still running after SIGTERM; sending SIGKILL"
                );
                if let Err(error) = self.child.kill().await {
                    warn!(name = self.name, %error, "SIGKILL failed");
                }
            }
        }
    }
}

/// The last lines of a log file (about 4 KiB), or why they could not be read.
pub(crate) fn log_tail(path: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let text = String::from_utf8_lossy(&bytes);
        // Drop the first, probably partial, line unless the file is that short.
        let text = match text.split_once('\n') {
            Some((_, rest)) if len > TAIL_BYTES => rest,
            _ => &text,
        };
        Ok(text.trim_end().to_owned())
    };
    read().unwrap_or_else(|error| format!("(could not read {}: {error})", path.display()))
}
