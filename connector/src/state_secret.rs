//! The connector state kept in a Kubernetes Secret, for connectors the operator runs as a
//! Deployment: a restarted or rescheduled pod finds its credentials again instead of
//! registering anew (and spending a use of the bootstrap token).
//!
//! The operator makes one empty **state slot** per replica plus one spare (for the pod a
//! rolling update adds), Secrets `<group>-connector-state-<i>` of type
//! [`STATE_SECRET_TYPE`], and a Role that lets the group's ServiceAccount `get` and
//! `patch` exactly those Secrets (no `list`, no `create`, no other Secret). A connector
//! claims one slot:
//!
//! - a slot is free when nobody holds it ([`STATE_HOLDER_ANNOTATION`] absent), when its
//!   holder is this pod (a restarted container takes its slot back at once), or when its
//!   holder has not renewed the claim ([`STATE_RENEWED_AT_ANNOTATION`]) for
//!   [`LEASE_DURATION`] (the pod is gone);
//! - among free slots it prefers its own, then slots that hold credentials (their
//!   identity is reused), then empty ones (the connector registers and writes into it);
//! - claiming is a merge patch carrying the `resourceVersion` it read, so two pods never
//!   both win a slot: the loser gets 409 Conflict and tries the next one;
//! - the holder renews its claim every [`RENEW_INTERVAL`], writes renewed certificates
//!   back under the same precondition, and releases the slot (clears the holder, keeps
//!   the credentials) when it stops cleanly. A holder that finds its slot claimed by
//!   another pod (its own claim lapsed, e.g. while the API server was unreachable) stops,
//!   so that one identity never serves from two pods for long.
//!
//! Claims compare the writer's clock with the reader's, as Kubernetes Leases do.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
pub use sallyport_api::registration::{
    STATE_HOLDER_ANNOTATION, STATE_KEY, STATE_RENEWED_AT_ANNOTATION, STATE_SECRET_TYPE,
};
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::state::ConnectorState;

/// How long a claim holds without renewal; a slot whose holder has not renewed for this
/// long is free for another pod.
pub const LEASE_DURATION: Duration = Duration::from_secs(30);

/// How often the holder renews its claim: three times per [`LEASE_DURATION`].
pub const RENEW_INTERVAL: Duration = Duration::from_secs(10);

/// The first pause before reading the slots again when none was free.
pub const FIRST_WAIT: Duration = Duration::from_secs(1);

/// The longest pause before reading the slots again when none was free.
pub const MAX_WAIT: Duration = Duration::from_secs(10);

/// How often one write retries after 409 Conflict while the slot is still ours.
const WRITE_ATTEMPTS: usize = 5;

/// The field manager of the connector's writes.
const FIELD_MANAGER: &str = "sallyport-connector";

/// A state Secret could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretStateError {
    /// No Kubernetes client could be made.
    #[error(
        "cannot reach Kubernetes for the connector state Secrets (in-cluster config or KUBECONFIG): {0}"
    )]
    Client(#[source] Box<kube::Error>),
    /// `--state-secrets` named no Secret, or an empty name.
    #[error("--state-secrets (SALLYPORT_STATE_SECRETS) must name one or more Secrets, got {0:?}")]
    NoSlots(Vec<String>),
    /// The API server refused or failed a request.
    #[error("cannot {action} the connector state Secret {namespace}/{name}: {source}")]
    Api {
        /// `read`, `claim`, `renew the claim on`, `save the state in` or `release`.
        action: &'static str,
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
        /// The API server's answer.
        source: Box<kube::Error>,
    },
    /// The connector's ServiceAccount may not use the slot.
    #[error(
        "the connector may not {action} the connector state Secret {namespace}/{name} (403 Forbidden): its ServiceAccount's Role must allow get and patch on it by name (the operator's Role <group>-connector does)"
    )]
    Forbidden {
        /// What was refused.
        action: &'static str,
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
    },
    /// The slot holds something that is not a connector state.
    #[error(
        "the field data.{field} of the connector state Secret {namespace}/{name} is not a connector state ({reason}); remove the field to register again"
    )]
    Parse {
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
        /// The data key.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The state could not be serialized.
    #[error("cannot serialize the connector state for Secret {namespace}/{name}: {source}")]
    Serialize {
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// Another pod claimed the slot after this connector's claim lapsed.
    #[error(
        "the connector state Secret {namespace}/{name} is now held by {holder}: this connector's claim lapsed; it stops so that a restart claims a slot anew"
    )]
    Lost {
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
        /// Who holds it now (`nobody` when the holder annotation is gone).
        holder: String,
    },
    /// The slot kept changing under this connector's writes.
    #[error(
        "cannot {action} the connector state Secret {namespace}/{name}: it kept changing under every attempt"
    )]
    Contended {
        /// What was being done.
        action: &'static str,
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
    },
    /// Shutdown came while every slot was held by other pods.
    #[error(
        "stopped while waiting for a free connector state Secret in {namespace} (all of {slots} are held by other pods)"
    )]
    Interrupted {
        /// The namespace.
        namespace: String,
        /// The slots, comma-separated.
        slots: String,
    },
}

