//! The Helm chart (`charts/sallyport`) against a real control plane with
//! kube-controller-manager, kube-scheduler and kwok (Deployments become Available on a
//! fake node without running containers).
//!
//! What is real here and what is not:
//!
//! - real: `helm lint --strict`, `helm template`, `helm install/upgrade/test/uninstall`
//!   (the Helm binary built by `hack/install-helm.sh`), the kube-apiserver accepting every
//!   rendered object (server-side dry run, then for real), the values schema refusing
//!   typos, CRDs established and kept, the Deployment rolled out by the real
//!   kube-controller-manager and scheduler, and the operator binary running as a local
//!   process with the chart's own flags (read from the installed Deployment) and
//!   authenticated as the chart's ServiceAccount, so the chart's RBAC is what it runs under.
//! - not real: no container runs. kwok marks the operator's Pods Running; the operator that
//!   reconciles is the local process. For `helm test`, this test plays the kubelet: once
//!   kwok has the test Pod Running, it runs the Pod's own command (`sallyport-operator
//!   check ...`, read from the Pod) locally, as the Pod's ServiceAccount, and writes the
//!   outcome into the Pod's status (Succeeded on exit 0, Failed otherwise). Helm's wiring
//!   (hook creation, waiting on the Pod phase, reporting) is what `helm test` exercises;
//!   the check itself is the real command, and it is also seen to fail while no operator
//!   leads. NetworkPolicies are checked to exist; no network plugin enforces them here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use sallyport_api::{ConnectorGroup, PublishedApp};
use sallyport_e2e::controlplane::{ControlPlane, Mode, cache_root};
use sallyport_e2e::identity::token_kubeconfig;
use sallyport_e2e::manifests::{repo_path, self_signed_tls_secret};
use sallyport_e2e::process::{OwnedProcess, workspace_binary};
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const RELEASE: &str = "sallyport";
const NAMESPACE: &str = "sallyport-system";
const APPS: &str = "team-a";
/// Bound on waiting for the cluster or the operator; generous for a busy 2-core machine.
const TIMEOUT: Duration = Duration::from_secs(90);
const SALLYPORT_CRDS: [&str; 4] = [
    "conditionalaccesspolicies.sallyport.dev",
    "connectorgroups.sallyport.dev",
    "connectors.sallyport.dev",
    "publishedapps.sallyport.dev",
];

/// Values for the installed release: fleet defaults set, images that do not exist
/// (nothing pulls them), short lease timings.
const INSTALL_VALUES: &str = r#"
fleet:
  oidc:
    issuer: https://login.example.com/
    clientId: sallyport-e2e
    clientSecret: {secretName: fleet-oidc}
  defaultTLSSecret: {name: wildcard-tls}
  proxy:
    serviceType: ClusterIP
    image: {repository: example.test/sallyport-proxy, tag: e2e}
  connector:
    image: {repository: example.test/sallyport-connector, tag: e2e}
operator:
  image: {repository: example.test/sallyport-operator, tag: e2e}
  leaderElection: {leaseDuration: 4s, renewDeadline: 3s, retryPeriod: 500ms}
  logFormat: text
"#;

/// Every optional part switched on, for lint and the server-side dry run.
const EVERYTHING_VALUES: &str = r#"
fleet:
  oidc:
    issuer: https://login.example.com/
    clientSecret: {secretName: fleet-oidc, namespace: identity}
  defaultTLSSecret: {name: wildcard-tls}
  proxy:
    image: {digest: "sha256:0000000000000000000000000000000000000000000000000000000000000000"}
    trustedProxies: [10.0.0.0/8]
  tunnelHostnames: [tunnel.example.com]
events:
  http:
    endpoint: https://siem.example.com/ingest
    tokenSecret: {name: siem-token}
    caConfigMap: {name: siem-ca}
  otlp:
    endpoint: https://otel.example.com:4318
    tokenSecret: {name: otlp-token}
