//! `sallyport-proxy`: see the library crate for what it does.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = sallyport_proxy::Cli::parse();
    match sallyport_proxy::run(cli, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sallyport-proxy: {error}");
            ExitCode::FAILURE
        }
    }
}
