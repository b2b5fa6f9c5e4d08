//! `images/Dockerfile` (for people with a container engine) and the engine-free build
//! agree: for each image, the user, entrypoint, env, exposed ports and labels that the
//! Dockerfile's final stage sets are the ones in the config `sallyport-image` writes,
//! the binary is copied to the entrypoint, and the rootfs files are the same.
//!
//! No engine runs here, so the Dockerfile is read with a small parser of the few
//! instructions it uses (FROM, ARG, ENV, LABEL, EXPOSE, USER, ENTRYPOINT, COPY, RUN,
//! WORKDIR), with line continuations and `${VAR}` substitution from ARGs.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::PathBuf;

use common::EPOCH;
use sallyport_image::catalog::Image;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One instruction: keyword (upper case) and the rest of the logical line.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue; // a comment inside a continued instruction
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    logical
        .into_iter()
        .map(|line| {
            let (keyword, rest) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
            (keyword.to_uppercase(), rest.trim().to_owned())
        })
        .collect()
}

/// `${NAME}` and `$NAME` replaced from `vars`.
fn substitute(text: &str, vars: &HashMap<String, String>) -> String {
    let mut out = text.to_owned();
    for (name, value) in vars {
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    assert!(!out.contains('$'), "an unknown variable in {text:?}");
    out
}

/// `key=value` pairs, values optionally double-quoted (with spaces inside).
fn pairs(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once('=')
            .unwrap_or_else(|| panic!("key=value expected in {text:?}"));
        let (value, after) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted
                    .find('"')
                    .unwrap_or_else(|| panic!("unclosed quote in {text:?}"));
                (quoted[..end].to_owned(), &quoted[end + 1..])
            }
            None => {
                let end = after.find(char::is_whitespace).unwrap_or(after.len());
                (after[..end].to_owned(), &after[end..])
            }
        };
        out.push((key.trim().to_owned(), value));
        rest = after.trim_start();
    }
    out
}

/// What a final stage of the Dockerfile makes.
#[derive(Debug, Default)]
struct Stage {
    base: String,
    user: Option<String>,
    entrypoint: Option<Vec<String>>,
    env: Vec<String>,
    labels: BTreeMap<String, String>,
    exposed: BTreeSet<String>,
    copies: Vec<String>,
    runs: Vec<String>,
}

/// Every stage of the Dockerfile by name, with `build_args` overriding ARG defaults.
fn stages(
    text: &str,
    build_args: &HashMap<&str, &str>,
) -> (BTreeMap<String, Stage>, HashMap<String, String>) {
    let mut global = HashMap::new();
    let mut stages = BTreeMap::new();
    let mut current: Option<(String, Stage, HashMap<String, String>)> = None;
    for (keyword, rest) in instructions(text) {
        if keyword == "FROM" {
            if let Some((name, stage, _)) = current.take() {
                stages.insert(name, stage);
            }
            let words: Vec<&str> = rest.split_whitespace().collect();
            let [base, as_, name] = words.as_slice() else {
                panic!("FROM <image> AS <name> expected: {rest}")
            };
            assert!(as_.eq_ignore_ascii_case("as"), "{rest}");
            let stage = Stage {
                base: substitute(base, &global),
                ..Stage::default()
            };
            current = Some(((*name).to_owned(), stage, HashMap::new()));
            continue;
        }
        if keyword == "ARG" {
            let (name, default) = match rest.split_once('=') {
                Some((name, default)) => (name.to_owned(), Some(default.to_owned())),
                None => (rest.clone(), None),
            };
            let value = build_args
                .get(name.as_str())
                .map(|v| (*v).to_owned())
                .or(default)
                .or_else(|| global.get(&name).cloned());
            match current.as_mut() {
                // A global ARG: its default reaches a stage that declares it again.
                None => {
                    global.insert(name, value.unwrap_or_default());
                }
                Some((_, _, vars)) => {
                    vars.insert(name, value.unwrap_or_default());
                }
            }
            continue;
        }
        let Some((_, stage, vars)) = current.as_mut() else {
            panic!("{keyword} before any FROM")
        };
        match keyword.as_str() {
            "ENV" => {
                for (key, value) in pairs(&substitute(&rest, vars)) {
                    stage.env.push(format!("{key}={value}"));
                }
            }
            "LABEL" => {
                for (key, value) in pairs(&substitute(&rest, vars)) {
                    stage.labels.insert(key, value);
                }
            }
            "EXPOSE" => stage
                .exposed
                .extend(rest.split_whitespace().map(str::to_owned)),
            "USER" => stage.user = Some(rest),
            "ENTRYPOINT" => {
                stage.entrypoint =
                    Some(serde_json::from_str(&rest).unwrap_or_else(|e| {
                        panic!("ENTRYPOINT must be exec form (JSON): {rest}: {e}")
                    }))
            }
            "COPY" => stage.copies.push(rest),
            "RUN" => stage.runs.push(rest),
            "WORKDIR" => {}
            other => {
                panic!("instruction {other} is not understood by this test; teach it or drop it")
            }
        }
    }
    if let Some((name, stage, _)) = current.take() {
        stages.insert(name, stage);
    }
    (stages, global)
}