operator:
  imagePullSecrets: [{name: registry}]
  priorityClassName: system-cluster-critical
  nodeSelector: {kubernetes.io/os: linux}
  tolerations: [{key: dedicated, operator: Equal, value: platform, effect: NoSchedule}]
  extraArgs: [--proxy-trusted-proxy=192.0.2.0/24]
  extraEnv: [{name: EXTRA, value: "1"}]
serviceAccount:
  annotations: {example.com/role: sallyport}
networkPolicy:
  apiServer: {cidrs: [10.0.0.1/32]}
  metrics:
    from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}}]
  extraEgress: [{ports: [{port: 4318, protocol: TCP}]}]
metrics:
  serviceMonitor: {enabled: true, labels: {release: prometheus}}
  prometheusRule: {enabled: true, labels: {release: prometheus}}
  grafanaDashboard: {enabled: true}
"#;

/// The Helm binary: `$HELM`, else the highest version of
/// `~/.cache/sallyport/tools/helm-v*/helm` (`hack/install-helm.sh` builds v3.22.0; the
/// test also passes with v4.3.1).
/// Missing Helm fails the test: it is never skipped.
fn helm_binary() -> PathBuf {
    if let Some(helm) = std::env::var_os("HELM").filter(|h| !h.is_empty()) {
        return PathBuf::from(helm);
    }
    let tools = cache_root()
        .unwrap_or_else(|e| panic!("no cache dir: {e}"))
        .join("tools");
    // (major, minor, patch) from `helm-vX.Y.Z`, so that v3.22 sorts after v3.9.
    let version = |path: &Path| -> Vec<u64> {
        let name = path.parent().and_then(Path::file_name).unwrap_or_default();
        name.to_string_lossy()
            .trim_start_matches("helm-v")
            .split('.')
            .map(|part| part.parse().unwrap_or(0))
            .collect()
    };
    let mut found: Vec<PathBuf> = std::fs::read_dir(&tools)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("helm-"))
        .map(|entry| entry.path().join("helm"))
        .filter(|path| path.is_file())
        .collect();
    found.sort_by_key(|path| version(path));
    found.pop().unwrap_or_else(|| {
        panic!(
            "no Helm found (neither $HELM nor {}/helm-*/helm): run `bash hack/install-helm.sh`",
            tools.display()
        )
    })
}

/// Runs a command, returning its output whatever its exit status.
async fn output(mut command: tokio::process::Command) -> Output {
    command
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
async fn succeed(what: &str, command: tokio::process::Command) -> String {
    let out = output(command).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Helm with its own config, cache and data dirs, talking to the test's control plane.
struct Helm {
    binary: PathBuf,
    home: PathBuf,
    kubeconfig: PathBuf,
}

impl Helm {
    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.binary);
        command
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.home.join("cache"))
            .env("HELM_CONFIG_HOME", self.home.join("config"))
            .env("HELM_DATA_HOME", self.home.join("data"))
            .kill_on_drop(true);
        command
    }

    async fn run(&self, args: &[&str]) -> String {
        succeed(&format!("helm {}", args.join(" ")), self.command(args)).await
    }
}

/// Every YAML document of `text` that is not empty.
fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|document| {
            serde::Deserialize::deserialize(document)
                .unwrap_or_else(|e| panic!("unparsable YAML: {e}\n{text}"))
        })
        .filter(|value: &Value| !value.is_null())
        .collect()
}

/// The parts of an RBAC object that grant something, keyed by kind and name.
fn grants(objects: &[Value]) -> BTreeMap<String, Value> {
    objects
        .iter()
        .map(|o| {
            let key = format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or_default(),
                o["metadata"]["name"].as_str().unwrap_or_default()
            );
            let value = json!({
                "apiVersion": o["apiVersion"],
                "namespace": o["metadata"]["namespace"],
                "app": o["metadata"]["labels"]["app.kubernetes.io/name"],
                "rules": o["rules"],
                "roleRef": o["roleRef"],
                "subjects": o["subjects"],
            });
            (key, value)
        })
        .collect()
}

