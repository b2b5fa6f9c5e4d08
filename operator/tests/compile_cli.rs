//! `sallyport-operator compile` on the repository's `examples/` and on fixtures.

use clap::Parser;
use sallyport_api::FleetConfig;
use sallyport_operator::compile::command::{CommandError, run};
use sallyport_operator::{Cli, Command};

fn repo(path: &str) -> String {
    std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("..")
    .join(path)
    .display()
    .to_string()
}

/// Runs `sallyport-operator compile ARGS`: the result, stdout and stderr.
fn compile(args: &[&str]) -> (Result<(), CommandError>, String, String) {
    let cli = Cli::parse_from(["sallyport-operator", "compile"].iter().chain(args));
    let Some(Command::Compile(args)) = cli.command else {
        panic!("expected the compile command")
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let result = run(&args, &mut out, &mut err);
    (
        result,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

fn parse(json: &str) -> FleetConfig {
    FleetConfig::from_json(json.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{json}"))
}

#[test]
fn the_examples_compile_as_deployed() {
    let examples = repo("examples");
    let namespace = repo("operator/tests/fixtures/compile/examples-namespaces.yaml");
    let (result, out, err) = compile(&[
        "-n",
        "sallyport-system",
        "-f",
        &examples,
        "-f",
        &namespace,
        "--default-tls-secret",
        "sallyport-system/wildcard-tls",
        "--default-oidc-issuer",
        "https://login.example.com/",
        "--default-oidc-client-id",
        "sallyport",
        "--strict",
    ]);
    assert!(result.is_ok(), "{result:?}\n{err}");
    let config = parse(&out);
    let routes: Vec<(&str, &str)> = config
        .routes
        .iter()
        .map(|r| (r.app.as_str(), r.url.as_str()))
        .collect();
    assert_eq!(
        routes,
        [
            (
                "sallyport-system/status-page",
                "https://apps.example.com/status/"
            ),
            ("sallyport-system/wiki", "https://wiki.apps.example.com/"),
            (
                "sallyport-system/dev-environments",
                "https://*.dev.example.com/"
            ),
        ]
    );
    let policies: Vec<&str> = config.policies.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(
        policies,
        [
            "sallyport-system/block-high-risk",
            "sallyport-system/require-mfa-outside-office"
        ]
    );
    assert_eq!(
        config
            .route("sallyport-system/wiki")
            .map(|r| r.policies.len()),
        Some(2)
    );
    assert_eq!(config.connector_groups.len(), 2);
    assert!(err.contains("compiled 3 route(s)"), "{err}");
    assert!(!err.contains("skipped"), "{err}");
}

#[test]
fn the_examples_compile_in_one_namespace_and_report_what_does_not_resolve() {
    let (result, out, err) = compile(&["-f", &repo("examples")]);
    assert!(result.is_ok(), "{result:?}\n{err}");
    let config = parse(&out);
    assert!(config.routes.is_empty());
    assert_eq!(config.connector_groups.len(), 2);
    for line in [
        "skipped PublishedApp default/wiki: ConnectorGroupNotFound: ConnectorGroup sallyport-system/datacenter-east does not exist",
        "skipped PublishedApp default/dev-environments: TLSSecretNotConfigured",
    ] {
        assert!(err.contains(line), "{line} missing from\n{err}");
    }
}

#[test]
fn yaml_output_to_a_file_and_strict_mode() {
    let output =
        std::env::temp_dir().join(format!("sallyport-compile-{}.yaml", std::process::id()));
    let output_arg = output.display().to_string();
    let routes = repo("operator/tests/fixtures/compile/routes.yaml");
    let common = [
        "-f",
        routes.as_str(),
        "--default-tls-secret",
        "sallyport-system/wildcard-tls",
        "--default-oidc-issuer",
        "https://login.example.com/",
        "--default-oidc-client-id",
        "sallyport",
    ];
    let mut args = common.to_vec();
    args.extend(["--format", "yaml", "-o", &output_arg]);
    let (result, out, err) = compile(&args);
    assert!(result.is_ok(), "{result:?}\n{err}");
    assert!(out.is_empty());
    let yaml = std::fs::read_to_string(&output).unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_file(&output);
    let config: FleetConfig = serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.routes.len(), 7);
    assert_eq!(config.content_version().ok(), Some(config.version.clone()));

    let mut strict = common.to_vec();
    strict.push("--strict");
    let (result, out, err) = compile(&strict);
    assert!(matches!(result, Err(CommandError::Strict { count: 1 })));
    assert!(out.is_empty(), "no configuration under --strict");
    assert!(err.contains("team-a/wiki-copy: HostConflict"), "{err}");
}

#[test]
fn the_command_line_refuses_half_a_default_provider() {
    assert!(
        Cli::try_parse_from([
            "sallyport-operator",
            "compile",
            "-f",
            "x.yaml",
            "--default-oidc-issuer",
            "https://login.example.com/"
        ])
        .is_err()
    );
    assert!(Cli::try_parse_from(["sallyport-operator", "compile"]).is_err());
}

#[test]
fn a_directory_without_manifests_is_an_error() {
    let (result, _, _) = compile(&["-f", &repo("operator/tests/fixtures")]);
    let message = result.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.ends_with("holds no *.yaml or *.yml file"),
        "{message}"
    );
}
