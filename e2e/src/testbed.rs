//! What every operator e2e test starts from: the shared control plane of its test binary
//! with the CRDs installed, a fresh operator namespace and app namespace, and a
//! kubeconfig for the operator's least-privileged ServiceAccount.

use std::path::{Path, PathBuf};

use crate::controlplane::{ControlPlane, Mode};
use crate::identity::operator_kubeconfig;
use crate::manifests::install_crds;

/// A prepared control plane for one operator test.
pub struct Testbed {
    /// The control plane shared by the test binary.
    pub control_plane: &'static ControlPlane,
    /// An admin client.
    pub client: kube::Client,
    /// The operator's namespace (`sallyport-system-<suffix>`).
    pub operator_namespace: String,
    /// A namespace for the test's objects (`<prefix>-<suffix>`).
    pub namespace: String,
    /// A kubeconfig authenticating as the operator's ServiceAccount.
    pub operator_kubeconfig: PathBuf,
}

impl Testbed {
    /// Prepares the shared control plane in `mode` (its supervisor is `supervisor`, the
    /// `sallyport-cluster` executable); the test's namespace is named after `prefix`.
    pub async fn new(
        supervisor: &Path,
        mode: Mode,
        prefix: &str,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let control_plane = ControlPlane::shared(supervisor, mode)?;
        let client = control_plane.client().await?;
        install_crds(&client).await?;
        let operator_namespace = control_plane.create_namespace("sallyport-system").await?;
        let namespace = control_plane.create_namespace(prefix).await?;
        let operator_kubeconfig = operator_kubeconfig(control_plane, &operator_namespace).await?;
        Ok(Self {
            control_plane,
            client,
            operator_namespace,
            namespace,
            operator_kubeconfig,
        })
    }
}
