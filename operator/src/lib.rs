//! The Sallyport operator: reconciles `PublishedApp`, `ConnectorGroup`,
//! `ConditionalAccessPolicy` and `Connector` objects into the proxy fleet, the connector
//! Deployments, the PKI and the compiled fleet configuration.
//!
//! Today it reconciles PublishedApps (references, route conflicts, conditions, Events)
//! and ConditionalAccessPolicies (matched apps); the fleet, connectors and PKI follow.

pub mod check;
pub mod compile;
pub mod conditional_access_policy;
pub mod conditions;
pub mod connector;
pub mod connector_group;
pub mod context;
pub mod error;
pub mod external_url;
pub mod fleet;
pub mod fleet_config;
pub mod kubectl;
pub mod leader;
pub mod managed;
pub mod metrics;
pub mod pki;
pub mod policy_selection;
pub mod probes;
pub mod published_app;
pub mod rbac;
pub mod reconcile;
pub mod remedies;
pub mod run;
pub mod tls;
pub mod whatif;

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::context::OperatorConfig;

/// Command-line interface of `sallyport-operator`.
#[derive(Debug, Parser)]
#[command(
    name = "sallyport-operator",
    version,
    about = "Reconciles Sallyport's custom resources into a running proxy fleet, connectors, PKI and a compiled configuration.",
    long_about = "Reconciles Sallyport's custom resources (PublishedApp, ConnectorGroup, \
ConditionalAccessPolicy and the system-made Connector) into the proxy fleet, connector \
Deployments, PKI Secrets and a compiled, versioned fleet configuration, and reports honest \
status on every object.\n\nWithout a command it prints its version and exits.",
    after_help = "Examples:\n  sallyport-operator crds | kubectl apply --server-side -f -\n  sallyport-operator run --namespace sallyport-system --default-tls-secret sallyport-system/wildcard-tls"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Sub-commands of `sallyport-operator`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controllers until SIGINT or SIGTERM, using the in-cluster service account
    /// or $KUBECONFIG.
    Run(RunArgs),
    /// Print the operator's least-privilege RBAC (ServiceAccount, ClusterRole, Role and
    /// their bindings) as YAML for an operator in NAMESPACE.
    Rbac {
        /// The operator's namespace.
        #[arg(long, default_value = "sallyport-system")]
        namespace: String,
    },
    /// Print the CustomResourceDefinitions of the Sallyport API as YAML, ready for
    /// `kubectl apply --server-side -f -`.
    Crds,
    /// Compile PublishedApps, ConnectorGroups, ConditionalAccessPolicies and Connectors
    /// from YAML manifests into the fleet configuration, without a cluster.
    Compile(compile::command::CompileArgs),
    /// Show what conditional access decides for a sign-in (an app, a user, their groups,
    /// IP, time, platform, authentication and risk) and why, policy by policy, reading
    /// the objects from the cluster or from YAML manifests. Exit status 0: allowed; 3:
    /// anything else.
    #[command(name = "whatif")]
    WhatIf(whatif::WhatIfArgs),
    /// Check an installed operator: every Sallyport kind is served, and a replica holds
    /// the leader Lease and renews it. Exit status 0: all pass; 1: anything else. The Helm
    /// chart's `helm test` Pod runs it.
    Check(check::CheckArgs),
}

