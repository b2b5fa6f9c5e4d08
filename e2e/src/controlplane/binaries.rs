use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use tokio::process::Command;
use tracing::{debug, info};

use super::{Error, Mode};

/// `build-binaries.sh`, embedded so the binary works from any directory.
const BUILD_SCRIPT: &str = include_str!("../../controlplane/build-binaries.sh");

/// A directory holding the control-plane executables.
#[derive(Clone, Debug)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// The executables for `mode`: from `$KUBEBUILDER_ASSETS` when set, otherwise from the
    /// cache, built first if missing (see [`Binaries::build`]).
    pub async fn locate(mode: Mode) -> Result<Self, Error> {
        let binaries = match std::env::var_os("KUBEBUILDER_ASSETS").filter(|dir| !dir.is_empty()) {
            Some(dir) => {
                info!(dir = %Path::new(&dir).display(), "using control-plane binaries from KUBEBUILDER_ASSETS");
                Binaries { dir: dir.into() }
            }
            None => Self::build().await?,
        };
        binaries.check(mode)?;
        Ok(binaries)
    }

    /// Runs `build-binaries.sh`, which builds every missing executable into the versioned
    /// cache directory (`KUBE_VERSION`, `ETCD_VERSION`, `KWOK_VERSION`, `SALLYPORT_CACHE`
    /// choose which) and is a no-op when all are there. Its progress goes to stderr.
    pub async fn build() -> Result<Self, Error> {
        debug!("running build-binaries.sh");
        let started = Instant::now();
        let output = Command::new("bash")
            .arg("-c")
            .arg(BUILD_SCRIPT)
            .arg("build-binaries.sh")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|source| Error::Spawn {
                program: "bash".into(),
                source,
            })?;
        if !output.status.success() {
            return Err(Error::BuildFailed {
                status: output.status,
            });
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let dir = stdout
            .lines()
            .rev()
            .find(|line| !line.trim().is_empty())
            .ok_or(Error::BuildPrintedNoDir)?;
        info!(dir, elapsed = ?started.elapsed(), "control-plane binaries ready");
        Ok(Binaries {
            dir: dir.trim().into(),
        })
    }

    /// The directory holding the executables.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of the file (usually an executable) `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn check(&self, mode: Mode) -> Result<(), Error> {
        match mode.files().iter().find(|name| !self.path(name).is_file()) {
            Some(name) => Err(Error::MissingBinary {
                name,
                dir: self.dir.clone(),
            }),
            None => Ok(()),
        }
    }
}
