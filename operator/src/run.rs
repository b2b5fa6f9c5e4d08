//! `sallyport-operator run`: the controllers, wired to their watches, until SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::Controller;
use kube::runtime::controller::{self, Action};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::utils::{Backoff, ResetTimerBackoff};
use kube::runtime::watcher::Config as WatcherConfig;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use sallyport_api::{ConditionalAccessPolicy, Connector, ConnectorGroup, PublishedApp};
use tracing::{debug, info, warn};

use tokio_util::sync::CancellationToken;

use crate::context::{Context, OperatorConfig};
use crate::leader::{self, LeaderElection, LeaderError, LeaseTiming};
use crate::managed::{CONNECTOR_GROUP_LABEL, MANAGED_BY, MANAGED_BY_LABEL};
use crate::metrics::{Metrics, MetricsError};
use crate::policy_selection::change_affects;
use crate::probes::{self, ProbeError, ProbeServer, Readiness, ShutdownError};
use crate::published_app::routes::same_route;
use crate::{
    conditional_access_policy, connector, connector_group, fleet, fleet_config, pki, published_app,
};

/// Logs what a reconcile ended in. Reconcile failures were logged by the error policy;
/// an object deleted before its turn is routine.
fn log_outcome<K, E, W>(
    kind: &'static str,
    outcome: Result<(ObjectRef<K>, Action), controller::Error<E, W>>,
) where
    K: kube::Resource,
    E: std::error::Error + 'static,
    W: std::error::Error + 'static,
{
    match outcome {
        Ok(_) | Err(controller::Error::ReconcilerFailed(..)) => {}
        Err(controller::Error::ObjectNotFound(object)) => {
            debug!(kind, %object, "object gone before its reconcile")
        }
        Err(error) => warn!(kind, %error, "controller error"),
    }
}

/// How the controllers' watches retry while the apiserver is away: 200 ms doubling to at
/// most 5 s (kube's default climbs to 30 s, which leaves the operator blind for up to a
/// minute after an apiserver restart), reset after a minute without errors.
struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(5);
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let current = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        Some(current)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

fn watch_backoff() -> ResetTimerBackoff<WatchBackoff> {
    ResetTimerBackoff::new(
        WatchBackoff {
            next: WatchBackoff::FIRST,
        },
        Duration::from_secs(60),
    )
}

/// Failures that stop the operator.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No usable Kubernetes configuration (in-cluster or kubeconfig).
    #[error("cannot create a Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    /// SIGTERM/SIGINT cannot be handled.
    #[error(transparent)]
    Signals(#[from] ShutdownError),
    /// The metrics could not be registered.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The probe listener could not start.
    #[error(transparent)]
    Probes(#[from] ProbeError),
    /// Leader election failed in a way retrying cannot fix (RBAC, missing namespace).
    #[error(transparent)]
    Leader(#[from] LeaderError),
    /// This replica stopped holding the Lease; it exits so that only one replica reconciles.
    #[error(
        "lost leadership (Lease {namespace}/{lease}); exiting so that only one replica reconciles"
    )]
    LeadershipLost {
        /// The Lease's namespace.
        namespace: String,
        /// The Lease's name.
        lease: String,
    },
}

/// How often the operator checks whether the Sallyport CRDs are served, until they are.
const CRD_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Probes, metrics and leader election settings of `run`.
#[derive(Debug, Clone)]
pub struct Availability {
    /// Where to serve `/livez`, `/readyz` and `/metrics`.
    pub probe_address: SocketAddr,
    /// Timings of the leader election over the Lease `sallyport-operator`.
    pub lease_timing: LeaseTiming,
}

/// Serves the probes and, while this replica holds the leader Lease, runs the
/// controllers; until SIGINT or SIGTERM, or until leadership is lost (an error).
pub async fn run(config: OperatorConfig, availability: Availability) -> Result<(), RunError> {
    let shutdown = probes::shutdown_on_signals()?;
    let readiness = Readiness::new();
    let metrics = Metrics::new()?;
    let probe_server = ProbeServer::bind(
        availability.probe_address,
        readiness.clone(),
        metrics.clone(),
    )
    .await?;
    if let Ok(address) = probe_server.local_addr() {
        info!(%address, "serving /livez, /readyz and /metrics");
    }
    let probes_done = tokio::spawn(probe_server.serve(shutdown.clone()));
    let outcome = run_controllers(
        config,
        availability.lease_timing,
        &readiness,
        &metrics,
        &shutdown,
    )
    .await;
    shutdown.cancel();
    if let Err(error) = probes_done.await {
        warn!(%error, "the probe server ended abnormally");
    }
    info!("sallyport-operator stopped");
    outcome
}