/// Settings of `sallyport-operator run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The operator's namespace. ConditionalAccessPolicies placed here apply to every
    /// PublishedApp of the fleet.
    #[arg(long, env = "POD_NAMESPACE", default_value = "sallyport-system")]
    pub namespace: String,

    /// The TLS Secret, as NAMESPACE/NAME, served for apps without spec.tls.
    #[arg(long, env = "SALLYPORT_DEFAULT_TLS_SECRET", value_parser = parse_namespaced_name)]
    pub default_tls_secret: Option<(String, String)>,

    /// The issuer URL of the fleet's default OpenID Connect provider, for apps that name
    /// none.
    #[arg(long, env = "SALLYPORT_DEFAULT_OIDC_ISSUER")]
    pub default_oidc_issuer: Option<String>,

    /// The client ID registered at the default OpenID Connect provider for the fleet.
    #[arg(
        long,
        env = "SALLYPORT_DEFAULT_OIDC_CLIENT_ID",
        default_value = "sallyport"
    )]
    pub default_oidc_client_id: String,

    /// The client secret of the default provider's client, as NAMESPACE/NAME/KEY of a
    /// Secret (e.g. `sallyport-system/default-oidc/client-secret`). Without it the client
    /// is public (PKCE only), which the provider must allow.
    #[arg(long, env = "SALLYPORT_DEFAULT_OIDC_CLIENT_SECRET", value_parser = check_secret_key_ref)]
    pub default_oidc_client_secret: Option<String>,

    /// The connector image for ConnectorGroups whose spec.deployment names none.
    #[arg(long, env = "SALLYPORT_CONNECTOR_IMAGE", default_value = concat!("ghcr.io/sallyport-dev/sallyport-connector:", env!("CARGO_PKG_VERSION")))]
    pub connector_image: String,

    /// A host name connectors dial to reach the fleet; the tunnel serving certificate
    /// covers every one given. Repeat the flag for several. Defaults to the proxy
    /// Service's in-cluster name.
    #[arg(
        long = "tunnel-hostname",
        env = "SALLYPORT_TUNNEL_HOSTNAMES",
        value_delimiter = ','
    )]
    pub tunnel_hostnames: Vec<String>,

    /// How old the session-cookie key may get before a new one takes over (older keys
    /// still open existing cookies).
    #[arg(long, env = "SALLYPORT_SESSION_KEY_ROTATION", default_value = "24h", value_parser = sallyport_service::parse_duration)]
    pub session_key_rotation: std::time::Duration,

    /// How many session-cookie keys the ring keeps, the current one included: sessions
    /// older than rotation x kept must sign in again.
    #[arg(long, env = "SALLYPORT_SESSION_KEYS_KEPT", default_value_t = 7, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub session_keys_kept: u16,

    /// Where to serve the kubelet's probes (`/livez`, `/readyz`) and Prometheus metrics
    /// (`/metrics`), as ADDRESS:PORT.
    #[arg(long, env = "SALLYPORT_PROBE_ADDRESS", default_value = "0.0.0.0:8080")]
    pub probe_address: std::net::SocketAddr,

    /// Leader election: how long the leader's Lease stays valid without renewal; another
    /// replica takes over after that. Whole seconds (`15s`).
    #[arg(long, env = "SALLYPORT_LEADER_ELECT_LEASE_DURATION", default_value = "15s", value_parser = leader::parse_duration)]
    pub leader_elect_lease_duration: std::time::Duration,

    /// Leader election: how long the leader keeps trying to renew its Lease before it
    /// gives up and exits; shorter than the lease duration.
    #[arg(long, env = "SALLYPORT_LEADER_ELECT_RENEW_DEADLINE", default_value = "10s", value_parser = leader::parse_duration)]
    pub leader_elect_renew_deadline: std::time::Duration,

    /// Leader election: how often the leader renews and the other replicas try to take
    /// the Lease; shorter than the renew deadline.
    #[arg(long, env = "SALLYPORT_LEADER_ELECT_RETRY_PERIOD", default_value = "2s", value_parser = leader::parse_duration)]
    pub leader_elect_retry_period: std::time::Duration,

    /// The proxy image of the fleet.
    #[arg(long, env = "SALLYPORT_PROXY_IMAGE", default_value = concat!("ghcr.io/sallyport-dev/sallyport-proxy:", env!("CARGO_PKG_VERSION")))]
    pub proxy_image: String,

    /// How many proxy replicas the fleet runs.
    #[arg(long, env = "SALLYPORT_PROXY_REPLICAS", default_value_t = 2, value_parser = clap::value_parser!(i32).range(1..=1000))]
    pub proxy_replicas: i32,

    /// The type of the proxy Service: LoadBalancer for a public edge, NodePort or
    /// ClusterIP behind another load balancer.
    #[arg(long, env = "SALLYPORT_PROXY_SERVICE_TYPE", default_value = "LoadBalancer", value_parser = ["LoadBalancer", "NodePort", "ClusterIP"])]
    pub proxy_service_type: String,

    /// A network (CIDR, IPv4 or IPv6, e.g. `10.0.0.0/8`) of proxies in front of the
    /// fleet, such as the cloud load balancer: the proxies believe `X-Forwarded-For`,
    /// `-Proto` and `-Host` only from peers inside one (`--trusted-proxy` of
    /// `sallyport-proxy run`). Repeat for several. Default: none.
    #[arg(
        long = "proxy-trusted-proxy",
        env = "SALLYPORT_PROXY_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_name = "CIDR",
        value_parser = parse_network
    )]
    pub proxy_trusted_proxies: Vec<String>,

    /// How long a proxy replica's tunnel entry on a Connector (`status.tunnels`) counts
    /// after its last renewal: an older one is removed, and a connector left without
    /// entries is no longer `Connected`. Several of the proxies'
    /// `--tunnel-status-heartbeat` (20 s by default).
    #[arg(long, env = "SALLYPORT_TUNNEL_STALE_AFTER", default_value = "60s", value_parser = sallyport_service::parse_duration)]
    pub tunnel_stale_after: std::time::Duration,

    /// Delivery of audit events to a SIEM (see docs/siem.md); boxed, as it is large.
    #[command(flatten)]
    pub events: Box<sallyport_events::EventArgs>,

    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, env = "SALLYPORT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// `text` when it is an IP network (`ADDRESS/PREFIX` or a single address), as the
