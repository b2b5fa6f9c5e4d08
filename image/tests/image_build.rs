//! `sallyport-image build` on a real static binary: the layout a consumer would accept,
//! the config, the layer's files, the binary running after extraction, reproducibility,
//! and the refusal of a dynamic binary.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::{EPOCH, HOST_CA_BUNDLE, VERSION_LINE};
use oci_spec::image::{Arch, ImageIndex, ImageManifest, MediaType, Os};
use sha2::{Digest, Sha256};

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

#[test]
fn the_layout_chains_index_manifest_config_and_layer_with_matching_digests() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let layout = dir.path().join("proxy");
    let printed = common::build("proxy", common::static_binary(), &layout, &[], EPOCH);

    // Read by hand, not through the verifier: every blob hashes to its name and the
    // descriptors' sizes and media types are the ones the image-spec asks for.
    assert_eq!(
        fs::read_to_string(layout.join("oci-layout")).unwrap_or_else(|e| panic!("oci-layout: {e}")),
        r#"{"imageLayoutVersion":"1.0.0"}"#
    );
    let blobs = layout.join("blobs/sha256");
    let mut names = BTreeSet::new();
    for entry in fs::read_dir(&blobs).unwrap_or_else(|e| panic!("read {}: {e}", blobs.display())) {
        let entry = entry.unwrap_or_else(|e| panic!("blob entry: {e}"));
        let bytes = fs::read(entry.path()).unwrap_or_else(|e| panic!("read blob: {e}"));
        let name = entry.file_name().to_string_lossy().into_owned();
        assert_eq!(sha256_hex(&bytes), name, "blob {name} hashes to its name");
        names.insert(name);
    }
    let index =
        ImageIndex::from_file(layout.join("index.json")).unwrap_or_else(|e| panic!("index: {e}"));
    assert_eq!(index.schema_version(), 2);
    assert_eq!(index.media_type(), &Some(MediaType::ImageIndex));
    let [entry] = index.manifests().as_slice() else {
        panic!("one manifest in index.json: {:?}", index.manifests())
    };
    assert_eq!(entry.media_type(), &MediaType::ImageManifest);
    assert_eq!(
        format!("{}", entry.digest()),
        printed,
        "the build printed the manifest digest"
    );
    assert_eq!(
        entry
            .annotations()
            .as_ref()
            .and_then(|a| a.get("org.opencontainers.image.ref.name"))
            .map(String::as_str),
        Some("ghcr.io/sallyport-dev/sallyport-proxy:0.1.0")
    );
    let manifest_bytes = fs::read(common::blob(&layout, entry.digest().as_ref()))
        .unwrap_or_else(|e| panic!("manifest blob: {e}"));
    assert_eq!(manifest_bytes.len() as u64, entry.size());
    let manifest = ImageManifest::from_reader(manifest_bytes.as_slice())
        .unwrap_or_else(|e| panic!("manifest: {e}"));
    assert_eq!(manifest.schema_version(), 2);
    assert_eq!(manifest.media_type(), &Some(MediaType::ImageManifest));
    assert_eq!(manifest.config().media_type(), &MediaType::ImageConfig);
    let [layer] = manifest.layers().as_slice() else {
        panic!("one layer: {:?}", manifest.layers())
    };
    assert_eq!(layer.media_type(), &MediaType::ImageLayerGzip);
    for descriptor in [manifest.config(), layer] {
        let path = common::blob(&layout, descriptor.digest().as_ref());
        let size = fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .len();
        assert_eq!(size, descriptor.size(), "size of {}", descriptor.digest());
    }
    let referenced: BTreeSet<String> = [entry.digest(), manifest.config().digest(), layer.digest()]
        .iter()
        .map(|d| d.digest().to_owned())
        .collect();
    assert_eq!(
        names, referenced,
        "the layout holds exactly the referenced blobs"
    );

    // The config's diff ID is the digest of the uncompressed layer.
    let image = common::verified(&layout);
    let compressed = fs::read(common::blob(&layout, layer.digest().as_ref()))
        .unwrap_or_else(|e| panic!("layer: {e}"));
    let mut tar = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(compressed.as_slice()),
        &mut tar,
    )
    .unwrap_or_else(|e| panic!("gunzip the layer: {e}"));
    assert_eq!(
        image.config.rootfs().diff_ids(),
        &vec![format!("sha256:{}", sha256_hex(&tar))]
    );
    assert_eq!(image.config.architecture(), &Arch::Amd64);
    assert_eq!(image.config.os(), &Os::Linux);
}

