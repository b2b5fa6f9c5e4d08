//! `sallyport-operator whatif` as a real process against a real kube-apiserver, and on
//! the same objects as manifests on disk: its decisions and per-policy results for
//! several sign-ins, the policies it evaluates being those the running operator put in
//! the fleet configuration, and a policy the engine cannot evaluate refused in its
//! status and in the answer.

use std::path::Path;
use std::process::Output;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use sallyport_api::{ConditionalAccessPolicy, ConnectorGroup, FleetConfig, PublishedApp};
use sallyport_e2e::controlplane::Mode;
use sallyport_e2e::dataplane::{REACTION_TIMEOUT, StepError, eventually, published_fleet_config};
use sallyport_e2e::manifests::self_signed_tls_secret;
use sallyport_e2e::process::{start_operator, workspace_binary};
use sallyport_e2e::testbed::Testbed;
use serde_json::Value;

type TestResult = Result<(), StepError>;

/// The time of every sign-in asked about.
const TIME: &str = "2026-01-05T12:00:00Z";

/// The objects of the app's namespace, without a namespace (the cluster's API and
/// `--from-file` put them in the app's).
const APP_OBJECTS: &str = "
apiVersion: sallyport.dev/v1alpha1
kind: ConnectorGroup
metadata: {name: dc}
spec: {}
---
apiVersion: sallyport.dev/v1alpha1
kind: PublishedApp
metadata: {name: wiki, labels: {tier: internal}}
spec:
  externalUrl: https://wiki.apps.example.com/
  internalUrl: http://wiki.corp.internal/
  connectorGroup: {name: dc}
  tls: {secretName: wiki-tls}
---
apiVersion: sallyport.dev/v1alpha1
kind: PublishedApp
metadata: {name: status}
spec:
  externalUrl: https://status.apps.example.com/
  internalUrl: http://status.corp.internal/
  connectorGroup: {name: dc}
  preAuthentication: {type: Passthrough}
  tls: {secretName: wiki-tls}
---
apiVersion: sallyport.dev/v1alpha1
kind: PublishedApp
metadata: {name: legacy}
spec:
  externalUrl: https://legacy.apps.example.com/
  internalUrl: http://legacy.corp.internal/
  connectorGroup: {name: dc}
  tls: {secretName: wiki-tls}
  conditionalAccessPolicies: [office-hours]
---
apiVersion: sallyport.dev/v1alpha1
kind: ConditionalAccessPolicy
metadata: {name: block-range}
spec:
  assignments: {apps: {selector: {matchLabels: {tier: internal}}}, users: {include: ['*']}}
  conditions: {locations: {include: [198.51.100.0/24]}}
  grant: {block: true}
---
apiVersion: sallyport.dev/v1alpha1
kind: ConditionalAccessPolicy
metadata: {name: report-untrusted}
spec:
  state: ReportOnly
  assignments: {apps: {names: [wiki]}, users: {include: ['*']}}
  conditions: {locations: {include: [Any], exclude: [10.0.0.0/8]}}
  grant: {require: {mfa: true}}
---
apiVersion: sallyport.dev/v1alpha1
kind: ConditionalAccessPolicy
metadata: {name: require-mfa}
spec:
  assignments: {apps: {names: [wiki]}, groups: {include: [staff]}}
  grant: {require: {mfa: true}}
---
apiVersion: sallyport.dev/v1alpha1
kind: ConditionalAccessPolicy
metadata: {name: office-hours}
spec:
  assignments: {apps: {names: [legacy]}, users: {include: ['*']}}
  conditions: {times: [{days: [Mon, Tue, Wed, Thu, Fri], from: '08:00', to: '18:00', timeZone: Mars/Olympus}]}
  grant: {block: true}
";

/// The fleet-wide baseline, for the operator's namespace.
const BASELINE: &str = "
apiVersion: sallyport.dev/v1alpha1
kind: ConditionalAccessPolicy
metadata: {name: baseline}
spec:
  assignments: {apps: {selector: {}}, users: {include: ['*'], exclude: [breakglass]}}
  conditions: {signInRisk: [high]}
  grant: {block: true}
