//! Connector state in Secrets, end to end, as the operator runs connectors in a cluster:
//! the operator makes a group's state slots and a ServiceAccount whose Role reaches those
//! Secrets alone; the real connector binary, authenticated as that ServiceAccount, claims
//! a slot, registers into it, and keeps its identity when killed and restarted under the
//! same pod name (no second registration: the token's use count and the Connector objects
//! stay as they were). A second pod claims the other slot; a pod stopped cleanly releases
//! its slot and the next pod reuses its identity; a pod killed for good (a rescheduled
//! pod) leaves its slot to a new pod once its claim lapses. Claims hold because the API
//! server refuses a write from a stale read; a pod whose slot another pod took stops.
//!
//! No kube-controller-manager runs here, so the Deployment makes no pods: each connector
//! process plays one pod, with the environment the Deployment gives it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use nix::sys::signal::Signal;
use sallyport_api::Connector;
use sallyport_api::registration::{
    STATE_HOLDER_ANNOTATION, STATE_KEY, STATE_RENEWED_AT_ANNOTATION, STATE_SECRET_TYPE,
    USES_ANNOTATION,
};
use sallyport_e2e::dataplane::{
    FLEET_TUNNEL_HOST, Fleet, GroupAccess, REACTION_TIMEOUT, StepError, TrafficBackend, eventually,
    https_get,
};
use sallyport_e2e::identity::token_kubeconfig;
use sallyport_e2e::process::OwnedProcess;
use serde_json::json;

type TestResult = Result<(), StepError>;

const APP_HOST: &str = "app.state.test";
const SLOTS: [&str; 2] = ["dc-connector-state-0", "dc-connector-state-1"];
/// Long enough for a claim to lapse (30 s) and the waiting connector to look again.
const LAPSE_TIMEOUT: Duration = Duration::from_secs(120);

/// A connector process as one pod of the group's Deployment: the pod's environment
/// (state slots, pod name and namespace, token, fleet) and the ServiceAccount's
/// credentials.
struct Pods<'a> {
    fleet: &'a Fleet,
    group: &'a GroupAccess,
    kubeconfig: PathBuf,
    state_secrets: String,
}

impl Pods<'_> {
    fn start(&self, pod: &str) -> Result<OwnedProcess, StepError> {
        let addresses = self
            .fleet
            .addresses()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let ca = self.group.fleet_ca.display().to_string();
        let kubeconfig = self.kubeconfig.display().to_string();
        Ok(OwnedProcess::start_capturing(
            "sallyport-connector",
            &[
                "run",
                "--fleet-address",
                &addresses,
                "--fleet-server-name",
                FLEET_TUNNEL_HOST,
                "--fleet-ca-file",
                &ca,
                "--group",
                &self.group.id,
                "--drain-timeout",
                "5s",
            ],
            &[
                ("SALLYPORT_REGISTRATION_TOKEN", &self.group.token),
                ("SALLYPORT_STATE_SECRETS", &self.state_secrets),
                ("POD_NAME", pod),
                ("POD_NAMESPACE", &self.fleet.bed.namespace),
                ("KUBECONFIG", &kubeconfig),
                ("RUST_LOG", "info,kube=warn"),
            ],
        )?)
    }
}

/// What a slot holds: its holder and the id of the connector whose state it keeps.
async fn slot(
    secrets: &Api<Secret>,
    name: &str,
) -> Result<(Option<String>, Option<String>), StepError> {
    let secret = secrets.get(name).await?;
    let holder = secret.annotations().get(STATE_HOLDER_ANNOTATION).cloned();
    let connector = match secret.data.as_ref().and_then(|d| d.get(STATE_KEY)) {
        Some(bytes) => {
            let state: serde_json::Value = serde_json::from_slice(&bytes.0)?;
            Some(
                state["connectorId"]
                    .as_str()
                    .ok_or("the slot's state has no connectorId")?
                    .to_owned(),
            )
        }
        None => None,
    };
    Ok((holder, connector))
}

/// The slot `pod` holds with a state in it, and that state's connector id.
async fn held_by(secrets: &Api<Secret>, pod: &str) -> Result<Option<(String, String)>, StepError> {
    for name in SLOTS {
        if let (Some(holder), Some(connector)) = slot(secrets, name).await?
            && holder == pod
        {
            return Ok(Some((name.to_owned(), connector)));
        }
    }
    Ok(None)
}