#[test]
fn the_config_runs_the_binary_as_nonroot_with_labels_and_a_fixed_creation_time() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    for (image, name, ports) in [
        ("operator", "sallyport-operator", vec!["8080/tcp"]),
        ("proxy", "sallyport-proxy", vec!["8080/tcp", "8443/tcp"]),
        ("connector", "sallyport-connector", vec![]),
    ] {
        let layout = dir.path().join(image);
        common::build(
            image,
            common::static_binary(),
            &layout,
            &["--version", "1.2.3", "--revision", "0123abcd"],
            EPOCH,
        );
        let verified = common::verified(&layout);
        let config = verified
            .config
            .config()
            .clone()
            .unwrap_or_else(|| panic!("{image}: no config"));
        assert_eq!(config.user().as_deref(), Some("65532:65532"), "{image}");
        assert_eq!(
            config.entrypoint(),
            &Some(vec![format!("/usr/local/bin/{name}")]),
            "{image}"
        );
        assert_eq!(config.cmd(), &None, "{image}: no default command");
        let mut exposed = config.exposed_ports().clone().unwrap_or_default();
        exposed.sort();
        assert_eq!(exposed, ports, "{image}");
        assert!(
            config
                .env()
                .clone()
                .unwrap_or_default()
                .contains(&"SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt".to_owned()),
            "{image}: {:?}",
            config.env()
        );
        let labels = config.labels().clone().unwrap_or_default();
        for (key, value) in [
            ("org.opencontainers.image.title", name),
            ("org.opencontainers.image.version", "1.2.3"),
            ("org.opencontainers.image.revision", "0123abcd"),
            ("org.opencontainers.image.licenses", "Apache-2.0"),
            (
                "org.opencontainers.image.source",
                "https://github.com/sallyport-dev/sallyport",
            ),
        ] {
            assert_eq!(
                labels.get(key).map(String::as_str),
                Some(value),
                "{image}: label {key}"
            );
        }
        assert_eq!(
            verified.config.created().as_deref(),
            Some("2023-11-14T22:13:20Z"),
            "{image}"
        );
        assert_eq!(
            verified.reference.as_deref(),
            Some(format!("ghcr.io/sallyport-dev/{name}:1.2.3").as_str())
        );
        let annotations = verified.manifest.annotations().clone().unwrap_or_default();
        assert_eq!(
            annotations
                .get("org.opencontainers.image.created")
                .map(String::as_str),
            Some("2023-11-14T22:13:20Z")
        );
        assert_eq!(
            annotations
                .get("org.opencontainers.image.version")
                .map(String::as_str),
            Some("1.2.3")
        );
    }
}

#[test]
fn the_layer_holds_the_static_binary_the_nonroot_user_tmp_and_the_ca_bundle() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let layout = dir.path().join("connector");
    common::build("connector", common::static_binary(), &layout, &[], EPOCH);
    let entries = common::layer_entries(&layout);
    let paths: Vec<&str> = entries.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "etc/",
            "etc/group",
            "etc/passwd",
            "etc/ssl/",
            "etc/ssl/certs/",
            "etc/ssl/certs/ca-certificates.crt",
            "tmp/",
            "usr/",
            "usr/local/",
            "usr/local/bin/",
            "usr/local/bin/sallyport-connector",
        ],
        "sorted, parents first, nothing else (no shell, no libc)"
    );
    for (path, entry) in &entries {
        assert_eq!(
            (entry.uid, entry.gid),
            (0, 0),
            "{path} belongs to root: the runtime user cannot change it"
        );
        assert_eq!(
            entry.mtime, EPOCH as u64,
            "{path}: mtime is SOURCE_DATE_EPOCH"
        );
    }
    let by_path = common::layer_map(&layout);
    let get = |path: &str| {
        by_path
            .get(path)
            .unwrap_or_else(|| panic!("{path} in the layer"))
    };
    assert_eq!((get("tmp/").kind, get("tmp/").mode), ('d', 0o1777));
    assert_eq!(get("usr/local/bin/sallyport-connector").mode, 0o755);
    assert_eq!(get("etc/passwd").mode, 0o644);
    let passwd = String::from_utf8_lossy(&get("etc/passwd").content).into_owned();
    assert!(
        passwd
            .lines()
            .any(|l| l == "nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin"),
        "{passwd}"
    );
    let group = String::from_utf8_lossy(&get("etc/group").content).into_owned();
    assert!(group.lines().any(|l| l == "nonroot:x:65532:"), "{group}");
    let host_bundle = fs::read(HOST_CA_BUNDLE).unwrap_or_else(|e| panic!("{HOST_CA_BUNDLE}: {e}"));
    assert_eq!(
        get("etc/ssl/certs/ca-certificates.crt").content,
        host_bundle
    );

    // The binary, extracted, is the static one and runs with nothing around it.
    let binary = dir.path().join("extracted-connector");
    fs::write(&binary, &get("usr/local/bin/sallyport-connector").content)
        .unwrap_or_else(|e| panic!("write: {e}"));
    fs::set_permissions(&binary, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod: {e}"));
    let headers = common::run_ok(
        Command::new(common::tool("readelf"))
            .args(["--program-headers", "--wide"])
            .arg(&binary),
    );
    assert!(
        headers.contains("LOAD"),
        "readelf read the program headers: {headers}"
    );
    assert!(
        !headers.contains("INTERP"),
        "no program interpreter: {headers}"
    );
    let file = common::run_ok(Command::new(common::tool("file")).arg(&binary));
    assert!(
        file.contains("static"),
        "file(1) says statically linked: {file}"
    );
    let version = common::run_ok(Command::new(&binary).arg("--version").env_clear());
    assert_eq!(version.trim(), VERSION_LINE);
}

