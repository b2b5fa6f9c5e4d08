//! The proxy fleet's objects, built from the operator's settings (pure).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SecretVolumeSource,
    Service, ServiceAccount, ServicePort, ServiceSpec, TopologySpreadConstraint, Volume,
    VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::fleet_config::CONFIG_MAP;
use crate::managed::{MANAGED_BY, MANAGED_BY_LABEL, hardened_container, hardened_pod};
use crate::pki::build::{ASSERTION_SIGNING, CONNECTOR_ISSUER, SESSION_KEYS, TUNNEL_TLS};

/// The name of the proxy Deployment, Service, PodDisruptionBudget and ServiceAccount.
pub const PROXY: &str = "sallyport-proxy";
/// The port the proxy serves users and connector tunnels on, in the pod.
pub const HTTPS_PORT: i32 = 8443;
/// The port of the proxy's probes and metrics, in the pod.
pub const PROBE_PORT: i32 = 8080;

/// How the proxy fleet should run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    /// The operator's namespace, where the fleet runs.
    pub namespace: String,
    /// The proxy image.
    pub image: String,
    /// How many proxy replicas.
    pub replicas: i32,
    /// The Service type: `LoadBalancer` for a public edge, `NodePort` or `ClusterIP`
    /// behind another load balancer.
    pub service_type: String,
    /// Host names connectors reach the fleet at: the proxies serve tunnels and the fleet
    /// API on them (the tunnel serving certificate covers the same names).
    pub tunnel_hostnames: Vec<String>,
    /// Networks (CIDR) of proxies in front of the fleet whose `X-Forwarded-For` the
    /// proxies believe; empty for none. Passed as `SALLYPORT_TRUSTED_PROXIES`.
    pub trusted_proxies: Vec<String>,
}

fn selector_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "sallyport-proxy".to_owned(),
        ),
        ("app.kubernetes.io/component".to_owned(), "proxy".to_owned()),
    ])
}

fn labels() -> BTreeMap<String, String> {
    let mut labels = selector_labels();
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
    labels
}

fn metadata(settings: &FleetSettings) -> ObjectMeta {
    ObjectMeta {
        name: Some(PROXY.to_owned()),
        namespace: Some(settings.namespace.clone()),
        labels: Some(labels()),
        ..ObjectMeta::default()
    }
}

