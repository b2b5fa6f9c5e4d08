use std::path::Path;

use kube::config::{
    AuthInfo, Cluster, Context, KubeConfigOptions, Kubeconfig, NamedAuthInfo, NamedCluster,
    NamedContext,
};

use super::{Error, Pki};

const NAME: &str = "sallyport-local";

/// Writes an admin kubeconfig for `server` that refers to the certificate files of `pki`.
pub(crate) fn write(path: &Path, server: &str, pki: &Pki) -> Result<(), Error> {
    let display = |path: &Path| Some(path.display().to_string());
    let kubeconfig = Kubeconfig {
        api_version: Some("v1".to_owned()),
        kind: Some("Config".to_owned()),
        clusters: vec![NamedCluster {
            name: NAME.to_owned(),
            cluster: Some(Cluster {
                server: Some(server.to_owned()),
                certificate_authority: display(&pki.ca_cert),
                ..Cluster::default()
            }),
            ..NamedCluster::default()
        }],
        auth_infos: vec![NamedAuthInfo {
            name: NAME.to_owned(),
            auth_info: Some(AuthInfo {
                client_certificate: display(&pki.admin_cert),
                client_key: display(&pki.admin_key),
                ..AuthInfo::default()
            }),
            ..NamedAuthInfo::default()
        }],
        contexts: vec![NamedContext {
            name: NAME.to_owned(),
            context: Some(Context {
                cluster: NAME.to_owned(),
                user: Some(NAME.to_owned()),
                ..Context::default()
            }),
            ..NamedContext::default()
        }],
        current_context: Some(NAME.to_owned()),
        ..Kubeconfig::default()
    };
    let yaml = serde_yaml::to_string(&kubeconfig).map_err(Error::KubeconfigYaml)?;
    std::fs::write(path, yaml).map_err(Error::io(path))
}

/// A new [`kube::Client`] for the kubeconfig at `path`.
pub async fn client(path: &Path) -> Result<kube::Client, Error> {
    let err = |source| Error::Kubeconfig {
        path: path.to_owned(),
        source,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(err)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(err)?;
    Ok(kube::Client::try_from(config)?)
}
