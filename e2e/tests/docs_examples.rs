//! Every YAML example of the documentation is alive: each document of each ```` ```yaml ````
//! block in `README.md` and `docs/*.md`, and of each file in `examples/`, is applied
//! server-side to a real kube-apiserver with the committed CRDs, in a fresh namespace,
//! and must be accepted.
//!
//! A block (or an example file) may start with marker comments, before its first line
//! that is not a comment (see docs/development.md, "Examples in the documentation"):
//!
//! - `# expect-rejected: <text>`: the block shows something invalid on purpose; each of
//!   its Sallyport objects must be refused, with an error containing `<text>`;
//! - `# fragment: <Kind>`: the block shows part of an object (`spec: ...`); it is merged
//!   into a minimal valid object of that Sallyport kind and applied;
//! - `# not-a-manifest: <what it is>`: not a Kubernetes object this test can apply (Helm
//!   values, a PrometheusRule, the compiled fleet configuration, a collector's config);
//!   counted and listed, never applied.
//!
//! Anything else is applied: Sallyport objects, and the Secrets, ConfigMaps and Namespaces
//! that come with them. A document of another kind, or without `apiVersion`, `kind` or
//! `metadata.name`, fails the test with a hint to mark it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use sallyport_e2e::controlplane::{ControlPlane, Mode};
use sallyport_e2e::manifests::{api_for, install_crds, repo_path};
use serde::Deserialize;
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// The field manager of every apply.
const MANAGER: &str = "sallyport-docs-examples";

/// Marker: the block's Sallyport objects must be refused with this text in the error.
const EXPECT_REJECTED: &str = "# expect-rejected:";
/// Marker: the block is part of an object of this kind.
const FRAGMENT: &str = "# fragment:";
/// Marker: the block is not a manifest this test applies.
const NOT_A_MANIFEST: &str = "# not-a-manifest:";

/// Kinds the test applies besides Sallyport's own.
const SUPPORTING_KINDS: &[&str] = &["Namespace", "Secret", "ConfigMap"];

/// What a block's markers ask for.
#[derive(Debug, Clone, PartialEq)]
enum Marker {
    /// Apply and expect success.
    Accept,
    /// Apply and expect a refusal containing the text.
    Reject(String),
    /// Merge into a minimal object of the kind, then apply and expect success.
    Fragment(String),
    /// Do not apply; the text says what it is.
    NotAManifest(String),
}

/// One YAML block of a Markdown file, or one example file.
struct Unit {
    /// `path:line` of the block's first line.
    origin: String,
    /// The YAML text.
    text: String,
    /// What its markers ask for.
    marker: Marker,
}

/// The markers in the leading comment lines of `text`.
fn marker(text: &str, origin: &str) -> Result<Marker, String> {
    let mut found = Marker::Accept;
    for line in text.lines().map(str::trim) {
        if line.is_empty() {
            continue;
        }
        if !line.starts_with('#') {
            break;
        }
        let (prefix, make): (&str, fn(String) -> Marker) = if line.starts_with(EXPECT_REJECTED) {
            (EXPECT_REJECTED, Marker::Reject)
        } else if line.starts_with(FRAGMENT) {
            (FRAGMENT, Marker::Fragment)
        } else if line.starts_with(NOT_A_MANIFEST) {
            (NOT_A_MANIFEST, Marker::NotAManifest)
        } else {
            continue;
        };
        let text = line[prefix.len()..].trim().to_owned();
        if text.is_empty() {
            return Err(format!("{origin}: the marker `{line}` needs its text"));
        }
        if found != Marker::Accept {
            return Err(format!("{origin}: more than one marker"));
        }
        found = make(text);
    }
    Ok(found)
}

/// The ```` ```yaml ```` (or `yml`) blocks of a Markdown file.
fn markdown_units(path: &Path, relative: &str) -> Result<Vec<Unit>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{relative}: {e}"))?;
    let mut units = Vec::new();
    let mut open: Option<(usize, usize, Vec<String>)> = None;
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match &mut open {
            None => {
                let language = trimmed.strip_prefix("```").map(|rest| {
                    rest.split(|c: char| c.is_whitespace() || c == '{')
                        .next()
                        .unwrap_or_default()
                });
                if matches!(language, Some("yaml" | "yml")) {
                    open = Some((index + 1, indent, Vec::new()));
                }
            }
            Some((start, fence_indent, lines)) => {
                if trimmed.trim_end() == "```" {
                    let origin = format!("{relative}:{start}");
                    let text = lines.join("\n");
                    let marker = marker(&text, &origin)?;
                    units.push(Unit {
                        origin,
                        text,
                        marker,
                    });
                    open = None;
                } else {
                    let strip = indent.min(*fence_indent);
                    lines.push(line[strip..].to_owned());
                }
            }
        }
    }
    if let Some((start, _, _)) = open {
        return Err(format!(
            "{relative}:{start}: a ```yaml block is never closed"
        ));
    }
    Ok(units)
}

