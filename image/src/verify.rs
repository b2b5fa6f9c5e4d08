//! `sallyport-image verify`: checks an OCI image layout the way a registry or an engine
//! would before trusting it.
//!
//! `oci-layout` names version 1.0.0; `index.json` is an image index; every manifest it
//! lists, every config and every layer is present with the size and SHA-256 its
//! descriptor states and the media type expected where it is referenced; every layer
//! is a well-formed (gzip) tar whose uncompressed digest is the config's
//! `rootfs.diff_ids` entry; the index's platform is the config's.

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use oci_spec::OciSpecError;
use oci_spec::image::{
    Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType, OciLayout,
};
use sha2::{Digest as _, Sha256};

use crate::catalog::label;

/// A layout is not a valid image.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A file of the layout cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A document does not parse as what it should be.
    #[error("{path} is not a valid {what}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What it should be (`image index`, `image manifest`, ...).
        what: &'static str,
        /// What the image-spec types said.
        source: OciSpecError,
    },
    /// `oci-layout` names another layout version.
    #[error("oci-layout: imageLayoutVersion is {found:?}, expected \"1.0.0\"")]
    LayoutVersion {
        /// What it names.
        found: String,
    },
    /// A document has the wrong `schemaVersion`.
    #[error("{what}: schemaVersion is {found}, expected 2")]
    SchemaVersion {
        /// Which document.
        what: String,
        /// What it says.
        found: u32,
    },
    /// `index.json` lists no manifest.
    #[error("index.json lists no manifest")]
    EmptyIndex,
    /// A descriptor's or document's media type is not the one expected there.
    #[error("{referenced_by}: mediaType is {found}, expected {expected}")]
    MediaType {
        /// Where the descriptor is.
        referenced_by: String,
        /// What it says.
        found: String,
        /// What it should say.
        expected: String,
    },
    /// A descriptor uses another digest algorithm than SHA-256.
    #[error("{referenced_by}: digest {digest} is not SHA-256, which is all this verifier reads")]
    Algorithm {
        /// Where the descriptor is.
        referenced_by: String,
        /// The digest.
        digest: String,
    },
    /// A referenced blob is missing.
    #[error("{referenced_by}: blob {digest} is missing ({path})")]
    MissingBlob {
        /// Where the descriptor is.
        referenced_by: String,
        /// The blob's digest.
        digest: String,
        /// Where it should be.
        path: PathBuf,
    },
    /// A blob's size is not its descriptor's.
    #[error("{referenced_by}: blob {digest} holds {actual} bytes, its descriptor says {expected}")]
    Size {
        /// Where the descriptor is.
        referenced_by: String,
        /// The blob's digest.
        digest: String,
        /// The descriptor's size.
        expected: u64,
        /// The blob's size.
        actual: u64,
    },
    /// A blob's content does not hash to its name: it was changed or corrupted.
    #[error("{referenced_by}: blob {digest} has SHA-256 {actual}: its content was changed")]
    Digest {
        /// Where the descriptor is.
        referenced_by: String,
        /// The digest it should have.
        digest: String,
        /// The digest it has.
        actual: String,
    },
    /// A layer is not a readable (gzip) tar.
    #[error("{referenced_by}: layer {digest} is not a readable tar: {source}")]
    Layer {
        /// Where the descriptor is.
        referenced_by: String,
        /// The layer's digest.
        digest: String,
        /// What failed.
        source: io::Error,
    },
    /// The config's `rootfs.diff_ids` do not match the layers.
    #[error("{referenced_by}: {problem}")]
    DiffIds {
        /// The manifest.
        referenced_by: String,
        /// What does not match.
        problem: String,
    },
    /// The index's platform is not the config's.
    #[error("{referenced_by}: the index says {index}, the config says {config}")]
    Platform {
        /// The index entry.
        referenced_by: String,
        /// The index's `os/architecture`.
        index: String,
        /// The config's `os/architecture`.
        config: String,
    },
}

/// One verified image of a layout.
#[derive(Debug, Clone)]
pub struct VerifiedImage {
    /// Its `org.opencontainers.image.ref.name` in `index.json`, if any.
    pub reference: Option<String>,
    /// Its manifest's descriptor.
    pub manifest_descriptor: Descriptor,
    /// Its manifest.
    pub manifest: ImageManifest,
    /// Its config.
    pub config: ImageConfiguration,
}