";

/// Creates the objects of the YAML documents `yaml` in `namespace`.
async fn create_all(client: &kube::Client, namespace: &str, yaml: &str) -> TestResult {
    let pp = PostParams::default();
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let value = <Value as serde::Deserialize>::deserialize(document)?;
        match value["kind"].as_str() {
            Some("ConnectorGroup") => {
                let object: ConnectorGroup = serde_json::from_value(value)?;
                Api::namespaced(client.clone(), namespace)
                    .create(&pp, &object)
                    .await?;
            }
            Some("PublishedApp") => {
                let object: PublishedApp = serde_json::from_value(value)?;
                Api::namespaced(client.clone(), namespace)
                    .create(&pp, &object)
                    .await?;
            }
            Some("ConditionalAccessPolicy") => {
                let object: ConditionalAccessPolicy = serde_json::from_value(value)?;
                Api::namespaced(client.clone(), namespace)
                    .create(&pp, &object)
                    .await?;
            }
            other => return Err(format!("unexpected kind {other:?}").into()),
        }
    }
    Ok(())
}

/// The fleet configuration the operator published, once `check` holds for it.
async fn published_config(
    client: &kube::Client,
    operator_namespace: &str,
    what: &str,
    check: impl Fn(&FleetConfig) -> bool,
) -> Result<FleetConfig, StepError> {
    eventually(
        &format!("fleet configuration: {what}"),
        REACTION_TIMEOUT,
        async || {
            Ok(published_fleet_config(client, operator_namespace)
                .await?
                .filter(|c| check(c)))
        },
    )
    .await
}

/// The `(status, reason, message)` of the `Accepted` condition of policy `name`, once it
/// has one.
async fn accepted(
    policies: &Api<ConditionalAccessPolicy>,
    name: &str,
) -> Result<(String, String, String), StepError> {
    eventually(
        &format!("an Accepted condition of {name}"),
        REACTION_TIMEOUT,
        async || {
            let policy = policies.get(name).await?;
            Ok(policy
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Accepted"))
                .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone())))
        },
    )
    .await
}

/// Where the what-if tool reads the objects.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// The cluster of this admin kubeconfig.
    Cluster(&'a Path),
    /// This directory of manifests.
    Files(&'a Path),
}

/// Runs `sallyport-operator whatif` with `args` against `source`.
async fn whatif(
    source: Source<'_>,
    operator_namespace: &str,
    args: &[&str],
) -> Result<Output, StepError> {
    let mut command = tokio::process::Command::new(workspace_binary("sallyport-operator")?);
    command
        .arg("whatif")
        .args(["--operator-namespace", operator_namespace, "--time", TIME])
        .args(args);
    match source {
        Source::Cluster(kubeconfig) => command.env("KUBECONFIG", kubeconfig),
        // No cluster to reach: the files must be enough.
        Source::Files(dir) => command
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .arg("--from-file")
            .arg(dir),
    };
    Ok(command.output().await?)
}

/// The sign-in log line of a `-o json` answer, checking the exit code.
async fn decide(
    source: Source<'_>,
    operator_namespace: &str,
    args: &[&str],
    exit_code: i32,
) -> Result<Value, StepError> {
    let output = whatif(
        source,
        operator_namespace,
        &[args, &["-o", "json"]].concat(),
    )
    .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(exit_code),
        "whatif {args:?}: stdout {stdout}, stderr {stderr}"
    );
    assert_eq!(stderr, "", "whatif {args:?} warned");
    Ok(serde_json::from_str(&stdout)?)
}

