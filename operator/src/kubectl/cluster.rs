//! The cluster as kubectl finds it: `--kubeconfig` (else `$KUBECONFIG`, else
//! `~/.kube/config`, else the in-cluster service account), `--context` (else the
//! kubeconfig's current one) and that context's namespace.

use std::path::PathBuf;

use clap::Args;
use kube::config::{Config, KubeConfigOptions, Kubeconfig};

/// Which kubeconfig and context to use, as kubectl's flags of the same names.
#[derive(Debug, Clone, Default, Args)]
pub struct ClusterArgs {
    /// The kubeconfig file. Default: $KUBECONFIG (files joined by ':'), else
    /// ~/.kube/config, else the in-cluster service account.
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// The kubeconfig context. Default: the kubeconfig's current context.
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
}

/// No client for the cluster could be made.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The kubeconfig could not be read or has no usable context.
    #[error("cannot use the kubeconfig{}: {source}", .path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Kubeconfig {
        /// The file given with --kubeconfig, if any.
        path: Option<PathBuf>,
        /// Why.
        source: kube::config::KubeconfigError,
    },
    /// Neither a kubeconfig nor the in-cluster service account is available.
    #[error("no kubeconfig ($KUBECONFIG, ~/.kube/config) and not in a Pod; give --kubeconfig: {0}")]
    Infer(#[source] kube::config::InferConfigError),
    /// The client could not be built from the configuration.
    #[error("cannot create a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// The client configuration `args` select.
pub async fn config(args: &ClusterArgs) -> Result<Config, ClusterError> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let failed = |source| ClusterError::Kubeconfig {
        path: args.kubeconfig.clone(),
        source,
    };
    match (&args.kubeconfig, &args.context) {
        (Some(path), _) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(failed)?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(failed)
        }
        // A context only exists in a kubeconfig: no in-cluster fallback.
        (None, Some(_)) => Config::from_kubeconfig(&options).await.map_err(failed),
        (None, None) => Config::infer().await.map_err(ClusterError::Infer),
    }
}

/// A client for the cluster `args` select, and the namespace of its context (`default`
/// when the context names none; the service account's in a Pod).
pub async fn client(args: &ClusterArgs) -> Result<(kube::Client, String), ClusterError> {
    let config = config(args).await?;
    let namespace = config.default_namespace.clone();
    let client = kube::Client::try_from(config).map_err(ClusterError::Client)?;
    Ok((client, namespace))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBECONFIG: &str = "
apiVersion: v1
kind: Config
current-context: dev
clusters:
- name: c
  cluster: {server: 'https://127.0.0.1:6443'}
users:
- name: u
  user: {token: abc}
contexts:
- name: dev
  context: {cluster: c, user: u, namespace: team-a}
- name: prod
  context: {cluster: c, user: u}
";

    #[tokio::test]
    async fn the_context_and_its_namespace_come_from_the_kubeconfig_as_kubectl_reads_it() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("config");
        std::fs::write(&path, KUBECONFIG).unwrap_or_else(|e| panic!("{e}"));
        let mut args = ClusterArgs {
            kubeconfig: Some(path),
            context: None,
        };
        let current = config(&args).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(current.default_namespace, "team-a");
        args.context = Some("prod".into());
        let prod = config(&args).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(prod.default_namespace, "default");
        args.context = Some("nowhere".into());
        let error = config(&args).await.err().map(|e| e.to_string());
        assert!(
            error.as_deref().is_some_and(|e| e.contains("nowhere")),
            "{error:?}"
        );
    }
}
