//! The verifier catches a layout that was changed after it was built: a flipped byte in
//! the layer, an edited config, a truncated blob, a missing blob, a lying descriptor.
//! Each case starts from a layout that verifies, so each failure is the tampering's.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::EPOCH;
use sallyport_image::verify::{self, VerifyError};

/// A fresh, verified proxy layout in `dir`, and its image.
fn fresh(dir: &Path, name: &str) -> (PathBuf, verify::VerifiedImage) {
    let layout = dir.join(name);
    common::build("proxy", common::static_binary(), &layout, &[], EPOCH);
    let image = common::verified(&layout);
    (layout, image)
}

fn verify_fails(layout: &Path) -> VerifyError {
    match verify::verify(layout) {
        Ok(_) => panic!("the tampered layout {} verified", layout.display()),
        Err(error) => error,
    }
}

fn cli_verify_fails(layout: &Path, expect: &str) {
    let output = common::sallyport_image(&["verify", layout.to_str().unwrap_or_default()], EPOCH);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "sallyport-image verify accepted {}",
        layout.display()
    );
    assert!(stderr.contains(expect), "stderr names {expect:?}: {stderr}");
}

#[test]
fn a_flipped_byte_in_the_layer_is_a_digest_mismatch() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (layout, image) = fresh(dir.path(), "layer");
    let layer = image.manifest.layers()[0].digest().to_string();
    let path = common::blob(&layout, &layer);
    let mut bytes = fs::read(&path).unwrap_or_else(|e| panic!("read: {e}"));
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    fs::write(&path, &bytes).unwrap_or_else(|e| panic!("write: {e}"));
    match verify_fails(&layout) {
        VerifyError::Digest {
            digest,
            referenced_by,
            ..
        } => {
            assert_eq!(digest, layer);
            assert!(referenced_by.ends_with("layers[0]"), "{referenced_by}");
        }
        other => panic!("expected a digest mismatch of the layer, got: {other}"),
    }
    cli_verify_fails(&layout, "its content was changed");
    // Nor is it archived.
    let output = common::sallyport_image(
        &[
            "archive",
            layout.to_str().unwrap_or_default(),
            "--out",
            dir.path().join("x.tar").to_str().unwrap_or_default(),
        ],
        EPOCH,
    );
    assert!(
        !output.status.success(),
        "a tampered layout must not be archived"
    );
    assert!(!dir.path().join("x.tar").exists());
}

#[test]
fn an_edited_config_is_a_digest_mismatch() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (layout, image) = fresh(dir.path(), "config");
    let config = image.manifest.config().digest().to_string();
    let path = common::blob(&layout, &config);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read: {e}"));
    // Same length, so only the digest can tell: run as root instead.
    let edited = text.replace("\"User\":\"65532:65532\"", "\"User\":\"00000:00000\"");
    assert_ne!(edited, text, "the config names the user");
    assert_eq!(edited.len(), text.len());
    fs::write(&path, edited).unwrap_or_else(|e| panic!("write: {e}"));
    match verify_fails(&layout) {
        VerifyError::Digest {
            digest,
            referenced_by,
            ..
        } => {
            assert_eq!(digest, config);
            assert!(referenced_by.ends_with("config"), "{referenced_by}");
        }
        other => panic!("expected a digest mismatch of the config, got: {other}"),
    }
    cli_verify_fails(&layout, &config);
}

#[test]
fn a_truncated_layer_is_a_size_mismatch() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (layout, image) = fresh(dir.path(), "truncated");
    let layer = &image.manifest.layers()[0];
    let path = common::blob(&layout, layer.digest().as_ref());
    let bytes = fs::read(&path).unwrap_or_else(|e| panic!("read: {e}"));
    fs::write(&path, &bytes[..bytes.len() - 100]).unwrap_or_else(|e| panic!("write: {e}"));
    match verify_fails(&layout) {
        VerifyError::Size {
            expected, actual, ..
        } => {
            assert_eq!(expected, layer.size());
            assert_eq!(actual, layer.size() - 100);
        }
        other => panic!("expected a size mismatch, got: {other}"),
    }
}

#[test]
fn a_missing_blob_is_named() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (layout, image) = fresh(dir.path(), "missing");
    let layer = image.manifest.layers()[0].digest().to_string();
    fs::remove_file(common::blob(&layout, &layer)).unwrap_or_else(|e| panic!("rm: {e}"));
    match verify_fails(&layout) {
        VerifyError::MissingBlob { digest, .. } => assert_eq!(digest, layer),
        other => panic!("expected a missing blob, got: {other}"),
    }
}

#[test]
fn an_index_that_points_elsewhere_or_lies_about_size_is_caught() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let (layout, image) = fresh(dir.path(), "index");
    let index_path = layout.join("index.json");
    let original = fs::read_to_string(&index_path).unwrap_or_else(|e| panic!("read: {e}"));
    let size = image.manifest_descriptor.size();

    // The manifest's size, off by one.
    let lying = original.replace(
        &format!("\"size\":{size}"),
        &format!("\"size\":{}", size + 1),
    );
    assert_ne!(lying, original);
    fs::write(&index_path, &lying).unwrap_or_else(|e| panic!("write: {e}"));
    assert!(matches!(verify_fails(&layout), VerifyError::Size { .. }));

    // The manifest's entry pointing at the config blob: the wrong document.
    let config = image.manifest.config();
    let swapped = original
        .replace(
            image.manifest_descriptor.digest().as_ref(),
            config.digest().as_ref(),
        )
        .replace(
            &format!("\"size\":{size}"),
            &format!("\"size\":{}", config.size()),
        );
    fs::write(&index_path, &swapped).unwrap_or_else(|e| panic!("write: {e}"));
    assert!(
        matches!(
            verify_fails(&layout),
            VerifyError::Parse {
                what: "image manifest",
                ..
            }
        ),
        "a config is not a manifest"
    );

    // A wrong media type for the manifest.
    let media = original.replace(
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.config.v1+json",
    );
    fs::write(&index_path, &media).unwrap_or_else(|e| panic!("write: {e}"));
    assert!(matches!(
        verify_fails(&layout),
        VerifyError::MediaType { .. }
    ));

    // Restored, it verifies again: the failures above were the edits'.
    fs::write(&index_path, &original).unwrap_or_else(|e| panic!("write: {e}"));
    common::verified(&layout);
}