/// Verifies the layout at `root`; returns its images.
pub fn verify(root: &Path) -> Result<Vec<VerifiedImage>, VerifyError> {
    let layout_path = root.join("oci-layout");
    let layout = parse(&layout_path, "oci-layout", &read_file(&layout_path)?, |b| {
        OciLayout::from_reader(b)
    })?;
    if layout.image_layout_version() != "1.0.0" {
        return Err(VerifyError::LayoutVersion {
            found: layout.image_layout_version().clone(),
        });
    }
    let index_path = root.join("index.json");
    let index = parse(&index_path, "image index", &read_file(&index_path)?, |b| {
        ImageIndex::from_reader(b)
    })?;
    schema_version("index.json", index.schema_version())?;
    if let Some(media_type) = index.media_type() {
        expect_media_type("index.json", media_type, &MediaType::ImageIndex)?;
    }
    if index.manifests().is_empty() {
        return Err(VerifyError::EmptyIndex);
    }
    index
        .manifests()
        .iter()
        .enumerate()
        .map(|(n, descriptor)| {
            verify_image(root, &format!("index.json manifests[{n}]"), descriptor)
        })
        .collect()
}

fn verify_image(
    root: &Path,
    referenced_by: &str,
    descriptor: &Descriptor,
) -> Result<VerifiedImage, VerifyError> {
    expect_media_type(
        referenced_by,
        descriptor.media_type(),
        &MediaType::ImageManifest,
    )?;
    let (path, bytes) = read_blob(root, referenced_by, descriptor)?;
    let manifest = parse(&path, "image manifest", &bytes, |b| {
        ImageManifest::from_reader(b)
    })?;
    let at = format!("manifest {}", descriptor.digest());
    schema_version(&at, manifest.schema_version())?;
    match manifest.media_type() {
        Some(media_type) => expect_media_type(&at, media_type, &MediaType::ImageManifest)?,
        None => {
            return Err(VerifyError::MediaType {
                referenced_by: at,
                found: "(none)".to_owned(),
                expected: MediaType::ImageManifest.to_string(),
            });
        }
    }

    let config_at = format!("{at} config");
    expect_media_type(
        &config_at,
        manifest.config().media_type(),
        &MediaType::ImageConfig,
    )?;
    let (path, bytes) = read_blob(root, &config_at, manifest.config())?;
    let config = parse(&path, "image config", &bytes, |b| {
        ImageConfiguration::from_reader(b)
    })?;
    if let Some(platform) = descriptor.platform() {
        let index = format!("{}/{}", platform.os(), platform.architecture());
        let image = format!("{}/{}", config.os(), config.architecture());
        if index != image {
            return Err(VerifyError::Platform {
                referenced_by: referenced_by.to_owned(),
                index,
                config: image,
            });
        }
    }

    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers().len() {
        return Err(VerifyError::DiffIds {
            referenced_by: at,
            problem: format!(
                "{} layers but {} rootfs.diff_ids in the config",
                manifest.layers().len(),
                diff_ids.len()
            ),
        });
    }
    for (n, (layer, diff_id)) in manifest.layers().iter().zip(diff_ids).enumerate() {
        let layer_at = format!("{at} layers[{n}]");
        let uncompressed = verify_layer(root, &layer_at, layer)?;
        if &uncompressed != diff_id {
            return Err(VerifyError::DiffIds {
                referenced_by: layer_at,
                problem: format!(
                    "the uncompressed layer is {uncompressed}, the config's rootfs.diff_ids[{n}] is {diff_id}"
                ),
            });
        }
    }
    let reference = descriptor
        .annotations()
        .as_ref()
        .and_then(|a| a.get(label::REF_NAME).cloned());
    Ok(VerifiedImage {
        reference,
        manifest_descriptor: descriptor.clone(),
        manifest,
        config,
    })
}

/// Checks a layer blob's size and digest while reading it through gzip and tar; returns
/// the digest of the uncompressed tar.
fn verify_layer(root: &Path, at: &str, descriptor: &Descriptor) -> Result<String, VerifyError> {
    let gzip = match descriptor.media_type() {
        MediaType::ImageLayerGzip => true,
        MediaType::ImageLayer => false,
        other => {
            return Err(VerifyError::MediaType {
                referenced_by: at.to_owned(),
                found: other.to_string(),
                expected: format!("{} or {}", MediaType::ImageLayerGzip, MediaType::ImageLayer),
            });
        }
    };
    let (path, expected) = blob_path(root, at, descriptor)?;
    let file = File::open(&path)
        .map_err(|source| missing_or_read(at, descriptor, path.clone(), source))?;
    let size = file
        .metadata()
        .map_err(|source| VerifyError::Read {
            path: path.clone(),
            source,
        })?
        .len();
    if size != descriptor.size() {
        return Err(VerifyError::Size {
            referenced_by: at.to_owned(),
            digest: descriptor.digest().to_string(),
            expected: descriptor.size(),
            actual: size,
        });
    }
    let mut blob = HashingReader::new(BufReader::new(file));
    let walked = walk_tar(&mut blob, gzip);
    // Whatever the tar reader made of it, the blob's own digest decides first: a changed
    // blob is reported as changed, not as a broken tar.
    io::copy(&mut blob, &mut io::sink()).map_err(|source| VerifyError::Read { path, source })?;
    check_blob(at, descriptor, &expected, blob.count, &blob.digest())?;
    let diff_id = walked.map_err(|source| VerifyError::Layer {
        referenced_by: at.to_owned(),
        digest: descriptor.digest().to_string(),
        source,
    })?;
    Ok(format!("sha256:{diff_id}"))
}