/// How many registrations used the group's token.
async fn token_uses(secrets: &Api<Secret>) -> Result<String, StepError> {
    Ok(secrets
        .get("dc-registration")
        .await?
        .annotations()
        .get(USES_ANNOTATION)
        .cloned()
        .unwrap_or_default())
}

/// The names of the group's Connector objects, sorted.
async fn connectors(api: &Api<Connector>) -> Result<Vec<String>, StepError> {
    let mut names: Vec<String> = api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|c| c.spec.connector_group == "dc")
        .map(ResourceExt::name_any)
        .collect();
    names.sort();
    Ok(names)
}

fn forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(status)) if status.code == 403)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectors_keep_their_identity_in_state_secrets_with_least_privilege() -> TestResult {
    let fleet = Fleet::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "state",
        &["proxy-a"],
    )
    .await?;
    let backend = TrafficBackend::start("app").await?;
    let group = fleet
        .create_group("dc", json!({"deployment": {"replicas": 1}}))
        .await?;
    let app_ca = fleet
        .publish_app("app", APP_HOST, &backend.url(), "dc")
        .await?;
    let namespace = fleet.bed.namespace.clone();
    let client = fleet.bed.client.clone();
    let secrets = Api::<Secret>::namespaced(client.clone(), &namespace);
    let connector_api = Api::<Connector>::namespaced(client.clone(), &namespace);

    // 1. The operator's objects: one slot per replica and a spare, empty, typed, owned;
    //    a ServiceAccount whose Role reaches exactly those Secrets; the pod wired to them.
    let deployment = eventually("the connector Deployment", REACTION_TIMEOUT, async || {
        Ok(Api::<Deployment>::namespaced(client.clone(), &namespace)
            .get_opt("dc-connector")
            .await?)
    })
    .await?;
    let pod_spec = deployment
        .spec
        .and_then(|s| s.template.spec)
        .ok_or("the Deployment has no pod spec")?;
    assert_eq!(
        pod_spec.service_account_name.as_deref(),
        Some("dc-connector")
    );
    assert_eq!(pod_spec.automount_service_account_token, Some(true));
    let env = |name: &str| {
        pod_spec.containers[0]
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .cloned()
    };
    let state_secrets = env("SALLYPORT_STATE_SECRETS")
        .and_then(|e| e.value)
        .ok_or("the pod has no SALLYPORT_STATE_SECRETS")?;
    assert_eq!(state_secrets, SLOTS.join(","));
    for (name, path) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let field = env(name)
            .and_then(|e| e.value_from)
            .and_then(|v| v.field_ref)
            .map(|f| f.field_path);
        assert_eq!(field.as_deref(), Some(path), "{name}");
    }
    for name in SLOTS {
        let secret = secrets.get(name).await?;
        assert_eq!(secret.type_.as_deref(), Some(STATE_SECRET_TYPE), "{name}");
        assert!(
            secret.data.as_ref().is_none_or(BTreeMap::is_empty),
            "{name} is made empty"
        );
        assert_eq!(
            secret
                .owner_references()
                .first()
                .map(|o| (o.kind.as_str(), o.name.as_str())),
            Some(("ConnectorGroup", "dc")),
            "{name}"
        );
    }
    Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
        .get("dc-connector")
        .await?;
    let role = Api::<Role>::namespaced(client.clone(), &namespace)
        .get("dc-connector")
        .await?;
    let rules = serde_json::to_value(role.rules.unwrap_or_default())?;
    assert_eq!(
        rules,
        json!([{"apiGroups": [""], "resources": ["secrets"], "resourceNames": SLOTS, "verbs": ["get", "patch"]}])
    );
    let binding = Api::<RoleBinding>::namespaced(client.clone(), &namespace)
        .get("dc-connector")
        .await?;
    assert_eq!(binding.role_ref.name, "dc-connector");
    assert_eq!(
        serde_json::to_value(binding.subjects.unwrap_or_default())?,
        json!([{"kind": "ServiceAccount", "name": "dc-connector", "namespace": namespace}])
    );

    // 2. The ServiceAccount reaches its slots and nothing else.
    let kubeconfig = token_kubeconfig(fleet.bed.control_plane, &namespace, "dc-connector").await?;
    let restricted = Client::try_from(
        kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&kubeconfig)?,
            &KubeConfigOptions::default(),
        )
        .await?,
    )?;
    let pods_client = restricted.clone();
    let restricted_secrets = Api::<Secret>::namespaced(restricted.clone(), &namespace);
    restricted_secrets.get(SLOTS[0]).await?;
    assert!(
        forbidden(restricted_secrets.get("dc-registration").await),
        "the connector's ServiceAccount must not read the token Secret"
    );
    assert!(
        forbidden(restricted_secrets.get("app-tls").await),
        "the connector's ServiceAccount must not read an app's Secret"
    );
    assert!(
        forbidden(restricted_secrets.get("dc-connector-state-2").await),
        "a slot outside the Role is refused, not merely missing"
    );
    assert!(forbidden(
        restricted_secrets.list(&ListParams::default()).await
    ));
    let mut extra = Secret::default();
    extra.metadata.name = Some("planted".to_owned());
    assert!(forbidden(
        restricted_secrets
            .create(&PostParams::default(), &extra)
            .await
    ));
    assert!(forbidden(
        Api::<Secret>::namespaced(restricted, &fleet.bed.operator_namespace)
            .get(SLOTS[0])
            .await
    ));

    let pods = Pods {
        fleet: &fleet,
        group: &group,
        kubeconfig,
        state_secrets,
    };
    let app_answers = async || -> Result<(), StepError> {
        let address = fleet.addresses()[0];
        eventually("the app through the fleet", REACTION_TIMEOUT, async || {
            let answer = https_get(address, APP_HOST, &app_ca, "/").await?;
            Ok((answer.status == 200).then_some(()))
        })
        .await
    };

    // 3. The first pod claims a slot and registers into it.
    let mut a = pods.start("dc-connector-a")?;
    let (a_slot, a_id) = eventually("pod a's state in a slot", REACTION_TIMEOUT, async || {
        held_by(&secrets, "dc-connector-a").await
    })
    .await?;
    app_answers().await?;
    assert_eq!(token_uses(&secrets).await?, "1");
    let registered = connectors(&connector_api).await?;
    assert_eq!(registered.len(), 1, "{registered:?}");
    assert!(
        a_id.ends_with(&format!("/{}", registered[0])),
        "{a_id} vs {registered:?}"
    );

    // 4. Killed (no release) and restarted under the same pod name: the same identity, no
    //    registration.
    a.signal(Signal::SIGKILL)?;
    a.wait_for_exit(REACTION_TIMEOUT)
        .await
        .ok_or("pod a did not die")?;
    assert_eq!(
        slot(&secrets, &a_slot).await?.0.as_deref(),
        Some("dc-connector-a"),
        "a killed pod cannot release its slot"
    );
    let a = pods.start("dc-connector-a")?;
    eventually("pod a reusing its state", REACTION_TIMEOUT, async || {
        Ok(a.output()
            .contains("using the saved registration")
            .then_some(()))
    })
    .await?;
    app_answers().await?;
    assert_eq!(
        held_by(&secrets, "dc-connector-a").await?,
        Some((a_slot.clone(), a_id.clone()))
    );
    assert!(a.output().contains(&a_id), "{}", a.output());
    assert!(
        !a.output().contains("registering with the fleet"),
        "{}",
        a.output()
    );
    assert_eq!(
        token_uses(&secrets).await?,
        "1",
        "the restart spent no token use"
    );
    assert_eq!(
        connectors(&connector_api).await?,
        registered,
        "still one Connector"
    );

    // 5. Another pod claims the other slot and registers into it.
    let mut b = pods.start("dc-connector-b")?;
    let (b_slot, b_id) = eventually("pod b's state in a slot", REACTION_TIMEOUT, async || {
        held_by(&secrets, "dc-connector-b").await
    })
    .await?;
    assert_ne!(b_slot, a_slot);
    assert_ne!(b_id, a_id);
    assert_eq!(token_uses(&secrets).await?, "2");
    assert_eq!(connectors(&connector_api).await?.len(), 2);

    // 6. Stopped cleanly (SIGTERM), it releases its slot and keeps the credentials in it;
    //    the next pod takes them over.
    b.terminate()?;
    let status = b
        .wait_for_exit(REACTION_TIMEOUT)
        .await
        .ok_or("pod b did not stop")?;
    assert!(
        status.success(),
        "pod b exited with {status}: {}",
        b.output()
    );
    assert_eq!(slot(&secrets, &b_slot).await?, (None, Some(b_id.clone())));
    let c = pods.start("dc-connector-c")?;
    let taken = eventually("pod c in b's released slot", REACTION_TIMEOUT, async || {
        held_by(&secrets, "dc-connector-c").await
    })
    .await?;
    assert_eq!(taken, (b_slot.clone(), b_id.clone()));
    eventually("pod c reusing b's state", REACTION_TIMEOUT, async || {
        Ok(c.output()
            .contains("using the saved registration")
            .then_some(()))
    })
    .await?;
    assert_eq!(token_uses(&secrets).await?, "2");
    assert_eq!(connectors(&connector_api).await?.len(), 2);

    // 7. A pod gone for good (killed, never back: a rescheduled pod gets a new name). The
    //    new pod finds every slot held, waits for the dead claim to lapse and takes over
    //    its identity.
    let mut a = a;
    a.signal(Signal::SIGKILL)?;
    a.wait_for_exit(REACTION_TIMEOUT)
        .await
        .ok_or("pod a did not die")?;
    let d = pods.start("dc-connector-d")?;
    eventually("pod d waiting for a slot", REACTION_TIMEOUT, async || {
        Ok(d.output()
            .contains("no connector state Secret is free")
            .then_some(()))
    })
    .await?;
    let taken = eventually("pod d in a's lapsed slot", LAPSE_TIMEOUT, async || {
        held_by(&secrets, "dc-connector-d").await
    })
    .await?;
    assert_eq!(taken, (a_slot, a_id.clone()));
    eventually("pod d reusing a's state", REACTION_TIMEOUT, async || {
        Ok(d.output()
            .contains("using the saved registration")
            .then_some(()))
    })
    .await?;
    assert!(d.output().contains(&a_id), "{}", d.output());
    app_answers().await?;
    assert_eq!(token_uses(&secrets).await?, "2", "no pod registered again");
    assert_eq!(connectors(&connector_api).await?.len(), 2);
    assert_eq!(
        held_by(&secrets, "dc-connector-c").await?,
        Some((b_slot, b_id))
    );

    // 8. Claims rest on the resourceVersion precondition: a merge patch from a stale read
    //    is refused with 409. A holder whose slot someone else touched keeps it; a holder
    //    whose slot another pod took stops, with an error naming the slot and the taker.
    let slots_as_pods = Api::<Secret>::namespaced(pods_client, &namespace);
    let read = secrets.get(&taken.0).await?;
    let stale = read.resource_version().unwrap_or_default();
    let renewed = read.annotations().get(STATE_RENEWED_AT_ANNOTATION).cloned();
    let touch = |version: &str, annotations: serde_json::Value| json!({"metadata": {"resourceVersion": version, "annotations": annotations}});
    slots_as_pods
        .patch(
            &taken.0,
            &PatchParams::default(),
            &Patch::Merge(touch(&stale, json!({"e2e.sallyport.dev/touched": "yes"}))),
        )
        .await?;
    let refused = slots_as_pods
        .patch(
            &taken.0,
            &PatchParams::default(),
            &Patch::Merge(touch(&stale, json!({"e2e.sallyport.dev/touched": "again"}))),
        )
        .await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(status)) if status.code == 409),
        "a stale resourceVersion must be refused: {refused:?}"
    );
    let mut d = d;
    eventually(
        "pod d renewing its claim after the touch",
        REACTION_TIMEOUT,
        async || {
            let secret = secrets.get(&taken.0).await?;
            let annotations = secret.annotations();
            Ok(
                (annotations.get(STATE_HOLDER_ANNOTATION).map(String::as_str)
                    == Some("dc-connector-d")
                    && annotations.get(STATE_RENEWED_AT_ANNOTATION) != renewed.as_ref())
                .then_some(()),
            )
        },
    )
    .await?;
    assert!(d.is_running(), "{}", d.output());

    let current = secrets.get(&taken.0).await?;
    slots_as_pods
        .patch(
            &taken.0,
            &PatchParams::default(),
            &Patch::Merge(touch(
                &current.resource_version().unwrap_or_default(),
                json!({STATE_HOLDER_ANNOTATION: "dc-connector-intruder"}),
            )),
        )
        .await?;
    let status = d
        .wait_for_exit(REACTION_TIMEOUT)
        .await
        .ok_or("pod d kept running on a slot another pod took")?;
    assert!(!status.success(), "pod d must fail: {status}");
    let expected = "is now held by dc-connector-intruder";
    assert!(d.output().contains(expected), "{}", d.output());
    assert!(d.output().contains(&taken.0), "{}", d.output());
    drop(c);
    Ok(())
}
