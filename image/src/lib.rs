//! Sallyport's container images, built without a container engine.
//!
//! `sallyport-image build` writes one image (operator, proxy or connector) as an OCI
//! image layout: a single gzip layer with the static binary at `/usr/local/bin/<name>`,
//! `/etc/passwd` and `/etc/group` with the `nonroot` user (65532), `/tmp` (1777) and a CA
//! bundle; a config that runs the binary as 65532:65532. The same inputs give the same
//! digest. `sallyport-image verify` checks a layout as a consumer would (every digest and
//! size, the index → manifest → config → layer chain, media types, diff IDs), and
//! `sallyport-image archive` packs a layout into an `oci-archive` tar for `skopeo` or
//! `podman load`. `images/Dockerfile` builds the same images with an engine.

pub mod archive;
pub mod blobs;
pub mod build;
pub mod catalog;
pub mod elf;
pub mod layer;
pub mod verify;

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::catalog::{DEFAULT_REPOSITORY, Image};

/// Command-line interface of `sallyport-image`.
#[derive(Debug, Parser)]
#[command(
    name = "sallyport-image",
    version,
    about = "Builds Sallyport's container images as OCI image layouts, without a container engine.",
    after_help = "Examples:\n  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct) sallyport-image build --image proxy \\\n    --binary target/x86_64-unknown-linux-musl/release/sallyport-proxy --out out/sallyport-proxy\n  sallyport-image verify out/sallyport-proxy\n  sallyport-image archive out/sallyport-proxy --out out/sallyport-proxy.oci.tar\n  skopeo copy oci:out/sallyport-proxy:ghcr.io/sallyport-dev/sallyport-proxy:0.1.0 \\\n    docker://ghcr.io/sallyport-dev/sallyport-proxy:0.1.0\n\nSee docs/images.md."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands of `sallyport-image`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build one image into an OCI image layout directory; print its reference and
    /// manifest digest.
    Build(BuildArgs),
    /// Verify an OCI image layout (digests, sizes, media types, the whole chain); print
    /// each image's reference, manifest digest, user and entrypoint.
    Verify {
        /// The layout directory.
        layout: PathBuf,
    },
    /// Pack a (verified) layout into an oci-archive tar.
    Archive {
        /// The layout directory.
        layout: PathBuf,
        /// The tar to write.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Arguments of `sallyport-image build`.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Which image.
    #[arg(long, value_enum)]
    pub image: Image,
    /// The static x86_64 binary to package (built with --target
    /// x86_64-unknown-linux-musl); a dynamically linked one is refused.
    #[arg(long)]
    pub binary: PathBuf,
    /// The layout directory to write; an older layout there is replaced.
    #[arg(long)]
    pub out: PathBuf,
    /// The image's version label and tag.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    pub version: String,
    /// The source revision (commit) label, e.g. `$(git rev-parse HEAD)`.
    #[arg(long)]
    pub revision: Option<String>,
    /// The repository the reference in index.json names (REPOSITORY/NAME:VERSION).
    #[arg(long, default_value = DEFAULT_REPOSITORY)]
    pub repository: String,
    /// The PEM CA bundle to install as /etc/ssl/certs/ca-certificates.crt (the binaries
    /// trust the system roots for OpenID providers, SIEM sinks and backends).
    #[arg(long, default_value = "/etc/ssl/certs/ca-certificates.crt")]
    pub ca_bundle: PathBuf,
    /// The build time, in seconds since the epoch: the config's `created` and every
    /// file's mtime. Reproducible builds take the last commit's time.
    #[arg(long, env = "SOURCE_DATE_EPOCH")]
    pub source_date_epoch: i64,
}

/// `sallyport-image` failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Building failed.
    #[error(transparent)]
    Build(#[from] build::BuildError),
    /// The layout does not verify.
    #[error("the layout {layout} does not verify: {source}")]
    Verify {
        /// The layout.
        layout: PathBuf,
        /// What is wrong.
        source: verify::VerifyError,
    },
    /// Archiving failed.
    #[error(transparent)]
    Archive(#[from] archive::ArchiveError),
    /// Writing the output failed.
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// Runs `sallyport-image` as `cli` asks, writing its report to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<(), ImageError> {
    match cli.command {
        Command::Build(args) => {
            let built = build::build(&build::BuildSpec {
                image: args.image,
                binary: args.binary,
                out: args.out,
                version: args.version,
                revision: args.revision,
                repository: args.repository,
                ca_bundle: args.ca_bundle,
                source_date_epoch: args.source_date_epoch,
            })?;
            writeln!(
                out,
                "{} {} sha256:{}",
                args.image.name(),
                built.reference,
                built.manifest.digest()
            )?;
        }
        Command::Verify { layout } => {
            let images = verify::verify(&layout).map_err(|source| ImageError::Verify {
                layout: layout.clone(),
                source,
            })?;
            for image in images {
                let runtime = image.config.config().clone().unwrap_or_default();
                writeln!(
                    out,
                    "{} {} user={} entrypoint={} layers={}",
                    image.reference.as_deref().unwrap_or("(no ref.name)"),
                    image.manifest_descriptor.digest(),
                    runtime.user().as_deref().unwrap_or("(unset)"),
                    runtime.entrypoint().clone().unwrap_or_default().join(" "),
                    image.manifest.layers().len()
                )?;
            }
        }
        Command::Archive { layout, out: tar } => {
            let blobs = archive::write(&layout, &tar)?;
            writeln!(out, "{} ({blobs} blobs)", tar.display())?;
        }
    }
    Ok(())
}
