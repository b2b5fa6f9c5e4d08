//! Writes the CustomResourceDefinitions of the Sallyport API as YAML, one file per kind.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Write the Sallyport CustomResourceDefinitions, generated from the Rust API types.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Directory to write `<plural>.<group>.yaml` files into; stdout when omitted.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match sallyport_api::crdgen::write(args.out_dir.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sallyport-crdgen: {error}");
            ExitCode::FAILURE
        }
    }
}