/// The YAML documents of a unit, empty ones left out.
fn documents(unit: &Unit) -> Result<Vec<Value>, String> {
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&unit.text) {
        let value = Value::deserialize(document)
            .map_err(|e| format!("{}: not valid YAML: {e}", unit.origin))?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

/// A minimal valid object of a Sallyport `kind`, for fragments to be merged into.
fn minimal(kind: &str, name: &str) -> Option<Value> {
    let spec = match kind {
        "PublishedApp" => json!({
            "externalUrl": format!("https://{name}.fragment.example.com/"),
            "internalUrl": "http://fragment.corp.internal/",
            "connectorGroup": {"name": "fragment"},
        }),
        "ConnectorGroup" => json!({}),
        "ConditionalAccessPolicy" => json!({
            "assignments": {"apps": {"selector": {}}, "users": {"include": ["*"]}},
        }),
        "Connector" => json!({"connectorGroup": "fragment"}),
        _ => return None,
    };
    Some(json!({
        "apiVersion": "sallyport.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    }))
}

fn is_sallyport(object: &Value) -> bool {
    object["apiVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("sallyport.dev/"))
}

/// Applies `object` server-side: Namespaces cluster-wide, everything else in `namespace`.
async fn apply(
    client: &kube::Client,
    namespace: &str,
    object: &Value,
) -> Result<DynamicObject, kube::Error> {
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let params = PatchParams::apply(MANAGER).force();
    if object["kind"] == "Namespace" {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "Namespace"));
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        return api.patch(name, &params, &Patch::Apply(object)).await;
    }
    api_for(client.clone(), namespace, object)
        .patch(name, &params, &Patch::Apply(object))
        .await
}

/// What one file contributed.
#[derive(Default)]
struct Tally {
    accepted: usize,
    rejected: usize,
    not_manifests: Vec<String>,
}

/// Applies the documents of one unit; failures go to `failures`.
async fn check_unit(
    client: &kube::Client,
    namespace: &str,
    unit: &Unit,
    fragment_index: &mut usize,
    tally: &mut Tally,
    failures: &mut Vec<String>,
) {
    if let Marker::NotAManifest(what) = &unit.marker {
        tally
            .not_manifests
            .push(format!("{} ({what})", unit.origin));
        return;
    }
    let mut objects = match documents(unit) {
        Ok(documents) => documents,
        Err(error) => {
            failures.push(error);
            return;
        }
    };
    if objects.is_empty() {
        failures.push(format!(
            "{}: an empty YAML block; remove it or mark it `{NOT_A_MANIFEST} <what>`",
            unit.origin
        ));
        return;
    }
    if let Marker::Fragment(kind) = &unit.marker {
        for object in &mut objects {
            *fragment_index += 1;
            let Some(mut base) = minimal(kind, &format!("fragment-{fragment_index}")) else {
                failures.push(format!(
                    "{}: `{FRAGMENT} {kind}` names no Sallyport kind",
                    unit.origin
                ));
                return;
            };
            json_patch::merge(&mut base, object);
            *object = base;
        }
    }
    // Namespaces first, then Secrets and ConfigMaps, then Sallyport objects.
    objects.sort_by_key(|o| match o["kind"].as_str() {
        Some("Namespace") => 0,
        Some("Secret" | "ConfigMap") => 1,
        _ => 2,
    });
    for mut object in objects {
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let what = format!("{} {kind} {name:?}", unit.origin);
        if kind.is_empty() || object["apiVersion"].as_str().is_none() || name.is_empty() {
            failures.push(format!(
                "{what}: a document without apiVersion, kind or metadata.name; mark its block \
                 `{FRAGMENT} <Kind>` (part of an object) or `{NOT_A_MANIFEST} <what it is>`"
            ));
            continue;
        }
        let sallyport = is_sallyport(&object);
        if !sallyport && !SUPPORTING_KINDS.contains(&kind.as_str()) {
            failures.push(format!(
                "{what}: this test applies Sallyport objects and their {SUPPORTING_KINDS:?} \
                 only; mark the block `{NOT_A_MANIFEST} <what it is>`"
            ));
            continue;
        }
        if kind == "Namespace" {
            let renamed: String = format!("{namespace}-{name}").chars().take(63).collect();
            object["metadata"]["name"] = json!(renamed.trim_end_matches('-'));
        } else {
            object["metadata"]["namespace"] = json!(namespace);
        }
        let result = apply(client, namespace, &object).await;
        match (&unit.marker, result, sallyport) {
            (Marker::Reject(expected), Err(kube::Error::Api(status)), true) => {
                if status.message.contains(expected.as_str()) {
                    tally.rejected += 1;
                } else {
                    failures.push(format!(
                        "{what} was refused, but not with {expected:?}: {}",
                        status.message
                    ));
                }
            }
            (Marker::Reject(expected), Ok(_), true) => failures.push(format!(
                "{what} is marked `{EXPECT_REJECTED} {expected}` but the apiserver accepted it"
            )),
            (_, Ok(_), _) => tally.accepted += 1,
            (_, Err(error), _) => failures.push(format!("{what} was refused: {error}")),
        }
    }
}

/// Every Markdown file the test reads: README.md and docs/*.md, sorted.
fn markdown_files() -> Result<Vec<PathBuf>, std::io::Error> {
    let mut files = vec![repo_path("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo_path("docs"))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    docs.retain(|p| p.extension().is_some_and(|e| e == "md"));
    docs.sort();
    files.extend(docs);
    Ok(files)
}

/// Every file of examples/, sorted; each is one unit.
fn example_units() -> Result<Vec<Unit>, String> {
    let dir = repo_path("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .and_then(|entries| entries.map(|e| e.map(|e| e.path())).collect())
        .map_err(|e| format!("examples/: {e}"))?;
    files.sort();
    let mut units = Vec::new();
    for file in files {
        let relative = format!(
            "examples/{}",
            file.file_name().unwrap_or_default().to_string_lossy()
        );
        if !file.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            return Err(format!(
                "{relative}: examples/ holds only YAML manifests (.yaml or .yml)"
            ));
        }
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{relative}: {e}"))?;
        let origin = format!("{relative}:1");
        let marker = marker(&text, &origin)?;
        units.push(Unit {
            origin,
            text,
            marker,
        });
    }
    Ok(units)
}

#[tokio::test]
async fn every_yaml_example_in_the_docs_and_examples_is_accepted() -> TestResult {
    let control_plane = ControlPlane::shared(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        Mode::ApiServer,
    )?;
    let client = control_plane.client().await?;
    install_crds(&client).await?;

    let mut sources: BTreeMap<String, Vec<Unit>> = BTreeMap::new();
    for file in markdown_files()? {
        let relative = file
            .strip_prefix(repo_path(""))
            .unwrap_or(&file)
            .display()
            .to_string();
        let relative = relative.trim_start_matches("./").to_owned();
        let units = markdown_units(&file, &relative)?;
        sources.insert(relative, units);
    }
    sources.insert("examples/".to_owned(), example_units()?);

    let mut failures = Vec::new();
    let mut fragment_index = 0;
    let (mut files, mut accepted, mut rejected, mut skipped) = (0, 0, 0, 0);
    println!("YAML examples applied to a real kube-apiserver:");
    for (source, units) in &sources {
        if units.is_empty() {
            println!("  {source}: no YAML blocks");
            continue;
        }
        let namespace = control_plane.create_namespace("docs-examples").await?;
        let mut tally = Tally::default();
        for unit in units {
            check_unit(
                &client,
                &namespace,
                unit,
                &mut fragment_index,
                &mut tally,
                &mut failures,
            )
            .await;
        }
        files += 1;
        accepted += tally.accepted;
        rejected += tally.rejected;
        skipped += tally.not_manifests.len();
        println!(
            "  {source}: {} block(s)/file(s), {} document(s) accepted, {} refused as expected, {} not a manifest",
            units.len(),
            tally.accepted,
            tally.rejected,
            tally.not_manifests.len()
        );
        for not_manifest in &tally.not_manifests {
            println!("      not applied: {not_manifest}");
        }
    }
    println!(
        "checked {files} source(s): {accepted} document(s) accepted, {rejected} refused as expected, {skipped} block(s) not manifests"
    );
    assert!(
        failures.is_empty(),
        "{} YAML example(s) failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
    // Guards against an extraction that silently finds nothing.
    assert!(
        sources
            .get("examples/")
            .is_some_and(|units| units.len() >= 8),
        "examples/ should hold the annotated examples"
    );
    assert!(
        accepted >= 20,
        "only {accepted} documents were applied; is the extraction broken?"
    );
    assert!(rejected >= 1, "no block shows an invalid object on purpose");
    Ok(())
}

#[cfg(test)]
mod markers {
    use super::*;

    #[test]
    fn markers_are_read_from_the_leading_comments_only() {
        let origin = "x.md:1";
        assert_eq!(
            marker(
                "# a comment\n# expect-rejected: must start\nkind: X\n",
                origin
            ),
            Ok(Marker::Reject("must start".into()))
        );
        assert_eq!(
            marker("kind: X\n# expect-rejected: later\n", origin),
            Ok(Marker::Accept)
        );
        assert!(marker("# fragment:\nspec: {}\n", origin).is_err());
        assert!(marker("# fragment: PublishedApp\n# not-a-manifest: x\n", origin).is_err());
    }

    #[test]
    fn indented_fences_are_read() {
        let dir = std::env::temp_dir().join(format!("docs-examples-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let file = dir.join("a.md");
        std::fs::write(
            &file,
            "text\n\n  ```yaml\n  # fragment: ConnectorGroup\n  spec:\n    registration: {maxUses: 1}\n  ```\n\n```sh\nx\n```\n```yml\na: 1\n```\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let units = markdown_units(&file, "a.md").unwrap_or_else(|e| panic!("{e}"));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(units.len(), 2);
        assert_eq!(units[0].origin, "a.md:3");
        assert_eq!(units[0].marker, Marker::Fragment("ConnectorGroup".into()));
        assert_eq!(
            units[0].text,
            "# fragment: ConnectorGroup\nspec:\n  registration: {maxUses: 1}"
        );
        assert_eq!(units[1].text, "a: 1");
    }
}