/// proxies will read it; checked here so that a typo fails the operator, not its fleet.
fn parse_network(text: &str) -> Result<String, String> {
    let text = text.trim();
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let max = match address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => 32,
        Ok(std::net::IpAddr::V6(_)) => 128,
        Err(_) => return Err(format!("{text:?} is not an IP network (ADDRESS/PREFIX)")),
    };
    match prefix {
        Some(prefix)
            if !prefix.bytes().all(|b| b.is_ascii_digit())
                || prefix.parse::<u8>().map_or(true, |p| p > max) =>
        {
            Err(format!("{text:?}: the prefix length must be 0 to {max}"))
        }
        _ => Ok(text.to_owned()),
    }
}

impl RunArgs {
    /// The probe and leader election settings these arguments describe.
    pub fn availability(&self) -> run::Availability {
        run::Availability {
            probe_address: self.probe_address,
            lease_timing: leader::LeaseTiming {
                lease_duration: self.leader_elect_lease_duration,
                renew_deadline: self.leader_elect_renew_deadline,
                retry_period: self.leader_elect_retry_period,
            },
        }
    }

    /// The operator configuration these arguments describe.
    pub fn config(&self) -> OperatorConfig {
        let tunnel_hostnames = if self.tunnel_hostnames.is_empty() {
            vec![format!("sallyport-proxy.{}.svc", self.namespace)]
        } else {
            self.tunnel_hostnames.clone()
        };
        OperatorConfig {
            operator_namespace: self.namespace.clone(),
            default_tls_secret: self.default_tls_secret.clone(),
            default_oidc_provider: self.default_oidc_issuer.is_some(),
            connector_image: self.connector_image.clone(),
            fleet_defaults: compile::FleetDefaults {
                tls_secret: self.default_tls_secret.clone().map(|(namespace, name)| {
                    sallyport_api::fleet_config::SecretRef { namespace, name }
                }),
                oidc: self.default_oidc_issuer.as_ref().map(|issuer| {
                    let mut client =
                        compile::DefaultOidcClient::new(issuer, &self.default_oidc_client_id);
                    client.client_secret_ref = self
                        .default_oidc_client_secret
                        .as_deref()
                        .and_then(|text| parse_secret_key_ref(text).ok());
                    client
                }),
                connector_version: Some(connector_group::version::target_version(
                    None,
                    &self.connector_image,
                )),
                ..compile::FleetDefaults::default()
            },
            fleet: fleet::FleetSettings {
                namespace: self.namespace.clone(),
                image: self.proxy_image.clone(),
                replicas: self.proxy_replicas,
                service_type: self.proxy_service_type.clone(),
                tunnel_hostnames: tunnel_hostnames.clone(),
                trusted_proxies: self.proxy_trusted_proxies.clone(),
            },
            pki: pki::PkiSettings {
                namespace: self.namespace.clone(),
                tunnel_hostnames,
                session_key_rotation: pki::build::Rotation {
                    every: self.session_key_rotation,
                    keep: usize::from(self.session_keys_kept),
                },
            },
            tunnel_stale_after: self.tunnel_stale_after,
        }
    }
}

