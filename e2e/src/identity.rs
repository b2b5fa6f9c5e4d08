//! Running the operator and the proxies as the least-privileged identities they ship
//! with: their ServiceAccounts, bound to exactly the RBAC rules of `sallyport-operator
//! rbac`, each with a token from the TokenRequest API in a kubeconfig of its own.

use std::path::PathBuf;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::Kubeconfig;
use sallyport_operator::rbac;

use crate::controlplane::ControlPlane;
use crate::manifests::api_for;

/// The operator's identity could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The apiserver refused a request.
    #[error("{what}: {source}")]
    Api {
        /// What was being done.
        what: String,
        /// The apiserver's answer.
        source: kube::Error,
    },
    /// The RBAC objects could not be rendered.
    #[error("cannot render the operator's RBAC: {0}")]
    Render(#[from] serde_json::Error),
    /// The admin kubeconfig could not be read or the new one written.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
}

/// Applies the RBAC for `operator_namespace` and writes a kubeconfig that authenticates
/// as the operator's ServiceAccount; returns that kubeconfig's path.
pub async fn operator_kubeconfig(
    control_plane: &ControlPlane,
    operator_namespace: &str,
) -> Result<PathBuf, IdentityError> {
    service_account_kubeconfig(control_plane, operator_namespace, rbac::OPERATOR).await
}

/// Applies the RBAC for `operator_namespace`, makes sure the proxy fleet's ServiceAccount
/// exists (the operator makes it too, with the fleet), and writes a kubeconfig that
/// authenticates as it; returns that kubeconfig's path.
pub async fn proxy_kubeconfig(
    control_plane: &ControlPlane,
    operator_namespace: &str,
) -> Result<PathBuf, IdentityError> {
    let client = control_plane
        .client()
        .await
        .map_err(|e| IdentityError::Kubeconfig(e.to_string()))?;
    let account = ServiceAccount {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(rbac::PROXY.to_owned()),
            ..Default::default()
        },
        ..ServiceAccount::default()
    };
    Api::<ServiceAccount>::namespaced(client, operator_namespace)
        .patch(
            rbac::PROXY,
            &PatchParams::apply("sallyport-e2e"),
            &Patch::Apply(&account),
        )
        .await
        .map_err(|source| IdentityError::Api {
            what: "creating the proxy ServiceAccount".to_owned(),
            source,
        })?;
    service_account_kubeconfig(control_plane, operator_namespace, rbac::PROXY).await
}

async fn service_account_kubeconfig(
    control_plane: &ControlPlane,
    operator_namespace: &str,
    account: &str,
) -> Result<PathBuf, IdentityError> {
    let api_error = |what: &str| {
        let what = what.to_owned();
        move |source| IdentityError::Api { what, source }
    };
    let client = control_plane
        .client()
        .await
        .map_err(|e| IdentityError::Kubeconfig(e.to_string()))?;
    for object in rbac::objects(operator_namespace)? {
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let api =
            if namespace.is_empty() {
                let resource = kube::core::ApiResource::from_gvk(
                    &kube::core::GroupVersionKind::gvk("rbac.authorization.k8s.io", "v1", &kind),
                );
                Api::<DynamicObject>::all_with(client.clone(), &resource)
            } else {
                api_for(client.clone(), &namespace, &object)
            };
        api.patch(
            &name,
            &PatchParams::apply("sallyport-e2e").force(),
            &Patch::Apply(&object),
        )
        .await
        .map_err(api_error(&format!("applying {kind} {name}")))?;
    }
    token_kubeconfig(control_plane, operator_namespace, account).await
}

/// Writes a kubeconfig that authenticates as the existing ServiceAccount `account` of
/// `namespace`, with a one-hour token from the TokenRequest API (as a pod's projected
/// token would be); returns its path.
pub async fn token_kubeconfig(
    control_plane: &ControlPlane,
    namespace: &str,
    account: &str,
) -> Result<PathBuf, IdentityError> {
    let api_error = |what: &str| {
        let what = what.to_owned();
        move |source| IdentityError::Api { what, source }
    };
    let client = control_plane
        .client()
        .await
        .map_err(|e| IdentityError::Kubeconfig(e.to_string()))?;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let token = Api::<ServiceAccount>::namespaced(client, namespace)
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .map_err(api_error("requesting a ServiceAccount token"))?
        .status
        .map(|s| s.token)
        .ok_or_else(|| IdentityError::Kubeconfig("the TokenRequest returned no token".into()))?;

    let admin = Kubeconfig::read_from(control_plane.kubeconfig_path())
        .map_err(|e| IdentityError::Kubeconfig(e.to_string()))?;
    let mut restricted = admin.clone();
    for named in &mut restricted.auth_infos {
        if let Some(auth) = named.auth_info.as_mut() {
            *auth = kube::config::AuthInfo {
                token: Some(token.clone().into()),
                ..kube::config::AuthInfo::default()
            };
        }
    }
    let path = control_plane
        .kubeconfig_path()
        .with_file_name(format!("{account}-{namespace}.kubeconfig"));
    let yaml =
        serde_yaml::to_string(&restricted).map_err(|e| IdentityError::Kubeconfig(e.to_string()))?;
    std::fs::write(&path, yaml)
        .map_err(|e| IdentityError::Kubeconfig(format!("{}: {e}", path.display())))?;
    Ok(path)
}
