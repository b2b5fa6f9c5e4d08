//! The Sallyport connector: runs inside a private network and carries requests from the proxy fleet to internal apps over outbound-only mutual TLS.
//!
//! It registers once with a bootstrap token (its key pair is made locally; only a CSR leaves the machine), keeps several outbound tunnels open to every proxy replica, pulls its configuration, serves proxied requests to internal apps, renews its certificate before it ages out, and drains cleanly on shutdown.

pub mod backend;
pub mod register;
pub mod slice;
pub mod state;

use std::io::Write;

use clap::Parser;

/// Command-line interface of `sallyport-connector`.
#[derive(Debug, Parser)]
#[command(
    name = "sallyport-connector",
    version,
    about = "The Sallyport connector: runs inside a private network and carries requests from the proxy fleet to internal apps over outbound-only mutual TLS.",
    long_about = "The Sallyport connector: runs inside a private network and carries requests from the proxy fleet to internal apps over outbound-only mutual TLS.\n\nIt registers once with a bootstrap token (its key pair is made locally; only a CSR leaves the machine), keeps several outbound tunnels open to every proxy replica, pulls its configuration, serves proxied requests to internal apps, renews its certificate before it ages out, and drains cleanly on shutdown.\n\nToday it prints its version and exits; its serving mode arrives with the data-plane issue."
)]
pub struct Cli {}

/// Runs `sallyport-connector` as `cli` asks, writing its output to `out`.
pub fn run(cli: Cli, out: &mut impl Write) -> std::io::Result<()> {
    let Cli {} = cli;
    writeln!(out, "sallyport-connector {}", env!("CARGO_PKG_VERSION"))
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
}
