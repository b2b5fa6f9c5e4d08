//! The registry kept in Kubernetes: the registration token Secret the operator mints for
//! each ConnectorGroup, and one `Connector` object per registered connector.
//!
//! A use of a token is counted by replacing its Secret with the `uses` annotation one
//! higher *and* the `resourceVersion` that was read: when another proxy replica counted a
//! use in between, the API server answers 409 Conflict and the check starts again from a
//! fresh read, so two replicas can never both spend the last use.
//!
//! The proxy's ServiceAccount needs `get` and `update` on Secrets, `get` and `create` on
//! `connectors` and `patch` on `connectors/status` in the groups' namespaces (all in
//! `sallyport-operator rbac`'s proxy rules).

use std::collections::BTreeMap;

use ::kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use ::kube::{Client, ResourceExt};
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use sallyport_api::registration::{
    CONNECTOR_GROUP_LABEL, EXPIRES_AT_ANNOTATION, MAX_USES_ANNOTATION, TOKEN_KEY,
    TOKEN_SECRET_TYPE, USES_ANNOTATION, token_secret_name,
};
use sallyport_api::{Connector, ConnectorSpec};
use serde_json::json;
use time::OffsetDateTime;
use tracing::debug;

use super::{
    ConnectorRecord, RecordEvent, RegistrationError, Registry, VersionReport, split_group_id,
    tokens_equal,
};

/// The field manager of every write.
pub const FIELD_MANAGER: &str = "sallyport-proxy";

/// The field manager of the Connector status fields registration owns (host name,
/// version, certificate, last seen): its own name, so that another proxy component
/// applying other status fields (tunnels, conditions) never removes these.
pub const STATUS_FIELD_MANAGER: &str = "sallyport-proxy-registration";

/// The field manager of the versions a connector reports when it pulls its configuration.
pub const VERSION_FIELD_MANAGER: &str = "sallyport-proxy-versions";

/// How many times a token use is retried after a conflicting write.
pub const MAX_ATTEMPTS: usize = 8;

/// A registry kept in the Kubernetes API.
#[derive(Clone)]
pub struct KubeRegistry {
    client: Client,
}

impl std::fmt::Debug for KubeRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeRegistry").finish_non_exhaustive()
    }
}

/// What a token Secret says, once the presented token matched.
struct TokenState {
    expires_at: Option<Timestamp>,
    expires_text: String,
    max_uses: u32,
    uses: u32,
}

fn kube_time(t: OffsetDateTime) -> Result<Timestamp, String> {
    let nanos = t.unix_timestamp_nanos();
    Timestamp::from_nanosecond(nanos).map_err(|e| e.to_string())
}

impl KubeRegistry {
    /// A registry using `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// Checks the presented token against the group's token Secret and, when `spend`,
    /// counts a use with an optimistic-concurrency write.
    async fn redeem_token(
        &self,
        group_id: &str,
        presented: &str,
        spend: bool,
    ) -> Result<(), RegistrationError> {
        let invalid = |detail: String| RegistrationError::TokenInvalid {
            group: group_id.to_owned(),
            detail,
        };
        let Some((namespace, group)) = split_group_id(group_id) else {
            return Err(invalid("the group id is not namespace/name".to_owned()));
        };
        let name = token_secret_name(group);
        let object = format!("Secret {namespace}/{name}");
        let backend = |reason: String| RegistrationError::Backend {
            object: object.clone(),
            reason,
        };
        let secrets = Api::<Secret>::namespaced(self.client.clone(), namespace);
        for attempt in 1..=MAX_ATTEMPTS {
            let Some(mut secret) = secrets
                .get_opt(&name)
                .await
                .map_err(|e| backend(format!("cannot read it: {e}")))?
            else {
                return Err(invalid(format!("{object} does not exist")));
            };
            let state = check_secret(&secret, &object, group_id, presented)?;
            if let Some(expires_at) = state.expires_at.filter(|t| *t <= Timestamp::now()) {
                return Err(RegistrationError::TokenExpired {
                    group: group_id.to_owned(),
                    expired_at: expires_at.to_string(),
                });
            }
            if state.expires_at.is_none() {
                return Err(RegistrationError::TokenExpired {
                    group: group_id.to_owned(),
                    expired_at: format!(
                        "an unreadable time ({EXPIRES_AT_ANNOTATION}: {:?})",
                        state.expires_text
                    ),
                });
            }
            if state.max_uses > 0 && state.uses >= state.max_uses {
                return Err(RegistrationError::TokenUsedUp {
                    group: group_id.to_owned(),
                    max_uses: state.max_uses,
                });
            }
            if !spend {
                return Ok(());
            }
            secret.annotations_mut().insert(
                USES_ANNOTATION.to_owned(),
                state.uses.saturating_add(1).to_string(),
            );
            let params = PostParams {
                dry_run: false,
                field_manager: Some(FIELD_MANAGER.to_owned()),
            };
            // The Secret as read carries its resourceVersion: the write fails with 409
            // when anything changed it since.
            match secrets.replace(&name, &params, &secret).await {
                Ok(_) => return Ok(()),
                Err(::kube::Error::Api(status)) if status.code == 409 => {
                    debug!(secret = %object, attempt, "token use raced another write; retrying");
                }
                Err(error) => return Err(backend(format!("cannot count a use: {error}"))),
            }
        }
        Err(backend(format!(
            "cannot count a use: {MAX_ATTEMPTS} conflicting writes in a row"
        )))
    }

