//! The Sallyport proxy: the public edge that pre-authenticates users and routes their requests onto connector tunnels.
//!
//! It terminates TLS for every published host, answers robots.txt, limits abuse, signs users in with OpenID Connect, keeps them signed in with an encrypted cookie, enforces conditional access, passes identity on to backends, and carries each request over a reverse HTTP/2 tunnel held open by a connector of the app's group.

pub mod access;
pub mod app_tls;
pub mod auth;
pub mod body_translation;
pub mod certs;
pub mod config_source;
pub mod fleet_api;
pub mod forward;
pub mod identity_keys;
pub mod issuer;
pub mod metrics;
pub mod pages;
pub mod protection;
pub mod rate_limit;
pub mod registry;
pub mod replicas;
pub mod risk;
pub mod router;
pub mod run;
pub mod serve;
pub mod session_controls;
pub mod websocket;

use std::io::Write;

use clap::{Parser, Subcommand};

/// Command-line interface of `sallyport-proxy`.
#[derive(Debug, Parser)]
#[command(
    name = "sallyport-proxy",
    version,
    about = "The Sallyport proxy: the public edge that pre-authenticates users and routes their requests onto connector tunnels.",
    long_about = "The Sallyport proxy: the public edge that pre-authenticates users and routes their requests onto connector tunnels.\n\nIt terminates TLS for every published host, answers robots.txt, carries each request over a reverse HTTP/2 tunnel held open by a connector of the app's group, and serves the fleet API connectors register and renew their certificates with. In a cluster it follows the configuration the operator compiles; standalone it reads it from a file.\n\nApps with OpenID Connect pre-authentication are served only to signed-in users (sessions in encrypted cookies, identity passed to backends as headers and a signed assertion). Conditional access policies decide every sign-in and request (with risk detections feeding them); abuse limits (rates, caps, timeouts, sizes) protect the fleet; sign-in and audit events go to stdout and optionally to a SIEM; metrics are served on the probe address."
)]
pub struct Cli {
    /// What to do; without a command, print the version.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The commands of `sallyport-proxy`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve users, connector tunnels and the fleet API until SIGTERM.
    Run(run::RunArgs),
}

/// The proxy could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Writing the output failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Serving failed.
    #[error(transparent)]
    Run(#[from] run::RunError),
}

/// Runs `sallyport-proxy` as `cli` asks, writing its output to `out`.
pub fn run(cli: Cli, out: &mut impl Write) -> Result<(), ProxyError> {
    match cli.command {
        Some(Command::Run(args)) => {
            sallyport_service::init_tracing(&args.log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(run::RunError::Runtime)?;
            runtime.block_on(run::run(args))?;
        }
        None => writeln!(out, "sallyport-proxy {}", env!("CARGO_PKG_VERSION"))?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_its_version() {
        let mut out = Vec::new();
        assert!(run(Cli::parse_from(["sallyport-proxy"]), &mut out).is_ok());
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("sallyport-proxy {}\n", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn run_has_helpful_defaults() {
        let cli = Cli::parse_from(["sallyport-proxy", "run"]);
        let Some(Command::Run(args)) = cli.command else {
            panic!("run parses");
        };
        assert_eq!(args.listen.port(), 8443);
        assert_eq!(args.fleet_config, "sallyport-fleet-config");
        assert!(args.fleet_config_file.is_none());
    }
}
