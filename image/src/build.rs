//! `sallyport-image build`: one image as an OCI image layout directory.
//!
//! The layout holds `oci-layout`, `index.json` (one manifest, named by
//! `org.opencontainers.image.ref.name`) and `blobs/sha256/`: the manifest, the config
//! and one gzip layer. The same inputs (binary, CA bundle, version, revision,
//! `SOURCE_DATE_EPOCH`) give the same bytes, hence the same manifest digest.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use oci_spec::OciSpecError;
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, HistoryBuilder, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, OciLayoutBuilder, Os, PlatformBuilder, RootFsBuilder,
    Sha256Digest,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::info;

use crate::blobs::{BlobError, BlobStore, canonical_json, oci_digest};
use crate::catalog::{ENV, Image, USER, label};
use crate::elf::{self, ElfError};
use crate::layer;

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    /// Which image.
    pub image: Image,
    /// The static binary to package.
    pub binary: PathBuf,
    /// The layout directory to write (replaced when it already holds a layout).
    pub out: PathBuf,
    /// `org.opencontainers.image.version`, and the tag of the reference.
    pub version: String,
    /// `org.opencontainers.image.revision`, when known.
    pub revision: Option<String>,
    /// The repository prefix of the reference, e.g. `ghcr.io/sallyport-dev`.
    pub repository: String,
    /// The PEM CA bundle to install at `/etc/ssl/certs/ca-certificates.crt`.
    pub ca_bundle: PathBuf,
    /// Seconds since the epoch: the config's `created` and every file's mtime.
    pub source_date_epoch: i64,
}

/// The image as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// `org.opencontainers.image.ref.name` in `index.json`, e.g.
    /// `ghcr.io/sallyport-dev/sallyport-proxy:0.1.0`.
    pub reference: String,
    /// The manifest's digest: the image's identity.
    pub manifest: Sha256Digest,
    /// The config's digest (the image ID engines show).
    pub config: Sha256Digest,
    /// The layer blob's digest.
    pub layer: Sha256Digest,
    /// The layer blob's size.
    pub layer_size: u64,
}

/// An image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The binary cannot go into an image.
    #[error(transparent)]
    Binary(#[from] ElfError),
    /// The CA bundle cannot be read.
    #[error("cannot read the CA bundle {path} (--ca-bundle): {source}")]
    CaBundle {
        /// The bundle.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The CA bundle holds no certificate.
    #[error(
        "the CA bundle {path} (--ca-bundle) holds no PEM certificate; install Debian's ca-certificates or name another bundle"
    )]
    CaBundleEmpty {
        /// The bundle.
        path: PathBuf,
    },
    /// `SOURCE_DATE_EPOCH` is out of range.
    #[error("SOURCE_DATE_EPOCH (--source-date-epoch) {value} is not a time RFC 3339 can write")]
    Epoch {
        /// The value.
        value: i64,
    },
    /// The output exists and is not an image layout, so it is not replaced.
    #[error(
        "--out {path} exists and is neither empty nor an OCI image layout (no oci-layout file): not replacing it"
    )]
    OutNotLayout {
        /// The directory.
        path: PathBuf,
    },
    /// A file of the layout could not be written, moved or removed.
    #[error("cannot write the layout at {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A blob could not be written.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// An image-spec document could not be made.
    #[error("cannot make the {what}: {source}")]
    Spec {
        /// Which document.
        what: &'static str,
        /// What the image-spec types said.
        source: OciSpecError,
    },
}

