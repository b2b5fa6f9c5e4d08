//! The Sallyport connector: runs inside a private network and carries requests from the proxy fleet to internal apps over outbound-only mutual TLS.
//!
//! It registers once with a bootstrap token (its key pair is made locally; only a CSR leaves the machine), keeps several outbound tunnels open to every proxy replica, pulls its configuration, serves proxied requests to internal apps, renews its certificate before it ages out, and drains cleanly on shutdown.

pub mod backend;
pub mod metrics;
pub mod register;
pub mod run;
pub mod slice;
pub mod state;
pub mod state_secret;
pub mod websocket;

use std::io::Write;

use clap::{Parser, Subcommand};

/// Command-line interface of `sallyport-connector`.
#[derive(Debug, Parser)]
#[command(
    name = "sallyport-connector",
    version,
    about = "The Sallyport connector: runs inside a private network and carries requests from the proxy fleet to internal apps over outbound-only mutual TLS.",
    long_about = "The Sallyport connector: runs inside a private network and carries requests from the proxy fleet to internal apps over outbound-only mutual TLS.\n\nIt registers once with a bootstrap token (its key pair is made locally; only a CSR leaves the machine), keeps several outbound tunnels open to every proxy replica, pulls its configuration, serves proxied requests to internal apps, renews its certificate before it ages out, and drains cleanly on shutdown.\n\nExample (outside Kubernetes):\n  sallyport-connector run --fleet-address tunnel.example.com:443 --fleet-ca-file ca.crt \\\n    --group infra/datacenter-east --state-dir /var/lib/sallyport\n  (with the bootstrap token in the environment: SALLYPORT_REGISTRATION_TOKEN=...)"
)]
pub struct Cli {
    /// What to do; without a command, print the version.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The commands of `sallyport-connector`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register (unless the state directory already holds a registration), then carry
    /// requests until SIGTERM.
    Run(run::RunArgs),
    /// Register with the fleet and save the state, then exit.
    Register(run::FleetArgs),
}

/// The connector could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// Writing the output failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Running failed.
    #[error(transparent)]
    Run(#[from] run::RunError),
}

/// The exit status when restarting cannot help until an administrator acts
/// ([`run::RunError::needs_administrator`]): a revoked connector, a removed group, a
/// refused registration token, or settings and saved state that do not fit. It is
/// `EX_CONFIG` of `sysexits.h`; the systemd unit names it in `RestartPreventExitStatus=`.
pub const EXIT_NEEDS_ADMINISTRATOR: u8 = 78;

impl ConnectorError {
    /// The process's exit status for this error: [`EXIT_NEEDS_ADMINISTRATOR`] when
    /// restarting cannot help, else 1.
    pub fn exit_status(&self) -> u8 {
        match self {
            Self::Run(error) if error.needs_administrator() => EXIT_NEEDS_ADMINISTRATOR,
            _ => 1,
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ConnectorError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ConnectorError::Run(run::RunError::Runtime(e)))
}

/// Runs `sallyport-connector` as `cli` asks, writing its output to `out`.
pub fn run(cli: Cli, out: &mut impl Write) -> Result<(), ConnectorError> {
    match cli.command {
        Some(Command::Run(args)) => {
            sallyport_service::init_tracing(&args.fleet.log_format);
            runtime()?.block_on(run::run(args))?;
        }
        Some(Command::Register(args)) => {
            sallyport_service::init_tracing(&args.log_format);
            let state = runtime()?.block_on(run::register_only(args))?;
            writeln!(
                out,
                "registered as {} in group {}",
                state.connector_id, state.group_id
            )?;
        }
        None => writeln!(out, "sallyport-connector {}", env!("CARGO_PKG_VERSION"))?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_its_version() {
        let mut out = Vec::new();
        assert!(run(Cli::parse_from(["sallyport-connector"]), &mut out).is_ok());
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("sallyport-connector {}\n", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn errors_an_administrator_must_fix_exit_with_their_own_status() {
        let fix = ConnectorError::Run(run::RunError::Missing("--group"));
        assert_eq!(fix.exit_status(), EXIT_NEEDS_ADMINISTRATOR);
        let transient = ConnectorError::Io(std::io::Error::other("broken pipe"));
        assert_eq!(transient.exit_status(), 1);
    }

    #[test]
    fn the_server_name_defaults_to_the_address_host() {
        let cli = Cli::parse_from([
            "sallyport-connector",
            "register",
            "--fleet-address",
            "tunnel.example.com:443",
            "--fleet-ca",
            "not a certificate",
        ]);
        let Some(Command::Register(args)) = cli.command else {
            panic!("register parses");
        };
        // The CA text is checked: a clear error rather than a handshake failure later.
        let error = args.endpoint(None).err().map(|e| e.to_string());
        assert!(
            error.as_deref().is_some_and(|e| e.contains("fleet CA")),
            "{error:?}"
        );
        assert_eq!(args.fleet_server_name, None);
    }
}
