//! Independent OCI tools accept what `sallyport-image` writes: skopeo (containers/image,
//! what podman and CRI-O use) inspects and copies the layout and the oci-archive without
//! changing the manifest digest, and refuses a tampered blob; umoci unpacks the image
//! into a runtime bundle that runs the binary as 65532:65532, and the binary runs from
//! the unpacked root filesystem.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{EPOCH, VERSION_LINE};

const REFERENCE: &str = "ghcr.io/sallyport-dev/sallyport-proxy:0.1.0";

fn transport(kind: &str, path: &Path, reference: &str) -> String {
    format!("{kind}:{}:{reference}", path.display())
}

#[test]
fn skopeo_inspects_and_copies_the_layout_and_the_archive_keeping_the_digest() {
    let skopeo = common::tool("skopeo");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let layout = dir.path().join("proxy");
    let digest = common::build("proxy", common::static_binary(), &layout, &[], EPOCH);

    let inspect: serde_json::Value = serde_json::from_str(&common::run_ok(
        Command::new(&skopeo).args(["inspect", &transport("oci", &layout, REFERENCE)]),
    ))
    .unwrap_or_else(|e| panic!("skopeo inspect JSON: {e}"));
    assert_eq!(inspect["Digest"], digest.as_str());
    assert_eq!(inspect["Architecture"], "amd64");
    assert_eq!(inspect["Os"], "linux");
    assert_eq!(
        inspect["Labels"]["org.opencontainers.image.title"],
        "sallyport-proxy"
    );
    let config: serde_json::Value =
        serde_json::from_str(&common::run_ok(Command::new(&skopeo).args([
            "inspect",
            "--config",
            &transport("oci", &layout, REFERENCE),
        ])))
        .unwrap_or_else(|e| panic!("skopeo inspect --config JSON: {e}"));
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(
        config["config"]["Entrypoint"][0],
        "/usr/local/bin/sallyport-proxy"
    );

    // Layout → layout: skopeo reads and checks every blob; the copy is the same image.
    let copy = dir.path().join("copy");
    common::run_ok(Command::new(&skopeo).args([
        "copy",
        "--quiet",
        &transport("oci", &layout, REFERENCE),
        &transport("oci", &copy, "copied"),
    ]));
    assert_eq!(
        common::verified(&copy)
            .manifest_descriptor
            .digest()
            .to_string(),
        digest
    );

    // The oci-archive podman load and skopeo take, and back.
    let archive = dir.path().join("proxy.oci.tar");
    let output = common::sallyport_image(
        &[
            "archive",
            layout.to_str().unwrap_or_default(),
            "--out",
            archive.to_str().unwrap_or_default(),
        ],
        EPOCH,
    );
    assert!(
        output.status.success(),
        "archive: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let from_archive: serde_json::Value = serde_json::from_str(&common::run_ok(
        Command::new(&skopeo).args(["inspect", &transport("oci-archive", &archive, REFERENCE)]),
    ))
    .unwrap_or_else(|e| panic!("skopeo inspect oci-archive JSON: {e}"));
    assert_eq!(from_archive["Digest"], digest.as_str());
    let unpacked = dir.path().join("from-archive");
    common::run_ok(Command::new(&skopeo).args([
        "copy",
        "--quiet",
        &transport("oci-archive", &archive, REFERENCE),
        &transport("oci", &unpacked, "x"),
    ]));
    assert_eq!(
        common::verified(&unpacked)
            .manifest_descriptor
            .digest()
            .to_string(),
        digest
    );
    // The archive is reproducible too.
    let again = dir.path().join("again.oci.tar");
    let output = common::sallyport_image(
        &[
            "archive",
            layout.to_str().unwrap_or_default(),
            "--out",
            again.to_str().unwrap_or_default(),
        ],
        EPOCH,
    );
    assert!(output.status.success());
    assert_eq!(
        fs::read(&archive).ok(),
        fs::read(&again).ok(),
        "same layout, same archive bytes"
    );
}

#[test]
fn skopeo_refuses_a_tampered_layer_as_our_verifier_does() {
    let skopeo = common::tool("skopeo");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let layout = dir.path().join("proxy");
    common::build("proxy", common::static_binary(), &layout, &[], EPOCH);
    let image = common::verified(&layout);
    let path = common::blob(&layout, image.manifest.layers()[0].digest().as_ref());
    let mut bytes = fs::read(&path).unwrap_or_else(|e| panic!("read: {e}"));
    let at = bytes.len() / 3;
    bytes[at] ^= 0x80;
    fs::write(&path, bytes).unwrap_or_else(|e| panic!("write: {e}"));
    let output = Command::new(&skopeo)
        .args([
            "copy",
            "--quiet",
            &transport("oci", &layout, REFERENCE),
            &transport("oci", &dir.path().join("copy"), "x"),
        ])
        .output()
        .unwrap_or_else(|e| panic!("skopeo: {e}"));
    assert!(!output.status.success(), "skopeo copied a tampered layer");
    assert!(sallyport_image::verify::verify(&layout).is_err());
}

#[test]
fn umoci_unpacks_a_bundle_that_runs_the_static_binary_as_nonroot() {
    let umoci = common::tool("umoci");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let layout = dir.path().join("connector");
    common::build("connector", common::static_binary(), &layout, &[], EPOCH);
    let bundle = dir.path().join("bundle");
    common::run_ok(
        Command::new(&umoci)
            .args(["unpack", "--rootless", "--image"])
            .arg(format!(
                "{}:ghcr.io/sallyport-dev/sallyport-connector:0.1.0",
                layout.display()
            ))
            .arg(&bundle),
    );
    let runtime: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(bundle.join("config.json"))
            .unwrap_or_else(|e| panic!("bundle config.json: {e}")),
    )
    .unwrap_or_else(|e| panic!("runtime config JSON: {e}"));
    assert_eq!(runtime["process"]["user"]["uid"], 65532);
    assert_eq!(runtime["process"]["user"]["gid"], 65532);
    assert_eq!(
        runtime["process"]["args"],
        serde_json::json!(["/usr/local/bin/sallyport-connector"])
    );
    let env = runtime["process"]["env"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        env.contains(&serde_json::json!(
            "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
        )),
        "{env:?}"
    );
    assert!(
        env.contains(&serde_json::json!("HOME=/nonexistent")),
        "umoci read /etc/passwd: {env:?}"
    );

    let rootfs = bundle.join("rootfs");
    let tmp_mode = fs::metadata(rootfs.join("tmp"))
        .unwrap_or_else(|e| panic!("rootfs/tmp: {e}"))
        .permissions()
        .mode();
    assert_eq!(tmp_mode & 0o7777, 0o1777);
    assert!(!rootfs.join("bin/sh").exists(), "no shell in the image");
    let version = common::run_ok(
        Command::new(rootfs.join("usr/local/bin/sallyport-connector"))
            .arg("--version")
            .env_clear(),
    );
    assert_eq!(version.trim(), VERSION_LINE);
}