fn secret_volume(name: &str, secret: &str) -> Volume {
    Volume {
        name: name.to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_owned()),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// The proxy Deployment: hardened pods spread over nodes, the PKI Secrets mounted read-only,
/// the fleet configuration named, rolled one pod at a time without losing capacity.
pub fn proxy_deployment(settings: &FleetSettings) -> Deployment {
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("probes".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(5),
        ..Probe::default()
    };
    let container = Container {
        name: "proxy".to_owned(),
        image: Some(settings.image.clone()),
        args: Some(vec![
            "run".to_owned(),
            "--fleet-config".to_owned(),
            CONFIG_MAP.to_owned(),
        ]),
        env: Some(
            vec![
                field_env("POD_NAME", "metadata.name"),
                field_env("POD_NAMESPACE", "metadata.namespace"),
                EnvVar {
                    name: "SALLYPORT_TUNNEL_HOSTNAMES".to_owned(),
                    value: Some(settings.tunnel_hostnames.join(",")),
                    value_from: None,
                },
            ]
            .into_iter()
            // Only when set: pods of a fleet without trusted proxies stay as they were.
            .chain((!settings.trusted_proxies.is_empty()).then(|| EnvVar {
                name: "SALLYPORT_TRUSTED_PROXIES".to_owned(),
                value: Some(settings.trusted_proxies.join(",")),
                value_from: None,
            }))
            .collect(),
        ),
        ports: Some(vec![
            ContainerPort {
                name: Some("https".to_owned()),
                container_port: HTTPS_PORT,
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("probes".to_owned()),
                container_port: PROBE_PORT,
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(probe("/readyz")),
        liveness_probe: Some(probe("/livez")),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("250m".to_owned())),
                ("memory".to_owned(), Quantity("128Mi".to_owned())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_owned(),
                Quantity("512Mi".to_owned()),
            )])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(hardened_container()),
        volume_mounts: Some(vec![
            mount("tunnel-tls", "/etc/sallyport/tunnel-tls"),
            mount("connector-issuer", "/etc/sallyport/connector-issuer"),
            mount("session-keys", "/etc/sallyport/session-keys"),
            mount("assertion-signing", "/etc/sallyport/assertion-signing"),
            VolumeMount {
                name: "tmp".to_owned(),
                mount_path: "/tmp".to_owned(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    Deployment {
        metadata: metadata(settings),
        spec: Some(DeploymentSpec {
            replicas: Some(settings.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels()),
                match_expressions: None,
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels()),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(PROXY.to_owned()),
                    containers: vec![container],
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(60),
                    security_context: Some(hardened_pod()),
                    topology_spread_constraints: Some(vec![TopologySpreadConstraint {
                        max_skew: 1,
                        topology_key: "kubernetes.io/hostname".to_owned(),
                        when_unsatisfiable: "ScheduleAnyway".to_owned(),
                        label_selector: Some(LabelSelector {
                            match_labels: Some(selector_labels()),
                            match_expressions: None,
                        }),
                        ..TopologySpreadConstraint::default()
                    }]),
                    volumes: Some(vec![
                        secret_volume("tunnel-tls", TUNNEL_TLS),
                        secret_volume("connector-issuer", CONNECTOR_ISSUER),
                        secret_volume("session-keys", SESSION_KEYS),
                        secret_volume("assertion-signing", ASSERTION_SIGNING),
                        Volume {
                            name: "tmp".to_owned(),
                            empty_dir: Some(EmptyDirVolumeSource::default()),
                            ..Volume::default()
                        },
                    ]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// The proxy Service: port 443 to the pods' https port, for users and connectors alike.
pub fn proxy_service(settings: &FleetSettings) -> Service {
    Service {
        metadata: metadata(settings),
        spec: Some(ServiceSpec {
            type_: Some(settings.service_type.clone()),
            selector: Some(selector_labels()),
            ports: Some(vec![ServicePort {
                name: Some("https".to_owned()),
                port: 443,
                target_port: Some(IntOrString::String("https".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The proxy's ServiceAccount, which the chart's Role lets read the fleet configuration
/// and its Secrets and record Connectors.
pub fn proxy_service_account(settings: &FleetSettings) -> ServiceAccount {
    ServiceAccount {
        metadata: metadata(settings),
        ..ServiceAccount::default()
    }
}

/// The proxy PodDisruptionBudget: voluntary evictions take one pod at a time.
pub fn proxy_disruption_budget(settings: &FleetSettings) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: metadata(settings),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels()),
                match_expressions: None,
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> FleetSettings {
        FleetSettings {
            namespace: "sallyport-system".into(),
            image: "example.test/proxy:1".into(),
            replicas: 3,
            service_type: "LoadBalancer".into(),
            tunnel_hostnames: vec![
                "tunnel.example.com".into(),
                "sallyport-proxy.sallyport-system.svc".into(),
            ],
            trusted_proxies: vec![],
        }
    }

    fn env(settings: &FleetSettings, name: &str) -> Option<String> {
        let deployment = proxy_deployment(settings);
        let pod = deployment.spec?.template.spec?;
        let container = pod.containers.into_iter().next()?;
        container
            .env?
            .into_iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value)
    }

    #[test]
    fn trusted_proxies_reach_the_proxy_pods_only_when_set() {
        assert_eq!(env(&settings(), "SALLYPORT_TRUSTED_PROXIES"), None);
        let trusting = FleetSettings {
            trusted_proxies: vec!["10.0.0.0/8".into(), "fd00::/8".into()],
            ..settings()
        };
        assert_eq!(
            env(&trusting, "SALLYPORT_TRUSTED_PROXIES").as_deref(),
            Some("10.0.0.0/8,fd00::/8")
        );
    }

    #[test]
    fn the_proxy_pods_are_hardened_and_mount_the_pki_read_only() {
        let deployment = proxy_deployment(&settings());
        let spec = deployment.spec.unwrap_or_default();
        assert_eq!(spec.replicas, Some(3));
        let pod = spec.template.spec.unwrap_or_default();
        let container = &pod.containers[0];
        let security = container.security_context.clone().unwrap_or_default();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(
            security.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_owned()])
        );
        let mounts = container.volume_mounts.clone().unwrap_or_default();
        assert!(
            mounts
                .iter()
                .filter(|m| m.mount_path.starts_with("/etc/sallyport"))
                .all(|m| m.read_only == Some(true))
        );
        let secrets: Vec<_> = pod
            .volumes
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| v.secret?.secret_name)
            .collect();
        assert!(
            secrets.contains(&TUNNEL_TLS.to_owned()) && secrets.contains(&SESSION_KEYS.to_owned())
        );
        assert!(
            !secrets.contains(&"sallyport-root-ca".to_owned()),
            "the root CA key stays with the operator"
        );
        let rolling = spec
            .strategy
            .and_then(|s| s.rolling_update)
            .unwrap_or_default();
        assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
        let hostnames = container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "SALLYPORT_TUNNEL_HOSTNAMES")
            .and_then(|e| e.value.clone());
        assert_eq!(
            hostnames.as_deref(),
            Some("tunnel.example.com,sallyport-proxy.sallyport-system.svc")
        );
    }

    #[test]
    fn the_service_and_budget_select_the_proxy_pods() {
        let service = proxy_service(&settings()).spec.unwrap_or_default();
        assert_eq!(service.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(service.ports.unwrap_or_default()[0].port, 443);
        assert_eq!(service.selector, Some(selector_labels()));
        let budget = proxy_disruption_budget(&settings())
            .spec
            .unwrap_or_default();
        assert_eq!(budget.max_unavailable, Some(IntOrString::Int(1)));
    }
}
