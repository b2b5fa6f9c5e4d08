//! The summary of `kubectl sallyport status`, from what was read (pure): one line for the
//! operator, a table each for PublishedApps, ConnectorGroups and
//! ConditionalAccessPolicies, and under every row that is not ready the condition's
//! message and what to fix ([`crate::remedies::remedy`]).

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use sallyport_api::conditional_access_policy::PolicyState;
use sallyport_api::{ConditionalAccessPolicy, Connector, ConnectorGroup, PublishedApp};

use super::status::Scope;
use crate::remedies::remedy;

/// Seconds past a Lease's duration before its holder counts as gone (clock skew).
const LEASE_GRACE_SECONDS: i64 = 5;

/// What `kubectl sallyport status` read about the operator.
#[derive(Debug, Clone)]
pub struct OperatorView {
    /// The operator's namespace.
    pub namespace: String,
    /// Its leader Lease, if any, or why it could not be read.
    pub lease: Result<Option<Lease>, String>,
    /// The Pod named as the Lease's holder (`None` when there is no holder), or why it
    /// could not be read.
    pub leader_pod: Option<Result<Option<Pod>, String>>,
}

/// Everything a summary is made from.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// When it was read.
    pub now: Timestamp,
    /// The namespaces it covers.
    pub scope: Scope,
    /// The operator.
    pub operator: OperatorView,
    /// The PublishedApps of the scope.
    pub apps: Vec<PublishedApp>,
    /// The ConnectorGroups of the scope and those its apps use.
    pub groups: Vec<ConnectorGroup>,
    /// The Connectors of those groups' namespaces.
    pub connectors: Vec<Connector>,
    /// The policies of the scope and the operator namespace's baselines.
    pub policies: Vec<ConditionalAccessPolicy>,
    /// What could not be read, one sentence each.
    pub unreadable: Vec<String>,
}

/// The summary: the text to print, and what is not ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The text for people.
    pub text: String,
    /// One entry per thing not ready, e.g. `PublishedApp team-a/wiki (TLSSecretNotFound)`.
    pub not_ready: Vec<String>,
}

/// A table row and, under it, what to know about it.
struct Row {
    cells: Vec<String>,
    details: Vec<String>,
}

/// `headers` and `rows` as aligned columns, each row's details indented below it.
fn table(headers: &[&str], rows: &[Row]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(&row.cells) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            let width = widths.get(i).copied().unwrap_or_default();
            text.push_str(&format!("{cell:<width$}  "));
        }
        text.trim_end().to_owned() + "\n"
    };
    let mut text = line(&mut headers.iter().copied());
    for row in rows {
        text.push_str(&line(&mut row.cells.iter().map(String::as_str)));
        for detail in &row.details {
            text.push_str(&format!("    {detail}\n"));
        }
    }
    text
}

/// `seconds` for people: `42s`, `5m`, `3h`, `12d`.
fn span(seconds: i64) -> String {
    let seconds = seconds.abs();
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m", seconds / 60),
        3600..86_400 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86_400),
    }
}

fn id<K: ResourceExt>(object: &K) -> String {
    format!(
        "{}/{}",
        object.namespace().unwrap_or_default(),
        object.name_any()
    )
}

fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the status was written for the object's current generation.
fn observed(generation: Option<i64>, observed: Option<i64>, conditions: &[Condition]) -> bool {
    !conditions.is_empty() && observed >= generation
}

const NOT_RECONCILED: &str = "NotReconciled";

fn not_reconciled(generation: Option<i64>) -> String {
    format!(
        "the operator has not reported on generation {} yet; if this lasts, check the operator above",
        generation.unwrap_or_default()
    )
}

/// The message and the remedy of a False condition, as detail lines.
fn explain(kind: &str, cause: &Condition, fill: &dyn Fn(&str) -> String) -> Vec<String> {
    let mut details = vec![cause.message.clone()];
    if let Some(fix) = remedy(kind, &cause.reason) {
        details.push(format!("fix: {}", fill(fix)));
    }
    details
}

