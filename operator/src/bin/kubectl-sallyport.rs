//! `kubectl-sallyport`: the kubectl plugin (`kubectl sallyport ...`); see
//! `sallyport_operator::kubectl`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = sallyport_operator::kubectl::PluginCli::parse();
    match sallyport_operator::kubectl::run(
        cli,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    ) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("kubectl sallyport: {error}");
            ExitCode::FAILURE
        }
    }
}
