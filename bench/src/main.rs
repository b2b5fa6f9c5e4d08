//! `sallyport-bench`: see the library crate for what it measures.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = sallyport_bench::Cli::parse();
    match sallyport_bench::run(cli, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sallyport-bench: {error}");
            ExitCode::FAILURE
        }
    }
}