/// The key path of every leaf of `values` (maps are descended, lists and empty maps are
/// leaves).
fn leaf_paths(prefix: &[String], values: &Value, out: &mut Vec<Vec<String>>) {
    match values.as_object() {
        Some(map) if !map.is_empty() => {
            for (key, value) in map {
                let mut path = prefix.to_vec();
                path.push(key.clone());
                leaf_paths(&path, value, out);
            }
        }
        _ => out.push(prefix.to_vec()),
    }
}

/// `value` with every number as a float: Helm's toYaml writes `100.0` as `100`.
fn same_numbers_as_floats(value: &Value) -> Value {
    match value {
        Value::Number(n) => n.as_f64().map_or(Value::Null, |f| json!(f)),
        Value::Array(items) => Value::Array(items.iter().map(same_numbers_as_floats).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), same_numbers_as_floats(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let entry = entry.unwrap_or_else(|e| panic!("{}: {e}", from.display()));
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target)
                .unwrap_or_else(|e| panic!("{}: {e}", target.display()));
        }
    }
}

/// Polls `api.get_opt(name)` until `check` holds; the error shows the last object seen.
async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    check: impl Fn(Option<&K>) -> bool,
) -> Result<Option<K>, String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let current = api
            .get_opt(name)
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        if check(current.as_ref()) {
            return Ok(current);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "{name}: {what} did not happen within {TIMEOUT:?}; last seen: {current:#?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn condition_status<'a>(
    conditions: impl IntoIterator<Item = &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    type_: &str,
) -> Option<String> {
    conditions
        .into_iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

fn deployment_available(d: Option<&Deployment>, replicas: i32) -> bool {
    d.and_then(|d| d.status.as_ref()).is_some_and(|s| {
        s.available_replicas == Some(replicas)
            && s.updated_replicas == Some(replicas)
            && s.replicas == Some(replicas)
    })
}

/// Runs the operator binary with `args` as the ServiceAccount of `kubeconfig`.
async fn operator_command(kubeconfig: &Path, args: &[String]) -> Output {
    let mut command = tokio::process::Command::new(
        workspace_binary("sallyport-operator").unwrap_or_else(|e| panic!("{e}")),
    );
    command
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "warn");
    output(command).await
}

