//! `sallyport-operator`: see the library crate for what it does.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = sallyport_operator::Cli::parse();
    // Not stdout's lock: `run` writes its audit events to stdout from worker threads.
    match sallyport_operator::run(cli, &mut std::io::stdout()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("sallyport-operator: {error}");
            ExitCode::FAILURE
        }
    }
}