/// What matters about a slot when choosing one: pure data read from its Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotView {
    /// The Secret's name.
    pub name: String,
    /// The pod holding it.
    pub holder: Option<String>,
    /// When the holder last renewed its claim; `None` when absent or unreadable.
    pub renewed_at: Option<OffsetDateTime>,
    /// Whether it holds credentials.
    pub has_state: bool,
    /// Its resourceVersion when read: the precondition of a claim.
    pub resource_version: String,
}

impl SlotView {
    /// The view of `secret`.
    pub fn of(secret: &Secret) -> Self {
        let annotations = secret.annotations();
        Self {
            name: secret.name_any(),
            holder: annotations
                .get(STATE_HOLDER_ANNOTATION)
                .filter(|h| !h.is_empty())
                .cloned(),
            renewed_at: annotations
                .get(STATE_RENEWED_AT_ANNOTATION)
                .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok()),
            has_state: secret
                .data
                .as_ref()
                .and_then(|d| d.get(STATE_KEY))
                .is_some_and(|v| !v.0.is_empty()),
            resource_version: secret.resource_version().unwrap_or_default(),
        }
    }
}

/// Whether a slot may be claimed by `pod`, and how much it is worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Claim {
    /// This pod holds it already (a restarted container): take it back.
    Ours,
    /// Free, with credentials to reuse.
    FreeWithState,
    /// Free and empty: the connector registers into it.
    FreeEmpty,
    /// Another pod holds it and renews its claim.
    Held,
}

/// Whether a claim last renewed at `renewed_at` still holds at `now`. A holder without a
/// readable renewal time holds nothing.
pub fn claim_is_fresh(
    renewed_at: Option<OffsetDateTime>,
    now: OffsetDateTime,
    lease: Duration,
) -> bool {
    renewed_at.is_some_and(|at| now < at + lease)
}

/// What `slot` is to `pod` at `now`.
pub fn claim_of(slot: &SlotView, pod: &str, now: OffsetDateTime, lease: Duration) -> Claim {
    match &slot.holder {
        Some(holder) if holder == pod => Claim::Ours,
        Some(_) if claim_is_fresh(slot.renewed_at, now, lease) => Claim::Held,
        _ if slot.has_state => Claim::FreeWithState,
        _ => Claim::FreeEmpty,
    }
}

/// The slots `pod` may claim, best first: its own, then free ones with credentials, then
/// empty ones, each in the order given (indices into `slots`).
pub fn candidates(
    slots: &[SlotView],
    pod: &str,
    now: OffsetDateTime,
    lease: Duration,
) -> Vec<usize> {
    let mut ranked: Vec<(Claim, usize)> = slots
        .iter()
        .enumerate()
        .map(|(index, slot)| (claim_of(slot, pod, now, lease), index))
        .filter(|(claim, _)| *claim != Claim::Held)
        .collect();
    ranked.sort();
    ranked.into_iter().map(|(_, index)| index).collect()
}

