//! A container's environment, resolved as the kubelet resolves it: literal values with
//! `$(VAR)` references to earlier variables, `valueFrom` Secret and ConfigMap keys, and
//! the pod fields of the downward API.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret};
use kube::api::Api;

use super::NodeAgentError;

/// The address every pod of the agent's node has (`status.podIP`, `status.hostIP`).
pub const POD_IP: &str = "127.0.0.1";

/// Why one variable of a container could not be resolved: the kubelet reports this as
/// `CreateContainerConfigError` and tries again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    /// A `fieldRef` names a field the agent does not provide.
    #[error(
        "env {variable}: fieldRef {path:?} is not supported (metadata.name, metadata.namespace, metadata.uid, spec.nodeName, spec.serviceAccountName, status.podIP, status.hostIP are)"
    )]
    UnsupportedField {
        /// The variable.
        variable: String,
        /// The field path.
        path: String,
    },
    /// A non-optional Secret or ConfigMap, or its key, does not exist.
    #[error("env {variable}: {kind} {name:?} has no key {key:?} (or does not exist)")]
    MissingKey {
        /// The variable.
        variable: String,
        /// `Secret` or `ConfigMap`.
        kind: &'static str,
        /// The object's name.
        name: String,
        /// The key.
        key: String,
    },
    /// A value is not UTF-8.
    #[error("env {variable}: {kind} {name:?} key {key:?} is not UTF-8")]
    NotUtf8 {
        /// The variable.
        variable: String,
        /// `Secret` or `ConfigMap`.
        kind: &'static str,
        /// The object's name.
        name: String,
        /// The key.
        key: String,
    },
    /// `valueFrom` names no source the agent supports (e.g. `resourceFieldRef`).
    #[error("env {variable}: valueFrom has no secretKeyRef, configMapKeyRef or fieldRef")]
    UnsupportedSource {
        /// The variable.
        variable: String,
    },
}

