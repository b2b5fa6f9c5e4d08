//! Reading Sallyport objects from YAML manifests, for compiling without a cluster.
//!
//! Files hold one or more YAML documents (`---`). Documents of kind `List` (as
//! `kubectl get -o yaml` writes) are read item by item. `Namespace` objects give the
//! namespace labels that `allowedNamespaces.from: Selector` matches. Objects of other
//! kinds are counted and ignored.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sallyport_api::{ConditionalAccessPolicy, Connector, ConnectorGroup, PublishedApp};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml::Value;

use super::{CompileInputs, FleetDefaults};

/// The `apiVersion` of every Sallyport kind.
const API_VERSION: &str = "sallyport.dev/v1alpha1";

/// Manifests could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A file, directory or stdin could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// What was read.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A directory holds no `*.yaml` or `*.yml` file.
    #[error("{path} holds no *.yaml or *.yml file")]
    NoManifests {
        /// The directory.
        path: PathBuf,
    },
    /// A document is not YAML.
    #[error("{source_name}, document {document}: not valid YAML: {source}")]
    Yaml {
        /// The file, or `<stdin>`.
        source_name: String,
        /// 1-based index of the document in the file.
        document: usize,
        /// The parser's error.
        source: serde_yaml::Error,
    },
    /// A Sallyport object does not match its kind's schema.
    #[error("{source_name}, {place}: {kind} {name:?}: {source}")]
    Object {
        /// The file, or `<stdin>`.
        source_name: String,
        /// `document N` or `document N, item M` (in a List).
        place: String,
        /// The object's kind.
        kind: String,
        /// The object's name, if it has one.
        name: String,
        /// What does not match.
        source: serde_yaml::Error,
    },
    /// A Sallyport kind with an `apiVersion` this build does not read.
    #[error(
        "{source_name}, {place}: {kind} has apiVersion {api_version:?}; expected {API_VERSION}"
    )]
    ApiVersion {
        /// The file, or `<stdin>`.
        source_name: String,
        /// `document N` or `document N, item M`.
        place: String,
        /// The object's kind.
        kind: String,
        /// The `apiVersion` found.
        api_version: String,
    },
}

/// The objects read from manifests.
#[derive(Debug, Clone, Default)]
pub struct Manifests {
    /// PublishedApps, in the order read.
    pub apps: Vec<PublishedApp>,
    /// ConnectorGroups.
    pub connector_groups: Vec<ConnectorGroup>,
    /// ConditionalAccessPolicies.
    pub policies: Vec<ConditionalAccessPolicy>,
    /// Connectors.
    pub connectors: Vec<Connector>,
    /// Labels of the Namespace objects read.
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// How many objects of other kinds were ignored.
    pub ignored: usize,
}

impl Manifests {
    /// Reads a file, every `*.yaml` and `*.yml` file of a directory (not its
    /// sub-directories) in name order, or stdin for `-`. Namespaced objects without a
    /// namespace are put in `default_namespace`.
    pub fn read_path(&mut self, path: &Path, default_namespace: &str) -> Result<(), ManifestError> {
        let read_error = |source| ManifestError::Read {
            path: path.to_owned(),
            source,
        };
        if path == Path::new("-") {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(read_error)?;
            return self.add_yaml("<stdin>", &text, default_namespace);
        }
        if !path.is_dir() {
            let text = std::fs::read_to_string(path).map_err(read_error)?;
            return self.add_yaml(&path.display().to_string(), &text, default_namespace);
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(path).map_err(read_error)? {
            let file = entry.map_err(read_error)?.path();
            let is_yaml = file.extension().is_some_and(|e| e == "yaml" || e == "yml");
            if is_yaml && file.is_file() {
                files.push(file);
            }
        }
        if files.is_empty() {
            return Err(ManifestError::NoManifests {
                path: path.to_owned(),
            });
        }
        files.sort();
        for file in files {
            self.read_path(&file, default_namespace)?;
        }
        Ok(())
    }

    /// Reads the YAML documents of `text`, naming `source_name` in errors.
    pub fn add_yaml(
        &mut self,
        source_name: &str,
        text: &str,
        default_namespace: &str,
    ) -> Result<(), ManifestError> {
        for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = Value::deserialize(document).map_err(|source| ManifestError::Yaml {
                source_name: source_name.to_owned(),
                document: index + 1,
                source,
            })?;
            let place = format!("document {}", index + 1);
            self.add_value(source_name, &place, value, default_namespace)?;
        }
        Ok(())
    }

