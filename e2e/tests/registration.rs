//! The proxy's Kubernetes registry against a real kube-apiserver, as the proxy fleet's own
//! least-privileged ServiceAccount: registration tokens are spent exactly as often as
//! they allow even when replicas race for the last use, and connectors are recorded as
//! `Connector` objects with their certificate.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use sallyport_api::Connector;
use sallyport_api::registration::{
    CONNECTOR_GROUP_LABEL, EXPIRES_AT_ANNOTATION, ISSUED_AT_ANNOTATION, MAX_USES_ANNOTATION,
    TOKEN_KEY, TOKEN_SECRET_TYPE, USES_ANNOTATION, token_secret_name,
};
use sallyport_e2e::controlplane::{self, Mode};
use sallyport_e2e::identity::proxy_kubeconfig;
use sallyport_e2e::testbed::Testbed;
use sallyport_proxy::registry::{
    ConnectorRecord, KubeRegistry, RecordEvent, RegistrationError, Registry,
};
use sallyport_tunnel::ConnectorIdentity;
use time::OffsetDateTime;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A token Secret as the operator writes it, expiring `expires_in` from now.
fn token_secret(group: &str, token: &str, max_uses: u32, expires_in: SignedDuration) -> Secret {
    let now = Timestamp::now();
    let expires_at = now.checked_add(expires_in).unwrap_or(now);
    Secret {
        metadata: ObjectMeta {
            name: Some(token_secret_name(group)),
            annotations: Some(BTreeMap::from([
                (ISSUED_AT_ANNOTATION.to_owned(), now.to_string()),
                (EXPIRES_AT_ANNOTATION.to_owned(), expires_at.to_string()),
                (MAX_USES_ANNOTATION.to_owned(), max_uses.to_string()),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some(TOKEN_SECRET_TYPE.to_owned()),
        data: Some(BTreeMap::from([(
            TOKEN_KEY.to_owned(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

/// The registry as a proxy replica runs it: a client of its own, authenticated as the
/// proxy's ServiceAccount.
async fn proxy_registry(kubeconfig: &Path) -> Result<KubeRegistry, Box<dyn std::error::Error>> {
    Ok(KubeRegistry::new(controlplane::client(kubeconfig).await?))
}

async fn uses(secrets: &Api<Secret>, group: &str) -> Result<Option<String>, kube::Error> {
    let secret = secrets.get(&token_secret_name(group)).await?;
    Ok(secret.annotations().get(USES_ANNOTATION).cloned())
}

fn reason(result: &Result<(), RegistrationError>) -> &'static str {
    result
        .as_ref()
        .err()
        .map_or("Ok", RegistrationError::reason)
}

#[tokio::test]
async fn the_last_use_of_a_token_is_spent_exactly_once() -> TestResult {
    let testbed = Testbed::new(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        Mode::ApiServer,
        "registration",
    )
    .await?;
    let namespace = &testbed.namespace;
    let proxy = proxy_kubeconfig(testbed.control_plane, &testbed.operator_namespace).await?;
    let secrets = Api::<Secret>::namespaced(testbed.client.clone(), namespace);
    let pp = PostParams::default();
    let hour = SignedDuration::from_hours(1);
    secrets
        .create(&pp, &token_secret("east", "east-token", 1, hour))
        .await?;
    secrets
        .create(&pp, &token_secret("crowd", "crowd-token", 3, hour))
        .await?;
    secrets
        .create(&pp, &token_secret("open", "open-token", 0, hour))
        .await?;
    secrets
        .create(
            &pp,
            &token_secret("old", "old-token", 0, SignedDuration::from_secs(-60)),
        )
        .await?;

    // Two replicas race for the only use.
    let first = proxy_registry(&proxy).await?;
    let second = proxy_registry(&proxy).await?;
    let east = format!("{namespace}/east");
    let (a, b) = tokio::join!(
        first.redeem(&east, "east-token"),
        second.redeem(&east, "east-token")
    );
    let mut outcomes = [reason(&a), reason(&b)];
    outcomes.sort_unstable();
    assert_eq!(outcomes, ["Ok", "TokenUsedUp"]);
    assert_eq!(uses(&secrets, "east").await?.as_deref(), Some("1"));
    assert_eq!(
        reason(&first.redeem(&east, "east-token").await),
        "TokenUsedUp"
    );

    // Eight registrations, alternating replicas, for three uses.
    let crowd = format!("{namespace}/crowd");
    let attempts = (0..8).map(|i| {
        let registry = if i % 2 == 0 { &first } else { &second };
        registry.redeem(&crowd, "crowd-token")
    });
    let results = futures::future::join_all(attempts).await;
    let spent = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(spent, 3, "{results:?}");
    assert!(
        results
            .iter()
            .all(|r| matches!(reason(r), "Ok" | "TokenUsedUp")),
        "{results:?}"
    );
    assert_eq!(uses(&secrets, "crowd").await?.as_deref(), Some("3"));

    // maxUses 0 is unlimited; the count goes on.
    let open = format!("{namespace}/open");
    for _ in 0..4 {
        assert_eq!(reason(&first.redeem(&open, "open-token").await), "Ok");
    }
    assert_eq!(uses(&secrets, "open").await?.as_deref(), Some("4"));

    // Wrong tokens, tokens of other groups and unknown groups all read the same.
    let unknown = format!("{namespace}/none");
    for (group, token) in [
        (open.as_str(), "wrong"),
        (open.as_str(), "crowd-token"),
        (unknown.as_str(), "open-token"),
        ("no-such-namespace/open", "open-token"),
    ] {
        let result = second.redeem(group, token).await;
        assert_eq!(reason(&result), "TokenInvalid", "{group} {result:?}");
    }
    assert_eq!(
        reason(
            &second
                .redeem(&format!("{namespace}/old"), "old-token")
                .await
        ),
        "TokenExpired"
    );
    assert_eq!(
        uses(&secrets, "old").await?,
        None,
        "a refusal counts nothing"
    );

    // A check (for a group a proxy has not loaded yet) reads the token, spends nothing.
    let fresh = format!("{namespace}/fresh");
    secrets
        .create(&pp, &token_secret("fresh", "fresh-token", 1, hour))
        .await?;
    for _ in 0..3 {
        assert_eq!(reason(&first.check(&fresh, "fresh-token").await), "Ok");
    }
    assert_eq!(
        uses(&secrets, "fresh").await?,
        None,
        "a check counts nothing"
    );
    assert_eq!(reason(&first.check(&fresh, "wrong").await), "TokenInvalid");
    assert_eq!(
        reason(&second.check(&unknown, "open-token").await),
        "TokenInvalid"
    );
    assert_eq!(reason(&first.redeem(&fresh, "fresh-token").await), "Ok");
    assert_eq!(
        reason(&second.check(&fresh, "fresh-token").await),
        "TokenUsedUp"
    );
    Ok(())
}

#[tokio::test]
async fn connectors_are_recorded_with_their_certificate() -> TestResult {
    let testbed = Testbed::new(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        Mode::ApiServer,
        "connectors",
    )
    .await?;
    let namespace = &testbed.namespace;
    let proxy = proxy_kubeconfig(testbed.control_plane, &testbed.operator_namespace).await?;
    let registry = proxy_registry(&proxy).await?;
    let connectors = Api::<Connector>::namespaced(testbed.client.clone(), namespace);

    let name = registry.new_connector_name("VM-1.corp.example");
    let identity = ConnectorIdentity::new(namespace, "east", &name)?;
    let issued_at = OffsetDateTime::from_unix_timestamp(1_780_000_000)?;
    let registered = ConnectorRecord {
        event: RecordEvent::Registered,
        identity: identity.clone(),
        hostname: Some("VM-1.corp.example".to_owned()),
        version: "0.1.0".to_owned(),
        serial_hex: "0a1b2c".to_owned(),
        issued_at,
        not_after: issued_at + time::Duration::hours(8760),
    };
    registry.record(registered.clone()).await?;

    let connector = connectors.get(&name).await?;
    assert_eq!(
        connector
            .labels()
            .get(CONNECTOR_GROUP_LABEL)
            .map(String::as_str),
        Some("east")
    );
    assert_eq!(connector.spec.connector_group, "east");
    let status = connector.status.unwrap_or_default();
    assert_eq!(status.hostname.as_deref(), Some("VM-1.corp.example"));
    assert_eq!(status.version.as_deref(), Some("0.1.0"));
    let certificate = status
        .certificate
        .ok_or("the Connector has no certificate status")?;
    assert_eq!(certificate.serial, "0a1b2c");
    assert_eq!(certificate.issued_at.0.to_string(), "2026-05-28T20:26:40Z");
    assert_eq!(certificate.not_after.0.to_string(), "2027-05-28T20:26:40Z");
    assert_eq!(
        status.last_seen.map(|t| t.0.to_string()).as_deref(),
        Some("2026-05-28T20:26:40Z")
    );

    // A renewal replaces the certificate and keeps the host name.
    let renewed_at = issued_at + time::Duration::days(180);
    registry
        .record(ConnectorRecord {
            event: RecordEvent::Renewed,
            hostname: None,
            version: "0.2.0".to_owned(),
            serial_hex: "0d0e0f".to_owned(),
            issued_at: renewed_at,
            not_after: renewed_at + time::Duration::hours(8760),
            ..registered.clone()
        })
        .await?;
    let status = connectors.get(&name).await?.status.unwrap_or_default();
    assert_eq!(status.hostname.as_deref(), Some("VM-1.corp.example"));
    assert_eq!(status.version.as_deref(), Some("0.2.0"));
    assert_eq!(
        status.certificate.map(|c| c.serial).as_deref(),
        Some("0d0e0f")
    );

    // A deleted Connector is revoked: a renewal does not bring it back.
    connectors.delete(&name, &DeleteParams::default()).await?;
    let after_deletion = registry
        .record(ConnectorRecord {
            event: RecordEvent::Renewed,
            ..registered.clone()
        })
        .await;
    assert!(
        matches!(
            after_deletion,
            Err(RegistrationError::ConnectorNotFound { .. })
        ),
        "{after_deletion:?}"
    );
    assert!(connectors.get_opt(&name).await?.is_none());

    // A connector of another group with the same name is not renewed either.
    let elsewhere = ConnectorIdentity::new(namespace, "west", &name)?;
    registry
        .record(ConnectorRecord {
            identity: ConnectorIdentity::new(namespace, "east", &name)?,
            ..registered.clone()
        })
        .await?;
    let moved = registry
        .record(ConnectorRecord {
            event: RecordEvent::Renewed,
            identity: elsewhere,
            ..registered
        })
        .await;
    assert!(
        matches!(moved, Err(RegistrationError::ConnectorNotFound { .. })),
        "{moved:?}"
    );
    Ok(())
}
