//! `kubectl sallyport`: a kubectl plugin (the `kubectl-sallyport` executable on `PATH`)
//! that answers "is Sallyport working, and if not, what do I fix?" and "what would
//! conditional access decide?", with the user's own kubeconfig, context and namespace.
//!
//! - [`cluster`] makes the client as kubectl would (`--kubeconfig`, `--context`,
//!   `$KUBECONFIG`, the in-cluster service account);
//! - [`status`] reads what the summary needs (the only IO of `status`);
//! - [`report`] turns it into the summary and the verdict (pure);
//! - `whatif` is the operator's own [`crate::whatif`], with the same flags.

pub mod cluster;
pub mod report;
pub mod status;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::whatif::{self, SignIn, WhatIfArgs, WhatIfError};

/// The exit code of `status` when anything is not ready.
pub const NOT_READY_EXIT_CODE: u8 = 3;

/// Command line of `kubectl sallyport`.
#[derive(Debug, Parser)]
#[command(
    name = "kubectl-sallyport",
    bin_name = "kubectl sallyport",
    version,
    about = "Sallyport at a glance: what is not working and how to fix it, and what conditional access would decide for a sign-in.",
    long_about = "Sallyport at a glance: what is not working and how to fix it, and what \
conditional access would decide for a sign-in.\n\nInstalled as `kubectl-sallyport` on PATH, \
kubectl finds it as `kubectl sallyport`. It uses your kubeconfig like kubectl: $KUBECONFIG \
(or ~/.kube/config), its current context and that context's namespace, unless --kubeconfig, \
--context or -n say otherwise; inside a Pod, the service account.\n\nThe objects themselves: \
`kubectl get sallyport -A` lists every PublishedApp, ConnectorGroup, Connector and \
ConditionalAccessPolicy; `kubectl describe publishedapp NAME` shows its conditions and \
Events.",
    after_help = "Examples:\n  \
# The context's namespace, and the operator:\n  \
kubectl sallyport status\n  \
# Every namespace; exit status 3 when anything is not ready:\n  \
kubectl sallyport status -A\n  \
kubectl sallyport status -n team-a --context prod\n  \
# What conditional access decides for alice signing in from 203.0.113.7:\n  \
kubectl sallyport whatif --app team-a/wiki --user alice --ip 203.0.113.7 --amr pwd\n  \
# The same from manifests, without a cluster:\n  \
kubectl sallyport whatif -f policies/ --app team-a/wiki --user alice --ip 203.0.113.7\n\n\
Every command has --help."
)]
pub struct PluginCli {
    /// Which kubeconfig and context to use.
    #[command(flatten)]
    pub cluster: cluster::ClusterArgs,

    /// What to do.
    #[command(subcommand)]
    pub command: PluginCommand,
}

/// Commands of `kubectl sallyport`.
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Summarize the operator, PublishedApps, ConnectorGroups and
    /// ConditionalAccessPolicies: what is ready, and for what is not, why and how to fix
    /// it. Exit status 0 when everything is ready, 3 when anything is not, 1 when the
    /// cluster cannot be read.
    Status(status::StatusArgs),
    /// Show what conditional access decides for a sign-in (an app, a user, their groups,
    /// IP, time, platform, authentication and risk) and why, policy by policy, exactly as
    /// `sallyport-operator whatif`. Exit status 0: allowed; 3: anything else; 1: no
    /// decision to make.
    #[command(name = "whatif")]
    WhatIf(Box<WhatIfArgs>),
}

/// Why `kubectl sallyport` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// No client for the cluster could be made.
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    /// `status` could not read what it reports on.
    #[error(transparent)]
    Status(#[from] status::StatusError),
    /// `whatif` could not decide.
    #[error(transparent)]
    WhatIf(#[from] WhatIfError),
    /// Writing the answer failed.
    #[error("cannot write the answer: {0}")]
    Write(#[source] std::io::Error),
}

/// Runs the command of `cli`, writing the answer to `out` and warnings to `report`.
pub fn run(
    cli: PluginCli,
    out: &mut impl Write,
    report: &mut impl Write,
) -> Result<ExitCode, PluginError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(PluginError::Runtime)?;
    match cli.command {
        PluginCommand::Status(args) => {
            let summary = runtime.block_on(async {
                let (client, default_namespace) = cluster::client(&cli.cluster).await?;
                let scope = args.scope(&default_namespace);
                let snapshot = status::read(&client, &scope, &args.operator_namespace).await?;
                Ok::<_, PluginError>(report::summarize(&snapshot))
            })?;
            out.write_all(summary.text.as_bytes())
                .map_err(PluginError::Write)?;
            Ok(if summary.not_ready.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(NOT_READY_EXIT_CODE)
            })
        }
        PluginCommand::WhatIf(args) => {
            // Whole seconds, as `sallyport-operator whatif`.
            let now = jiff::Timestamp::now();
            let now = jiff::Timestamp::from_second(now.as_second()).unwrap_or(now);
            let args = *args;
            let sign_in = SignIn::new(&args, now)?;
            let from_cluster = args.from_files.is_empty();
            let manifests = if from_cluster {
                runtime.block_on(async {
                    let (client, _) = cluster::client(&cli.cluster).await?;
                    Ok::<_, PluginError>(whatif::sources::from_cluster(&client).await?)
                })?
            } else {
                let app_namespace = args.app.split('/').next().unwrap_or_default();
                let namespace = args.namespace.as_deref().unwrap_or(app_namespace);
                whatif::sources::from_files(&args.from_files, namespace)?
            };
            Ok(whatif::answer(
                &args,
                &sign_in,
                &manifests,
                from_cluster,
                out,
                report,
            )?)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent_and_takes_kubectl_flags_anywhere() {
        PluginCli::command().debug_assert();
        let cli = PluginCli::try_parse_from([
            "kubectl-sallyport",
            "status",
            "-A",
            "--context",
            "prod",
            "--kubeconfig",
            "/tmp/k",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cli.cluster.context.as_deref(), Some("prod"));
        let PluginCommand::Status(args) = cli.command else {
            panic!("status expected");
        };
        assert!(args.all_namespaces);
        assert!(
            PluginCli::try_parse_from(["kubectl-sallyport", "status", "-A", "-n", "x"]).is_err(),
            "-A and -n exclude each other"
        );
        let cli = PluginCli::try_parse_from([
            "kubectl-sallyport",
            "--context",
            "dev",
            "whatif",
            "--app",
            "team-a/wiki",
            "--user",
            "alice",
            "--ip",
            "203.0.113.7",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cli.cluster.context.as_deref(), Some("dev"));
        assert!(matches!(cli.command, PluginCommand::WhatIf(_)));
    }
}