/// The state in a slot's data; `None` when it is empty.
pub fn state_from_data(
    namespace: &str,
    name: &str,
    data: Option<&BTreeMap<String, ByteString>>,
) -> Result<Option<ConnectorState>, SecretStateError> {
    let Some(bytes) = data
        .and_then(|d| d.get(STATE_KEY))
        .filter(|v| !v.0.is_empty())
    else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes.0)
        .map(Some)
        .map_err(|e| SecretStateError::Parse {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            field: STATE_KEY,
            reason: e.to_string(),
        })
}

/// The merge patch claiming (or keeping) a slot for `pod` at `now`, valid only while the
/// Secret is still at `resource_version`; with `state`, it also saves the state.
pub fn claim_patch(
    pod: &str,
    now: OffsetDateTime,
    resource_version: &str,
    state: Option<&[u8]>,
) -> serde_json::Value {
    let renewed_at = now.format(&Rfc3339).unwrap_or_default();
    let mut patch = json!({
        "metadata": {
            "resourceVersion": resource_version,
            "annotations": {
                STATE_HOLDER_ANNOTATION: pod,
                STATE_RENEWED_AT_ANNOTATION: renewed_at,
            },
        },
    });
    if let Some(state) = state {
        patch["data"] = json!({ STATE_KEY: STANDARD.encode(state) });
    }
    patch
}

/// The merge patch releasing a slot: the holder goes, the credentials stay.
pub fn release_patch(resource_version: &str) -> serde_json::Value {
    json!({
        "metadata": {
            "resourceVersion": resource_version,
            "annotations": {
                STATE_HOLDER_ANNOTATION: null,
                STATE_RENEWED_AT_ANNOTATION: null,
            },
        },
    })
}

fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    }
}

fn is_status(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}

/// A claimed state slot: the connector's state store in a cluster.
#[derive(Debug)]
pub struct SecretState {
    api: Api<Secret>,
    namespace: String,
    name: String,
    pod: String,
    /// The slot's resourceVersion after our last write: the precondition of the next.
    resource_version: tokio::sync::Mutex<String>,
    /// Who took the slot from us, once that happened.
    lost_to: Mutex<Option<String>>,
    /// Stops the claim's renewal.
    stop_renewal: CancellationToken,
}