/// The value of the downward API field `path` of `pod` on the agent's node.
pub fn pod_field(pod: &Pod, path: &str) -> Option<String> {
    let spec = pod.spec.as_ref();
    match path {
        "metadata.name" => pod.metadata.name.clone(),
        "metadata.namespace" => pod.metadata.namespace.clone(),
        "metadata.uid" => pod.metadata.uid.clone(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => Some(
            spec.and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".to_owned()),
        ),
        "status.podIP" | "status.hostIP" => Some(POD_IP.to_owned()),
        _ => None,
    }
}

/// Expands `$(NAME)` references in `value` to the variables defined so far, as the
/// kubelet does: `$$` is a literal `$`, and a reference to an unknown variable stays as
/// written.
pub fn expand(value: &str, defined: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(reference) = after.strip_prefix('(')
            && let Some(close) = reference.find(')')
        {
            let name = &reference[..close];
            match defined.get(name) {
                Some(found) => out.push_str(found),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &reference[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Where `valueFrom` keys are read: the apiserver, as the kubelet reads them (the agent
/// reads with its admin client), or a fixed map in unit tests.
pub trait KeySource {
    /// The bytes under `key` of the Secret (`secret` true) or ConfigMap `name` in
    /// `namespace`; `None` when the object or key does not exist.
    fn get(
        &self,
        secret: bool,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, NodeAgentError>> + Send;
}

/// Reads Secrets and ConfigMaps through the apiserver.
pub struct ApiKeys(pub kube::Client);

impl KeySource for ApiKeys {
    async fn get(
        &self,
        secret: bool,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<Option<Vec<u8>>, NodeAgentError> {
        let what = || format!("reading {} {namespace}/{name}", kind(secret));
        if secret {
            let found = Api::<Secret>::namespaced(self.0.clone(), namespace)
                .get_opt(name)
                .await
                .map_err(|source| NodeAgentError::Api {
                    what: what(),
                    source,
                })?;
            Ok(found
                .and_then(|s| s.data)
                .and_then(|mut data| data.remove(key))
                .map(|bytes| bytes.0))
        } else {
            let found = Api::<ConfigMap>::namespaced(self.0.clone(), namespace)
                .get_opt(name)
                .await
                .map_err(|source| NodeAgentError::Api {
                    what: what(),
                    source,
                })?;
            Ok(found.and_then(|c| {
                c.data
                    .and_then(|mut data| data.remove(key))
                    .map(String::into_bytes)
                    .or_else(|| c.binary_data.and_then(|mut b| b.remove(key)).map(|b| b.0))
            }))
        }
    }
}

fn kind(secret: bool) -> &'static str {
    if secret { "Secret" } else { "ConfigMap" }
}

/// The environment of `container` of `pod`, in order, with `$(VAR)` references expanded.
/// The outer error is the apiserver failing; the inner one a variable that cannot be
/// resolved (the kubelet's `CreateContainerConfigError`).
pub async fn resolve(
    pod: &Pod,
    container: &Container,
    keys: &impl KeySource,
) -> Result<Result<BTreeMap<String, String>, EnvError>, NodeAgentError> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut defined = BTreeMap::new();
    for variable in container.env.iter().flatten() {
        match resolve_one(pod, &namespace, variable, &defined, keys).await? {
            Ok(Some(value)) => {
                defined.insert(variable.name.clone(), value);
            }
            Ok(None) => {}
            Err(error) => return Ok(Err(error)),
        }
    }
    Ok(Ok(defined))
}

async fn resolve_one(
    pod: &Pod,
    namespace: &str,
    variable: &EnvVar,
    defined: &BTreeMap<String, String>,
    keys: &impl KeySource,
) -> Result<Result<Option<String>, EnvError>, NodeAgentError> {
    let name = &variable.name;
    let Some(from) = &variable.value_from else {
        return Ok(Ok(Some(expand(
            variable.value.as_deref().unwrap_or_default(),
            defined,
        ))));
    };
    if let Some(field) = &from.field_ref {
        return Ok(pod_field(pod, &field.field_path).map(Some).ok_or_else(|| {
            EnvError::UnsupportedField {
                variable: name.clone(),
                path: field.field_path.clone(),
            }
        }));
    }
    let (secret, object, key, optional) = if let Some(r) = &from.secret_key_ref {
        (true, r.name.clone(), r.key.clone(), r.optional)
    } else if let Some(r) = &from.config_map_key_ref {
        (false, r.name.clone(), r.key.clone(), r.optional)
    } else {
        return Ok(Err(EnvError::UnsupportedSource {
            variable: name.clone(),
        }));
    };
    match keys.get(secret, namespace, &object, &key).await? {
        Some(bytes) => Ok(String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| EnvError::NotUtf8 {
                variable: name.clone(),
                kind: kind(secret),
                name: object,
                key,
            })),
        None if optional == Some(true) => Ok(Ok(None)),
        None => Ok(Err(EnvError::MissingKey {
            variable: name.clone(),
            kind: kind(secret),
            name: object,
            key,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        EnvVarSource, ObjectFieldSelector, PodSpec, SecretKeySelector,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    struct Fixed(BTreeMap<(bool, String, String), Vec<u8>>);

    impl KeySource for Fixed {
        async fn get(
            &self,
            secret: bool,
            _namespace: &str,
            name: &str,
            key: &str,
        ) -> Result<Option<Vec<u8>>, NodeAgentError> {
            Ok(self
                .0
                .get(&(secret, name.to_owned(), key.to_owned()))
                .cloned())
        }
    }

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-1".into()),
                namespace: Some("apps".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some("local-node-0".into()),
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    fn value(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        }
    }

    fn from(name: &str, source: EnvVarSource) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(source),
        }
    }

    fn secret(name: &str, key: &str, optional: Option<bool>) -> EnvVarSource {
        EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: name.into(),
                key: key.into(),
                optional,
            }),
            ..EnvVarSource::default()
        }
    }

    #[test]
    fn references_expand_to_earlier_variables_only() {
        let defined = BTreeMap::from([("A".to_owned(), "x".to_owned())]);
        assert_eq!(expand("$(A)-$(B)-$$(A)-$", &defined), "x-$(B)-$(A)-$");
        assert_eq!(expand("no refs", &defined), "no refs");
        assert_eq!(expand("$(A", &defined), "$(A");
    }

    #[tokio::test]
    async fn values_secrets_and_fields_resolve_in_order() {
        let keys = Fixed(BTreeMap::from([(
            (true, "tok".to_owned(), "token".to_owned()),
            b"s3cret".to_vec(),
        )]));
        let field = |path: &str| EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        };
        let container = Container {
            name: "c".into(),
            env: Some(vec![
                from("POD", field("metadata.name")),
                from("NODE", field("spec.nodeName")),
                from("IP", field("status.podIP")),
                from("TOKEN", secret("tok", "token", None)),
                from("GONE", secret("missing", "x", Some(true))),
                value("WHO", "$(POD)@$(NODE)"),
            ]),
            ..Container::default()
        };
        let env = resolve(&pod(), &container, &keys)
            .await
            .unwrap_or_else(|e| panic!("api: {e}"))
            .unwrap_or_else(|e| panic!("env: {e}"));
        assert_eq!(env["POD"], "web-1");
        assert_eq!(env["NODE"], "local-node-0");
        assert_eq!(env["IP"], "127.0.0.1");
        assert_eq!(env["TOKEN"], "s3cret");
        assert_eq!(env["WHO"], "web-1@local-node-0");
        assert!(
            !env.contains_key("GONE"),
            "an optional missing key is left out"
        );
    }

    #[tokio::test]
    async fn a_missing_required_key_is_a_config_error() {
        let container = Container {
            name: "c".into(),
            env: Some(vec![from("TOKEN", secret("tok", "token", Some(false)))]),
            ..Container::default()
        };
        let result = resolve(&pod(), &container, &Fixed(BTreeMap::new()))
            .await
            .unwrap_or_else(|e| panic!("api: {e}"));
        assert!(
            matches!(&result, Err(EnvError::MissingKey { variable, .. }) if variable == "TOKEN"),
            "{result:?}"
        );
    }
}