#[tokio::test]
async fn the_chart_installs_upgrades_tests_and_uninstalls_the_operator() -> TestResult {
    let helm = helm_binary();
    let chart = repo_path("charts/sallyport");
    let scratch = tempfile::tempdir()?;

    // The chart's CRDs are copies of crds/ (which the Rust types generate): identical.
    let originals: BTreeSet<_> = std::fs::read_dir(repo_path("crds"))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    let copies: BTreeSet<_> = std::fs::read_dir(chart.join("files/crds"))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        originals, copies,
        "charts/sallyport/files/crds/ holds other files than crds/: run `make crds`"
    );
    for name in &originals {
        assert!(
            std::fs::read(repo_path("crds").join(name))?
                == std::fs::read(chart.join("files/crds").join(name))?,
            "charts/sallyport/files/crds/{} differs from crds/: run `make crds`",
            name.to_string_lossy()
        );
    }

    // Every value is documented in charts/README.md.
    let defaults: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart.join("values.yaml"))?)?;
    let readme = std::fs::read_to_string(repo_path("charts/README.md"))?;
    let mut paths = Vec::new();
    leaf_paths(&[], &defaults, &mut paths);
    // A free-form object (resources, security contexts) is documented as a whole.
    let documented = |path: &[String]| {
        (2..=path.len()).any(|n| readme.contains(&format!("`{}`", path[..n].join("."))))
    };
    let undocumented: Vec<_> = paths.iter().filter(|p| !documented(p)).collect();
    assert!(
        undocumented.is_empty(),
        "values missing from charts/README.md: {undocumented:?}"
    );

    let control_plane = ControlPlane::shared(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        Mode::WithControllers,
    )?;
    let client = control_plane.client().await?;
    let helm = Helm {
        binary: helm,
        home: scratch.path().join("helm"),
        kubeconfig: control_plane.kubeconfig_path().to_owned(),
    };
    let chart_arg = chart.display().to_string();
    let install_values = scratch.path().join("install.yaml");
    std::fs::write(&install_values, INSTALL_VALUES)?;
    let install_values = install_values.display().to_string();
    let everything = scratch.path().join("everything.yaml");
    std::fs::write(&everything, EVERYTHING_VALUES)?;
    let everything = everything.display().to_string();
    // `helm template` assumes an old Kubernetes unless told (the chart needs >= 1.29).
    let kube_version = client.apiserver_version().await?.git_version;
    let version = helm.run(&["version", "--short"]).await;
    eprintln!("helm {}", version.trim());

    // Lint: clean with the defaults and with every option on.
    for values in [None, Some(everything.as_str())] {
        let mut args = vec![
            "lint",
            "--strict",
            chart_arg.as_str(),
            "--namespace",
            NAMESPACE,
        ];
        if let Some(values) = values {
            args.extend(["-f", values]);
        }
        let lint = helm.run(&args).await;
        assert!(lint.contains("0 chart(s) failed"), "{lint}");
        assert!(
            !lint.contains("[WARNING]") && !lint.contains("[ERROR]"),
            "{lint}"
        );
    }

    // A typo and a wrong value are refused by the schema, naming the field.
    for (set, field) in [
        ("operator.replicaz=3", "replicaz"),
        ("fleet.proxy.serviceType=Loadbalancer", "serviceType"),
        ("networkPolicy.enable=false", "enable"),
    ] {
        let refused = output(helm.command(&[
            "install",
            RELEASE,
            chart_arg.as_str(),
            "--namespace",
            NAMESPACE,
            "--create-namespace",
            "--set",
            set,
        ]))
        .await;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success(),
            "helm install --set {set} was accepted"
        );
        assert!(
            stderr.contains("values don't meet the specifications of the schema")
                || stderr.contains("schema"),
            "{stderr}"
        );
        assert!(
            stderr.contains(field),
            "the refusal of {set} does not name {field}: {stderr}"
        );
    }
    assert!(
        Api::<Namespace>::all(client.clone())
            .get_opt(NAMESPACE)
            .await?
            .is_none(),
        "a refused install created the namespace"
    );

    // The chart's RBAC is exactly what `sallyport-operator rbac` prints.
    let rendered_rbac = helm
        .run(&[
            "template",
            "--kube-version",
            kube_version.as_str(),
            RELEASE,
            chart_arg.as_str(),
            "--namespace",
            NAMESPACE,
            "--show-only",
            "templates/serviceaccount.yaml",
            "--show-only",
            "templates/rbac.yaml",
        ])
        .await;
    let printed = succeed("sallyport-operator rbac", {
        let mut command = tokio::process::Command::new(workspace_binary("sallyport-operator")?);
        command.args(["rbac", "--namespace", NAMESPACE]);
        command
    })
    .await;
    let (chart_rbac, binary_rbac) = (
        grants(&documents(&rendered_rbac)),
        grants(&documents(&printed)),
    );
    assert_eq!(chart_rbac.len(), 9, "{rendered_rbac}");
    assert_eq!(
        serde_json::to_string_pretty(&chart_rbac)?,
        serde_json::to_string_pretty(&binary_rbac)?,
        "charts/sallyport/templates/rbac.yaml differs from `sallyport-operator rbac` (operator/src/rbac.rs)"
    );

    // Namespaces and the Secrets the fleet defaults name.
    for name in [NAMESPACE, APPS] {
        Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: ObjectMeta {
                        name: Some(name.to_owned()),
                        ..ObjectMeta::default()
                    },
                    ..Namespace::default()
                },
            )
            .await?;
    }
    let secrets = Api::<Secret>::namespaced(client.clone(), NAMESPACE);
    secrets
        .create(
            &PostParams::default(),
            &self_signed_tls_secret("wildcard-tls", "*.apps.example.com")?,
        )
        .await?;
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "fleet-oidc"}, "stringData": {"client-secret": "e2e-secret"}}))?,
        )
        .await?;

    // Everything the chart renders, every option on, is accepted by the apiserver. The
    // monitoring.coreos.com kinds come from a minimal CRD fixture of ours.
    let kubectl_apply = |file: &Path, dry_run: bool| {
        let mut command = tokio::process::Command::from(control_plane.kubectl());
        command
            .args([
                "apply",
                "--server-side",
                "--field-manager",
                "sallyport-e2e",
                "-f",
            ])
            .arg(file);
        if dry_run {
            command.arg("--dry-run=server");
        }
        command
    };
    let fixture = repo_path("e2e/fixtures/monitoring.coreos.com-crds.yaml");
    succeed(
        "kubectl apply the monitoring CRD fixture",
        kubectl_apply(&fixture, false),
    )
    .await;
    let mut wait = tokio::process::Command::from(control_plane.kubectl());
    wait.args([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
    ]);
    succeed("kubectl wait for the monitoring CRDs", wait).await;
    let rendered = helm
        .run(&[
            "template",
            "--kube-version",
            kube_version.as_str(),
            RELEASE,
            chart_arg.as_str(),
            "--namespace",
            NAMESPACE,
            "-f",
            everything.as_str(),
            // The test Pod names the ServiceAccount, which a dry run does not create;
            // `helm test` below creates it for real.
            "--skip-tests",
        ])
        .await;
    let kinds: BTreeSet<String> = documents(&rendered)
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or_default().to_owned())
        .collect();
    for kind in [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Service",
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
    ] {
        assert!(
            kinds.contains(kind),
            "helm template rendered no {kind}: {kinds:?}"
        );
    }
    let rendered_file = scratch.path().join("rendered.yaml");
    std::fs::write(&rendered_file, &rendered)?;
    let dry_run = succeed(
        "kubectl apply --server-side --dry-run=server (helm template)",
        kubectl_apply(&rendered_file, true),
    )
    .await;
    assert!(
        dry_run.contains("serverside-applied (server dry run)"),
        "{dry_run}"
    );
    // The CRD templates carry the same schemas as crds/ (a round trip through Helm's
    // fromYaml/toYaml changes no value).
    for document in documents(&rendered)
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
    {
        let name = document["metadata"]["name"].as_str().unwrap_or_default();
        let original = documents(&std::fs::read_to_string(
            repo_path("crds").join(format!("{name}.yaml")),
        )?);
        assert!(
            same_numbers_as_floats(&document["spec"])
                == same_numbers_as_floats(&original[0]["spec"]),
            "the rendered CRD {name} differs from crds/{name}.yaml"
        );
        assert_eq!(
            document["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
            "{name}"
        );
    }

    // `check` as the chart's test Pod runs it, before the operator exists: it fails.
    let rendered_test = documents(
        &helm
            .run(&[
                "template",
                "--kube-version",
                kube_version.as_str(),
                RELEASE,
                chart_arg.as_str(),
                "--namespace",
                NAMESPACE,
                "--show-only",
                "templates/tests/check.yaml",
            ])
            .await,
    );
    let check_args: Vec<String> =
        serde_json::from_value(rendered_test[0]["spec"]["containers"][0]["args"].clone())?;
    assert_eq!(check_args.first().map(String::as_str), Some("check"));

    // Install.
    let install = helm
        .run(&[
            "install",
            RELEASE,
            chart_arg.as_str(),
            "--namespace",
            NAMESPACE,
            "-f",
            install_values.as_str(),
            "--wait",
            "--timeout",
            "5m",
        ])
        .await;
    assert!(install.contains("STATUS: deployed"), "{install}");
    assert!(
        install.contains("helm test sallyport"),
        "NOTES.txt tells what to do next: {install}"
    );
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for name in SALLYPORT_CRDS {
        wait_for(&crds, name, "Established", |crd| {
            crd.and_then(|c| c.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        })
        .await?;
    }
    let deployments = Api::<Deployment>::namespaced(client.clone(), NAMESPACE);
    let deployment = wait_for(
        &deployments,
        "sallyport-operator",
        "Available with 2 replicas (kwok)",
        |d| deployment_available(d, 2),
    )
    .await?
    .ok_or("no operator Deployment")?;
    let pod_spec = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .ok_or("no pod spec")?;
    let container = pod_spec.containers.first().ok_or("no container")?;
    assert_eq!(
        container.image.as_deref(),
        Some("example.test/sallyport-operator:e2e")
    );
    let security = container.security_context.clone().unwrap_or_default();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        security.capabilities.and_then(|c| c.drop),
        Some(vec!["ALL".to_owned()])
    );
    assert_eq!(
        pod_spec
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user),
        Some(65532)
    );
    assert!(
        pod_spec
            .affinity
            .as_ref()
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .is_some()
    );
    assert!(
        pod_spec
            .topology_spread_constraints
            .as_ref()
            .is_some_and(|t| !t.is_empty())
    );
    let readiness = container
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .map(|h| h.path.clone());
    assert_eq!(readiness, Some(Some("/readyz".to_owned())));
    let pdb = Api::<PodDisruptionBudget>::namespaced(client.clone(), NAMESPACE)
        .get("sallyport-operator")
        .await?;
    assert!(pdb.spec.and_then(|s| s.max_unavailable).is_some());
    let policies = Api::<NetworkPolicy>::namespaced(client.clone(), NAMESPACE)
        .list(&Default::default())
        .await?;
    let policy = policies
        .items
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("sallyport-operator"))
        .ok_or("no operator NetworkPolicy")?;
    let types = policy
        .spec
        .as_ref()
        .and_then(|s| s.policy_types.clone())
        .unwrap_or_default();
    assert_eq!(types, ["Ingress", "Egress"]);

    // The chart's ServiceAccount with a token, as a Pod of the Deployment would have it.
    let account = pod_spec
        .service_account_name
        .clone()
        .ok_or("no serviceAccountName")?;
    let operator_kubeconfig = token_kubeconfig(control_plane, NAMESPACE, &account).await?;
    let failed = operator_command(&operator_kubeconfig, &check_args).await;
    let report = String::from_utf8_lossy(&failed.stdout).into_owned();
    assert!(
        !failed.status.success(),
        "check passed with no operator running:\n{report}"
    );
    assert!(
        report.contains("ok    crds") && report.contains("FAIL  leader"),
        "{report}"
    );

    // The real operator, with the Deployment's own arguments (probes on a free loopback
    // port instead), as the chart's ServiceAccount: the chart's RBAC is all it has.
    let mut run_args: Vec<String> = container
        .args
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| !a.starts_with("--probe-address"))
        .collect();
    run_args.push("--probe-address=127.0.0.1:0".to_owned());
    let run_args: Vec<&str> = run_args.iter().map(String::as_str).collect();
    let kubeconfig = operator_kubeconfig.display().to_string();
    let operator = OwnedProcess::start(
        "sallyport-operator",
        &run_args,
        &[
            ("KUBECONFIG", kubeconfig.as_str()),
            ("POD_NAME", "e2e-local-operator"),
            ("RUST_LOG", "info,kube=warn"),
        ],
    )?;

    let groups = Api::<ConnectorGroup>::namespaced(client.clone(), APPS);
    let apps = Api::<PublishedApp>::namespaced(client.clone(), APPS);
    groups.create(&PostParams::default(), &serde_yaml::from_str("apiVersion: sallyport.dev/v1alpha1\nkind: ConnectorGroup\nmetadata: {name: east}\nspec:\n  deployment: {replicas: 1}\n")?).await?;
    apps.create(&PostParams::default(), &serde_yaml::from_str("apiVersion: sallyport.dev/v1alpha1\nkind: PublishedApp\nmetadata: {name: wiki}\nspec:\n  externalUrl: https://wiki.apps.example.com/\n  internalUrl: http://wiki.corp.internal:8080/\n  connectorGroup: {name: east}\n")?).await?;
    let group = wait_for(&groups, "east", "a Ready condition", |g| {
        g.and_then(|g| g.status.as_ref())
            .is_some_and(|s| condition_status(&s.conditions, "Ready").is_some())
    })
    .await?;
    eprintln!("ConnectorGroup status: {:?}", group.and_then(|g| g.status));
    // The connectors' Deployment: made with the chart's create rights on Deployments,
    // ServiceAccounts, Roles and RoleBindings.
    wait_for(
        &Api::<Deployment>::namespaced(client.clone(), APPS),
        "east-connector",
        "created",
        |d| d.is_some(),
    )
    .await?;
    let app = wait_for(&apps, "wiki", "Accepted and ResolvedRefs", |a| {
        a.and_then(|a| a.status.as_ref()).is_some_and(|s| {
            condition_status(&s.conditions, "Accepted").as_deref() == Some("True")
                && condition_status(&s.conditions, "ResolvedRefs").as_deref() == Some("True")
        })
    })
    .await?;
    eprintln!("PublishedApp status: {:?}", app.and_then(|a| a.status));
    // The fleet the operator makes from the chart's defaults.
    let fleet = wait_for(&deployments, "sallyport-proxy", "the proxy fleet", |d| {
        d.is_some()
    })
    .await?
    .ok_or("no fleet")?;
    let proxy_image = fleet
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.containers.first().and_then(|c| c.image.clone()));
    assert_eq!(
        proxy_image.as_deref(),
        Some("example.test/sallyport-proxy:e2e")
    );

    // `check` passes now that a replica leads.
    let passed = operator_command(&operator_kubeconfig, &check_args).await;
    let report = String::from_utf8_lossy(&passed.stdout).into_owned();
    assert!(
        passed.status.success(),
        "check failed with the operator running:\n{report}\n{}",
        String::from_utf8_lossy(&passed.stderr)
    );

    // `helm test`: Helm creates the hook Pod and waits for its phase; this test plays the
    // kubelet (see the module docs).
    let mut helm_test =
        helm.command(&["test", RELEASE, "--namespace", NAMESPACE, "--timeout", "3m"]);
    helm_test
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let helm_test = helm_test.spawn()?;
    let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
    let test_pod_name = rendered_test[0]["metadata"]["name"]
        .as_str()
        .ok_or("unnamed test Pod")?
        .to_owned();
    let test_pod = wait_for(&pods, &test_pod_name, "Running (kwok)", |p| {
        p.and_then(|p| p.status.as_ref())
            .and_then(|s| s.phase.as_deref())
            == Some("Running")
    })
    .await?
    .ok_or("no test Pod")?;
    let test_spec = test_pod.spec.ok_or("no test Pod spec")?;
    let test_container = test_spec.containers.first().ok_or("no test container")?;
    let test_account = test_spec
        .service_account_name
        .clone()
        .ok_or("no test serviceAccountName")?;
    let test_kubeconfig = token_kubeconfig(control_plane, NAMESPACE, &test_account).await?;
    let ran = operator_command(
        &test_kubeconfig,
        test_container.args.as_deref().unwrap_or_default(),
    )
    .await;
    let exit_code = ran.status.code().unwrap_or(-1);
    eprintln!(
        "the test Pod's command, run locally, exited {exit_code}:\n{}",
        String::from_utf8_lossy(&ran.stdout)
    );
    pods.patch_status(
        &test_pod_name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "phase": if exit_code == 0 { "Succeeded" } else { "Failed" },
            "containerStatuses": [{
                "name": test_container.name, "image": test_container.image, "imageID": "",
                "ready": false, "restartCount": 0, "started": false,
                "state": {"terminated": {"exitCode": exit_code, "reason": if exit_code == 0 { "Completed" } else { "Error" }}}
            }]
        }})),
    )
    .await?;
    let tested =
        tokio::time::timeout(Duration::from_secs(240), helm_test.wait_with_output()).await??;
    let tested_out = String::from_utf8_lossy(&tested.stdout);
    assert!(
        tested.status.success() && exit_code == 0,
        "helm test failed:\n{tested_out}\n{}",
        String::from_utf8_lossy(&tested.stderr)
    );
    assert!(
        tested_out.contains("Phase:          Succeeded") || tested_out.contains("Succeeded"),
        "{tested_out}"
    );

    // Upgrade: more replicas, another image tag, and a changed CRD (a new short name on
    // Connector), from a copy of the chart.
    let upgraded_chart = scratch.path().join("sallyport");
    copy_dir(&chart, &upgraded_chart);
    let crd_file = upgraded_chart.join("files/crds/connectors.sallyport.dev.yaml");
    let mut crd = documents(&std::fs::read_to_string(&crd_file)?).remove(0);
    crd["spec"]["names"]["shortNames"]
        .as_array_mut()
        .ok_or("no shortNames")?
        .push(json!("e2econn"));
    std::fs::write(&crd_file, serde_yaml::to_string(&crd)?)?;
    let upgraded_arg = upgraded_chart.display().to_string();
    let upgrade = helm
        .run(&[
            "upgrade",
            RELEASE,
            upgraded_arg.as_str(),
            "--namespace",
            NAMESPACE,
            "-f",
            install_values.as_str(),
            "--set",
            "operator.replicas=3",
            "--set",
            "operator.image.tag=e2e-2",
            "--wait",
            "--timeout",
            "5m",
        ])
        .await;
    assert!(upgrade.contains("REVISION: 2"), "{upgrade}");
    let upgraded = wait_for(
        &deployments,
        "sallyport-operator",
        "Available with 3 replicas of e2e-2",
        |d| {
            deployment_available(d, 3)
                && d.and_then(|d| d.spec.as_ref())
                    .and_then(|s| s.template.spec.as_ref())
                    .and_then(|s| s.containers.first())
                    .and_then(|c| c.image.as_deref())
                    == Some("example.test/sallyport-operator:e2e-2")
        },
    )
    .await?;
    assert!(upgraded.is_some());
    wait_for(
        &crds,
        "connectors.sallyport.dev",
        "the new short name",
        |c| {
            c.is_some_and(|c| {
                c.spec
                    .names
                    .short_names
                    .as_ref()
                    .is_some_and(|s| s.iter().any(|n| n == "e2econn"))
            })
        },
    )
    .await?;

    // Uninstall: the operator's objects go; the CRDs and the custom resources stay.
    drop(operator);
    let uninstall = helm
        .run(&[
            "uninstall",
            RELEASE,
            "--namespace",
            NAMESPACE,
            "--wait",
            "--timeout",
            "3m",
        ])
        .await;
    assert!(uninstall.contains("uninstalled"), "{uninstall}");
    wait_for(&deployments, "sallyport-operator", "deleted", |d| {
        d.is_none()
    })
    .await?;
    assert!(
        Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE)
            .get_opt("sallyport-operator")
            .await?
            .is_none()
    );
    assert!(
        Api::<ClusterRole>::all(client.clone())
            .get_opt("sallyport-operator")
            .await?
            .is_none()
    );
    assert!(
        Api::<ClusterRole>::all(client.clone())
            .get_opt("sallyport-proxy")
            .await?
            .is_none()
    );
    assert!(
        Api::<ClusterRoleBinding>::all(client.clone())
            .get_opt(&format!("sallyport-operator-{NAMESPACE}"))
            .await?
            .is_none()
    );
    assert!(
        Api::<PodDisruptionBudget>::namespaced(client.clone(), NAMESPACE)
            .get_opt("sallyport-operator")
            .await?
            .is_none()
    );
    assert!(
        Api::<NetworkPolicy>::namespaced(client.clone(), NAMESPACE)
            .get_opt("sallyport-operator")
            .await?
            .is_none()
    );
    for name in SALLYPORT_CRDS {
        assert!(
            crds.get_opt(name).await?.is_some(),
            "CRD {name} was removed by helm uninstall"
        );
    }
    assert!(
        apps.get_opt("wiki").await?.is_some(),
        "the PublishedApp was removed with the chart"
    );
    assert!(
        groups.get_opt("east").await?.is_some(),
        "the ConnectorGroup was removed with the chart"
    );
    Ok(())
}