impl SecretState {
    /// Claims one of `slots` in `namespace` for `pod`, waiting while all are held by other
    /// pods, and keeps the claim renewed until [`SecretState::release`]. When the claim is
    /// lost, `shutdown` is cancelled so the connector drains and stops.
    pub async fn claim(
        client: Client,
        namespace: &str,
        slots: &[String],
        pod: &str,
        shutdown: &CancellationToken,
    ) -> Result<Arc<Self>, SecretStateError> {
        if slots.is_empty() || slots.iter().any(|s| s.trim().is_empty()) {
            return Err(SecretStateError::NoSlots(slots.to_vec()));
        }
        let api = Api::<Secret>::namespaced(client, namespace);
        let mut wait = FIRST_WAIT;
        'read: loop {
            let views = read_slots(&api, namespace, slots).await?;
            let now = OffsetDateTime::now_utc();
            for index in candidates(&views, pod, now, LEASE_DURATION) {
                let Some(view) = views.get(index) else {
                    continue;
                };
                let patch = claim_patch(pod, now, &view.resource_version, None);
                match api
                    .patch(&view.name, &params(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(secret) => {
                        let previous = view.holder.as_deref().unwrap_or("nobody");
                        info!(
                            secret = %format!("{namespace}/{}", view.name),
                            pod,
                            previous_holder = previous,
                            holds_credentials = view.has_state,
                            "claimed the connector state Secret"
                        );
                        let store = Arc::new(Self {
                            api: api.clone(),
                            namespace: namespace.to_owned(),
                            name: view.name.clone(),
                            pod: pod.to_owned(),
                            resource_version: tokio::sync::Mutex::new(
                                secret.resource_version().unwrap_or_default(),
                            ),
                            lost_to: Mutex::new(None),
                            stop_renewal: CancellationToken::new(),
                        });
                        tokio::spawn(keep_claim(store.clone(), shutdown.clone()));
                        return Ok(store);
                    }
                    // Changed since read (another pod claimed it first): read them all again.
                    Err(error) if is_status(&error, 409) => {
                        debug!(secret = %view.name, pod, "the slot changed since it was read; reading the slots again");
                        continue 'read;
                    }
                    Err(error) if is_status(&error, 403) => {
                        return Err(SecretStateError::Forbidden {
                            action: "patch",
                            namespace: namespace.to_owned(),
                            name: view.name.clone(),
                        });
                    }
                    Err(source) => {
                        return Err(SecretStateError::Api {
                            action: "claim",
                            namespace: namespace.to_owned(),
                            name: view.name.clone(),
                            source: Box::new(source),
                        });
                    }
                }
            }
            let held: Vec<String> = views
                .iter()
                .map(|v| format!("{} by {}", v.name, v.holder.as_deref().unwrap_or("-")))
                .collect();
            warn!(%namespace, pod, slots = %held.join(", "), retry_in = ?wait, "no connector state Secret is free: every slot is held by a live pod or missing; waiting for one to be released or to lapse");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => {
                    return Err(SecretStateError::Interrupted {
                        namespace: namespace.to_owned(),
                        slots: slots.join(","),
                    });
                }
            }
            wait = (wait * 2).min(MAX_WAIT);
        }
    }

    /// The claimed Secret, `namespace/name`.
    pub fn secret(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The state in the claimed slot; `None` when it is empty.
    pub async fn load(&self) -> Result<Option<ConnectorState>, SecretStateError> {
        let secret = self
            .api
            .get(&self.name)
            .await
            .map_err(|e| self.api_error("read", e))?;
        state_from_data(&self.namespace, &self.name, secret.data.as_ref())
    }

    /// Writes `state` into the claimed slot (renewing the claim).
    pub async fn save(&self, state: &ConnectorState) -> Result<(), SecretStateError> {
        let json = serde_json::to_vec(state).map_err(|source| SecretStateError::Serialize {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        })?;
        self.write("save the state in", Some(&json)).await?;
        info!(secret = %self.secret(), connector = %state.connector_id, not_after = %state.not_after, "saved the connector state");
        Ok(())
    }

    /// Releases the slot (its credentials stay for the next pod) and stops renewing the
    /// claim. Failures are logged: the claim lapses after [`LEASE_DURATION`] anyway.
    pub async fn release(&self) {
        self.stop_renewal.cancel();
        if self.lost().is_some() {
            return;
        }
        let mut resource_version = self.resource_version.lock().await;
        for _ in 0..WRITE_ATTEMPTS {
            let patch = release_patch(&resource_version);
            match self
                .api
                .patch(&self.name, &params(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    info!(secret = %self.secret(), pod = %self.pod, "released the connector state Secret; its credentials stay for the next pod");
                    return;
                }
                Err(error) if is_status(&error, 409) => match self.still_ours().await {
                    Ok(version) => *resource_version = version,
                    Err(error) => {
                        warn!(%error, "not releasing the connector state Secret");
                        return;
                    }
                },
                Err(error) => {
                    warn!(secret = %self.secret(), %error, "cannot release the connector state Secret; the claim lapses on its own");
                    return;
                }
            }
        }
        warn!(secret = %self.secret(), "cannot release the connector state Secret: it keeps changing; the claim lapses on its own");
    }

    /// Why the slot was lost, once another pod took it.
    pub fn lost(&self) -> Option<SecretStateError> {
        let holder = self
            .lost_to
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        Some(SecretStateError::Lost {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            holder,
        })
    }

    /// One write (claim renewal, or a save with `state`) under the resourceVersion
    /// precondition; after 409 it goes again as long as the slot is still ours.
    async fn write(
        &self,
        action: &'static str,
        state: Option<&[u8]>,
    ) -> Result<(), SecretStateError> {
        if let Some(lost) = self.lost() {
            return Err(lost);
        }
        let mut resource_version = self.resource_version.lock().await;
        for _ in 0..WRITE_ATTEMPTS {
            let patch = claim_patch(
                &self.pod,
                OffsetDateTime::now_utc(),
                &resource_version,
                state,
            );
            match self
                .api
                .patch(&self.name, &params(), &Patch::Merge(&patch))
                .await
            {
                Ok(secret) => {
                    *resource_version = secret.resource_version().unwrap_or_default();
                    return Ok(());
                }
                // Someone else wrote (the operator's labels, or a pod that took the slot).
                Err(error) if is_status(&error, 409) => {
                    *resource_version = self.still_ours().await?;
                }
                Err(error) => return Err(self.api_error(action, error)),
            }
        }
        Err(SecretStateError::Contended {
            action,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        })
    }

    /// The slot's current resourceVersion when this pod still holds it; otherwise the
    /// slot is marked lost.
    async fn still_ours(&self) -> Result<String, SecretStateError> {
        let current = self
            .api
            .get(&self.name)
            .await
            .map_err(|e| self.api_error("read", e))?;
        let view = SlotView::of(&current);
        if view.holder.as_deref() == Some(self.pod.as_str()) {
            return Ok(current.resource_version().unwrap_or_default());
        }
        let holder = view.holder.unwrap_or_else(|| "nobody".to_owned());
        *self.lost_to.lock().unwrap_or_else(PoisonError::into_inner) = Some(holder);
        Err(self.lost().unwrap_or(SecretStateError::Lost {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            holder: "nobody".to_owned(),
        }))
    }

    fn api_error(&self, action: &'static str, source: kube::Error) -> SecretStateError {
        if is_status(&source, 403) {
            return SecretStateError::Forbidden {
                action,
                namespace: self.namespace.clone(),
                name: self.name.clone(),
            };
        }
        SecretStateError::Api {
            action,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source: Box::new(source),
        }
    }
}