/// Waits for the CRDs and for leadership, then runs the controllers until `shutdown` or
/// until leadership is lost.
async fn run_controllers(
    config: OperatorConfig,
    lease_timing: LeaseTiming,
    readiness: &Readiness,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<(), RunError> {
    let client = Client::try_default().await?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        operator_namespace = %config.operator_namespace,
        "starting sallyport-operator"
    );
    if !probes::wait_until_crds_served(&client, CRD_CHECK_INTERVAL, shutdown).await {
        return Ok(());
    }
    readiness.set_crds_served();
    let election = LeaderElection::new(
        client.clone(),
        &config.operator_namespace,
        leader::OPERATOR_LEASE_NAME,
        leader::default_identity(),
        lease_timing,
    )?;
    tokio::spawn(probes::follow_leadership(
        election.status(),
        readiness.clone(),
        metrics.clone(),
    ));
    let leadership = tokio::select! {
        leadership = election.acquire() => leadership?,
        () = shutdown.cancelled() => return Ok(()),
    };

    let apps_api = Api::<PublishedApp>::all(client.clone());
    let policies_api = Api::<ConditionalAccessPolicy>::all(client.clone());
    let app_controller = Controller::new(apps_api.clone(), WatcherConfig::default())
        .trigger_backoff(watch_backoff())
        .graceful_shutdown_on(shutdown.clone().cancelled_owned());
    let apps = app_controller.store();
    let policy_controller = Controller::new(policies_api.clone(), WatcherConfig::default())
        .trigger_backoff(watch_backoff())
        .graceful_shutdown_on(shutdown.clone().cancelled_owned());
    let policies = policy_controller.store();
    let policies_cache = policies.clone();

    let reporter = Reporter {
        controller: "sallyport-operator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        config: config.clone(),
        apps: apps.clone(),
        metrics: metrics.clone(),
        recorder: Recorder::new(client.clone(), reporter),
    });

    let operator_namespace = config.operator_namespace.clone();
    let default_tls = config.default_tls_secret.clone();
    let app_controller = {
        // A policy change re-reconciles exactly the apps it applies to, before or after.
        let store = apps.clone();
        let baseline = operator_namespace.clone();
        let app_controller =
            app_controller.watches(policies_api, WatcherConfig::default(), move |policy| {
                store
                    .state()
                    .into_iter()
                    .filter(|app| change_affects(&policy, app, &baseline))
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
        // A Secret change re-reconciles the apps that use it (TLS, OIDC client secret or
        // backend CA).
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
                        let backend_ca = app
                            .spec
                            .backend
                            .tls
                            .as_ref()
                            .and_then(|t| t.ca_secret_ref.as_ref())
                            .is_some_and(|r| r.name == name);
                        (app.namespace() == namespace && (own_tls || client_secret || backend_ca))
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

    // ConnectorGroups own their Deployment and token Secret, and count their Connectors.
    let managed = WatcherConfig::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let group_controller = Controller::new(
        Api::<ConnectorGroup>::all(client.clone()),
        WatcherConfig::default(),
    )
    .trigger_backoff(watch_backoff())
    .owns(Api::<Deployment>::all(client.clone()), managed.clone())
    .watches(
        Api::<PartialObjectMeta<Secret>>::all(client.clone()),
        managed,
        |secret| {
            let group = secret.labels().get(CONNECTOR_GROUP_LABEL).cloned();
            // State slots change whenever a connector renews its claim: no reconcile.
            group
                .filter(|group| !connector_group::build::is_state_slot(group, &secret.name_any()))
                .map(|group| ObjectRef::new(&group).within(&secret.namespace().unwrap_or_default()))
        },
    )
    .watches(
        Api::<Connector>::all(client.clone()),
        WatcherConfig::default(),
        {
            // Not on every heartbeat of the proxies: see ConnectorChanges.
            let changes = connector_group::ConnectorChanges::default();
            move |connector| changes.group_to_reconcile(&connector)
        },
    )
    .graceful_shutdown_on(shutdown.clone().cancelled_owned());
    let groups_cache = group_controller.store();
    metrics.follow_objects(groups_cache.clone(), apps.clone());
    let groups_done = group_controller
        .run(
            connector_group::reconcile,
            connector_group::error_policy,
            ctx.clone(),
        )
        .for_each(|result| {
            log_outcome("ConnectorGroup", result);
            futures::future::ready(())
        });

    // Connectors expire when unseen, and are revoked when deleted.
    let connector_controller = Controller::new(
        Api::<Connector>::all(client.clone()),
        WatcherConfig::default(),
    )
    .trigger_backoff(watch_backoff());
    let connectors = connector_controller.store();
    let connectors_cache = connectors.clone();
    // A group's inactiveConnectorTTL decides when its connectors expire.
    let connector_controller = connector_controller
        .watches(
            Api::<ConnectorGroup>::all(client.clone()),
            WatcherConfig::default(),
            move |group| {
                connectors
                    .state()
                    .into_iter()
                    .filter(|c| {
                        c.namespace() == group.namespace()
                            && c.spec.connector_group == group.name_any()
                    })
                    .map(|c| ObjectRef::from_obj(&*c))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown.clone().cancelled_owned());
    let connectors_done = connector_controller
        .run(connector::reconcile, connector::error_policy, ctx.clone())
        .for_each(|result| {
            log_outcome("Connector", result);
            futures::future::ready(())
        });

    let apps_done = app_controller
        .run(
            published_app::reconcile,
            published_app::error_policy,
            ctx.clone(),
        )
        .for_each(|result| {
            log_outcome("PublishedApp", result);
            futures::future::ready(())
        });
    let policies_done = policy_controller
        .run(
            conditional_access_policy::reconcile,
            conditional_access_policy::error_policy,
            ctx,
        )
        .for_each(|result| {
            log_outcome("ConditionalAccessPolicy", result);
            futures::future::ready(())
        });
    // The PKI and the proxy fleet's objects are checked at start and then periodically;
    // only what is due is written.
    let fleet_client = client.clone();
    let pki_settings = config.pki.clone();
    let fleet_settings = config.fleet.clone();
    let pki_metrics = metrics.clone();
    let pki_loop = async move {
        let mut last_pki_check: Option<tokio::time::Instant> = None;
        loop {
            if last_pki_check.is_none_or(|at| at.elapsed() >= pki::CHECK_EVERY) {
                match pki::reconcile(&fleet_client, &pki_settings).await {
                    Ok(0) => debug!("PKI up to date"),
                    Ok(written) => info!(written, "PKI updated"),
                    Err(error) => {
                        warn!(reason = error.metric_label(), %error, "PKI reconcile failed; retrying")
                    }
                }
                pki_metrics
                    .record_pki_expiry(&fleet_client, &pki_settings.namespace)
                    .await;
                last_pki_check = Some(tokio::time::Instant::now());
            }
            match fleet::reconcile(&fleet_client, &fleet_settings).await {
                Ok(0) => debug!("proxy fleet objects up to date"),
                Ok(written) => info!(written, "proxy fleet objects applied"),
                Err(error) => {
                    warn!(reason = error.metric_label(), %error, "proxy fleet reconcile failed; retrying")
                }
            }
            tokio::time::sleep(fleet::CHECK_EVERY).await;
        }
    };
    let pki_done = futures::future::select(Box::pin(pki_loop), Box::pin(shutdown.cancelled()));

    // Ready once every controller has listed its objects.
    let apps_cache = apps.clone();
    let caches_synced = async {
        let synced = async {
            let (apps, policies, groups, connectors) = futures::join!(
                apps_cache.wait_until_ready(),
                policies_cache.wait_until_ready(),
                groups_cache.wait_until_ready(),
                connectors_cache.wait_until_ready(),
            );
            apps.is_ok() && policies.is_ok() && groups.is_ok() && connectors.is_ok()
        };
        tokio::select! {
            synced = synced => if synced {
                readiness.set_caches_synced();
                info!("controller caches synced");
            },
            () = shutdown.cancelled() => {}
        }
    };
    // Namespace labels feed the compiled configuration (`allowedNamespaces.from: Selector`).
    let (namespaces_cache, namespaces_writer) = reflector::store();
    let namespaces_done = watcher(
        Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        WatcherConfig::default(),
    )
    .default_backoff()
    .reflect(namespaces_writer)
    .take_until(shutdown.clone().cancelled_owned())
    .for_each(|event| async move {
        if let Err(error) = event {
            warn!(%error, "namespace watch failed; retrying");
        }
    });
    // Secrets' metadata (without managed fields): a backend CA Secret's change recompiles.
    let (secrets_cache, secrets_writer) = reflector::store();
    let secrets_done = watcher(
        Api::<PartialObjectMeta<Secret>>::all(client.clone()),
        WatcherConfig::default(),
    )
    .default_backoff()
    .modify(|secret| {
        secret.managed_fields_mut().clear();
    })
    .reflect(secrets_writer)
    .take_until(shutdown.clone().cancelled_owned())
    .for_each(|event| async move {
        if let Err(error) = event {
            warn!(%error, "secret metadata watch failed; retrying");
        }
    });
    // The compiled configuration follows every change of the caches.
    let config_done = fleet_config::run(
        client.clone(),
        fleet_config::Sources {
            apps: apps.clone(),
            policies: policies_cache.clone(),
            groups: groups_cache.clone(),
            connectors: connectors_cache.clone(),
            namespaces: namespaces_cache,
            secrets: secrets_cache,
        },
        config.operator_namespace.clone(),
        config.fleet_defaults.clone(),
        shutdown.clone(),
    );
    let reconciling = async {
        futures::join!(
            apps_done,
            policies_done,
            groups_done,
            connectors_done,
            pki_done,
            caches_synced,
            config_done,
            namespaces_done,
            secrets_done
        );
    };
    tokio::select! {
        () = reconciling => {}
        () = leadership.lost() => {
            return Err(RunError::LeadershipLost {
                namespace: config.operator_namespace.clone(),
                lease: leader::OPERATOR_LEASE_NAME.to_owned(),
            });
        }
    }
    if let Err(error) = leadership.release().await {
        warn!(%error, "cannot release leadership; another replica takes over when the Lease expires");
    }
    Ok(())
}