fn parse_namespaced_name(text: &str) -> Result<(String, String), String> {
    match text.split_once('/') {
        Some((namespace, name))
            if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
        {
            Ok((namespace.to_owned(), name.to_owned()))
        }
        _ => Err(format!("{text:?} is not NAMESPACE/NAME")),
    }
}

fn parse_secret_key_ref(text: &str) -> Result<sallyport_api::fleet_config::SecretKeyRef, String> {
    let mut parts = text.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(namespace), Some(name), Some(key), None)
            if !namespace.is_empty() && !name.is_empty() && !key.is_empty() =>
        {
            Ok(sallyport_api::fleet_config::SecretKeyRef {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                key: key.to_owned(),
            })
        }
        _ => Err(format!("{text:?} is not NAMESPACE/NAME/KEY")),
    }
}

fn check_secret_key_ref(text: &str) -> Result<String, String> {
    parse_secret_key_ref(text).map(|_| text.to_owned())
}

pub use sallyport_service::init_tracing;

/// The operator could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// Rendering the CustomResourceDefinitions failed.
    #[error(transparent)]
    Crds(#[from] sallyport_api::crdgen::CrdgenError),
    /// The controllers could not run.
    #[error(transparent)]
    Run(#[from] run::RunError),
    /// The event sinks' flags are unusable.
    #[error(transparent)]
    Events(#[from] sallyport_events::PipelineError),
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// Rendering RBAC objects failed.
    #[error("cannot render the RBAC objects: {0}")]
    Json(serde_json::Error),
    /// Rendering YAML failed.
    #[error("cannot render YAML: {0}")]
    Yaml(serde_yaml::Error),
    /// Writing to stdout failed.
    #[error("cannot write to stdout: {0}")]
    Stdout(#[from] std::io::Error),
    /// `compile` failed.
    #[error(transparent)]
    Compile(#[from] compile::command::CommandError),
    /// `whatif` could not decide.
    #[error(transparent)]
    WhatIf(#[from] whatif::WhatIfError),
    /// `check` could not ask.
    #[error(transparent)]
    Check(#[from] check::CheckError),
}

/// Runs the command `cli` asks for, writing its output to `out`; the exit code is
/// success unless `whatif` decides anything but `allowed` or a `check` fails.
pub fn run(cli: Cli, out: &mut impl Write) -> Result<ExitCode, OperatorError> {
    match cli.command {
        Some(Command::Run(args)) => {
            init_tracing(&args.log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(OperatorError::Runtime)?;
            runtime.block_on(async {
                // Audit events: standard output and the SIEM sinks (docs/siem.md),
                // flushed once the controllers stopped.
                let events = sallyport_events::Events::start(
                    &args.events,
                    sallyport_events::Actor::new("sallyport-operator", &leader::default_identity()),
                )?;
                events.install();
                let outcome = run::run(args.config(), args.availability()).await;
                events.close().await;
                outcome.map_err(OperatorError::from)
            })?;
        }
        Some(Command::Rbac { namespace }) => {
            for object in rbac::objects(&namespace).map_err(OperatorError::Json)? {
                let yaml = serde_yaml::to_string(&object).map_err(OperatorError::Yaml)?;
                write!(out, "---\n{yaml}")?;
            }
        }
        Some(Command::Crds) => {
            for crd in sallyport_api::custom_resource_definitions() {
                out.write_all(sallyport_api::crdgen::render(&crd)?.as_bytes())?;
            }
        }
        Some(Command::Compile(args)) => {
            compile::command::run(&args, out, &mut std::io::stderr().lock())?;
        }
        Some(Command::WhatIf(args)) => {
            return Ok(whatif::run(&args, out, &mut std::io::stderr().lock())?);
        }
        Some(Command::Check(args)) => return Ok(check::run(&args, out)?),
        None => writeln!(out, "sallyport-operator {}", env!("CARGO_PKG_VERSION"))?,
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_command_prints_every_kind() {
        let mut out = Vec::new();
        let cli = Cli::parse_from(["sallyport-operator", "crds"]);
        assert!(run(cli, &mut out).is_ok());
        let text = String::from_utf8_lossy(&out);
        for kind in [
            "PublishedApp",
            "ConnectorGroup",
            "ConditionalAccessPolicy",
            "Connector",
        ] {
            assert!(text.contains(&format!("kind: {kind}\n")), "{kind} missing");
        }
    }

    #[test]
    fn run_arguments_become_the_operator_configuration() {
        let cli = Cli::parse_from([
            "sallyport-operator",
            "run",
            "--namespace",
            "platform",
            "--default-tls-secret",
            "platform/wildcard",
        ]);
        let Some(Command::Run(args)) = cli.command else {
            panic!("expected run")
        };
        let config = args.config();
        assert_eq!(config.operator_namespace, "platform");
        assert_eq!(
            config.default_tls_secret,
            Some(("platform".into(), "wildcard".into()))
        );
        assert!(!config.default_oidc_provider);
        assert!(
            Cli::try_parse_from([
                "sallyport-operator",
                "run",
                "--default-tls-secret",
                "no-namespace"
            ])
            .is_err()
        );
    }

    #[test]
    fn the_default_provider_may_have_a_client_secret() {
        let cli = Cli::parse_from([
            "sallyport-operator",
            "run",
            "--default-oidc-issuer",
            "https://login.example.com/",
            "--default-oidc-client-secret",
            "platform/default-oidc/client-secret",
        ]);
        let Some(Command::Run(args)) = cli.command else {
            panic!("expected run")
        };
        let config = args.config();
        let secret = config
            .fleet_defaults
            .oidc
            .and_then(|oidc| oidc.client_secret_ref)
            .map(|r| (r.namespace, r.name, r.key));
        assert_eq!(
            secret,
            Some((
                "platform".to_owned(),
                "default-oidc".to_owned(),
                "client-secret".to_owned()
            ))
        );
        for bad in ["platform/default-oidc", "a/b/c/d", "/b/c", "a//c"] {
            assert!(
                Cli::try_parse_from([
                    "sallyport-operator",
                    "run",
                    "--default-oidc-client-secret",
                    bad
                ])
                .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn trusted_proxies_are_checked_and_reach_the_fleet_settings() {
        let cli = Cli::parse_from([
            "sallyport-operator",
            "run",
            "--proxy-trusted-proxy",
            "10.0.0.0/8,fd00::/8",
            "--proxy-trusted-proxy",
            "192.0.2.7",
        ]);
        let Some(Command::Run(args)) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(
            args.config().fleet.trusted_proxies,
            ["10.0.0.0/8", "fd00::/8", "192.0.2.7"]
        );
        for bad in ["10.0.0.0/33", "lb.example.com", "::/x", "10.0.0/8"] {
            assert!(
                Cli::try_parse_from(["sallyport-operator", "run", "--proxy-trusted-proxy", bad])
                    .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn without_a_command_prints_the_version() {
        let mut out = Vec::new();
        assert!(run(Cli::parse_from(["sallyport-operator"]), &mut out).is_ok());
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("sallyport-operator {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
}