/// Reads every slot with its resourceVersion; a missing slot (not made yet) is skipped.
async fn read_slots(
    api: &Api<Secret>,
    namespace: &str,
    slots: &[String],
) -> Result<Vec<SlotView>, SecretStateError> {
    let mut views = Vec::with_capacity(slots.len());
    for name in slots {
        match api.get_opt(name).await {
            Ok(Some(secret)) => views.push(SlotView::of(&secret)),
            Ok(None) => {
                warn!(secret = %format!("{namespace}/{name}"), "the connector state Secret does not exist (yet); the operator makes it")
            }
            Err(error) if is_status(&error, 403) => {
                return Err(SecretStateError::Forbidden {
                    action: "get",
                    namespace: namespace.to_owned(),
                    name: name.clone(),
                });
            }
            Err(source) => {
                return Err(SecretStateError::Api {
                    action: "read",
                    namespace: namespace.to_owned(),
                    name: name.clone(),
                    source: Box::new(source),
                });
            }
        }
    }
    Ok(views)
}

/// Renews the claim every [`RENEW_INTERVAL`] until released; cancels `shutdown` when
/// another pod took the slot.
async fn keep_claim(store: Arc<SecretState>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(RENEW_INTERVAL) => {}
            () = store.stop_renewal.cancelled() => return,
        }
        match store.write("renew the claim on", None).await {
            Ok(()) => debug!(secret = %store.secret(), "renewed the claim"),
            Err(error @ SecretStateError::Lost { .. }) => {
                warn!(%error, "lost the connector state Secret; stopping");
                shutdown.cancel();
                return;
            }
            Err(error) => {
                warn!(%error, "cannot renew the claim on the connector state Secret; trying again")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn at(seconds: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + seconds)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn slot(name: &str, holder: Option<&str>, renewed: Option<i64>, has_state: bool) -> SlotView {
        SlotView {
            name: name.to_owned(),
            holder: holder.map(str::to_owned),
            renewed_at: renewed.map(at),
            has_state,
            resource_version: String::new(),
        }
    }

    fn state() -> ConnectorState {
        ConnectorState {
            connector_id: "infra/east-abcde".to_owned(),
            group_id: "infra/east".to_owned(),
            chain_pem: "chain".to_owned(),
            key_pem: "secret key".to_owned(),
            ca_pem: "ca".to_owned(),
            not_after: at(3600),
            renew_at: at(2400),
        }
    }

    #[test]
    fn a_claim_is_fresh_for_one_lease() {
        let lease = Duration::from_secs(30);
        assert!(claim_is_fresh(Some(at(0)), at(29), lease));
        assert!(!claim_is_fresh(Some(at(0)), at(30), lease));
        assert!(!claim_is_fresh(None, at(0), lease));
        // A renewal stamped ahead of the reader's clock holds a lease past that stamp.
        assert!(claim_is_fresh(Some(at(10)), at(35), lease));
    }

    #[test]
    fn slots_are_chosen_own_first_then_with_credentials_then_empty() {
        let lease = Duration::from_secs(30);
        let now = at(100);
        let slots = [
            slot("s-0", None, None, false),             // free, empty
            slot("s-1", Some("pod-b"), Some(95), true), // held, fresh
            slot("s-2", Some("pod-c"), Some(60), true), // held, lapsed
            slot("s-3", None, None, true),              // released, with credentials
            slot("s-4", Some("pod-a"), Some(10), true), // ours (a restart)
            slot("s-5", Some("pod-d"), None, false),    // holder without renewal time
        ];
        assert_eq!(candidates(&slots, "pod-a", now, lease), [4, 2, 3, 0, 5]);
        assert_eq!(claim_of(&slots[1], "pod-a", now, lease), Claim::Held);
        assert_eq!(claim_of(&slots[1], "pod-b", now, lease), Claim::Ours);
        let all_held = [slot("s-0", Some("pod-b"), Some(99), true)];
        assert!(candidates(&all_held, "pod-a", now, lease).is_empty());
    }

    #[test]
    fn a_slot_view_reads_the_annotations_and_data() {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some("dc-connector-state-1".to_owned()),
                annotations: Some(BTreeMap::from([
                    (STATE_HOLDER_ANNOTATION.to_owned(), "pod-a".to_owned()),
                    (
                        STATE_RENEWED_AT_ANNOTATION.to_owned(),
                        "2027-01-15T08:00:00Z".to_owned(),
                    ),
                ])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                STATE_KEY.to_owned(),
                ByteString(b"{}".to_vec()),
            )])),
            ..Secret::default()
        };
        assert_eq!(
            SlotView::of(&secret),
            slot("dc-connector-state-1", Some("pod-a"), Some(0), true)
        );
        assert_eq!(
            SlotView::of(&Secret::default()),
            slot("", None, None, false)
        );
    }

    #[test]
    fn the_state_round_trips_through_the_patch_and_secret_data() {
        let json = serde_json::to_vec(&state()).unwrap_or_else(|e| panic!("{e}"));
        let patch = claim_patch("pod-a", at(0), "42", Some(&json));
        assert_eq!(patch["metadata"]["resourceVersion"], "42");
        assert_eq!(
            patch["metadata"]["annotations"][STATE_HOLDER_ANNOTATION],
            "pod-a"
        );
        assert_eq!(
            patch["metadata"]["annotations"][STATE_RENEWED_AT_ANNOTATION],
            "2027-01-15T08:00:00Z"
        );
        let encoded = patch["data"][STATE_KEY].as_str().unwrap_or_default();
        let bytes = STANDARD.decode(encoded).unwrap_or_else(|e| panic!("{e}"));
        let data = BTreeMap::from([(STATE_KEY.to_owned(), ByteString(bytes))]);
        let loaded = state_from_data("infra", "east-connector-state-0", Some(&data))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(loaded, Some(state()));

        assert!(
            claim_patch("pod-a", at(0), "42", None)
                .get("data")
                .is_none()
        );
        let release = release_patch("43");
        assert!(release["metadata"]["annotations"][STATE_HOLDER_ANNOTATION].is_null());
        assert!(
            release.get("data").is_none(),
            "releasing keeps the credentials"
        );
    }

    #[test]
    fn empty_slots_hold_no_state_and_bad_ones_name_the_secret_and_field() {
        assert!(matches!(state_from_data("infra", "s", None), Ok(None)));
        let empty = BTreeMap::from([(STATE_KEY.to_owned(), ByteString(vec![]))]);
        assert!(matches!(
            state_from_data("infra", "s", Some(&empty)),
            Ok(None)
        ));
        let bad = BTreeMap::from([(STATE_KEY.to_owned(), ByteString(b"{".to_vec()))]);
        let error = state_from_data("infra", "east-connector-state-2", Some(&bad))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            error.contains("infra/east-connector-state-2")
                && error.contains("data.connector-state.json"),
            "{error}"
        );
    }
}
