//! The repository's manifests as tests use them: YAML files, the CRDs, examples.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::wait::{await_condition, conditions};
use serde::Deserialize;
use serde_json::Value;

/// A test setup step failed.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not valid YAML.
    #[error("{path} is not valid YAML: {source}")]
    Yaml {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_yaml::Error,
    },
    /// A document is not the object it should be.
    #[error("{what} is not a valid object: {source}")]
    Object {
        /// Which document.
        what: String,
        /// Why.
        source: serde_json::Error,
    },
    /// The apiserver refused a request.
    #[error("{what}: {source}")]
    Api {
        /// What was being done.
        what: String,
        /// The apiserver's answer.
        source: kube::Error,
    },
    /// Watching a CRD failed.
    #[error("watching CRD {name}: {source}")]
    Wait {
        /// The CRD.
        name: String,
        /// Why.
        source: kube::runtime::wait::Error,
    },
    /// A CRD did not become Established in time.
    #[error("CRD {name} was not Established within {timeout:?}")]
    NotEstablished {
        /// The CRD.
        name: String,
        /// How long we waited.
        timeout: Duration,
    },
}

/// The e2e crate's directory in the checkout being tested.
///
/// Taken from `CARGO_MANIFEST_DIR` at run time (cargo sets it for test binaries), and
/// only then from the compile-time value: a library compiled in another clone that
/// shares the cargo target directory would otherwise point at that clone.
pub fn e2e_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// A path inside the repository, e.g. `repo_path("crds")`.
pub fn repo_path(relative: &str) -> PathBuf {
    e2e_dir().join("..").join(relative)
}

/// Every YAML document of every `*.yaml` file in `dir`, sorted by file name; empty
/// documents are skipped.
pub fn yaml_documents(dir: &Path) -> Result<Vec<Value>, ManifestError> {
    let read_error = |source| ManifestError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_error)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(|source| ManifestError::Read {
            path: dir.to_owned(),
            source,
        })?;
    files.retain(|path| path.extension().is_some_and(|ext| ext == "yaml"));
    files.sort();
    let mut documents = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| ManifestError::Read {
            path: file.clone(),
            source,
        })?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(document).map_err(|source| ManifestError::Yaml {
                path: file.clone(),
                source,
            })?;
            if !value.is_null() {
                documents.push(value);
            }
        }
    }
    Ok(documents)
}

/// How long a CRD may take to be served.
pub const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(60);

/// Applies the committed CRDs (`crds/*.yaml`) with server-side apply and waits until each
/// is Established. Idempotent, so every test may call it.
pub async fn install_crds(client: &kube::Client) -> Result<(), ManifestError> {
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let mut names = Vec::new();
    for document in yaml_documents(&repo_path("crds"))? {
        let crd: CustomResourceDefinition =
            serde_json::from_value(document).map_err(|source| ManifestError::Object {
                what: "a file in crds/".into(),
                source,
            })?;
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(
            &name,
            &PatchParams::apply("sallyport-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .map_err(|source| ManifestError::Api {
            what: format!("applying CRD {name}"),
            source,
        })?;
        names.push(name);
    }
    for name in names {
        tokio::time::timeout(
            ESTABLISH_TIMEOUT,
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .map_err(|_| ManifestError::NotEstablished {
            name: name.clone(),
            timeout: ESTABLISH_TIMEOUT,
        })?
        .map_err(|source| ManifestError::Wait {
            name: name.clone(),
            source,
        })?;
    }
    Ok(())
}

/// The namespaced API for whatever kind the JSON `object` is.
pub fn api_for(client: kube::Client, namespace: &str, object: &Value) -> Api<DynamicObject> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = object["kind"].as_str().unwrap_or_default();
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    Api::namespaced_with(client, namespace, &resource)
}

/// Creates the JSON `object` in `namespace`, whatever its kind; the apiserver's refusal
/// is returned as is, for tests that expect one.
pub async fn create(
    client: kube::Client,
    namespace: &str,
    object: &Value,
) -> kube::Result<DynamicObject> {
    let api = api_for(client, namespace, object);
    let dynamic: DynamicObject =
        serde_json::from_value(object.clone()).map_err(kube::Error::SerdeError)?;
    api.create(&PostParams::default(), &dynamic).await
}

/// A `kubernetes.io/tls` Secret `name` holding a fresh self-signed certificate for `host`.
pub fn self_signed_tls_secret(
    name: &str,
    host: &str,
) -> Result<k8s_openapi::api::core::v1::Secret, rcgen::Error> {
    use k8s_openapi::ByteString;
    let key = rcgen::KeyPair::generate()?;
    let certificate = rcgen::CertificateParams::new(vec![host.to_owned()])?.self_signed(&key)?;
    Ok(k8s_openapi::api::core::v1::Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(std::collections::BTreeMap::from([
            (
                "tls.crt".to_owned(),
                ByteString(certificate.pem().into_bytes()),
            ),
            (
                "tls.key".to_owned(),
                ByteString(key.serialize_pem().into_bytes()),
            ),
        ])),
        ..Default::default()
    })
}