    async fn record_connector(&self, record: ConnectorRecord) -> Result<(), RegistrationError> {
        let identity = &record.identity;
        let namespace = identity.namespace();
        let name = identity.name();
        let object = format!("Connector {namespace}/{name}");
        let backend = |reason: String| RegistrationError::Backend {
            object: object.clone(),
            reason,
        };
        let connectors = Api::<Connector>::namespaced(self.client.clone(), namespace);
        let mut hostname = record.hostname.clone();
        match record.event {
            RecordEvent::Registered => {
                let connector = Connector {
                    metadata: ObjectMeta {
                        name: Some(name.to_owned()),
                        namespace: Some(namespace.to_owned()),
                        labels: Some(BTreeMap::from([(
                            CONNECTOR_GROUP_LABEL.to_owned(),
                            identity.group().to_owned(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    spec: ConnectorSpec {
                        connector_group: identity.group().to_owned(),
                    },
                    status: None,
                };
                let params = PostParams {
                    dry_run: false,
                    field_manager: Some(FIELD_MANAGER.to_owned()),
                };
                connectors
                    .create(&params, &connector)
                    .await
                    .map_err(|e| backend(format!("cannot create it: {e}")))?;
            }
            RecordEvent::Renewed => {
                let existing = connectors
                    .get_opt(name)
                    .await
                    .map_err(|e| backend(format!("cannot read it: {e}")))?;
                let revoked = || RegistrationError::ConnectorNotFound {
                    connector: identity.connector_id(),
                };
                let Some(existing) = existing else {
                    return Err(revoked());
                };
                if existing.metadata.deletion_timestamp.is_some()
                    || existing.spec.connector_group != identity.group()
                {
                    return Err(revoked());
                }
                if hostname.is_none() {
                    hostname = existing.status.and_then(|s| s.hostname);
                }
            }
        }
        // A Connector left without status by a failure here is removed by the operator
        // once its group's inactiveConnectorTTL has passed since its creation; the
        // connector registers again.
        self.write_status(&connectors, &record, hostname)
            .await
            .map_err(|e| backend(format!("cannot write its status: {e}")))
    }

    async fn write_status(
        &self,
        connectors: &Api<Connector>,
        record: &ConnectorRecord,
        hostname: Option<String>,
    ) -> Result<(), String> {
        let issued_at = kube_time(record.issued_at)?;
        let not_after = kube_time(record.not_after)?;
        let mut status = json!({
            "version": record.version,
            "certificate": {
                "serial": record.serial_hex,
                "issuedAt": issued_at.to_string(),
                "notAfter": not_after.to_string(),
            },
            "lastSeen": issued_at.to_string(),
        });
        if let (Some(hostname), Some(fields)) = (hostname, status.as_object_mut()) {
            fields.insert("hostname".to_owned(), json!(hostname));
        }
        let patch = json!({
            "apiVersion": "sallyport.dev/v1alpha1",
            "kind": "Connector",
            "status": status,
        });
        connectors
            .patch_status(
                record.identity.name(),
                &PatchParams::apply(STATUS_FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Reads the token Secret and checks the presented token against it.
fn check_secret(
    secret: &Secret,
    object: &str,
    group_id: &str,
    presented: &str,
) -> Result<TokenState, RegistrationError> {
    let invalid = |detail: String| RegistrationError::TokenInvalid {
        group: group_id.to_owned(),
        detail,
    };
    if secret.type_.as_deref() != Some(TOKEN_SECRET_TYPE) {
        return Err(invalid(format!(
            "{object} is of type {:?}, not {TOKEN_SECRET_TYPE}",
            secret.type_
        )));
    }
    let stored = secret
        .data
        .as_ref()
        .and_then(|data| data.get(TOKEN_KEY))
        .and_then(|bytes| std::str::from_utf8(&bytes.0).ok())
        .filter(|token| !token.is_empty());
    let Some(stored) = stored else {
        return Err(invalid(format!("{object} holds no {TOKEN_KEY}")));
    };
    if !tokens_equal(presented, stored) {
        return Err(invalid(format!("the token does not match {object}")));
    }
    let annotations = secret.annotations();
    let count = |key: &str| -> Result<u32, RegistrationError> {
        match annotations.get(key).map(|v| v.trim()) {
            None | Some("") => Ok(0),
            Some(text) => text.parse().map_err(|_| RegistrationError::Backend {
                object: object.to_owned(),
                reason: format!("annotation {key} is {text:?}, not a count"),
            }),
        }
    };
    let expires_text = annotations
        .get(EXPIRES_AT_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    Ok(TokenState {
        expires_at: expires_text.parse().ok(),
        expires_text,
        max_uses: count(MAX_USES_ANNOTATION)?,
        uses: count(USES_ANNOTATION)?,
    })
}

impl Registry for KubeRegistry {
    fn redeem<'a>(
        &'a self,
        group_id: &'a str,
        presented_token: &'a str,
    ) -> BoxFuture<'a, Result<(), RegistrationError>> {
        Box::pin(self.redeem_token(group_id, presented_token, true))
    }

    fn check<'a>(
        &'a self,
        group_id: &'a str,
        presented_token: &'a str,
    ) -> BoxFuture<'a, Result<(), RegistrationError>> {
        Box::pin(self.redeem_token(group_id, presented_token, false))
    }

    fn record(&self, record: ConnectorRecord) -> BoxFuture<'_, Result<(), RegistrationError>> {
        Box::pin(self.record_connector(record))
    }

    fn report_version(
        &self,
        report: VersionReport,
    ) -> BoxFuture<'_, Result<(), RegistrationError>> {
        Box::pin(async move {
            let identity = &report.identity;
            let connectors =
                Api::<Connector>::namespaced(self.client.clone(), identity.namespace());
            // A merge patch of these two fields alone: the registration's apply keeps
            // owning the rest of the status.
            let patch = json!({
                "status": {
                    "version": report.version,
                    "desiredVersion": report.desired_version,
                },
            });
            connectors
                .patch_status(
                    identity.name(),
                    &PatchParams {
                        field_manager: Some(VERSION_FIELD_MANAGER.to_owned()),
                        ..PatchParams::default()
                    },
                    &Patch::Merge(&patch),
                )
                .await
                .map(|_| ())
                .map_err(|e| RegistrationError::Backend {
                    object: format!("Connector {}/{}", identity.namespace(), identity.name()),
                    reason: format!("cannot record its version: {e}"),
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;

    use super::*;

    fn secret(type_: &str, token: &str, annotations: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            type_: Some(type_.to_owned()),
            data: Some(BTreeMap::from([(
                TOKEN_KEY.to_owned(),
                ByteString(token.as_bytes().to_vec()),
            )])),
            ..Secret::default()
        }
    }

    fn reason<T>(result: Result<T, RegistrationError>) -> &'static str {
        result.err().map_or("Ok", |e| e.reason())
    }

    #[test]
    fn reads_the_token_secret() {
        let annotations = [
            (EXPIRES_AT_ANNOTATION, "2030-01-01T00:00:00Z"),
            (MAX_USES_ANNOTATION, "3"),
            (USES_ANNOTATION, "2"),
        ];
        let good = secret(TOKEN_SECRET_TYPE, "abc", &annotations);
        let state =
            check_secret(&good, "Secret a/b", "a/b", "abc").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((state.max_uses, state.uses), (3, 2));
        assert_eq!(
            state.expires_at.map(|t| t.to_string()).as_deref(),
            Some("2030-01-01T00:00:00Z")
        );
        assert_eq!(
            reason(check_secret(&good, "s", "a/b", "abd")),
            "TokenInvalid"
        );
        let opaque = secret("Opaque", "abc", &annotations);
        assert_eq!(
            reason(check_secret(&opaque, "s", "a/b", "abc")),
            "TokenInvalid"
        );
        let empty = secret(TOKEN_SECRET_TYPE, "", &annotations);
        assert_eq!(reason(check_secret(&empty, "s", "a/b", "")), "TokenInvalid");
        let broken = secret(TOKEN_SECRET_TYPE, "abc", &[(USES_ANNOTATION, "many")]);
        assert_eq!(reason(check_secret(&broken, "s", "a/b", "abc")), "Backend");
        let fresh = secret(TOKEN_SECRET_TYPE, "abc", &[]);
        let state = check_secret(&fresh, "s", "a/b", "abc").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((state.max_uses, state.uses, state.expires_at), (0, 0, None));
    }

    #[test]
    fn times_convert_exactly() {
        let t =
            OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            kube_time(t).map(|t| t.to_string()),
            Ok("2027-01-15T08:00:00Z".to_owned())
        );
    }
}