#[test]
fn each_dockerfile_target_matches_the_engine_free_image() {
    let text = fs::read_to_string(repo().join("images/Dockerfile"))
        .unwrap_or_else(|e| panic!("images/Dockerfile: {e}"));
    let build_args = HashMap::from([("VERSION", "7.8.9"), ("REVISION", "feedc0de")]);
    let (stages, global) = stages(&text, &build_args);
    assert_eq!(
        global.get("VERSION").map(String::as_str),
        Some("7.8.9"),
        "the build arg reaches the global ARG"
    );
    let (_, defaults) = self::stages(&text, &HashMap::new());
    assert_eq!(
        defaults.get("VERSION").map(String::as_str),
        Some(env!("CARGO_PKG_VERSION")),
        "images/Dockerfile's default VERSION is the workspace version: bump it with the release"
    );

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    for image in Image::ALL {
        let stage = stages
            .get(image.target())
            .unwrap_or_else(|| panic!("images/Dockerfile has no target {}", image.target()));
        let layout = dir.path().join(image.target());
        common::build(
            image.target(),
            common::static_binary(),
            &layout,
            &["--version", "7.8.9", "--revision", "feedc0de"],
            EPOCH,
        );
        let config = common::verified(&layout)
            .config
            .config()
            .clone()
            .unwrap_or_else(|| panic!("no config"));
        let name = image.target();

        assert_eq!(
            stage.base, "scratch",
            "{name}: nothing but our files (no shell, no libc)"
        );
        assert_eq!(
            stage.user.as_deref(),
            config.user().as_deref(),
            "{name}: USER"
        );
        assert_eq!(
            stage.entrypoint.as_ref(),
            config.entrypoint().as_ref(),
            "{name}: ENTRYPOINT"
        );
        assert_eq!(Some(stage.env.clone()), config.env().clone(), "{name}: ENV");
        let exposed: BTreeSet<String> = config
            .exposed_ports()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        assert_eq!(stage.exposed, exposed, "{name}: EXPOSE");
        let labels: BTreeMap<String, String> = config
            .labels()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        assert_eq!(stage.labels, labels, "{name}: LABEL");
        assert!(stage.runs.is_empty(), "{name}: a scratch stage cannot RUN");

        // What the stage copies: the shared rootfs, and the binary to the entrypoint.
        let entrypoint = config.entrypoint().clone().unwrap_or_default();
        let binary_copy = format!(
            "--from=build /out/{} {}",
            image.name(),
            entrypoint.join(" ")
        );
        assert_eq!(
            stage.copies,
            vec!["--from=build /rootfs/ /".to_owned(), binary_copy],
            "{name}: COPY"
        );
    }

    // The rootfs the final stages copy is made of the same files the builder writes.
    let build = stages
        .get("build")
        .unwrap_or_else(|| panic!("images/Dockerfile has no build stage"));
    let runs = build.runs.join("\n");
    for needed in [
        "cp images/rootfs/etc/passwd images/rootfs/etc/group /rootfs/etc/",
        "chmod 0644 /rootfs/etc/passwd /rootfs/etc/group",
        "cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ca-certificates.crt",
        "chmod 1777 /rootfs/tmp",
        "--target x86_64-unknown-linux-musl",
        "-p sallyport-operator -p sallyport-proxy -p sallyport-connector",
    ] {
        assert!(
            runs.contains(needed),
            "the build stage runs {needed:?}: {runs}"
        );
    }
    let layer = common::layer_map(&dir.path().join("proxy"));
    for file in ["etc/passwd", "etc/group"] {
        let committed = fs::read(repo().join("images/rootfs").join(file))
            .unwrap_or_else(|e| panic!("images/rootfs/{file}: {e}"));
        assert_eq!(
            layer.get(file).map(|e| &e.content),
            Some(&committed),
            "{file} of the engine-free image is images/rootfs/{file}"
        );
    }
}

#[test]
fn the_parser_sees_a_disagreement() {
    // The comparison above is only worth something if a changed Dockerfile changes what
    // the parser reads.
    let text = fs::read_to_string(repo().join("images/Dockerfile"))
        .unwrap_or_else(|e| panic!("images/Dockerfile: {e}"));
    let changed = text.replacen("USER 65532:65532", "USER 0:0", 1).replacen(
        "EXPOSE 8443/tcp 8080/tcp",
        "EXPOSE 8443/tcp",
        1,
    );
    let (original, _) = stages(&text, &HashMap::new());
    let (edited, _) = stages(&changed, &HashMap::new());
    assert_eq!(original["operator"].user.as_deref(), Some("65532:65532"));
    assert_eq!(edited["operator"].user.as_deref(), Some("0:0"));
    assert_eq!(original["proxy"].exposed.len(), 2);
    assert_eq!(edited["proxy"].exposed.len(), 1);
    assert_eq!(
        original["proxy"]
            .labels
            .get("org.opencontainers.image.version")
            .map(String::as_str),
        Some(env!("CARGO_PKG_VERSION"))
    );
}