#[test]
fn the_same_inputs_give_the_same_digest_and_another_time_another_one() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    // Separate processes: the image-spec types keep labels and ports in HashMaps whose
    // order differs from process to process.
    let first = common::build(
        "proxy",
        common::static_binary(),
        &dir.path().join("a"),
        &[],
        EPOCH,
    );
    let second = common::build(
        "proxy",
        common::static_binary(),
        &dir.path().join("b"),
        &[],
        EPOCH,
    );
    assert_eq!(first, second, "two builds of the same inputs");
    for file in ["index.json", "oci-layout"] {
        assert_eq!(
            fs::read(dir.path().join("a").join(file)).unwrap_or_else(|e| panic!("{file}: {e}")),
            fs::read(dir.path().join("b").join(file)).unwrap_or_else(|e| panic!("{file}: {e}")),
            "{file}"
        );
    }
    // Rebuilding over an existing layout replaces it and gives the same digest again.
    let again = common::build(
        "proxy",
        common::static_binary(),
        &dir.path().join("a"),
        &[],
        EPOCH,
    );
    assert_eq!(first, again);
    // The inputs do count: another time, another image.
    let later = common::build(
        "proxy",
        common::static_binary(),
        &dir.path().join("c"),
        &[],
        EPOCH + 1,
    );
    assert_ne!(first, later, "SOURCE_DATE_EPOCH is part of the image");
    let other = common::build(
        "connector",
        common::static_binary(),
        &dir.path().join("d"),
        &[],
        EPOCH,
    );
    assert_ne!(first, other);
}

#[test]
fn a_dynamically_linked_binary_is_refused() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let out = dir.path().join("proxy");
    let binary = common::dynamic_binary()
        .to_str()
        .unwrap_or_else(|| panic!("utf-8"))
        .to_owned();
    let output = common::sallyport_image(
        &[
            "build",
            "--image",
            "proxy",
            "--binary",
            &binary,
            "--out",
            out.to_str().unwrap_or_default(),
        ],
        EPOCH,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a glibc binary must be refused");
    assert!(
        stderr.contains("dynamically linked") && stderr.contains("PT_INTERP"),
        "{stderr}"
    );
    assert!(!out.exists(), "nothing written");
}

#[test]
fn a_directory_that_is_not_a_layout_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let out = dir.path().join("precious");
    fs::create_dir(&out).unwrap_or_else(|e| panic!("mkdir: {e}"));
    fs::write(out.join("notes.txt"), "keep me").unwrap_or_else(|e| panic!("write: {e}"));
    let binary = common::static_binary()
        .to_str()
        .unwrap_or_else(|| panic!("utf-8"))
        .to_owned();
    let output = common::sallyport_image(
        &[
            "build",
            "--image",
            "proxy",
            "--binary",
            &binary,
            "--out",
            out.to_str().unwrap_or_default(),
        ],
        EPOCH,
    );
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("neither empty nor an OCI image layout")
    );
    assert_eq!(
        fs::read_to_string(out.join("notes.txt")).unwrap_or_default(),
        "keep me"
    );
}
