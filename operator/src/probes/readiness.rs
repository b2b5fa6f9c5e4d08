//! Whether the operator is ready, and why not: the state `/readyz` reports.

use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

use crate::leader::LeaderStatus;

/// What the run loop has established so far. Cheap to clone: every clone flips the same
/// flags.
///
/// Ready means the Sallyport CustomResourceDefinitions are served, and leadership is
/// settled: either this replica leads and its controllers' caches are synced, or another
/// replica is known to lead (a standby runs no controllers, so it has no caches to sync).
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<Checks>>,
}

#[derive(Debug, Clone)]
struct Checks {
    crds_served: bool,
    caches_synced: bool,
    leadership: LeaderStatus,
}

impl Default for Checks {
    fn default() -> Self {
        Self {
            crds_served: false,
            caches_synced: false,
            leadership: LeaderStatus::Unsettled,
        }
    }
}

/// The answer to `/readyz`, serialized as its JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReadinessReport {
    /// Whether the operator is ready.
    pub ready: bool,
    /// Why it is not ready; absent when ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `leader`, `follower`, or absent while leadership is not settled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// The leader's identity, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// Each check on its own.
    pub checks: CheckReport,
}

/// The individual checks of a [`ReadinessReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckReport {
    /// The Sallyport CustomResourceDefinitions are served by the apiserver.
    pub crds_served: bool,
    /// The controllers' caches hold a complete list of their objects.
    pub caches_synced: bool,
    /// Who leads, as this replica knows it: `unsettled`, `following <leader>`, `leading`,
    /// `ended`.
    pub leadership: String,
}

impl Readiness {
    /// Nothing established yet: not ready.
    pub fn new() -> Self {
        Self::default()
    }

    fn update(&self, change: impl FnOnce(&mut Checks)) {
        change(&mut self.checks.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// The Sallyport CustomResourceDefinitions are served.
    pub fn set_crds_served(&self) {
        self.update(|c| c.crds_served = true);
    }

    /// The controllers' caches are synced (their watches listed every object once).
    pub fn set_caches_synced(&self) {
        self.update(|c| c.caches_synced = true);
    }

    /// What this replica now knows about who leads (from
    /// [`LeaderElection::status`](crate::leader::LeaderElection::status)).
    pub fn set_leadership(&self, status: LeaderStatus) {
        self.update(|c| c.leadership = status);
    }

    /// Whether the operator is ready and, if not, why.
    pub fn report(&self) -> ReadinessReport {
        let checks = self
            .checks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let (role, leader) = match &checks.leadership {
            LeaderStatus::Leading => (Some("leader"), None),
            LeaderStatus::Following { leader } => (Some("follower"), Some(leader.clone())),
            LeaderStatus::Unsettled | LeaderStatus::Ended => (None, None),
        };
        let reason = if !checks.crds_served {
            Some("the Sallyport CustomResourceDefinitions are not served yet".to_owned())
        } else {
            match &checks.leadership {
                LeaderStatus::Unsettled => {
                    Some("leadership is not settled: no leader is known yet".to_owned())
                }
                LeaderStatus::Ended => {
                    Some("this replica stopped leading and is shutting down".to_owned())
                }
                LeaderStatus::Leading if !checks.caches_synced => {
                    Some("the controllers' caches are not synced yet".to_owned())
                }
                LeaderStatus::Leading | LeaderStatus::Following { .. } => None,
            }
        };
        ReadinessReport {
            ready: reason.is_none(),
            reason,
            role,
            leader,
            checks: CheckReport {
                crds_served: checks.crds_served,
                caches_synced: checks.caches_synced,
                leadership: checks.leadership.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_is_ready_once_crds_are_served_and_caches_synced() {
        let readiness = Readiness::new();
        let reason = |r: &Readiness| r.report().reason.unwrap_or_default();
        assert!(reason(&readiness).contains("CustomResourceDefinitions"));
        readiness.set_crds_served();
        assert!(reason(&readiness).contains("leadership is not settled"));
        readiness.set_leadership(LeaderStatus::Leading);
        assert!(reason(&readiness).contains("caches"));
        readiness.clone().set_caches_synced();
        let report = readiness.report();
        assert!(report.ready, "{report:?}");
        assert_eq!(report.role, Some("leader"));
    }

    #[test]
    fn a_standby_is_ready_once_it_knows_the_leader() {
        let readiness = Readiness::new();
        readiness.set_crds_served();
        readiness.set_leadership(LeaderStatus::Following {
            leader: "operator-b".into(),
        });
        let report = readiness.report();
        assert!(report.ready, "{report:?}");
        assert_eq!(report.leader.as_deref(), Some("operator-b"));
    }

    #[test]
    fn a_replica_that_stopped_leading_is_not_ready() {
        let readiness = Readiness::new();
        readiness.set_crds_served();
        readiness.set_caches_synced();
        readiness.set_leadership(LeaderStatus::Ended);
        assert!(!readiness.report().ready);
    }

    #[test]
    fn the_report_serializes_with_camel_case_checks() -> Result<(), serde_json::Error> {
        let json = serde_json::to_value(Readiness::new().report())?;
        assert_eq!(json["ready"], false);
        assert_eq!(json["checks"]["crdsServed"], false);
        assert_eq!(json["checks"]["leadership"], "unsettled");
        Ok(())
    }
}
