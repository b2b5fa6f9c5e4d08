//! Connector versions: which one a group should run, the image that carries it, and
//! where the group's move to it stands (its rollout), from what the cluster shows.
//!
//! A group's target version is its `spec.version`, else the tag of the operator's
//! `--connector-image` (the release the operator belongs to, which `helm upgrade`
//! changes). In this cluster the connector Deployment rolls one pod at a time (surge one,
//! none unavailable, each new pod ready — holding tunnels to every proxy replica — before
//! an old one drains), so a new version that never gets ready stops the rollout by
//! itself: the rollout is then reported `Halted` with the failing pod's reason. Outside
//! the cluster the connectors report the version they run; the rollout `Waits` for
//! whoever runs them.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use sallyport_api::Connector;
use sallyport_api::connector_group::{RolloutPhase, RolloutStatus, VersionCount};
use sallyport_api::registration::CONNECTOR_VERSION_ANNOTATION;

use crate::conditions::Verdict;

/// The condition type telling whether every connector of a group runs its target version.
pub const UP_TO_DATE: &str = "UpToDate";

/// The version shown for a pod or connector that names none.
pub const UNKNOWN_VERSION: &str = "unknown";

/// Restarts of a new connector container after which its version counts as failed even
/// before the Deployment's progress deadline.
pub const FAILED_AFTER_RESTARTS: i32 = 3;

/// Container waiting reasons that mean a new version cannot start.
const FAILING_REASONS: [&str; 6] = [
    "CrashLoopBackOff",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// An image reference split at its tag and digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference<'a> {
    /// Everything before the tag and digest: `registry[:port]/path/name`.
    pub repository: &'a str,
    /// The tag, when the reference has one.
    pub tag: Option<&'a str>,
    /// The digest (`sha256:…`), when the reference has one.
    pub digest: Option<&'a str>,
}

/// Splits `image` into repository, tag and digest. A `:` belongs to the tag only after
/// the last `/` (before it, it is a registry port).
pub fn parse_image(image: &str) -> ImageReference<'_> {
    let (name, digest) = match image.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (image, None),
    };
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    match name[last_slash..].rfind(':') {
        Some(colon) => {
            let at = last_slash + colon;
            ImageReference {
                repository: &name[..at],
                tag: Some(&name[at + 1..]).filter(|t| !t.is_empty()),
                digest,
            }
        }
        None => ImageReference {
            repository: name,
            tag: None,
            digest,
        },
    }
}

/// The version a group should run: its `spec.version`, else the tag of the operator's
/// default connector image, else the operator's own version.
pub fn target_version(spec_version: Option<&str>, default_image: &str) -> String {
    spec_version
        .filter(|v| !v.is_empty())
        .or_else(|| parse_image(default_image).tag)
        .unwrap_or(env!("CARGO_PKG_VERSION"))
        .to_owned()
}

/// The image a group's connector Deployment runs, and the version it carries.
///
/// `spec_image` (the group's `spec.deployment.image`) with a tag or digest is used as it
/// is, its tag being the version (or the target version when it has a digest alone);
/// without either it is the repository the target version is pulled from. Without it,
/// the repository of `default_image` is.
pub fn deployment_image(
    spec_image: Option<&str>,
    default_image: &str,
    target: &str,
) -> (String, String) {
    if let Some(image) = spec_image.filter(|i| !i.is_empty()) {
        let reference = parse_image(image);
        if reference.tag.is_some() || reference.digest.is_some() {
            let version = reference.tag.unwrap_or(target).to_owned();
            return (image.to_owned(), version);
        }
        return (format!("{image}:{target}"), target.to_owned());
    }
    let repository = parse_image(default_image).repository;
    (format!("{repository}:{target}"), target.to_owned())
}

/// The version a connector pod carries (its template annotation).
pub fn pod_version(pod: &Pod) -> &str {
    pod.annotations()
        .get(CONNECTOR_VERSION_ANNOTATION)
        .map_or(UNKNOWN_VERSION, String::as_str)
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Whether `pod`'s Ready condition is True.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// Why `pod`'s connector container cannot start, when it cannot: a waiting reason such
/// as `CrashLoopBackOff` or `ImagePullBackOff`, or too many restarts.
pub fn pod_failure(pod: &Pod) -> Option<String> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|status| {
        let waiting = status
            .state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.as_deref())
            .filter(|reason| FAILING_REASONS.contains(reason));
        if let Some(reason) = waiting {
            let exit = status
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .map(|t| format!(", last exit code {}", t.exit_code))
                .unwrap_or_default();
            return Some(format!(
                "{reason} after {} restart(s){exit}",
                status.restart_count
            ));
        }
        (status.restart_count >= FAILED_AFTER_RESTARTS && !status.ready)
            .then(|| format!("not ready after {} restart(s)", status.restart_count))
    })
}