/// `(id, result)` of every policy of a sign-in log line.
fn results(event: &Value) -> Vec<(String, String)> {
    event["policies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["id"].as_str().unwrap_or_default().to_owned(),
                p["result"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// A sign-in asked about and its answer, as [`CASES`] lists them.
type Case = (
    &'static [&'static str],
    &'static str,
    &'static [&'static str],
    i32,
    &'static str,
    [&'static str; 4],
);

/// A user of the group the require-mfa policy names.
const ALICE: [&str; 4] = ["--user", "alice", "--group", "staff"];
/// A user no policy names but those for everyone.
const BOB: [&str; 2] = ["--email", "bob@example.com"];

/// The sign-ins asked about: who, from where, further arguments, exit code, decision, and
/// the results of the baseline, block-range, report-untrusted and require-mfa policies
/// in that order.
const CASES: [Case; 7] = [
    (
        &ALICE,
        "203.0.113.7",
        &[],
        3,
        "stepUp",
        ["notApplied", "notApplied", "reportOnlyFailure", "failure"],
    ),
    (
        &ALICE,
        "203.0.113.7",
        &["--amr", "pwd", "--amr", "mfa"],
        0,
        "allowed",
        ["notApplied", "notApplied", "reportOnlySuccess", "success"],
    ),
    (
        &ALICE,
        "203.0.113.7",
        &["--acr", "phr", "--mfa-acr-value", "phr"],
        0,
        "allowed",
        ["notApplied", "notApplied", "reportOnlySuccess", "success"],
    ),
    (
        &ALICE,
        "198.51.100.20",
        &["--amr", "mfa"],
        3,
        "blocked",
        ["notApplied", "failure", "reportOnlySuccess", "success"],
    ),
    (
        &BOB,
        "10.1.2.3",
        &["--platform", "linux"],
        0,
        "allowed",
        [
            "notApplied",
            "notApplied",
            "reportOnlyNotApplied",
            "notApplied",
        ],
    ),
    (
        &BOB,
        "10.1.2.3",
        &["--sign-in-risk", "high"],
        3,
        "blocked",
        [
            "failure",
            "notApplied",
            "reportOnlyNotApplied",
            "notApplied",
        ],
    ),
    (
        &["--user", "breakglass"],
        "10.1.2.3",
        &["--sign-in-risk", "high"],
        0,
        "allowed",
        [
            "notApplied",
            "notApplied",
            "reportOnlyNotApplied",
            "notApplied",
        ],
    ),
];

#[tokio::test]
async fn whatif_answers_as_the_fleet_configuration_decides() -> TestResult {
    let Testbed {
        control_plane,
        client,
        operator_namespace,
        namespace,
        operator_kubeconfig,
    } = Testbed::new(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        Mode::ApiServer,
        "whatif",
    )
    .await
    .map_err(|e| e.to_string())?;
    let _operator = start_operator(
        &operator_kubeconfig,
        &operator_namespace,
        &["--default-oidc-issuer", "https://login.example.com/"],
    )?;
    Api::<Secret>::namespaced(client.clone(), &namespace)
        .create(
            &PostParams::default(),
            &self_signed_tls_secret("wiki-tls", "*.apps.example.com")?,
        )
        .await?;
    create_all(&client, &namespace, APP_OBJECTS).await?;
    create_all(&client, &operator_namespace, BASELINE).await?;

    // The policy the engine cannot evaluate is refused in its status; the app that
    // names it is not served; the others are.
    let policies = Api::<ConditionalAccessPolicy>::namespaced(client.clone(), &namespace);
    let (status, reason, message) = accepted(&policies, "office-hours").await?;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "InvalidPolicy")
    );
    assert!(
        message.starts_with("spec.conditions.times[0].timeZone: \"Mars/Olympus\""),
        "{message}"
    );
    assert_eq!(accepted(&policies, "require-mfa").await?.1, "Accepted");

    // Settled: the app's status raises no warning (the tool warns while it would).
    let apps = Api::<PublishedApp>::namespaced(client.clone(), &namespace);
    eventually(
        "wiki resolving its references",
        REACTION_TIMEOUT,
        async || {
            let seen = apps.get("wiki").await?;
            Ok(seen
                .status
                .is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "ResolvedRefs" && c.status == "True")
                })
                .then_some(()))
        },
    )
    .await?;

    // The app the invalid policy applies to says why it is not served.
    eventually(
        "legacy reporting its invalid policy",
        REACTION_TIMEOUT,
        async || {
            let seen = apps.get("legacy").await?;
            Ok(seen
                .status
                .and_then(|s| {
                    s.conditions.into_iter().find(|c| {
                        c.type_ == "ResolvedRefs"
                            && c.status == "False"
                            && c.reason == "PolicyInvalid"
                            && c.message.contains("office-hours")
                            && c.message.contains("Mars/Olympus")
                    })
                })
                .map(|_| ()))
        },
    )
    .await?;

    let wiki = format!("{namespace}/wiki");
    let baseline = format!("{operator_namespace}/baseline");
    let wiki_policies = [
        baseline.clone(),
        format!("{namespace}/block-range"),
        format!("{namespace}/report-untrusted"),
        format!("{namespace}/require-mfa"),
    ];
    let config = published_config(&client, &operator_namespace, "wiki with 4 policies", |c| {
        c.route(&wiki).is_some_and(|r| r.policies == wiki_policies)
    })
    .await?;
    assert!(config.route(&format!("{namespace}/legacy")).is_none());

    // The same objects as manifests on disk; those of the app's namespace name none.
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("apps.yaml"), APP_OBJECTS)?;
    std::fs::write(
        dir.path().join("baseline.yml"),
        BASELINE.replace(
            "metadata: {name: baseline}",
            &format!("metadata: {{name: baseline, namespace: {operator_namespace}}}"),
        ),
    )?;
    let kubeconfig = control_plane.kubeconfig_path();
    let app = ["--app", wiki.as_str()];
    for (who, ip, extra, exit_code, decision, expected) in CASES {
        let args = [&app[..], who, &["--ip", ip], extra].concat();
        let from_cluster = decide(
            Source::Cluster(kubeconfig),
            &operator_namespace,
            &args,
            exit_code,
        )
        .await?;
        assert_eq!(
            from_cluster["decision"], decision,
            "{args:?}: {from_cluster:#}"
        );
        assert_eq!(from_cluster["stage"], "whatIf");
        assert_eq!(from_cluster["time"], TIME);
        let expected: Vec<(String, String)> = wiki_policies
            .iter()
            .cloned()
            .zip(expected.map(String::from))
            .collect();
        assert_eq!(
            results(&from_cluster),
            expected,
            "{args:?}: {from_cluster:#}"
        );
        let from_files = decide(
            Source::Files(dir.path()),
            &operator_namespace,
            &args,
            exit_code,
        )
        .await?;
        assert_eq!(
            from_files, from_cluster,
            "{args:?}: files and cluster disagree"
        );
    }

    // The text answer, for people.
    let output = whatif(
        Source::Cluster(kubeconfig),
        &operator_namespace,
        &[&app[..], &ALICE, &["--ip", "203.0.113.7"]].concat(),
    )
    .await?;
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(3), "{text}");
    for line in [
        format!("App:       {wiki} (https://wiki.apps.example.com/)"),
        "Decision:  stepUp".to_owned(),
        format!(
            "Reason:    policies {namespace}/require-mfa require multi-factor authentication: the user must sign in again"
        ),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
    let row = text
        .lines()
        .find(|l| l.starts_with(&format!("{namespace}/report-untrusted ")))
        .unwrap_or_default();
    let columns: Vec<&str> = row
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        columns,
        [
            format!("{namespace}/report-untrusted").as_str(),
            "reportOnly",
            "reportOnlyFailure",
            "applies; not met: multi-factor authentication"
        ],
        "{text}"
    );

    // Apps no sign-in reaches are named in the error, from either source.
    for source in [Source::Cluster(kubeconfig), Source::Files(dir.path())] {
        for (app, error) in [
            ("status", "uses spec.preAuthentication.type Passthrough"),
            ("legacy", "is not served (PolicyInvalid: "),
            ("nope", "there is no PublishedApp"),
        ] {
            let app = format!("{namespace}/{app}");
            let output = whatif(
                source,
                &operator_namespace,
                &["--app", &app, "--user", "alice", "--ip", "203.0.113.7"],
            )
            .await?;
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(1), "{app}: {stderr}");
            assert!(
                stderr.contains(&app) && stderr.contains(error),
                "{app}: {stderr}"
            );
            assert!(output.stdout.is_empty(), "{app}");
        }
    }
    Ok(())
}