    /// The compile inputs these manifests give, with the other settings.
    pub fn inputs<'a>(
        &'a self,
        operator_namespace: &'a str,
        defaults: &'a FleetDefaults,
        revoked_connectors: &'a [String],
    ) -> CompileInputs<'a> {
        CompileInputs {
            apps: &self.apps,
            connector_groups: &self.connector_groups,
            policies: &self.policies,
            connectors: &self.connectors,
            namespace_labels: &self.namespace_labels,
            revoked_connectors,
            operator_namespace,
            defaults,
        }
    }

    fn add_value(
        &mut self,
        source_name: &str,
        place: &str,
        value: Value,
        default_namespace: &str,
    ) -> Result<(), ManifestError> {
        if value.is_null() {
            return Ok(());
        }
        let text = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_owned);
        let (Some(kind), api_version) = (text("kind"), text("apiVersion").unwrap_or_default())
        else {
            self.ignored += 1;
            return Ok(());
        };
        let object = Object {
            source_name,
            place,
            kind: &kind,
            default_namespace,
        };
        match kind.as_str() {
            "List" if api_version == "v1" => {
                let items = match value.get("items") {
                    Some(Value::Sequence(items)) => items.clone(),
                    _ => Vec::new(),
                };
                for (index, item) in items.into_iter().enumerate() {
                    let place = format!("{place}, item {}", index + 1);
                    self.add_value(source_name, &place, item, default_namespace)?;
                }
            }
            "Namespace" if api_version == "v1" => {
                let namespace: Namespace = object.parse(value, |_| {})?;
                if let Some(name) = namespace.metadata.name {
                    self.namespace_labels
                        .insert(name, namespace.metadata.labels.unwrap_or_default());
                }
            }
            "PublishedApp" | "ConnectorGroup" | "ConditionalAccessPolicy" | "Connector"
                if api_version != API_VERSION =>
            {
                return Err(ManifestError::ApiVersion {
                    source_name: source_name.to_owned(),
                    place: place.to_owned(),
                    kind,
                    api_version,
                });
            }
            "PublishedApp" => {
                let app = object.namespaced(value, |a: &mut PublishedApp| &mut a.metadata)?;
                self.apps.push(app);
            }
            "ConnectorGroup" => {
                let group = object.namespaced(value, |g: &mut ConnectorGroup| &mut g.metadata)?;
                self.connector_groups.push(group);
            }
            "ConditionalAccessPolicy" => {
                let policy =
                    object.namespaced(value, |p: &mut ConditionalAccessPolicy| &mut p.metadata)?;
                self.policies.push(policy);
            }
            "Connector" => {
                let connector = object.namespaced(value, |c: &mut Connector| &mut c.metadata)?;
                self.connectors.push(connector);
            }
            _ => self.ignored += 1,
        }
        Ok(())
    }
}

/// Where an object was read, for parsing it with errors that say so.
struct Object<'a> {
    source_name: &'a str,
    place: &'a str,
    kind: &'a str,
    default_namespace: &'a str,
}

impl Object<'_> {
    /// Parses `value` as `T`, then lets `adjust` fix it up.
    fn parse<T: DeserializeOwned>(
        &self,
        value: Value,
        adjust: impl FnOnce(&mut T),
    ) -> Result<T, ManifestError> {
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let mut object: T =
            serde_yaml::from_value(value).map_err(|source| ManifestError::Object {
                source_name: self.source_name.to_owned(),
                place: self.place.to_owned(),
                kind: self.kind.to_owned(),
                name,
                source,
            })?;
        adjust(&mut object);
        Ok(object)
    }

    /// Parses a namespaced object, putting it in the default namespace when it names none.
    fn namespaced<T: DeserializeOwned>(
        &self,
        value: Value,
        metadata: impl FnOnce(&mut T) -> &mut ObjectMeta,
    ) -> Result<T, ManifestError> {
        self.parse(value, |object: &mut T| {
            let metadata = metadata(object);
            if metadata.namespace.as_deref().is_none_or(str::is_empty) {
                metadata.namespace = Some(self.default_namespace.to_owned());
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_documents_lists_and_namespaces_and_ignores_other_kinds() {
        let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: team-a, labels: {publish: "true"}}
---
apiVersion: sallyport.dev/v1alpha1
kind: ConnectorGroup
metadata: {name: dc}
spec: {}
---
# an empty document
---
apiVersion: v1
kind: List
items:
  - apiVersion: sallyport.dev/v1alpha1
    kind: PublishedApp
    metadata: {name: wiki, namespace: team-a}
    spec: {externalUrl: 'https://wiki.example.com/', internalUrl: 'http://wiki/', connectorGroup: {name: dc}}
  - apiVersion: v1
    kind: Secret
    metadata: {name: s}
"#;
        let mut manifests = Manifests::default();
        let result = manifests.add_yaml("test.yaml", yaml, "fallback");
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(manifests.apps.len(), 1);
        assert_eq!(
            manifests.apps[0].metadata.namespace.as_deref(),
            Some("team-a")
        );
        assert_eq!(
            manifests.connector_groups[0].metadata.namespace.as_deref(),
            Some("fallback")
        );
        assert_eq!(
            manifests.namespace_labels.get("team-a"),
            Some(&BTreeMap::from([("publish".into(), "true".into())]))
        );
        assert_eq!(manifests.ignored, 1);
    }

    #[test]
    fn errors_name_the_file_the_document_and_the_object() {
        let mut manifests = Manifests::default();
        let yaml = "apiVersion: sallyport.dev/v1alpha1\nkind: ConnectorGroup\nmetadata: {name: ok}\nspec: {}\n---\napiVersion: sallyport.dev/v1alpha1\nkind: PublishedApp\nmetadata: {name: wiki}\nspec: {externalUrl: 'https://wiki.example.com/'}\n";
        let error = manifests
            .add_yaml("apps.yaml", yaml, "default")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            error.starts_with("apps.yaml, document 2: PublishedApp \"wiki\": ")
                && error.contains("internalUrl"),
            "{error}"
        );

        let old = "apiVersion: sallyport.dev/v1beta9\nkind: PublishedApp\nmetadata: {name: wiki}\n";
        let error = Manifests::default()
            .add_yaml("old.yaml", old, "default")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("expected sallyport.dev/v1alpha1"), "{error}");

        let broken = "kind: [unclosed\n";
        assert!(matches!(
            Manifests::default().add_yaml("broken.yaml", broken, "default"),
            Err(ManifestError::Yaml { document: 1, .. })
        ));
    }
}