/// The operator's line, and whether it is ready.
fn operator_line(view: &OperatorView, now: Timestamp) -> (String, bool) {
    let namespace = &view.namespace;
    let lease = match &view.lease {
        Err(error) => return (format!("unknown: {error}"), false),
        Ok(None) => {
            return (
                format!(
                    "not running: no replica holds the Lease {}/{} (kubectl get pods -n {namespace}; or pass --operator-namespace)",
                    namespace,
                    crate::leader::OPERATOR_LEASE_NAME
                ),
                false,
            );
        }
        Ok(Some(lease)) => lease,
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let Some(holder) = spec.holder_identity.filter(|h| !h.is_empty()) else {
        return (
            format!(
                "no leader: the Lease of namespace {namespace} has no holder (is any replica running?)"
            ),
            false,
        );
    };
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    let Some(renewed) = spec.renew_time.map(|t| t.0) else {
        return (
            format!("leader {holder} has never renewed the Lease"),
            false,
        );
    };
    let age = now.as_second() - renewed.as_second();
    if age > duration + LEASE_GRACE_SECONDS {
        return (
            format!(
                "down: leader {holder} stopped renewing the Lease {} ago (it lasts {duration}s); the operator is not running or cannot reach the apiserver (kubectl logs -n {namespace} {holder})",
                span(age)
            ),
            false,
        );
    }
    let mut line = format!(
        "namespace {namespace}, leader {holder} (Lease renewed {} ago)",
        span(age.max(0))
    );
    let ready = match &view.leader_pod {
        None => true,
        Some(Err(error)) => {
            line.push_str(&format!("; {error}"));
            true
        }
        Some(Ok(None)) => {
            line.push_str(&format!(
                "; not a Pod of namespace {namespace} (runs outside the cluster)"
            ));
            true
        }
        Some(Ok(Some(pod))) => {
            let conditions = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .cloned()
                .unwrap_or_default();
            let ready = conditions.iter().find(|c| c.type_ == "Ready");
            match ready {
                Some(c) if c.status == "True" => {
                    line.push_str("; Pod ready");
                    true
                }
                other => {
                    let why = other
                        .and_then(|c| c.message.clone().or_else(|| c.reason.clone()))
                        .unwrap_or_else(|| "no Ready condition".to_owned());
                    line.push_str(&format!(
                        "; Pod not ready ({why}): its /readyz says why (kubectl describe pod -n {namespace} {holder})"
                    ));
                    false
                }
            }
        }
    };
    (line, ready)
}

/// An app's row and, when it is not ready, its reason.
fn app_row(app: &PublishedApp) -> (Row, Option<String>) {
    let status = app.status.clone().unwrap_or_default();
    let generation = app.metadata.generation;
    let url = status
        .url
        .clone()
        .unwrap_or_else(|| app.spec.external_url.clone());
    let group_namespace = app
        .spec
        .connector_group
        .namespace
        .clone()
        .unwrap_or_else(|| app.namespace().unwrap_or_default());
    let fill = |fix: &str| fix.replace("GROUP_NAMESPACE", &group_namespace);
    let cells =
        |ready: &str, reason: &str| vec![id(app), ready.to_owned(), reason.to_owned(), url.clone()];
    let ready = condition(&status.conditions, "Ready");
    match ready {
        _ if !observed(generation, status.observed_generation, &status.conditions) => (
            Row {
                cells: cells("Unknown", NOT_RECONCILED),
                details: vec![not_reconciled(generation)],
            },
            Some(NOT_RECONCILED.to_owned()),
        ),
        Some(ready) if ready.status == "True" => (
            Row {
                cells: cells("True", &ready.reason),
                details: Vec::new(),
            },
            None,
        ),
        Some(ready) => {
            // The most specific cause: a False Accepted or ResolvedRefs, else Ready.
            let cause = ["Accepted", "ResolvedRefs"]
                .iter()
                .filter_map(|t| condition(&status.conditions, t))
                .find(|c| c.status != "True")
                .unwrap_or(ready);
            (
                Row {
                    cells: cells("False", &cause.reason),
                    details: explain("PublishedApp", cause, &fill),
                },
                Some(cause.reason.clone()),
            )
        }
        None => (
            Row {
                cells: cells("Unknown", NOT_RECONCILED),
                details: vec![not_reconciled(generation)],
            },
            Some(NOT_RECONCILED.to_owned()),
        ),
    }
}

/// A group's row, counting its `connectors`' certificates, and when it is not ready,
/// its reason.
fn group_row(
    group: &ConnectorGroup,
    connectors: &[Connector],
    now: Timestamp,
) -> (Row, Option<String>) {
    let status = group.status.clone().unwrap_or_default();
    let generation = group.metadata.generation;
    let name = group.name_any();
    let namespace = group.namespace().unwrap_or_default();
    let soonest = connectors
        .iter()
        .filter(|c| {
            c.namespace().as_deref() == Some(namespace.as_str()) && c.spec.connector_group == name
        })
        .filter_map(|c| {
            c.status
                .as_ref()?
                .certificate
                .as_ref()
                .map(|cert| cert.not_after.0)
        })
        .min();
    let expiry = match soonest {
        None => "-".to_owned(),
        Some(at) => {
            let left = at.as_second() - now.as_second();
            let when = if left >= 0 {
                format!("in {}", span(left))
            } else {
                format!("expired {} ago", span(left))
            };
            format!("{} ({when})", at.strftime("%Y-%m-%dT%H:%M:%SZ"))
        }
    };
    let secret = status
        .registration_token_secret
        .clone()
        .unwrap_or_else(|| format!("{name}-registration"));
    let fill = |fix: &str| fix.replace("<group>-registration", &secret);
    let up_to_date = condition(&status.conditions, "UpToDate");
    let version = match (&status.rollout, up_to_date) {
        (Some(rollout), Some(c)) => format!("{} ({})", rollout.target_version, c.reason),
        (Some(rollout), None) => rollout.target_version.clone(),
        (None, _) => "-".to_owned(),
    };
    // A rollout that needs a person is explained beside the readiness.
    let rollout_details: Vec<String> = up_to_date
        .filter(|c| c.status == "False" && remedy("ConnectorGroup", &c.reason).is_some())
        .map(|c| explain("ConnectorGroup", c, &fill))
        .unwrap_or_default();
    let cells = |ready: &str, reason: &str| {
        vec![
            id(group),
            ready.to_owned(),
            reason.to_owned(),
            format!(
                "{}/{}",
                status.connected_connectors, status.desired_connectors
            ),
            version.clone(),
            expiry.clone(),
        ]
    };
    match condition(&status.conditions, "Ready") {
        _ if !observed(generation, status.observed_generation, &status.conditions) => (
            Row {
                cells: cells("Unknown", NOT_RECONCILED),
                details: vec![not_reconciled(generation)],
            },
            Some(NOT_RECONCILED.to_owned()),
        ),
        Some(ready) if ready.status == "True" => (
            Row {
                cells: cells("True", &ready.reason),
                details: rollout_details,
            },
            None,
        ),
        Some(ready) => (
            Row {
                cells: cells("False", &ready.reason),
                details: [explain("ConnectorGroup", ready, &fill), rollout_details].concat(),
            },
            Some(ready.reason.clone()),
        ),
        None => (
            Row {
                cells: cells("Unknown", NOT_RECONCILED),
                details: vec![not_reconciled(generation)],
            },
            Some(NOT_RECONCILED.to_owned()),
        ),
    }
}

/// A policy's row and, when it is not in force as its state says, its reason.
fn policy_row(policy: &ConditionalAccessPolicy) -> (Row, Option<String>) {
    let status = policy.status.clone().unwrap_or_default();
    let generation = policy.metadata.generation;
    let state = match policy.spec.state {
        PolicyState::Enabled => "Enabled",
        PolicyState::ReportOnly => "ReportOnly",
        PolicyState::Disabled => "Disabled",
    };
    let cells = |ready: &str, reason: &str| {
        vec![
            id(policy),
            state.to_owned(),
            status.matched_apps.to_string(),
            ready.to_owned(),
            reason.to_owned(),
        ]
    };
    if !observed(generation, status.observed_generation, &status.conditions) {
        return (
            Row {
                cells: cells("Unknown", NOT_RECONCILED),
                details: vec![not_reconciled(generation)],
            },
            Some(NOT_RECONCILED.to_owned()),
        );
    }
    let failed = ["Accepted", "Ready"]
        .iter()
        .filter_map(|t| condition(&status.conditions, t))
        .find(|c| c.status != "True");
    if let Some(cause) = failed {
        return (
            Row {
                cells: cells("False", &cause.reason),
                details: explain("ConditionalAccessPolicy", cause, &|fix| fix.to_owned()),
            },
            Some(cause.reason.clone()),
        );
    }
    let reason = condition(&status.conditions, "Ready").map_or("", |c| c.reason.as_str());
    let mut details = Vec::new();
    if status.matched_apps == 0 && policy.spec.state != PolicyState::Disabled {
        details.push(format!(
            "applies to no app; {}",
            remedy("ConditionalAccessPolicy", "NoMatchedApps").unwrap_or_default()
        ));
    }
    (
        Row {
            cells: cells("True", reason),
            details,
        },
        None,
    )
}

fn sorted<K: ResourceExt + Clone>(objects: &[K]) -> Vec<K> {
    let mut objects = objects.to_vec();
    objects.sort_by_key(|o| (o.namespace(), o.name_any()));
    objects.dedup_by_key(|o| (o.namespace(), o.name_any()));
    objects
}

/// The summary's per-kind sections, written into one text.
struct Sections<'a> {
    scope: &'a str,
    text: &'a mut String,
    not_ready: &'a mut Vec<String>,
}

