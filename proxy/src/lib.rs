//! The Sallyport proxy: the public edge that pre-authenticates users and routes their requests onto connector tunnels.
//!
//! It terminates TLS for every published host, answers robots.txt, limits abuse, signs users in with OpenID Connect, keeps them signed in with an encrypted cookie, enforces conditional access, passes identity on to backends, and carries each request over a reverse HTTP/2 tunnel held open by a connector of the app's group.

pub mod certs;
pub mod fleet_api;
pub mod forward;
pub mod issuer;
pub mod pages;
pub mod registry;
pub mod router;

use std::io::Write;

use clap::Parser;

/// Command-line interface of `sallyport-proxy`.
#[derive(Debug, Parser)]
#[command(
    name = "sallyport-proxy",
    version,
    about = "The Sallyport proxy: the public edge that pre-authenticates users and routes their requests onto connector tunnels.",
    long_about = "The Sallyport proxy: the public edge that pre-authenticates users and routes their requests onto connector tunnels.\n\nIt terminates TLS for every published host, answers robots.txt, limits abuse, signs users in with OpenID Connect, keeps them signed in with an encrypted cookie, enforces conditional access, passes identity on to backends, and carries each request over a reverse HTTP/2 tunnel held open by a connector of the app's group.\n\nToday it prints its version and exits; its serving mode arrives with the data-plane issue."
)]
pub struct Cli {}

/// Runs `sallyport-proxy` as `cli` asks, writing its output to `out`.
pub fn run(cli: Cli, out: &mut impl Write) -> std::io::Result<()> {
    let Cli {} = cli;
    writeln!(out, "sallyport-proxy {}", env!("CARGO_PKG_VERSION"))
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
}
