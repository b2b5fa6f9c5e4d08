//! The proxy fleet: its ServiceAccount, Deployment, Service and PodDisruptionBudget in the operator's
//! namespace, built from the operator's configuration (which the Helm chart sets) and
//! applied only when they differ from what was last applied.

pub mod build;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;

use crate::error::Error;
use crate::managed::apply_if_changed;

pub use build::FleetSettings;

/// How often the fleet's objects are checked.
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Applies the fleet's Deployment, Service and PodDisruptionBudget where they differ from
/// `settings`. Returns how many it wrote.
pub async fn reconcile(client: &kube::Client, settings: &FleetSettings) -> Result<usize, Error> {
    let namespace = settings.namespace.as_str();
    let mut written = 0;
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
    let existing = accounts.get_opt(build::PROXY).await?;
    written += usize::from(
        apply_if_changed(
            &accounts,
            build::proxy_service_account(settings),
            existing.as_ref(),
        )
        .await?,
    );
    let deployments = Api::<Deployment>::namespaced(client.clone(), namespace);
    let existing = deployments.get_opt(build::PROXY).await?;
    written += usize::from(
        apply_if_changed(
            &deployments,
            build::proxy_deployment(settings),
            existing.as_ref(),
        )
        .await?,
    );
    let services = Api::<Service>::namespaced(client.clone(), namespace);
    let existing = services.get_opt(build::PROXY).await?;
    written += usize::from(
        apply_if_changed(&services, build::proxy_service(settings), existing.as_ref()).await?,
    );
    let budgets = Api::<PodDisruptionBudget>::namespaced(client.clone(), namespace);
    let existing = budgets.get_opt(build::PROXY).await?;
    written += usize::from(
        apply_if_changed(
            &budgets,
            build::proxy_disruption_budget(settings),
            existing.as_ref(),
        )
        .await?,
    );
    Ok(written)
}
