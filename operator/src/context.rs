//! What every reconcile shares: the client, the operator's configuration, caches and the
//! Event recorder.

use kube::Client;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use sallyport_api::PublishedApp;

/// The field manager of every write the operator makes (server-side apply).
pub const FIELD_MANAGER: &str = "sallyport-operator";

/// Fleet-wide settings of the operator, from its command line (set by the Helm chart).
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// The operator's namespace; ConditionalAccessPolicies here apply to every app.
    pub operator_namespace: String,
    /// The TLS Secret (`namespace`, `name`) for apps without `spec.tls`.
    pub default_tls_secret: Option<(String, String)>,
    /// Whether a default OpenID Connect provider is configured for apps that name none.
    pub default_oidc_provider: bool,
    /// The connector image for ConnectorGroups whose `spec.deployment.image` is empty.
    pub connector_image: String,
    /// Defaults compiled into the fleet configuration.
    pub fleet_defaults: crate::compile::FleetDefaults,
    /// The proxy fleet's Deployment, Service and PodDisruptionBudget.
    pub fleet: crate::fleet::FleetSettings,
    /// The fleet's PKI and keys.
    pub pki: crate::pki::PkiSettings,
    /// How long a proxy replica's entry in a Connector's `status.tunnels` counts after
    /// its last renewal.
    pub tunnel_stale_after: std::time::Duration,
}

impl OperatorConfig {
    /// Where connectors dial the fleet: the first tunnel host name, on the proxy
    /// Service's port 443.
    pub fn fleet_endpoint(&self) -> crate::connector_group::build::FleetEndpoint {
        let host = self
            .pki
            .tunnel_hostnames
            .first()
            .cloned()
            .unwrap_or_else(|| format!("sallyport-proxy.{}.svc", self.operator_namespace));
        crate::connector_group::build::FleetEndpoint {
            address: format!("{host}:443"),
            server_name: host,
        }
    }
}

/// Shared state of the controllers.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// Fleet-wide settings.
    pub config: OperatorConfig,
    /// Every PublishedApp in the cluster, as the PublishedApp controller sees them.
    pub apps: Store<PublishedApp>,
    /// Reconcile counts, failures and durations, served on `/metrics`.
    pub metrics: crate::metrics::Metrics,
    /// Publishes Events on the objects the operator reconciles.
    pub recorder: Recorder,
}
