//! `sallyport-operator check`: is an installed operator working? The chart's `helm test`
//! Pod runs it with the operator's ServiceAccount; people can run it with their own
//! kubeconfig.
//!
//! It asks the apiserver two things and prints one line for each:
//!
//! 1. every Sallyport kind is served and listable (the CRDs are installed and Established);
//! 2. the leader Lease `sallyport-operator` of the operator's namespace is held, and was
//!    renewed within its duration (a replica is alive and reconciling).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::Api;

use crate::leader::OPERATOR_LEASE_NAME;
use crate::probes::crds::unserved_kinds;

/// Settings of `sallyport-operator check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The operator's namespace, where its leader Lease lives.
    #[arg(long, env = "POD_NAMESPACE", default_value = "sallyport-system")]
    pub namespace: String,

    /// Extra seconds allowed past the Lease's duration before its holder counts as gone
    /// (clock skew between the checker and the leader).
    #[arg(long, default_value_t = 5)]
    pub grace_seconds: u64,
}

/// Why `check` could not ask.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// No usable Kubernetes configuration (in-cluster or kubeconfig).
    #[error("cannot create a Kubernetes client: {0}")]
    Client(kube::Error),
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// Writing the report failed.
    #[error("cannot write the report: {0}")]
    Output(#[from] std::io::Error),
}

/// Runs the checks, writing one line per check to `out`; exit status 0 when all pass,
/// 1 otherwise.
pub fn run(args: &CheckArgs, out: &mut impl Write) -> Result<ExitCode, CheckError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CheckError::Runtime)?;
    let outcomes = runtime.block_on(async {
        let client = Client::try_default().await.map_err(CheckError::Client)?;
        let crds = match unserved_kinds(&client).await {
            missing if missing.is_empty() => Ok("every Sallyport kind is served".to_owned()),
            missing => Err(format!("not served: {}", missing.join("; "))),
        };
        let leader = leader(
            &client,
            &args.namespace,
            Duration::from_secs(args.grace_seconds),
        )
        .await;
        Ok::<_, CheckError>([("crds", crds), ("leader", leader)])
    })?;
    let mut passed = true;
    for (name, outcome) in outcomes {
        match outcome {
            Ok(detail) => writeln!(out, "ok    {name}: {detail}")?,
            Err(detail) => {
                passed = false;
                writeln!(out, "FAIL  {name}: {detail}")?;
            }
        }
    }
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Whether the leader Lease is held and fresh.
async fn leader(client: &Client, namespace: &str, grace: Duration) -> Result<String, String> {
    let lease = Api::<Lease>::namespaced(client.clone(), namespace)
        .get_opt(OPERATOR_LEASE_NAME)
        .await
        .map_err(|e| format!("cannot read Lease {namespace}/{OPERATOR_LEASE_NAME}: {e}"))?
        .ok_or_else(|| {
            format!("no Lease {namespace}/{OPERATOR_LEASE_NAME}: no operator replica has started")
        })?;
    let spec = lease.spec.unwrap_or_default();
    let holder = spec
        .holder_identity
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("Lease {namespace}/{OPERATOR_LEASE_NAME} has no holder"))?;
    let renewed = spec
        .renew_time
        .map(|t| t.0)
        .ok_or_else(|| format!("Lease {namespace}/{OPERATOR_LEASE_NAME} was never renewed"))?;
    let duration =
        Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15));
    let age = Timestamp::now().duration_since(renewed);
    let age = Duration::try_from(age).unwrap_or_default();
    if age > duration + grace {
        return Err(format!(
            "leader {holder} last renewed Lease {namespace}/{OPERATOR_LEASE_NAME} {}s ago, past its {}s duration",
            age.as_secs(),
            duration.as_secs()
        ));
    }
    Ok(format!(
        "{holder} holds Lease {namespace}/{OPERATOR_LEASE_NAME} (renewed {}s ago)",
        age.as_secs()
    ))
}
