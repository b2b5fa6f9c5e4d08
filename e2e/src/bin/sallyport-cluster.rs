//! `sallyport-cluster`: a real Kubernetes control plane on loopback. See `--help`.

use std::process::ExitCode;

use clap::Parser;
use sallyport_e2e::supervisor::{self, Cli};

// One thread: the components are spawned from the main thread, and their parent-death
// signal fires when the thread that spawned them ends.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    supervisor::init_tracing();
    match cli.run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sallyport-cluster: {error}");
            ExitCode::FAILURE
        }
    }
}
