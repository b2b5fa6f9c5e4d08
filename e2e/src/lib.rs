//! End-to-end test harness for Sallyport.
//!
//! - [`controlplane`]: a real Kubernetes control plane on loopback (etcd and kube-apiserver,
//!   optionally kube-controller-manager, kube-scheduler and kwok), and the [`ControlPlane`]
//!   handle tests use to get one.
//! - [`supervisor`]: the `sallyport-cluster` command that runs a control plane as its children
//!   and cleans up after it.
//!
//! [`ControlPlane`]: controlplane::ControlPlane

pub mod controlplane;
pub mod supervisor;
