//! `sallyport-connector`: see the library crate for what it does.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = sallyport_connector::Cli::parse();
    match sallyport_connector::run(cli, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sallyport-connector: {error}");
            ExitCode::from(error.exit_status())
        }
    }
}
