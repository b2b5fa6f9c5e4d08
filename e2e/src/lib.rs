//! End-to-end test harness for Sallyport.
//!
//! - [`controlplane`]: a real Kubernetes control plane on loopback (etcd and kube-apiserver,
//!   optionally kube-controller-manager, kube-scheduler and kwok), and the [`ControlPlane`]
//!   handle tests use to get one.
//! - [`dataplane`]: backends, an HTTPS client, and the proxy and connector processes.
//! - [`identity`]: the operator's and proxies' least-privileged ServiceAccounts, as kubeconfigs.
//! - [`manifests`]: the repository's CRDs and examples, applied as tests need them.
//! - [`process`]: Sallyport's own binaries run as real processes, killed when dropped.
//! - [`testbed`]: the common start of every operator e2e test.
//! - [`supervisor`]: the `sallyport-cluster` command that runs a control plane as its children
//!   and cleans up after it.
//!
//! [`ControlPlane`]: controlplane::ControlPlane

pub mod controlplane;
pub mod dataplane;
pub mod identity;
pub mod manifests;
pub mod process;
pub mod supervisor;
pub mod testbed;
