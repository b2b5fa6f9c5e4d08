//! `sallyport-image archive`: an image layout as one `oci-archive` tar, the file
//! `skopeo copy oci-archive:...`, `podman load` and `docker load` (25 and newer) take.
//!
//! The layout is verified first; the tar holds `oci-layout`, `index.json` and the blobs
//! the index reaches, sorted, with fixed owners and times, so it is reproducible too.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::verify::{self, VerifyError};

/// The archive could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The layout does not verify, so it is not archived.
    #[error("the layout {layout} does not verify: {source}")]
    Verify {
        /// The layout.
        layout: PathBuf,
        /// What is wrong with it.
        source: VerifyError,
    },
    /// Reading the layout or writing the archive failed.
    #[error("cannot write the archive {path}: {source}")]
    Io {
        /// The archive.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
}

/// Writes the layout at `layout` as an oci-archive tar at `out`; returns how many blobs
/// it holds.
pub fn write(layout: &Path, out: &Path) -> Result<usize, ArchiveError> {
    let images = verify::verify(layout).map_err(|source| ArchiveError::Verify {
        layout: layout.to_owned(),
        source,
    })?;
    let mut blobs = BTreeSet::new();
    for image in &images {
        for descriptor in std::iter::once(&image.manifest_descriptor)
            .chain(std::iter::once(image.manifest.config()))
            .chain(image.manifest.layers())
        {
            // Verified: every descriptor is SHA-256.
            if let Some(hex) = descriptor.as_digest_sha256() {
                blobs.insert(hex.to_owned());
            }
        }
    }
    let failed = |source| ArchiveError::Io {
        path: out.to_owned(),
        source,
    };
    let mut name = out.file_name().map(|n| n.to_owned()).unwrap_or_default();
    name.push(".partial");
    let partial = out.with_file_name(name);
    let file = File::create(&partial).map_err(failed)?;
    let mut tar = tar::Builder::new(BufWriter::new(file));
    let mut files = vec!["index.json".to_owned(), "oci-layout".to_owned()];
    files.extend(blobs.iter().map(|hex| format!("blobs/sha256/{hex}")));
    append_dir(&mut tar, "blobs/").map_err(failed)?;
    append_dir(&mut tar, "blobs/sha256/").map_err(failed)?;
    files.sort();
    for path in &files {
        let source = File::open(layout.join(path)).map_err(failed)?;
        let mut header = header(tar::EntryType::Regular, 0o644);
        header.set_size(source.metadata().map_err(failed)?.len());
        tar.append_data(&mut header, path, source).map_err(failed)?;
    }
    let file = tar
        .into_inner()
        .map_err(failed)?
        .into_inner()
        .map_err(|e| failed(e.into_error()))?;
    file.sync_all().map_err(failed)?;
    drop(file);
    fs::rename(&partial, out).map_err(failed)?;
    Ok(blobs.len())
}

fn header(kind: tar::EntryType, mode: u32) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(0);
    header
}

fn append_dir<W: Write>(tar: &mut tar::Builder<W>, path: &str) -> io::Result<()> {
    let mut header = header(tar::EntryType::Directory, 0o755);
    tar.append_data(&mut header, path, io::empty())
}
