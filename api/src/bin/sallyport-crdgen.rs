//! Writes the CustomResourceDefinitions of the Sallyport API as YAML, one file per kind,
//! and their Markdown reference.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Write the Sallyport CustomResourceDefinitions, generated from the Rust API types, and
/// their Markdown reference.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Directory to write `<plural>.<group>.yaml` files into; stdout when omitted (and
    /// no `--reference` is given).
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,

    /// File to write the Markdown reference of every field into, e.g.
    /// `docs/crd-reference.md`.
    #[arg(long, value_name = "FILE")]
    reference: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match (&args.out_dir, &args.reference) {
        (out_dir, None) => sallyport_api::crdgen::write(out_dir.as_deref()),
        (None, Some(reference)) => sallyport_api::crdgen::write_reference(reference),
        (Some(out_dir), Some(reference)) => sallyport_api::crdgen::write(Some(out_dir))
            .and_then(|()| sallyport_api::crdgen::write_reference(reference)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sallyport-crdgen: {error}");
            ExitCode::FAILURE
        }
    }
}
