//! `sallyport-proxy`: see the library crate for what it does.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = sallyport_proxy::Cli::parse();
    // Not stdout's lock: the proxy writes its sign-in log to stdout from worker threads.
    match sallyport_proxy::run(cli, &mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sallyport-proxy: {error}");
            ExitCode::FAILURE
        }
    }
}
