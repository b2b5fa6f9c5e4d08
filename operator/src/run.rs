//! `sallyport-operator run`: the controllers, wired to their watches, until SIGTERM.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::Config as WatcherConfig;
use kube::{Client, ResourceExt};
use sallyport_api::{ConditionalAccessPolicy, ConnectorGroup, PublishedApp};
use tracing::{info, warn};

use crate::context::{Context, OperatorConfig};
use crate::published_app::routes::same_route;
use crate::{conditional_access_policy, published_app};

/// Failures that stop the operator.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No usable Kubernetes configuration (in-cluster or kubeconfig).
    #[error("cannot create a Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Runs the controllers until SIGINT or SIGTERM.
pub async fn run(config: OperatorConfig) -> Result<(), RunError> {
    let client = Client::try_default().await?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        operator_namespace = %config.operator_namespace,
        "starting sallyport-operator"
    );
    let apps_api = Api::<PublishedApp>::all(client.clone());
    let policies_api = Api::<ConditionalAccessPolicy>::all(client.clone());
    let app_controller =
        Controller::new(apps_api.clone(), WatcherConfig::default()).shutdown_on_signal();
    let apps = app_controller.store();
    let policy_controller =
        Controller::new(policies_api.clone(), WatcherConfig::default()).shutdown_on_signal();
    let policies = policy_controller.store();

    let reporter = Reporter {
        controller: "sallyport-operator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        config: config.clone(),
        apps: apps.clone(),
        recorder: Recorder::new(client.clone(), reporter),
    });

    let operator_namespace = config.operator_namespace.clone();
    let default_tls = config.default_tls_secret.clone();
    let app_controller = {
        // A policy change re-reconciles the apps it may apply to.
        let store = apps.clone();
        let baseline = operator_namespace.clone();
        let app_controller =
            app_controller.watches(policies_api, WatcherConfig::default(), move |policy| {
                let fleet_wide = policy.namespace().as_deref() == Some(baseline.as_str());
                store
                    .state()
                    .into_iter()
                    .filter(|app| fleet_wide || app.namespace() == policy.namespace())
                    .map(|app| ObjectRef::from_obj(&*app))
                    .collect::<Vec<_>>()
            });
        // A group change re-reconciles the apps that reference it.
        let store = apps.clone();
        let app_controller = app_controller.watches(
            Api::<ConnectorGroup>::all(client.clone()),
            WatcherConfig::default(),
            move |group| {
                store
                    .state()
                    .into_iter()
                    .filter(|app| {
                        let reference = &app.spec.connector_group;
                        reference.name == group.name_any()
                            && reference.namespace.clone().or_else(|| app.namespace())
                                == group.namespace()
                    })
                    .map(|app| ObjectRef::from_obj(&*app))
                    .collect::<Vec<_>>()
            },
        );
        // A Secret change re-reconciles the apps that use it (TLS or OIDC client secret).
        let store = apps.clone();
        // Metadata only: the operator reads a Secret's data when it reconciles an app.
        let secrets = Api::<PartialObjectMeta<Secret>>::all(client.clone());
        let app_controller =
            app_controller.watches(secrets, WatcherConfig::default(), move |secret| {
                let (namespace, name) = (secret.namespace(), secret.name_any());
                let is_default_tls = default_tls
                    .as_ref()
                    .is_some_and(|(ns, n)| Some(ns) == namespace.as_ref() && *n == name);
                store
                    .state()
                    .into_iter()
                    .filter(|app| {
                        let own_tls = app.spec.tls.as_ref().is_some_and(|t| t.secret_name == name);
                        let client_secret = app
                            .spec
                            .pre_authentication
                            .oidc
                            .as_ref()
                            .and_then(|o| o.client_secret_ref.as_ref())
                            .is_some_and(|r| r.name == name);
                        (app.namespace() == namespace && (own_tls || client_secret))
                            || (is_default_tls && app.spec.tls.is_none())
                    })
                    .map(|app| ObjectRef::from_obj(&*app))
                    .collect::<Vec<_>>()
            });
        // A namespace's labels decide `allowedNamespaces.from: Selector`.
        let store = apps.clone();
        let namespaces = Api::<PartialObjectMeta<Namespace>>::all(client.clone());
        let app_controller =
            app_controller.watches(namespaces, WatcherConfig::default(), move |namespace| {
                store
                    .state()
                    .into_iter()
                    .filter(|app| app.namespace() == Some(namespace.name_any()))
                    .map(|app| ObjectRef::from_obj(&*app))
                    .collect::<Vec<_>>()
            });
        // Apps on the same route decide between themselves who holds it.
        let store = apps.clone();
        app_controller.watches(apps_api.clone(), WatcherConfig::default(), move |changed| {
            store
                .state()
                .into_iter()
                .filter(|app| same_route(app, &changed) && app.metadata.uid != changed.metadata.uid)
                .map(|app| ObjectRef::from_obj(&*app))
                .collect::<Vec<_>>()
        })
    };

    // An app change re-counts the policies that may apply to it.
    let policy_controller =
        policy_controller.watches(apps_api, WatcherConfig::default(), move |app| {
            policies
                .state()
                .into_iter()
                .filter(|policy| {
                    policy.namespace() == app.namespace()
                        || policy.namespace().as_deref() == Some(operator_namespace.as_str())
                })
                .map(|policy| ObjectRef::from_obj(&*policy))
                .collect::<Vec<_>>()
        });

    let apps_done = app_controller
        .run(
            published_app::reconcile,
            published_app::error_policy,
            ctx.clone(),
        )
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "PublishedApp controller");
            }
        });
    let policies_done = policy_controller
        .run(
            conditional_access_policy::reconcile,
            conditional_access_policy::error_policy,
            ctx,
        )
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "ConditionalAccessPolicy controller");
            }
        });
    futures::join!(apps_done, policies_done);
    info!("sallyport-operator stopped");
    Ok(())
}