/// The running versions of a group's connector pods (those not being deleted): the
/// target version first, then the others by name.
pub fn pod_versions(pods: &[Pod], target: &str) -> Vec<VersionCount> {
    let mut by_version: BTreeMap<&str, VersionCount> = BTreeMap::new();
    for pod in pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        let version = pod_version(pod);
        let entry = by_version.entry(version).or_insert_with(|| VersionCount {
            version: version.to_owned(),
            ..VersionCount::default()
        });
        entry.connectors += 1;
        entry.ready += i32::from(pod_ready(pod));
    }
    ordered(by_version, target)
}

/// The versions the Connectors of a group outside the cluster report (connected ones
/// count as ready).
pub fn connector_versions(
    connectors: &[Connector],
    target: &str,
    connected: impl Fn(&Connector) -> bool,
) -> Vec<VersionCount> {
    let mut by_version: BTreeMap<&str, VersionCount> = BTreeMap::new();
    for connector in connectors
        .iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
    {
        let version = connector
            .status
            .as_ref()
            .and_then(|s| s.version.as_deref())
            .unwrap_or(UNKNOWN_VERSION);
        let entry = by_version.entry(version).or_insert_with(|| VersionCount {
            version: version.to_owned(),
            ..VersionCount::default()
        });
        entry.connectors += 1;
        entry.ready += i32::from(connected(connector));
    }
    ordered(by_version, target)
}

fn ordered(mut by_version: BTreeMap<&str, VersionCount>, target: &str) -> Vec<VersionCount> {
    let mut versions: Vec<VersionCount> = by_version.remove(target).into_iter().collect();
    versions.extend(by_version.into_values());
    versions
}

/// Whether the Deployment's controller gave up on its progress deadline.
fn deadline_exceeded(deployment: &Deployment) -> bool {
    deployment
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions.iter().any(|c| {
                c.type_ == "Progressing"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
            })
        })
}

/// Where the rollout of an in-cluster group to `target` stands, from its Deployment (as
/// last written; `None` before it exists) and its pods, and the `UpToDate` verdict.
pub fn in_cluster_rollout(
    target: &str,
    desired: i32,
    deployment: Option<&Deployment>,
    pods: &[Pod],
) -> (RolloutStatus, Verdict) {
    let live: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let updated: Vec<&&Pod> = live.iter().filter(|p| pod_version(p) == target).collect();
    let updated_ready = count(updated.iter().filter(|p| pod_ready(p)).count());
    let old = count(live.len() - updated.len());
    let failure = updated.iter().find_map(|pod| {
        pod_failure(pod).map(|why| format!("new connector pod {}: {why}", pod.name_any()))
    });
    let failure = failure.or_else(|| {
        deployment.filter(|d| deadline_exceeded(d)).map(|_| {
            "the Deployment exceeded its progress deadline: the new connectors did not become ready"
                .to_owned()
        })
    });
    let draining = count(pods.len() - live.len());
    let (phase, message) = if let Some(why) = failure.filter(|_| old > 0 || updated_ready < desired)
    {
        (
            RolloutPhase::Halted,
            format!(
                "rollout to {target} halted with {updated_ready} of {desired} connector(s) updated; the old ones keep serving: {why}"
            ),
        )
    } else if old == 0 && updated_ready >= desired && draining == 0 {
        (
            RolloutPhase::Complete,
            format!("all {desired} connector(s) run {target}"),
        )
    } else {
        (
            RolloutPhase::Progressing,
            format!(
                "replacing connectors one at a time: {updated_ready} of {desired} run {target} and are ready, {old} old one(s) left{}",
                if draining > 0 {
                    format!(", {draining} draining")
                } else {
                    String::new()
                }
            ),
        )
    };
    let verdict = verdict(phase, &message);
    (
        RolloutStatus {
            target_version: target.to_owned(),
            updated_connectors: updated_ready,
            desired_connectors: desired,
            phase,
            message,
        },
        verdict,
    )
}

