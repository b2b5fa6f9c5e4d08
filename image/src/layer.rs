//! The one layer of an image: the whole root filesystem as a gzip-compressed tar.
//!
//! The tar is reproducible: entries sorted by path, every parent directory listed before
//! its children, fixed modification time, numeric owners without names, and gzip with no
//! name and a zero timestamp in its header.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;

use flate2::{Compression, GzBuilder};
use oci_spec::image::Sha256Digest;

use crate::blobs::{BlobError, BlobStore, Hashing};
use crate::catalog::{CA_BUNDLE, GROUP, Image, PASSWD};

/// What a file of the root filesystem holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A directory.
    Directory,
    /// A small file, in memory.
    Bytes(Vec<u8>),
    /// A file copied from the build machine, streamed.
    File(PathBuf),
}

/// One entry of the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Permission bits (with the sticky bit for `/tmp`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Directory or file content.
    pub content: Content,
}

/// The root filesystem of `image`, keyed by path without the leading `/`; directories end
/// in `/`. Parents are added for every file.
pub fn rootfs(image: Image, binary: PathBuf, ca_bundle: Vec<u8>) -> BTreeMap<String, Entry> {
    let file = |mode, content| Entry {
        mode,
        uid: 0,
        gid: 0,
        content,
    };
    let mut entries = BTreeMap::new();
    let mut add = |path: &str, entry: Entry| {
        let path = path.trim_start_matches('/');
        let body = path.trim_end_matches('/');
        for (end, _) in body.match_indices('/') {
            entries
                .entry(format!("{}/", &body[..end]))
                .or_insert_with(|| file(0o755, Content::Directory));
        }
        entries.insert(path.to_owned(), entry);
    };
    add("/etc/passwd", file(0o644, Content::Bytes(PASSWD.into())));
    add("/etc/group", file(0o644, Content::Bytes(GROUP.into())));
    add(CA_BUNDLE, file(0o644, Content::Bytes(ca_bundle)));
    // World-writable with the sticky bit, as on any Linux: the one place the non-root
    // user may write when no volume is mounted (pods mount an emptyDir here).
    add("/tmp/", file(0o1777, Content::Directory));
    add(&image.binary_path(), file(0o755, Content::File(binary)));
    entries
}

/// The written layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Digest of the compressed blob.
    pub digest: Sha256Digest,
    /// Size of the compressed blob.
    pub size: u64,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids`).
    pub diff_id: Sha256Digest,
}

/// Writes `entries` as a gzip tar blob into `store`, every entry stamped `mtime`.
pub fn write(
    store: &mut BlobStore,
    entries: &BTreeMap<String, Entry>,
    mtime: u64,
) -> Result<Layer, BlobError> {
    let (diff_id, digest, size) = store.put_streamed(|compressed| {
        let gzip = GzBuilder::new()
            .mtime(0)
            .write(compressed, Compression::best());
        let mut tar = tar::Builder::new(Hashing::new(gzip));
        for (path, entry) in entries {
            append(&mut tar, path, entry, mtime)?;
        }
        let (gzip, diff_id, _) = tar.into_inner()?.finish();
        gzip.finish()?;
        Ok(diff_id)
    })?;
    Ok(Layer {
        digest,
        size,
        diff_id,
    })
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    entry: &Entry,
    mtime: u64,
) -> io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_mode(entry.mode);
    header.set_uid(entry.uid.into());
    header.set_gid(entry.gid.into());
    header.set_mtime(mtime);
    match &entry.content {
        Content::Directory => {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            tar.append_data(&mut header, path, io::empty())
        }
        Content::Bytes(bytes) => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(bytes.len() as u64);
            tar.append_data(&mut header, path, bytes.as_slice())
        }
        Content::File(source) => {
            let file = File::open(source).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot read {}: {e}", source.display()))
            })?;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(file.metadata()?.len());
            tar.append_data(&mut header, path, file)
        }
    }
}