fn spec_error(what: &'static str) -> impl FnOnce(OciSpecError) -> BuildError {
    move |source| BuildError::Spec { what, source }
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError {
    let path = path.to_owned();
    move |source| BuildError::Io { path, source }
}

/// The config `Labels` of an image: the OCI pre-defined annotations that describe it.
pub fn labels(image: Image, version: &str, revision: Option<&str>) -> HashMap<String, String> {
    let mut labels = HashMap::from([
        (label::TITLE.to_owned(), image.name().to_owned()),
        (
            label::DESCRIPTION.to_owned(),
            image.description().to_owned(),
        ),
        (
            label::SOURCE.to_owned(),
            env!("CARGO_PKG_REPOSITORY").to_owned(),
        ),
        (label::VERSION.to_owned(), version.to_owned()),
        (
            label::LICENSES.to_owned(),
            env!("CARGO_PKG_LICENSE").to_owned(),
        ),
    ]);
    if let Some(revision) = revision {
        labels.insert(label::REVISION.to_owned(), revision.to_owned());
    }
    labels
}

/// Builds `spec.image` into the layout directory `spec.out`.
pub fn build(spec: &BuildSpec) -> Result<Built, BuildError> {
    elf::check_static(&spec.binary)?;
    let ca_bundle = fs::read(&spec.ca_bundle).map_err(|source| BuildError::CaBundle {
        path: spec.ca_bundle.clone(),
        source,
    })?;
    if !String::from_utf8_lossy(&ca_bundle).contains("-----BEGIN CERTIFICATE-----") {
        return Err(BuildError::CaBundleEmpty {
            path: spec.ca_bundle.clone(),
        });
    }
    let created = OffsetDateTime::from_unix_timestamp(spec.source_date_epoch)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .ok_or(BuildError::Epoch {
            value: spec.source_date_epoch,
        })?;
    // Negative epochs format fine but make no sense as a file time.
    let mtime = u64::try_from(spec.source_date_epoch).map_err(|_| BuildError::Epoch {
        value: spec.source_date_epoch,
    })?;

    check_replaceable(&spec.out)?;
    // Written beside the target and moved in place at the end: a failed build leaves the
    // previous layout as it was.
    let partial = partial_dir(&spec.out);
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(io_at(&partial))?;
    }
    fs::create_dir_all(&partial).map_err(io_at(&partial))?;
    let mut store = BlobStore::create(&partial)?;

    let entries = layer::rootfs(spec.image, spec.binary.clone(), ca_bundle);
    let layer = layer::write(&mut store, &entries, mtime)?;

    let labels = labels(spec.image, &spec.version, spec.revision.as_deref());
    let mut runtime = ConfigBuilder::default()
        .user(USER)
        .env(ENV.map(str::to_owned).to_vec())
        .entrypoint(vec![spec.image.binary_path()])
        .labels(labels.clone());
    let ports = spec.image.exposed_ports();
    if !ports.is_empty() {
        runtime = runtime.exposed_ports(ports.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>());
    }
    let config = ImageConfigurationBuilder::default()
        .created(created.clone())
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(
            runtime
                .build()
                .map_err(spec_error("image config's config"))?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![oci_digest(&layer.diff_id).to_string()])
                .build()
                .map_err(spec_error("image config's rootfs"))?,
        )
        .history(vec![
            HistoryBuilder::default()
                .created(created.clone())
                .created_by(format!(
                    "sallyport-image {} build --image {}",
                    env!("CARGO_PKG_VERSION"),
                    spec.image.target()
                ))
                .comment(format!(
                    "static {} at {}, CA bundle, nonroot user (65532)",
                    spec.image.name(),
                    spec.image.binary_path()
                ))
                .build()
                .map_err(spec_error("image config's history"))?,
        ])
        .build()
        .map_err(spec_error("image config"))?;
    let (config_digest, config_size) = store.put(&canonical_json("image config", &config)?)?;

    let mut annotations = labels;
    annotations.insert(label::CREATED.to_owned(), created);
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(Descriptor::new(
            MediaType::ImageConfig,
            config_size,
            oci_digest(&config_digest),
        ))
        .layers(vec![Descriptor::new(
            MediaType::ImageLayerGzip,
            layer.size,
            oci_digest(&layer.digest),
        )])
        .annotations(annotations)
        .build()
        .map_err(spec_error("image manifest"))?;
    let (manifest_digest, manifest_size) =
        store.put(&canonical_json("image manifest", &manifest)?)?;

    let reference = format!(
        "{}/{}:{}",
        spec.repository.trim_end_matches('/'),
        spec.image.name(),
        spec.version
    );
    let mut entry = Descriptor::new(
        MediaType::ImageManifest,
        manifest_size,
        oci_digest(&manifest_digest),
    );
    entry.set_annotations(Some(HashMap::from([(
        label::REF_NAME.to_owned(),
        reference.clone(),
    )])));
    entry.set_platform(Some(
        PlatformBuilder::default()
            .architecture(Arch::Amd64)
            .os(Os::Linux)
            .build()
            .map_err(spec_error("index platform"))?,
    ));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![entry])
        .build()
        .map_err(spec_error("image index"))?;
    let index_path = partial.join("index.json");
    fs::write(&index_path, canonical_json("image index", &index)?).map_err(io_at(&index_path))?;
    let layout = OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()
        .map_err(spec_error("oci-layout"))?;
    let layout_path = partial.join("oci-layout");
    fs::write(&layout_path, canonical_json("oci-layout", &layout)?).map_err(io_at(&layout_path))?;

    replace(&partial, &spec.out)?;
    info!(
        image = spec.image.name(),
        reference = %reference,
        manifest = %oci_digest(&manifest_digest),
        layer_size = layer.size,
        out = %spec.out.display(),
        "image built"
    );
    Ok(Built {
        reference,
        manifest: manifest_digest,
        config: config_digest,
        layer: layer.digest,
        layer_size: layer.size,
    })
}

/// `<out>.partial`, beside `out`.
fn partial_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_owned()).unwrap_or_default();
    name.push(".partial");
    out.with_file_name(name)
}

/// Fails unless `out` is absent, an empty directory, or an image layout (which a build
/// may replace).
fn check_replaceable(out: &Path) -> Result<(), BuildError> {
    let Ok(mut listing) = fs::read_dir(out) else {
        return match out.exists() {
            true => Err(BuildError::OutNotLayout {
                path: out.to_owned(),
            }),
            false => Ok(()),
        };
    };
    if listing.next().is_none() || out.join("oci-layout").is_file() {
        return Ok(());
    }
    Err(BuildError::OutNotLayout {
        path: out.to_owned(),
    })
}

/// Moves the finished layout `partial` to `out`, replacing an older layout there.
fn replace(partial: &Path, out: &Path) -> Result<(), BuildError> {
    check_replaceable(out)?;
    if out.exists() {
        fs::remove_dir_all(out).map_err(io_at(out))?;
    }
    fs::rename(partial, out).map_err(io_at(out))
}