/// Where the move of a group outside the cluster to `target` stands, from the versions
/// its connectors report.
pub fn outside_rollout(target: &str, versions: &[VersionCount]) -> (RolloutStatus, Verdict) {
    let total: i32 = versions.iter().map(|v| v.connectors).sum();
    let updated = versions
        .iter()
        .find(|v| v.version == target)
        .map_or(0, |v| v.connectors);
    let behind: Vec<String> = versions
        .iter()
        .filter(|v| v.version != target)
        .map(|v| format!("{} on {}", v.connectors, v.version))
        .collect();
    let (phase, message) = if behind.is_empty() {
        (
            RolloutPhase::Complete,
            format!("all {total} connector(s) run {target}"),
        )
    } else {
        (
            RolloutPhase::Waiting,
            format!(
                "{updated} of {total} connector(s) run {target}; waiting for {} to be upgraded by whoever runs them (install the new binary and restart the service: it drains first)",
                behind.join(", ")
            ),
        )
    };
    let verdict = verdict(phase, &message);
    (
        RolloutStatus {
            target_version: target.to_owned(),
            updated_connectors: updated,
            desired_connectors: total,
            phase,
            message,
        },
        verdict,
    )
}

/// The `UpToDate` condition of a rollout in `phase`.
fn verdict(phase: RolloutPhase, message: &str) -> Verdict {
    match phase {
        RolloutPhase::Complete => Verdict::ok(UP_TO_DATE, "AllUpToDate", message.to_owned()),
        RolloutPhase::Progressing => Verdict::failed(UP_TO_DATE, "RollingOut", message.to_owned()),
        RolloutPhase::Halted => Verdict::failed(UP_TO_DATE, "RolloutHalted", message.to_owned()),
        RolloutPhase::Waiting => {
            Verdict::failed(UP_TO_DATE, "UpgradeAvailable", message.to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, version: &str, ready: bool, extra_status: &str) -> Pod {
        let yaml = format!(
            "metadata: {{name: {name}, annotations: {{sallyport.dev/connector-version: '{version}'}}}}\nstatus:\n  conditions: [{{type: Ready, status: '{}'}}]\n{extra_status}",
            if ready { "True" } else { "False" }
        );
        serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    fn crash_looping(name: &str, version: &str) -> Pod {
        pod(
            name,
            version,
            false,
            "  containerStatuses: [{name: connector, image: i, imageID: '', ready: false, restartCount: 2, state: {waiting: {reason: CrashLoopBackOff}}, lastState: {terminated: {exitCode: 1}}}]\n",
        )
    }

    #[test]
    fn image_references_split_at_tag_and_digest_not_at_a_port() {
        let cases = [
            ("ghcr.io/a/b:0.1.0", "ghcr.io/a/b", Some("0.1.0"), None),
            ("registry:5000/b", "registry:5000/b", None, None),
            ("registry:5000/b:1", "registry:5000/b", Some("1"), None),
            ("b@sha256:ab", "b", None, Some("sha256:ab")),
            ("r:1/b:2@sha256:ab", "r:1/b", Some("2"), Some("sha256:ab")),
            ("b:", "b", None, None),
        ];
        for (image, repository, tag, digest) in cases {
            assert_eq!(
                parse_image(image),
                ImageReference {
                    repository,
                    tag,
                    digest
                },
                "{image}"
            );
        }
    }

    #[test]
    fn the_target_is_the_spec_version_else_the_default_image_tag() {
        assert_eq!(target_version(Some("0.3.0"), "r/c:0.2.0"), "0.3.0");
        assert_eq!(target_version(None, "r/c:0.2.0"), "0.2.0");
        assert_eq!(target_version(Some(""), "r/c:0.2.0"), "0.2.0");
        assert_eq!(
            target_version(None, "r/c@sha256:ab"),
            env!("CARGO_PKG_VERSION")
        );
    }

    #[test]
    fn the_image_follows_the_version_unless_the_spec_pins_one() {
        let default = "ghcr.io/s/connector:0.1.0";
        assert_eq!(
            deployment_image(None, default, "0.2.0"),
            ("ghcr.io/s/connector:0.2.0".into(), "0.2.0".into())
        );
        assert_eq!(
            deployment_image(Some("mirror:5000/connector"), default, "0.2.0"),
            ("mirror:5000/connector:0.2.0".into(), "0.2.0".into())
        );
        assert_eq!(
            deployment_image(Some("mirror/connector:0.9.0"), default, "0.2.0"),
            ("mirror/connector:0.9.0".into(), "0.9.0".into())
        );
        assert_eq!(
            deployment_image(Some("mirror/connector@sha256:ab"), default, "0.2.0"),
            ("mirror/connector@sha256:ab".into(), "0.2.0".into())
        );
    }

    #[test]
    fn pods_are_counted_by_version_target_first() {
        let pods = [
            pod("a", "0.1.0", true, ""),
            pod("b", "0.2.0", true, ""),
            pod("c", "0.2.0", false, ""),
            pod("d", "0.0.9", true, ""),
        ];
        let versions = pod_versions(&pods, "0.2.0");
        let summary: Vec<(&str, i32, i32)> = versions
            .iter()
            .map(|v| (v.version.as_str(), v.connectors, v.ready))
            .collect();
        assert_eq!(summary, [("0.2.0", 2, 1), ("0.0.9", 1, 1), ("0.1.0", 1, 1)]);
    }

    #[test]
    fn a_rollout_progresses_completes_or_halts() {
        let mid = [
            pod("a", "0.1.0", true, ""),
            pod("b", "0.1.0", true, ""),
            pod("c", "0.2.0", true, ""),
        ];
        let (rollout, verdict) = in_cluster_rollout("0.2.0", 3, None, &mid);
        assert_eq!(rollout.phase, RolloutPhase::Progressing);
        assert_eq!(rollout.updated_connectors, 1);
        assert_eq!(verdict.reason, "RollingOut");
        assert!(rollout.message.contains("1 of 3"), "{}", rollout.message);

        let done = [
            pod("a", "0.2.0", true, ""),
            pod("b", "0.2.0", true, ""),
            pod("c", "0.2.0", true, ""),
        ];
        let (rollout, verdict) = in_cluster_rollout("0.2.0", 3, None, &done);
        assert_eq!(rollout.phase, RolloutPhase::Complete);
        assert_eq!(verdict.reason, "AllUpToDate");

        let halted = [
            pod("a", "0.2.0", true, ""),
            pod("b", "0.2.0", true, ""),
            pod("c", "0.2.0", true, ""),
            crash_looping("d", "0.3.0"),
        ];
        let (rollout, verdict) = in_cluster_rollout("0.3.0", 3, None, &halted);
        assert_eq!(rollout.phase, RolloutPhase::Halted);
        assert_eq!(verdict.reason, "RolloutHalted");
        assert!(
            rollout
                .message
                .contains("CrashLoopBackOff after 2 restart(s), last exit code 1"),
            "{}",
            rollout.message
        );
        assert!(
            rollout.message.contains("new connector pod d"),
            "{}",
            rollout.message
        );
    }

    #[test]
    fn a_pod_fails_by_waiting_reason_or_by_restarts() {
        assert!(pod_failure(&pod("a", "1", true, "")).is_none());
        let restarting = pod(
            "b",
            "1",
            false,
            "  containerStatuses: [{name: connector, image: i, imageID: '', ready: false, restartCount: 3, state: {running: {}}}]\n",
        );
        assert_eq!(
            pod_failure(&restarting).as_deref(),
            Some("not ready after 3 restart(s)")
        );
    }

    #[test]
    fn outside_connectors_wait_to_be_upgraded() {
        let versions = [
            VersionCount {
                version: "0.2.0".into(),
                connectors: 1,
                ready: 1,
            },
            VersionCount {
                version: "0.1.0".into(),
                connectors: 2,
                ready: 2,
            },
        ];
        let (rollout, verdict) = outside_rollout("0.2.0", &versions);
        assert_eq!(rollout.phase, RolloutPhase::Waiting);
        assert_eq!(verdict.reason, "UpgradeAvailable");
        assert!(
            rollout.message.contains("2 on 0.1.0"),
            "{}",
            rollout.message
        );
        let (rollout, _) = outside_rollout("0.2.0", &versions[..1]);
        assert_eq!(rollout.phase, RolloutPhase::Complete);
    }
}
