//! A real Kubernetes control plane on loopback.
//!
//! The pieces, in the order a start uses them:
//!
//! 1. [`Binaries`]: the executables, from `$KUBEBUILDER_ASSETS` or built into the cache;
//! 2. [`Pki`]: a throwaway CA and the certificates and keys signed by it;
//! 3. [`Cluster`]: etcd, kube-apiserver and (in [`Mode::WithControllers`]) the controllers,
//!    running as children of the calling process, plus an admin kubeconfig;
//! 4. [`ControlPlane`]: for tests, a `sallyport-cluster run` child supervising a [`Cluster`].

mod binaries;
mod cluster;
mod error;
mod handle;
mod kubeconfig;
mod pki;
mod process;

use std::path::PathBuf;

pub use binaries::Binaries;
pub use cluster::{Cluster, FAKE_NODE, READY_TIMEOUT, STOP_GRACE};
pub use error::Error;
pub use handle::ControlPlane;
pub use kubeconfig::client;
pub use pki::Pki;
pub(crate) use process::log_tail;

/// Which components a control plane runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// etcd and kube-apiserver only: the API works, but nothing reconciles
    /// (no Deployment rollouts, no ServiceAccount tokens, no scheduling).
    ApiServer,
    /// Additionally kube-controller-manager, kube-scheduler and kwok with one fake Node,
    /// so that workloads roll out and become Available without running containers.
    WithControllers,
}

impl Mode {
    /// The files this mode needs in the binaries directory: executables, and kwok's
    /// `--config` with the node and pod lifecycle stages.
    pub fn files(self) -> &'static [&'static str] {
        match self {
            Mode::ApiServer => &["etcd", "kube-apiserver"],
            Mode::WithControllers => &[
                "etcd",
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
                "kwok",
                "kwok-stages.yaml",
            ],
        }
    }
}

/// The root of Sallyport's build cache: `$SALLYPORT_CACHE`, else
/// `$XDG_CACHE_HOME/sallyport`, else `$HOME/.cache/sallyport` (the same rule as
/// `build-binaries.sh`).
pub fn cache_root() -> Result<PathBuf, Error> {
    let non_empty = |name| std::env::var_os(name).filter(|value| !value.is_empty());
    if let Some(dir) = non_empty("SALLYPORT_CACHE") {
        return Ok(dir.into());
    }
    if let Some(dir) = non_empty("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("sallyport"));
    }
    non_empty("HOME")
        .map(|home| PathBuf::from(home).join(".cache/sallyport"))
        .ok_or(Error::NoCacheDir)
}