impl Sections<'_> {
    /// One kind's table (or a line saying there is none, naming the kind's `plural`),
    /// noting each object `row` finds not ready.
    fn push<K: ResourceExt>(
        &mut self,
        objects: &[K],
        (kind, plural): (&str, &str),
        headers: &[&str],
        row: impl Fn(&K) -> (Row, Option<String>),
    ) {
        if objects.is_empty() {
            self.text
                .push_str(&format!("No {plural} in {}.\n", self.scope));
        } else {
            let rows: Vec<Row> = objects
                .iter()
                .map(|object| {
                    let (cells, reason) = row(object);
                    if let Some(reason) = reason {
                        self.not_ready
                            .push(format!("{kind} {} ({reason})", id(object)));
                    }
                    cells
                })
                .collect();
            self.text.push_str(&table(headers, &rows));
        }
    }
}

/// The summary of `snapshot`.
pub fn summarize(snapshot: &Snapshot) -> Summary {
    let mut text = String::new();
    let mut not_ready = Vec::new();
    let scope = match &snapshot.scope {
        Scope::Namespace(namespace) => format!("namespace {namespace}"),
        Scope::All => "all namespaces".to_owned(),
    };

    let (line, ready) = operator_line(&snapshot.operator, snapshot.now);
    text.push_str(&format!(
        "Operator: {}{line}\n\n",
        if ready { "ready, " } else { "NOT READY, " }
    ));
    if !ready {
        not_ready.push(format!(
            "operator (namespace {})",
            snapshot.operator.namespace
        ));
    }

    let apps = sorted(&snapshot.apps);
    let groups = sorted(&snapshot.groups);
    let policies = sorted(&snapshot.policies);
    let mut sections = Sections {
        scope: &scope,
        text: &mut text,
        not_ready: &mut not_ready,
    };
    sections.push(
        &apps,
        ("PublishedApp", "PublishedApps"),
        &["PUBLISHEDAPP", "READY", "REASON", "URL"],
        app_row,
    );
    sections.text.push('\n');
    sections.push(
        &groups,
        ("ConnectorGroup", "ConnectorGroups"),
        &[
            "CONNECTORGROUP",
            "READY",
            "REASON",
            "CONNECTED",
            "VERSION",
            "SOONEST-CERT-EXPIRY",
        ],
        |group| group_row(group, &snapshot.connectors, snapshot.now),
    );
    sections.text.push('\n');
    sections.push(
        &policies,
        ("ConditionalAccessPolicy", "ConditionalAccessPolicies"),
        &["POLICY", "STATE", "MATCHED", "READY", "REASON"],
        policy_row,
    );
    if !policies.is_empty() {
        let count = |state: PolicyState| policies.iter().filter(|p| p.spec.state == state).count();
        text.push_str(&format!(
            "Policies: {} enabled, {} report-only, {} disabled.\n",
            count(PolicyState::Enabled),
            count(PolicyState::ReportOnly),
            count(PolicyState::Disabled)
        ));
    }

    for problem in &snapshot.unreadable {
        text.push_str(&format!("\nwarning: {problem}"));
    }
    if !snapshot.unreadable.is_empty() {
        text.push('\n');
    }
    text.push('\n');
    if not_ready.is_empty() {
        text.push_str(&format!(
            "All ready: {} app(s), {} group(s), {} policy(ies).\n",
            apps.len(),
            groups.len(),
            policies.len()
        ));
    } else {
        text.push_str(&format!("Not ready: {}.\n", not_ready.join(", ")));
    }
    Summary { text, not_ready }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
        serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    const NOW: &str = "2026-03-01T12:00:00Z";

    fn lease(holder: &str, renewed: &str) -> Lease {
        yaml(&format!(
            "metadata: {{name: sallyport-operator, namespace: ops}}\nspec: {{holderIdentity: {holder}, leaseDurationSeconds: 15, renewTime: '{renewed}'}}\n"
        ))
    }

    fn app(name: &str, conditions: &str) -> PublishedApp {
        yaml(&format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: PublishedApp\nmetadata: {{name: {name}, namespace: team-a, generation: 2}}\nspec:\n  externalUrl: https://{name}.example.com/\n  internalUrl: http://{name}.corp/\n  connectorGroup: {{name: dc, namespace: ops}}\nstatus:\n  observedGeneration: 2\n  conditions: {conditions}\n"
        ))
    }

    fn cond(type_: &str, status: &str, reason: &str, message: &str) -> String {
        format!(
            "{{type: {type_}, status: '{status}', reason: {reason}, message: '{message}', lastTransitionTime: '2026-03-01T00:00:00Z'}}"
        )
    }

    fn snapshot() -> Snapshot {
        let ready = format!(
            "[{}, {}, {}]",
            cond("Accepted", "True", "Accepted", "ok"),
            cond("ResolvedRefs", "True", "ResolvedRefs", "ok"),
            cond("Ready", "True", "Ready", "1 connected connector(s)")
        );
        let group: ConnectorGroup = yaml(&format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: ConnectorGroup\nmetadata: {{name: dc, namespace: ops, generation: 1}}\nspec: {{}}\nstatus: {{observedGeneration: 1, desiredConnectors: 2, connectedConnectors: 1, registrationTokenSecret: dc-registration, rollout: {{targetVersion: 0.2.0, updatedConnectors: 2, desiredConnectors: 2, phase: Complete}}, conditions: [{}, {}]}}\n",
            cond(
                "Ready",
                "True",
                "Connected",
                "1 of 2 connector(s) connected"
            ),
            cond(
                "UpToDate",
                "True",
                "AllUpToDate",
                "all 2 connector(s) run 0.2.0"
            )
        ));
        let connector = |name: &str, not_after: &str| -> Connector {
            yaml(&format!(
                "apiVersion: sallyport.dev/v1alpha1\nkind: Connector\nmetadata: {{name: {name}, namespace: ops}}\nspec: {{connectorGroup: dc}}\nstatus: {{certificate: {{serial: '01', issuedAt: '2026-01-01T00:00:00Z', notAfter: '{not_after}'}}}}\n"
            ))
        };
        let policy = |name: &str, state: &str, matched: i32| -> ConditionalAccessPolicy {
            yaml(&format!(
                "apiVersion: sallyport.dev/v1alpha1\nkind: ConditionalAccessPolicy\nmetadata: {{name: {name}, namespace: team-a, generation: 1}}\nspec:\n  state: {state}\n  assignments: {{apps: {{selector: {{}}}}, users: {{include: ['*']}}}}\n  grant: {{block: true}}\nstatus: {{observedGeneration: 1, matchedApps: {matched}, conditions: [{}, {}]}}\n",
                cond("Accepted", "True", "Accepted", "valid"),
                cond("Ready", "True", "Enforced", "enforced")
            ))
        };
        Snapshot {
            now: at(NOW),
            scope: Scope::Namespace("team-a".into()),
            operator: OperatorView {
                namespace: "ops".into(),
                lease: Ok(Some(lease("op-0", "2026-03-01T11:59:58Z"))),
                leader_pod: Some(Ok(None)),
            },
            apps: vec![app("wiki", &ready)],
            groups: vec![group],
            connectors: vec![
                connector("c1", "2026-03-31T12:00:00Z"),
                connector("c2", "2026-03-11T12:00:00Z"),
            ],
            policies: vec![
                policy("mfa", "Enabled", 1),
                policy("audit", "ReportOnly", 1),
                policy("old", "Disabled", 0),
            ],
            unreadable: Vec::new(),
        }
    }

    #[test]
    fn an_empty_namespace_says_so_for_each_kind() {
        let mut empty = snapshot();
        empty.apps.clear();
        empty.groups.clear();
        empty.policies.clear();
        let summary = summarize(&empty);
        assert!(
            summary.text.contains(
                "No PublishedApps in namespace team-a.\n\nNo ConnectorGroups in namespace team-a.\n\nNo ConditionalAccessPolicies in namespace team-a.\n"
            ),
            "{}",
            summary.text
        );
    }

    #[test]
    fn everything_ready_is_one_summary_with_no_complaint() {
        let summary = summarize(&snapshot());
        assert_eq!(summary.not_ready, Vec::<String>::new(), "{}", summary.text);
        let text = &summary.text;
        for part in [
            "Operator: ready, namespace ops, leader op-0 (Lease renewed 2s ago); not a Pod of namespace ops",
            "team-a/wiki   True   Ready   https://wiki.example.com/",
            "ops/dc          True   Connected  1/2        0.2.0 (AllUpToDate)  2026-03-11T12:00:00Z (in 10d)",
            "Policies: 1 enabled, 1 report-only, 1 disabled.",
            "All ready: 1 app(s), 1 group(s), 3 policy(ies).",
        ] {
            assert!(text.contains(part), "{part:?} missing from\n{text}");
        }
    }

    #[test]
    fn a_broken_app_shows_its_most_specific_reason_the_message_and_the_fix() {
        let mut snapshot = snapshot();
        snapshot.apps.push(app(
            "crm",
            &format!(
                "[{}, {}, {}]",
                cond("Accepted", "True", "Accepted", "ok"),
                cond(
                    "ResolvedRefs",
                    "False",
                    "TLSSecretNotFound",
                    "TLS Secret team-a/crm-tls does not exist"
                ),
                cond(
                    "Ready",
                    "False",
                    "RefsNotResolved",
                    "TLS Secret team-a/crm-tls does not exist"
                )
            ),
        ));
        let summary = summarize(&snapshot);
        assert_eq!(
            summary.not_ready,
            ["PublishedApp team-a/crm (TLSSecretNotFound)"]
        );
        let text = &summary.text;
        for part in [
            "team-a/crm    False  TLSSecretNotFound  https://crm.example.com/\n    TLS Secret team-a/crm-tls does not exist\n    fix: create it",
            "Not ready: PublishedApp team-a/crm (TLSSecretNotFound).",
        ] {
            assert!(text.contains(part), "{part:?} missing from\n{text}");
        }
    }

    #[test]
    fn an_app_not_reconciled_for_its_generation_is_unknown() {
        let mut snapshot = snapshot();
        let mut stale = app("blog", "[]");
        stale.metadata.generation = Some(3);
        snapshot.apps = vec![stale];
        let summary = summarize(&snapshot);
        assert_eq!(
            summary.not_ready,
            ["PublishedApp team-a/blog (NotReconciled)"]
        );
        assert!(
            summary.text.contains("has not reported on generation 3"),
            "{}",
            summary.text
        );
    }

    #[test]
    fn a_lapsed_or_missing_lease_means_the_operator_is_not_ready() {
        let mut snapshot = snapshot();
        snapshot.operator.lease = Ok(Some(lease("op-0", "2026-03-01T11:50:00Z")));
        let summary = summarize(&snapshot);
        assert_eq!(summary.not_ready, ["operator (namespace ops)"]);
        assert!(
            summary.text.contains("stopped renewing the Lease 10m ago"),
            "{}",
            summary.text
        );
        snapshot.operator.lease = Ok(None);
        assert!(
            summarize(&snapshot)
                .text
                .contains("Operator: NOT READY, not running")
        );
        snapshot.operator.lease = Err("forbidden".into());
        assert_eq!(summarize(&snapshot).not_ready.len(), 1);
    }

    #[test]
    fn an_unready_leader_pod_and_a_disconnected_group_are_not_ready() {
        let mut snapshot = snapshot();
        snapshot.operator.leader_pod = Some(Ok(Some(yaml(
            "metadata: {name: op-0}\nstatus: {conditions: [{type: Ready, status: 'False', message: 'containers with unready status: [operator]'}]}\n",
        ))));
        snapshot.groups[0] = yaml(&format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: ConnectorGroup\nmetadata: {{name: dc, namespace: ops}}\nspec: {{}}\nstatus: {{desiredConnectors: 0, connectedConnectors: 0, registrationTokenSecret: dc-registration, conditions: [{}]}}\n",
            cond(
                "Ready",
                "False",
                "NoConnectedConnectors",
                "no connector has registered yet"
            )
        ));
        let summary = summarize(&snapshot);
        assert_eq!(
            summary.not_ready,
            [
                "operator (namespace ops)",
                "ConnectorGroup ops/dc (NoConnectedConnectors)"
            ]
        );
        assert!(
            summary.text.contains(
                "fix: run connectors with the registration token of Secret dc-registration"
            ),
            "{}",
            summary.text
        );
    }

    #[test]
    fn a_halted_rollout_is_explained_while_the_group_stays_ready() {
        let mut snapshot = snapshot();
        snapshot.groups[0] = yaml(&format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: ConnectorGroup\nmetadata: {{name: dc, namespace: ops}}\nspec: {{version: 0.3.0}}\nstatus: {{desiredConnectors: 2, connectedConnectors: 2, rollout: {{targetVersion: 0.3.0, updatedConnectors: 0, desiredConnectors: 2, phase: Halted}}, conditions: [{}, {}]}}\n",
            cond(
                "Ready",
                "True",
                "Connected",
                "2 of 2 connector(s) connected"
            ),
            cond(
                "UpToDate",
                "False",
                "RolloutHalted",
                "rollout to 0.3.0 halted: new connector pod dc-connector-x: CrashLoopBackOff"
            )
        ));
        let summary = summarize(&snapshot);
        assert_eq!(summary.not_ready, Vec::<String>::new(), "{}", summary.text);
        for part in [
            "0.3.0 (RolloutHalted)",
            "rollout to 0.3.0 halted: new connector pod dc-connector-x: CrashLoopBackOff",
            "fix: set spec.version (or spec.deployment.image) back",
        ] {
            assert!(
                summary.text.contains(part),
                "{part:?} missing from\n{}",
                summary.text
            );
        }
    }

    #[test]
    fn a_refused_policy_is_not_ready_and_an_unmatched_one_is_noted() {
        let mut snapshot = snapshot();
        snapshot.policies.push(yaml(&format!(
            "apiVersion: sallyport.dev/v1alpha1\nkind: ConditionalAccessPolicy\nmetadata: {{name: hours, namespace: team-a}}\nspec:\n  assignments: {{apps: {{names: [x]}}, users: {{include: ['*']}}}}\n  grant: {{block: true}}\nstatus: {{matchedApps: 0, conditions: [{}, {}]}}\n",
            cond("Accepted", "False", "InvalidPolicy", "spec.conditions.times[0].timeZone is unknown"),
            cond("Ready", "False", "NotAccepted", "not served")
        )));
        if let Some(status) = snapshot.policies[0].status.as_mut() {
            status.matched_apps = 0;
        }
        let summary = summarize(&snapshot);
        assert_eq!(
            summary.not_ready,
            ["ConditionalAccessPolicy team-a/hours (InvalidPolicy)"]
        );
        assert!(
            summary
                .text
                .contains("timeZone is unknown\n    fix: fix the field"),
            "{}",
            summary.text
        );
        assert!(
            summary.text.contains("applies to no app;"),
            "{}",
            summary.text
        );
    }
}
