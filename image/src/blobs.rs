//! The content-addressed blob store of an OCI image layout (`blobs/sha256/<hex>`), and
//! the canonical JSON every JSON blob is written as.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use oci_spec::image::{Digest, Sha256Digest};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

/// A blob could not be written.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// Writing a file of the layout failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// A value could not be turned into JSON.
    #[error("cannot serialize the {what} as JSON: {source}")]
    Json {
        /// Which document (`image config`, `manifest`, ...).
        what: &'static str,
        /// What failed.
        source: serde_json::Error,
    },
}

/// A writer that passes bytes on and keeps their SHA-256 and count.
pub struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Hashing<W> {
    /// Hashes what goes through to `inner`.
    pub fn new(inner: W) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// The inner writer, the SHA-256 of everything written, and its length.
    pub fn finish(self) -> (W, Sha256Digest, u64) {
        let digest = sha256_of_hasher(self.hasher);
        (self.inner, digest, self.written)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(done) = buf.get(..n) {
            self.hasher.update(done);
        }
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn sha256_of_hasher(hasher: Sha256) -> Sha256Digest {
    let hex = format!("{:x}", hasher.finalize());
    // 64 lowercase hex digits by construction, which is all `from_str` checks.
    match Sha256Digest::from_str(&hex) {
        Ok(digest) => digest,
        Err(error) => unreachable!("a SHA-256 in lowercase hex is a valid digest: {error}"),
    }
}

/// The SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Sha256Digest {
    let mut hasher = Sha256::new();
    hasher.update(bytes);
    sha256_of_hasher(hasher)
}

/// `sha256:<hex>` as an OCI digest.
pub fn oci_digest(digest: &Sha256Digest) -> Digest {
    Digest::from(digest.clone())
}

/// `value` as canonical JSON: object keys sorted at every level, no spaces. The
/// image-spec types keep maps in `HashMap`s, whose order changes from run to run; the
/// digest of a document must not.
pub fn canonical_json<T: serde::Serialize>(
    what: &'static str,
    value: &T,
) -> Result<Vec<u8>, BlobError> {
    let json = serde_json::to_value(value).map_err(|source| BlobError::Json { what, source })?;
    serde_json::to_vec(&sorted(json)).map_err(|source| BlobError::Json { what, source })
}

fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut out = Map::new();
            for (key, value) in entries {
                out.insert(key, sorted(value));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// The `blobs/sha256` directory of a layout being written.
#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
    partial: u32,
}

impl BlobStore {
    /// Creates `root/blobs/sha256`.
    pub fn create(root: &Path) -> Result<Self, BlobError> {
        let dir = root.join("blobs").join("sha256");
        fs::create_dir_all(&dir).map_err(|source| BlobError::Write {
            path: dir.clone(),
            source,
        })?;
        Ok(BlobStore { dir, partial: 0 })
    }

    /// Stores `bytes`; returns their digest and size.
    pub fn put(&mut self, bytes: &[u8]) -> Result<(Sha256Digest, u64), BlobError> {
        let digest = sha256(bytes);
        let path = self.dir.join(digest.digest());
        fs::write(&path, bytes).map_err(|source| BlobError::Write { path, source })?;
        Ok((digest, bytes.len() as u64))
    }

    /// Stores what `write` writes, streamed through a file named after its digest once
    /// done; returns `write`'s result, the digest and the size.
    pub fn put_streamed<T>(
        &mut self,
        write: impl FnOnce(&mut Hashing<BufWriter<File>>) -> io::Result<T>,
    ) -> Result<(T, Sha256Digest, u64), BlobError> {
        self.partial += 1;
        let partial = self.dir.join(format!(".partial-{}", self.partial));
        let failed = |path: &Path| {
            let path = path.to_owned();
            move |source| BlobError::Write { path, source }
        };
        let file = File::create(&partial).map_err(failed(&partial))?;
        let mut out = Hashing::new(BufWriter::new(file));
        let result = write(&mut out).map_err(failed(&partial))?;
        let (buffered, digest, size) = out.finish();
        let file = buffered
            .into_inner()
            .map_err(|e| failed(&partial)(e.into_error()))?;
        file.sync_all().map_err(failed(&partial))?;
        let path = self.dir.join(digest.digest());
        fs::rename(&partial, &path).map_err(failed(&path))?;
        Ok((result, digest, size))
    }
}
