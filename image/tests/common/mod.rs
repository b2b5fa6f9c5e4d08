//! Helpers of the image tests: real static and dynamic binaries compiled here, the real
//! `sallyport-image` binary, and the layer read back from a layout.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use flate2::read::GzDecoder;
use sallyport_image::verify::{self, VerifiedImage};

/// The SOURCE_DATE_EPOCH of the tests: 2023-11-14T22:13:20Z.
pub const EPOCH: i64 = 1_700_000_000;

/// What the test binary prints for `--version`.
pub const VERSION_LINE: &str = "sallyport-image-test 1.0.0";

const PROGRAM: &str = r#"
fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("--version") => println!("sallyport-image-test 1.0.0"),
        _ => std::process::exit(2),
    }
}
"#;

fn work_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sallyport-image-tests")
}

/// Compiles the test program with rustc for `target` (None: the host), once per test
/// process.
fn compile(name: &str, target: Option<&str>) -> PathBuf {
    let dir = work_dir();
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let source = dir.join("program.rs");
    fs::write(&source, PROGRAM).unwrap_or_else(|e| panic!("write {}: {e}", source.display()));
    let out = dir.join(format!("{name}-{}", std::process::id()));
    let mut rustc = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned()));
    rustc
        .args(["--edition", "2021", "-O", "-C", "strip=symbols", "-o"])
        .arg(&out)
        .arg(&source);
    if let Some(target) = target {
        rustc.args(["--target", target]);
    }
    let output = rustc.output().unwrap_or_else(|e| panic!("run rustc: {e}"));
    assert!(
        output.status.success(),
        "rustc --target {target:?} failed (for the musl target: bash hack/install-image-tools.sh): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

/// A static x86_64 binary (Rust's musl target) that prints [`VERSION_LINE`] for
/// `--version`.
pub fn static_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| compile("static", Some("x86_64-unknown-linux-musl")))
}

/// The same program linked dynamically against glibc (the host target).
pub fn dynamic_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| compile("dynamic", None))
}

/// The host's CA bundle, which the builder installs by default.
pub const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Runs the real `sallyport-image` with `args` and `SOURCE_DATE_EPOCH=epoch`.
pub fn sallyport_image(args: &[&str], epoch: i64) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sallyport-image"))
        .args(args)
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap_or_else(|e| panic!("run sallyport-image: {e}"))
}

/// Builds `image` (a catalog name: operator, proxy, connector) from `binary` into `out`
/// and panics unless it succeeds; returns the manifest digest it printed.
pub fn build(image: &str, binary: &Path, out: &Path, extra: &[&str], epoch: i64) -> String {
    let binary = binary
        .to_str()
        .unwrap_or_else(|| panic!("binary path is not UTF-8"));
    let out_arg = out
        .to_str()
        .unwrap_or_else(|| panic!("out path is not UTF-8"));
    let mut args = vec![
        "build", "--image", image, "--binary", binary, "--out", out_arg,
    ];
    args.extend_from_slice(extra);
    let output = sallyport_image(&args, epoch);
    assert!(
        output.status.success(),
        "sallyport-image build failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    stdout
        .split_whitespace()
        .last()
        .unwrap_or_else(|| panic!("no digest in the build's output: {stdout:?}"))
        .to_owned()
}

/// The layout's one image, verified.
pub fn verified(layout: &Path) -> VerifiedImage {
    let mut images =
        verify::verify(layout).unwrap_or_else(|e| panic!("verify {}: {e}", layout.display()));
    assert_eq!(images.len(), 1, "one image per layout");
    images.remove(0)
}

/// The path of a blob of `layout`.
pub fn blob(layout: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    layout.join("blobs").join("sha256").join(hex)
}

/// One entry of a layer tar, as its header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    pub kind: char,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub content: Vec<u8>,
}

/// The entries of the image's only layer, in tar order, read with the tar crate.
pub fn layer_entries(layout: &Path) -> Vec<(String, TarEntry)> {
    let image = verified(layout);
    let layer = image
        .manifest
        .layers()
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("no layer"));
    let file = fs::File::open(blob(layout, layer.digest().as_ref()))
        .unwrap_or_else(|e| panic!("open the layer: {e}"));
    let mut archive = tar::Archive::new(GzDecoder::new(file));
    let mut entries = Vec::new();
    for entry in archive
        .entries()
        .unwrap_or_else(|e| panic!("read the layer: {e}"))
    {
        let mut entry = entry.unwrap_or_else(|e| panic!("read a layer entry: {e}"));
        let header = entry.header().clone();
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let mut content = Vec::new();
        entry
            .read_to_end(&mut content)
            .unwrap_or_else(|e| panic!("read {path}: {e}"));
        let kind = match header.entry_type() {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Regular => 'f',
            other => panic!("unexpected entry type {other:?} for {path}"),
        };
        entries.push((
            path,
            TarEntry {
                kind,
                mode: header.mode().unwrap_or_else(|e| panic!("mode: {e}")),
                uid: header.uid().unwrap_or_else(|e| panic!("uid: {e}")),
                gid: header.gid().unwrap_or_else(|e| panic!("gid: {e}")),
                mtime: header.mtime().unwrap_or_else(|e| panic!("mtime: {e}")),
                content,
            },
        ));
    }
    entries
}

/// The layer's entries by path.
pub fn layer_map(layout: &Path) -> BTreeMap<String, TarEntry> {
    layer_entries(layout).into_iter().collect()
}

/// The path of a tool the tests need, or a panic naming the script that installs it.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not on PATH: run `bash hack/install-image-tools.sh` (as root)")
        })
}

/// Runs a tool and panics unless it succeeds; returns its stdout.
pub fn run_ok(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
