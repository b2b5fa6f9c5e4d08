//! `sallyport-operator compile`: the fleet configuration from manifests on disk.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use sallyport_api::FleetConfig;
use sallyport_api::fleet_config::SecretRef;

use super::manifests::{ManifestError, Manifests};
use super::{CompileError, DefaultOidcClient, FleetDefaults, compile};

/// Settings of `sallyport-operator compile`.
#[derive(Debug, Args)]
#[command(
    after_help = "The configuration goes to stdout (or -o FILE); the objects left out, \
with the reason their status would give, and a summary go to stderr.\n\n\
Examples:\n  \
sallyport-operator compile -f deploy/ -n team-a --default-tls-secret sallyport-system/wildcard-tls -o fleet-config.json\n  \
kubectl get publishedapps,connectorgroups,conditionalaccesspolicies,connectors,namespaces -A -o yaml | sallyport-operator compile -f -"
)]
pub struct CompileArgs {
    /// A manifest file, a directory whose *.yaml and *.yml files are read (not its
    /// sub-directories), or - for stdin. Repeat for more.
    #[arg(short = 'f', long = "filename", value_name = "FILE_OR_DIR", required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,

    /// Write the configuration to FILE instead of stdout.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// The namespace of objects that name none.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,

    /// The operator's namespace: ConditionalAccessPolicies placed there apply to every
    /// PublishedApp of the fleet.
    #[arg(long, default_value = "sallyport-system")]
    pub operator_namespace: String,

    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,

    /// The TLS Secret, as NAMESPACE/NAME, served for apps without spec.tls.
    #[arg(long, value_name = "NAMESPACE/NAME", value_parser = parse_secret_ref)]
    pub default_tls_secret: Option<SecretRef>,

    /// The issuer URL of the fleet's default OpenID Connect provider, for apps that name
    /// none.
    #[arg(long, value_name = "URL", requires = "default_oidc_client_id")]
    pub default_oidc_issuer: Option<String>,

    /// The client ID of the fleet at its default provider.
    #[arg(long, value_name = "ID", requires = "default_oidc_issuer")]
    pub default_oidc_client_id: Option<String>,

    /// A revoked connector, as the NAMESPACE/NAME of its deleted Connector object.
    /// Repeat for more.
    #[arg(long = "revoked-connector", value_name = "NAMESPACE/NAME")]
    pub revoked_connectors: Vec<String>,

    /// Fail, writing no configuration, when any object is left out.
    #[arg(long)]
    pub strict: bool,
}

/// How the configuration is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Indented JSON.
    Json,
    /// YAML.
    Yaml,
}

impl CompileArgs {
    /// The fleet defaults these arguments describe.
    pub fn defaults(&self) -> FleetDefaults {
        FleetDefaults {
            tls_secret: self.default_tls_secret.clone(),
            oidc: self
                .default_oidc_issuer
                .clone()
                .zip(self.default_oidc_client_id.clone())
                .map(|(issuer, client)| DefaultOidcClient::new(issuer, client)),
            ..FleetDefaults::default()
        }
    }
}

fn parse_secret_ref(text: &str) -> Result<SecretRef, String> {
    match text.split_once('/') {
        Some((namespace, name))
            if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
        {
            Ok(SecretRef {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
        }
        _ => Err(format!("{text:?} is not NAMESPACE/NAME")),
    }
}

/// `sallyport-operator compile` failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The manifests could not be read.
    #[error(transparent)]
    Manifests(#[from] ManifestError),
    /// The objects could not be compiled.
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// Rendering the configuration as JSON failed.
    #[error("cannot render the configuration as JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// Rendering the configuration as YAML failed.
    #[error("cannot render the configuration as YAML: {0}")]
    Yaml(#[source] serde_yaml::Error),
    /// Writing the configuration or the report failed.
    #[error("cannot write to {target}: {source}")]
    Write {
        /// The file, stdout or stderr.
        target: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `--strict` and objects were left out.
    #[error("{count} object(s) left out of the configuration (--strict)")]
    Strict {
        /// How many.
        count: usize,
    },
}

/// Compiles the manifests `args` names; the configuration goes to `out` (or the output
/// file), the objects left out and a summary to `report`.
pub fn run(
    args: &CompileArgs,
    out: &mut impl Write,
    report: &mut impl Write,
) -> Result<(), CommandError> {
    let mut manifests = Manifests::default();
    for path in &args.files {
        manifests.read_path(path, &args.namespace)?;
    }
    let defaults = args.defaults();
    let compiled = compile(&manifests.inputs(
        &args.operator_namespace,
        &defaults,
        &args.revoked_connectors,
    ))?;

    let to_report = |source| CommandError::Write {
        target: "stderr".to_owned(),
        source,
    };
    for skipped in &compiled.skipped {
        writeln!(report, "skipped {skipped}").map_err(to_report)?;
    }
    let config = &compiled.config;
    writeln!(
        report,
        "compiled {} route(s), {} policy(ies), {} connector group(s), {} revoked connector(s); {} object(s) left out, {} of other kinds ignored; version {}",
        config.routes.len(),
        config.policies.len(),
        config.connector_groups.len(),
        config.revoked_connectors.len(),
        compiled.skipped.len(),
        manifests.ignored,
        config.version,
    )
    .map_err(to_report)?;
    if args.strict && !compiled.skipped.is_empty() {
        return Err(CommandError::Strict {
            count: compiled.skipped.len(),
        });
    }

    let text = render(config, args.format)?;
    match &args.output {
        Some(path) => std::fs::write(path, text).map_err(|source| CommandError::Write {
            target: path.display().to_string(),
            source,
        }),
        None => out
            .write_all(text.as_bytes())
            .map_err(|source| CommandError::Write {
                target: "stdout".to_owned(),
                source,
            }),
    }
}

/// The configuration as text in `format`, ending with a newline.
pub fn render(config: &FleetConfig, format: Format) -> Result<String, CommandError> {
    match format {
        Format::Json => serde_json::to_string_pretty(config)
            .map(|json| json + "\n")
            .map_err(CommandError::Json),
        Format::Yaml => serde_yaml::to_string(config).map_err(CommandError::Yaml),
    }
}