/// Reads every entry of the (gzip) tar `blob`; returns the digest of the uncompressed tar.
fn walk_tar(blob: &mut impl Read, gzip: bool) -> io::Result<String> {
    let decompressed: Box<dyn Read + '_> = match gzip {
        true => Box::new(GzDecoder::new(blob)),
        false => Box::new(blob),
    };
    let mut tar_stream = HashingReader::new(decompressed);
    {
        let mut archive = tar::Archive::new(&mut tar_stream);
        for entry in archive.entries()? {
            io::copy(&mut entry?, &mut io::sink())?;
        }
    }
    // The tar's closing blocks and padding count in the diff ID too.
    io::copy(&mut tar_stream, &mut io::sink())?;
    Ok(tar_stream.digest())
}

fn schema_version(what: &str, found: u32) -> Result<(), VerifyError> {
    match found {
        2 => Ok(()),
        found => Err(VerifyError::SchemaVersion {
            what: what.to_owned(),
            found,
        }),
    }
}

fn expect_media_type(at: &str, found: &MediaType, expected: &MediaType) -> Result<(), VerifyError> {
    if found == expected {
        return Ok(());
    }
    Err(VerifyError::MediaType {
        referenced_by: at.to_owned(),
        found: found.to_string(),
        expected: expected.to_string(),
    })
}

/// `bytes` (read from `path`) parsed by `from_reader` as a `what`.
fn parse<T>(
    path: &Path,
    what: &'static str,
    bytes: &[u8],
    from_reader: impl FnOnce(&[u8]) -> Result<T, OciSpecError>,
) -> Result<T, VerifyError> {
    from_reader(bytes).map_err(|source| VerifyError::Parse {
        path: path.to_owned(),
        what,
        source,
    })
}

fn read_file(path: &Path) -> Result<Vec<u8>, VerifyError> {
    fs::read(path).map_err(|source| VerifyError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The blob's path and its expected hex digest.
fn blob_path(
    root: &Path,
    at: &str,
    descriptor: &Descriptor,
) -> Result<(PathBuf, String), VerifyError> {
    let hex = descriptor
        .as_digest_sha256()
        .ok_or_else(|| VerifyError::Algorithm {
            referenced_by: at.to_owned(),
            digest: descriptor.digest().to_string(),
        })?;
    Ok((root.join("blobs").join("sha256").join(hex), hex.to_owned()))
}

fn missing_or_read(
    at: &str,
    descriptor: &Descriptor,
    path: PathBuf,
    source: io::Error,
) -> VerifyError {
    match source.kind() {
        io::ErrorKind::NotFound => VerifyError::MissingBlob {
            referenced_by: at.to_owned(),
            digest: descriptor.digest().to_string(),
            path,
        },
        _ => VerifyError::Read { path, source },
    }
}

/// Reads a (small, JSON) blob and checks its size and digest.
fn read_blob(
    root: &Path,
    at: &str,
    descriptor: &Descriptor,
) -> Result<(PathBuf, Vec<u8>), VerifyError> {
    let (path, expected) = blob_path(root, at, descriptor)?;
    let bytes =
        fs::read(&path).map_err(|source| missing_or_read(at, descriptor, path.clone(), source))?;
    let mut hasher = Sha256::new();
    hasher.update(&bytes);
    let actual = format!("{:x}", hasher.finalize());
    check_blob(at, descriptor, &expected, bytes.len() as u64, &actual)?;
    Ok((path, bytes))
}

fn check_blob(
    at: &str,
    descriptor: &Descriptor,
    expected: &str,
    size: u64,
    actual: &str,
) -> Result<(), VerifyError> {
    if size != descriptor.size() {
        return Err(VerifyError::Size {
            referenced_by: at.to_owned(),
            digest: descriptor.digest().to_string(),
            expected: descriptor.size(),
            actual: size,
        });
    }
    if actual != expected {
        return Err(VerifyError::Digest {
            referenced_by: at.to_owned(),
            digest: descriptor.digest().to_string(),
            actual: format!("sha256:{actual}"),
        });
    }
    Ok(())
}

/// A reader that keeps the SHA-256 and count of what it read.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    fn digest(&self) -> String {
        format!("{:x}", self.hasher.clone().finalize())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(read) = buf.get(..n) {
            self.hasher.update(read);
        }
        self.count += n as u64;
        Ok(n)
    }
}
