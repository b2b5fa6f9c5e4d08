//! End-to-end test harness for Sallyport.
//!
//! - [`browser`]: a real headless Chromium driven over WebDriver, trusting the test CAs.
//! - [`controlplane`]: a real Kubernetes control plane on loopback (etcd and kube-apiserver,
//!   optionally kube-controller-manager, kube-scheduler and kwok), and the [`ControlPlane`]
//!   handle tests use to get one.
//! - [`dataplane`]: backends, an HTTPS client, and the proxy and connector processes.
//! - [`identity`]: the operator's and proxies' least-privileged ServiceAccounts, as kubeconfigs.
//! - [`manifests`]: the repository's CRDs and examples, applied as tests need them.
//! - [`node_agent`]: a tiny kubelet whose Node runs pods as local processes.
//! - [`oidc`]: a real OpenID provider (panva's oidc-provider on Node.js) with scripted
//!   users, clients, key rotation and token lifetimes.
//! - [`process`]: Sallyport's own binaries run as real processes, killed when dropped.
//! - [`risk`]: sign-ins over HTTP from a chosen loopback address (through the provider's
//!   login form), failed sign-ins, and a private `redis-server`, for the risk tests.
//! - [`test_ca`]: a throwaway CA issuing the test servers' certificates.
//! - [`testbed`]: the common start of every operator e2e test.
//! - [`supervisor`]: the `sallyport-cluster` command that runs a control plane as its children
//!   and cleans up after it.
//!
//! [`ControlPlane`]: controlplane::ControlPlane

pub mod access;
pub mod browser;
pub mod controlplane;
pub mod dataplane;
pub mod echo;
pub mod identity;
pub mod manifests;
pub mod node_agent;
pub mod oidc;
pub mod process;
pub mod risk;
pub mod sign_in;
pub mod supervisor;
pub mod test_ca;
pub mod testbed;
