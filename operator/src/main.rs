//! `sallyport-operator`: see the library crate for what it does.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = sallyport_operator::Cli::parse();
    match sallyport_operator::run(cli, &mut std::io::stdout().lock()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("sallyport-operator: {error}");
            ExitCode::FAILURE
        }
    }
}
