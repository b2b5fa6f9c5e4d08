//! The Sallyport operator: reconciles `PublishedApp`, `ConnectorGroup`,
//! `ConditionalAccessPolicy` and `Connector` objects into the proxy fleet, the connector
//! Deployments, the PKI and the compiled fleet configuration.
//!
//! The controllers arrive with the operator issue; today the binary identifies itself
//! and prints the CustomResourceDefinitions it serves.

use std::io::Write;

use clap::{Parser, Subcommand};

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
    after_help = "Examples:\n  sallyport-operator crds | kubectl apply --server-side -f -\n  sallyport-operator --version"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Sub-commands of `sallyport-operator`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the CustomResourceDefinitions of the Sallyport API as YAML, ready for
    /// `kubectl apply --server-side -f -`.
    Crds,
}

/// The operator could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// Rendering the CustomResourceDefinitions failed.
    #[error(transparent)]
    Crds(#[from] sallyport_api::crdgen::CrdgenError),
    /// Writing to stdout failed.
    #[error("cannot write to stdout: {0}")]
    Stdout(#[from] std::io::Error),
}

/// Runs the command `cli` asks for, writing its output to `out`.
pub fn run(cli: Cli, out: &mut impl Write) -> Result<(), OperatorError> {
    match cli.command {
        Some(Command::Crds) => {
            for crd in sallyport_api::custom_resource_definitions() {
                out.write_all(sallyport_api::crdgen::render(&crd)?.as_bytes())?;
            }
        }
        None => writeln!(out, "sallyport-operator {}", env!("CARGO_PKG_VERSION"))?,
    }
    Ok(())
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
    fn without_a_command_prints_the_version() {
        let mut out = Vec::new();
        assert!(run(Cli::parse_from(["sallyport-operator"]), &mut out).is_ok());
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("sallyport-operator {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
}
