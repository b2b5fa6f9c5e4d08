//! `sallyport-operator whatif`: what conditional access decides for a sign-in described
//! on the command line, and why, like the reference product's What If tool.
//!
//! The objects are read from the cluster or from manifests on disk and compiled with the
//! operator's own compile step ([`crate::compile::compile`]) into the fleet
//! configuration the proxies load; the app's route, with the policies that step applies
//! to it, is then decided by the same engine the proxies run
//! ([`sallyport_policy::PolicySet`]). The answer is therefore the proxies' answer for
//! the same sign-in, by construction.
//!
//! - [`sources`] reads the objects (the only IO besides printing);
//! - [`decide`] compiles the policies and decides (pure);
//! - [`render`] writes the answer for people; `--output json` writes the sign-in log
//!   line instead.

pub mod decide;
pub mod render;
pub mod sources;

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, Args, ValueEnum};
use jiff::Timestamp;
use sallyport_api::PublishedApp;
use sallyport_api::conditional_access_policy::{ClientPlatform, RiskLevel};
use sallyport_api::fleet_config::SecretRef;
use sallyport_policy::{
    MfaSettings, SignInContext, SignInEvent, SignInStage, platform_from_user_agent,
};

use crate::compile::manifests::{ManifestError, Manifests};
use crate::compile::{
    CompileError, DefaultOidcClient, FleetDefaults, compile, split_namespaced_name,
};

/// The exit code when the decision is anything but `allowed`.
pub const NOT_ALLOWED_EXIT_CODE: u8 = 3;

/// Settings of `sallyport-operator whatif`.
#[derive(Debug, Args)]
#[command(
    group(ArgGroup::new("who").args(["user", "email"]).required(true).multiple(true)),
    after_help = "The objects come from the cluster (the in-cluster service account or \
$KUBECONFIG; listing PublishedApps, ConnectorGroups, ConditionalAccessPolicies and \
Namespaces is enough) or, with --from-file, from manifests on disk. They are compiled by \
the operator's own compile step, and the app's policies decided by the proxies' own \
engine, so the answer is the proxies' answer. The fleet's default TLS Secret and OIDC \
provider are assumed to exist: no decision depends on them.\n\n\
Exit status: 0 when the decision is allowed; 3 when it is notAssigned, blocked, denied or \
stepUp; 1 when no decision could be made (unknown app, Passthrough app, unreadable \
sources); 2 for invalid arguments.\n\n\
Examples:\n  \
sallyport-operator whatif --app team-a/wiki --user alice@example.com --group staff --ip 203.0.113.7 --platform windows\n  \
sallyport-operator whatif --app team-a/wiki --user alice --ip 10.20.1.5 --amr pwd --amr mfa \\\n      \
--time 2026-01-05T20:00:00+01:00 --auth-time 2026-01-05T08:00:00+01:00 -f deploy/ -o json"
)]
pub struct WhatIfArgs {
    /// The PublishedApp signed in to.
    #[arg(long, value_name = "NAMESPACE/NAME", value_parser = parse_app)]
    pub app: String,

    /// The user name, as the provider's `preferred_username` claim gives it.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,

    /// The user's e-mail address (the `email` claim); the user name when --user is left
    /// out.
    #[arg(long, value_name = "ADDRESS")]
    pub email: Option<String>,

    /// A group of the user (the `groups` claim). Repeat for more.
    #[arg(long = "group", value_name = "GROUP")]
    pub groups: Vec<String>,

    /// The client's IP address, as the proxy sees it.
    #[arg(long, value_name = "ADDRESS")]
    pub ip: IpAddr,

    /// When the sign-in happens, RFC 3339 with an offset. Default: now.
    #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
    pub time: Option<Timestamp>,

    /// The client platform. Default: unknown (policies that include platforms do not
    /// apply).
    #[arg(long, value_enum, ignore_case = true, conflicts_with = "user_agent")]
    pub platform: Option<Platform>,

    /// The client's User-Agent, read for its platform as the proxy reads it.
    #[arg(long, value_name = "TEXT")]
    pub user_agent: Option<String>,

    /// An authentication method of the sign-in (the ID token's `amr`), e.g. `pwd`,
    /// `mfa`, `otp`, `hwk`. Repeat for more.
    #[arg(long = "amr", value_name = "METHOD")]
    pub amr: Vec<String>,

    /// The authentication context class of the sign-in (the ID token's `acr`).
    #[arg(long, value_name = "VALUE")]
    pub acr: Option<String>,

    /// When the user last authenticated at the provider (`auth_time`), RFC 3339.
    /// Default: --time, a fresh sign-in.
    #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
    pub auth_time: Option<Timestamp>,

    /// The sign-in's risk level.
    #[arg(long, value_enum, default_value_t = Risk::None)]
    pub sign_in_risk: Risk,

    /// The user's risk level.
    #[arg(long, value_enum, default_value_t = Risk::None)]
    pub user_risk: Risk,

    /// An `acr` value that means the user completed MFA, as the proxies'
    /// --mfa-acr-value; also what a step-up for MFA requests. Repeat for more.
    #[arg(long = "mfa-acr-value", value_name = "ACR")]
    pub mfa_acr_values: Vec<String>,

    /// The operator's namespace: ConditionalAccessPolicies placed there apply to every
    /// PublishedApp of the fleet.
    #[arg(long, value_name = "NAMESPACE", default_value = "sallyport-system")]
    pub operator_namespace: String,

    /// Read the objects from a manifest file, a directory of *.yaml and *.yml files (not
    /// its sub-directories) or - for stdin, instead of the cluster. Repeat for more.
    #[arg(short = 'f', long = "from-file", value_name = "FILE_OR_DIR")]
    pub from_files: Vec<PathBuf>,

    /// With --from-file: the namespace of objects that name none. Default: the app's.
    #[arg(short = 'n', long, value_name = "NAMESPACE", requires = "from_files")]
    pub namespace: Option<String>,

    /// `text` for people; `json` (indented) or `json-line` for the sign-in log line the
    /// proxies would write (stage `whatIf`).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// A client platform, spelled as policies spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Platform {
    /// Microsoft Windows.
    #[value(name = "windows")]
    Windows,
    /// Apple macOS.
    #[value(name = "macOS")]
    MacOs,
    /// Linux desktops.
    #[value(name = "linux")]
    Linux,
    /// Apple iOS and iPadOS.
    #[value(name = "iOS")]
    Ios,
    /// Android.
    #[value(name = "android")]
    Android,
}

impl From<Platform> for ClientPlatform {
    fn from(platform: Platform) -> Self {
        match platform {
            Platform::Windows => Self::Windows,
            Platform::MacOs => Self::MacOs,
            Platform::Linux => Self::Linux,
            Platform::Ios => Self::Ios,
            Platform::Android => Self::Android,
        }
    }
}

/// A risk level, or none detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Risk {
    /// No risk detected.
    None,
    /// Low risk.
    Low,
    /// Medium risk.
    Medium,
    /// High risk.
    High,
}

impl Risk {
    fn level(self) -> Option<RiskLevel> {
        match self {
            Self::None => None,
            Self::Low => Some(RiskLevel::Low),
            Self::Medium => Some(RiskLevel::Medium),
            Self::High => Some(RiskLevel::High),
        }
    }
}

/// How the answer is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// The decision, its reason and a table of the policies.
    Text,
    /// The sign-in log line, indented.
    Json,
    /// The sign-in log line, on one line.
    JsonLine,
}

fn parse_app(text: &str) -> Result<String, String> {
    match split_namespaced_name(text) {
        Some(_) => Ok(text.to_owned()),
        None => Err(format!(
            "{text:?} is not NAMESPACE/NAME (the PublishedApp's namespace and name)"
        )),
    }
}

fn parse_time(text: &str) -> Result<Timestamp, String> {
    text.parse::<Timestamp>().map_err(|error| {
        format!(
            "{text:?} is not an RFC 3339 time with an offset, such as 2026-01-05T09:30:00Z: {error}"
        )
    })
}

/// `sallyport-operator whatif` could not decide.
#[derive(Debug, thiserror::Error)]
pub enum WhatIfError {
    /// The arguments contradict each other.
    #[error("{flag}: {message}")]
    InvalidArgument {
        /// The flag at fault.
        flag: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The manifests could not be read.
    #[error(transparent)]
    Manifests(#[from] ManifestError),
    /// The async runtime for the cluster's client could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// No client for the cluster could be made.
    #[error(
        "cannot reach the cluster (in-cluster service account or $KUBECONFIG); use --from-file to read manifests instead: {0}"
    )]
    Client(#[source] kube::Error),
    /// Listing objects failed.
    #[error("cannot list {what} in the cluster: {source}")]
    List {
        /// The kind listed.
        what: &'static str,
        /// The API error.
        source: kube::Error,
    },
    /// The objects could not be compiled at all.
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// The app does not exist.
    #[error("there is no PublishedApp {app}")]
    AppNotFound {
        /// `namespace/name`.
        app: String,
    },
    /// The compile step leaves the app out: the proxies do not serve it.
    #[error(
        "PublishedApp {app} is not served ({reason}: {message}); no sign-in reaches its policies"
    )]
    AppNotServed {
        /// `namespace/name`.
        app: String,
        /// Why, as its status says.
        reason: &'static str,
        /// What to fix.
        message: String,
    },
    /// The app is not signed in to.
    #[error(
        "PublishedApp {app} uses spec.preAuthentication.type Passthrough: nobody signs in, so conditional access does not apply to it"
    )]
    Passthrough {
        /// `namespace/name`.
        app: String,
    },
    /// Rendering the sign-in log line failed.
    #[error("cannot render the answer as JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// Writing the answer failed.
    #[error("cannot write the answer: {0}")]
    Write(#[source] std::io::Error),
}

/// The sign-in the arguments describe, owning what [`SignInContext`] borrows.
#[derive(Debug, Clone, PartialEq)]
pub struct SignIn {
    user_name: String,
    email: Option<String>,
    groups: Vec<String>,
    client_ip: IpAddr,
    platform: Option<ClientPlatform>,
    now: Timestamp,
    auth_time: Timestamp,
    amr: Vec<String>,
    acr: Option<String>,
    sign_in_risk: Option<RiskLevel>,
    user_risk: Option<RiskLevel>,
}

impl SignIn {
    /// The sign-in of `args`, at `now` unless `--time` says otherwise.
    pub fn new(args: &WhatIfArgs, now: Timestamp) -> Result<Self, WhatIfError> {
        let now = args.time.unwrap_or(now);
        let auth_time = args.auth_time.unwrap_or(now);
        if auth_time > now {
            return Err(WhatIfError::InvalidArgument {
                flag: "--auth-time",
                message: format!(
                    "{auth_time} is after the sign-in's time {now}; a user authenticates before they use the app"
                ),
            });
        }
        let Some(user_name) = args.user.clone().or_else(|| args.email.clone()) else {
            // Clap requires one of them; checked again for callers that build the args.
            return Err(WhatIfError::InvalidArgument {
                flag: "--user",
                message: "give --user, --email or both".to_owned(),
            });
        };
        let platform = match (&args.platform, &args.user_agent) {
            (Some(platform), _) => Some(ClientPlatform::from(*platform)),
            (None, Some(user_agent)) => platform_from_user_agent(user_agent),
            (None, None) => None,
        };
        Ok(Self {
            user_name,
            email: args.email.clone(),
            groups: args.groups.clone(),
            client_ip: args.ip,
            platform,
            now,
            auth_time,
            amr: args.amr.clone(),
            acr: args.acr.clone(),
            sign_in_risk: args.sign_in_risk.level(),
            user_risk: args.user_risk.level(),
        })
    }

    /// The sign-in as the engine sees it.
    pub fn context(&self) -> SignInContext<'_> {
        SignInContext {
            user_name: &self.user_name,
            email: self.email.as_deref(),
            groups: &self.groups,
            client_ip: self.client_ip,
            platform: self.platform,
            now: self.now,
            auth_time: self.auth_time,
            amr: &self.amr,
            acr: self.acr.as_deref(),
            sign_in_risk: self.sign_in_risk,
            user_risk: self.user_risk,
        }
    }
}

/// Stand-ins for the fleet's default TLS Secret and OIDC provider, which the tool cannot
/// know: they make an app that relies on them compile as it does in the operator, and no
/// decision depends on them.
fn stand_in_defaults() -> FleetDefaults {
    FleetDefaults {
        tls_secret: Some(SecretRef {
            namespace: "what-if".to_owned(),
            name: "fleet-default-tls".to_owned(),
        }),
        oidc: Some(DefaultOidcClient::new(
            "https://fleet-default-provider.invalid/",
            "what-if",
        )),
        ..FleetDefaults::default()
    }
}

/// Decides the sign-in `args` describes, writing the answer to `out` and warnings to
/// `report`. Ok with exit code 0 when allowed, [`NOT_ALLOWED_EXIT_CODE`] otherwise.
pub fn run(
    args: &WhatIfArgs,
    out: &mut impl Write,
    report: &mut impl Write,
) -> Result<ExitCode, WhatIfError> {
    // Whole seconds: the answer reads better, and no decision turns on a fraction.
    let now = Timestamp::now();
    let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
    let sign_in = SignIn::new(args, now)?;
    let from_cluster = args.from_files.is_empty();
    let manifests = if from_cluster {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(WhatIfError::Runtime)?;
        runtime.block_on(async {
            let client = kube::Client::try_default()
                .await
                .map_err(WhatIfError::Client)?;
            sources::from_cluster(&client).await
        })?
    } else {
        let app_namespace = args.app.split('/').next().unwrap_or_default();
        let namespace = args.namespace.as_deref().unwrap_or(app_namespace);
        sources::from_files(&args.from_files, namespace)?
    };
    answer(args, &sign_in, &manifests, from_cluster, out, report)
}

/// Decides `sign_in` over the objects of `manifests` and prints the answer; warns when
/// the cluster's status of the app says the proxies do not serve it (`from_cluster`).
pub fn answer(
    args: &WhatIfArgs,
    sign_in: &SignIn,
    manifests: &Manifests,
    from_cluster: bool,
    out: &mut impl Write,
    report: &mut impl Write,
) -> Result<ExitCode, WhatIfError> {
    let defaults = stand_in_defaults();
    let compiled = compile(&manifests.inputs(&args.operator_namespace, &defaults, &[]))?;
    let context = sign_in.context();
    let mfa = MfaSettings {
        acr_values: args.mfa_acr_values.clone(),
    };
    let answer = decide::decide(
        &compiled.config,
        &compiled.skipped,
        &args.app,
        mfa,
        &context,
    )?;
    if from_cluster {
        for warning in status_warnings(&manifests.apps, &args.app) {
            writeln!(report, "warning: {warning}").map_err(WhatIfError::Write)?;
        }
    }
    for error in &answer.compile_errors {
        writeln!(
            report,
            "warning: {error}; the proxies block everyone this policy names until it is fixed"
        )
        .map_err(WhatIfError::Write)?;
    }
    let event = SignInEvent::new(
        &answer.route.app,
        SignInStage::WhatIf,
        &context,
        &answer.decision,
    );
    let text = match args.output {
        Output::Text => render::text(&answer, &context, &event),
        Output::Json => serde_json::to_string_pretty(&event).map_err(WhatIfError::Json)? + "\n",
        Output::JsonLine => event.to_json() + "\n",
    };
    out.write_all(text.as_bytes()).map_err(WhatIfError::Write)?;
    Ok(if answer.decision.outcome.is_allowed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(NOT_ALLOWED_EXIT_CODE)
    })
}

/// What the app's status in the cluster says against serving it: its `Accepted` and
/// `ResolvedRefs` conditions when False (a missing Secret, say, which the tool does not
/// read).
fn status_warnings(apps: &[PublishedApp], app: &str) -> Vec<String> {
    let Some(found) = apps.iter().find(|a| {
        format!(
            "{}/{}",
            a.metadata.namespace.as_deref().unwrap_or_default(),
            a.metadata.name.as_deref().unwrap_or_default()
        ) == app
    }) else {
        return Vec::new();
    };
    let conditions = found
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    conditions
        .iter()
        .filter(|c| (c.type_ == "Accepted" || c.type_ == "ResolvedRefs") && c.status == "False")
        .map(|c| {
            format!(
                "PublishedApp {app} has {}=False ({}: {}): the proxies do not serve it until that is fixed; below is what they will decide once they do",
                c.type_, c.reason, c.message
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::compile::fixtures::{self, GROUP_DC};
    use crate::{Cli, Command};

    /// Besides [`GROUP_DC`]: an OIDC app with four policies, one a fleet-wide baseline; a
    /// Passthrough app; an app whose ConnectorGroup is missing.
    const MANIFESTS: &str = "
apiVersion: sallyport.dev/v1alpha1
kind: PublishedApp
metadata: {name: wiki, namespace: team-a, labels: {tier: internal}}
spec:
  externalUrl: https://wiki.example.com/
  internalUrl: http://wiki.corp.internal/
  connectorGroup: {name: dc}
  assignment: {groups: [staff, contractors]}
---
apiVersion: sallyport.dev/v1alpha1
kind: PublishedApp
metadata: {name: status, namespace: team-a}
spec:
  externalUrl: https://status.example.com/
  internalUrl: http://status.corp.internal/
  connectorGroup: {name: dc}
  preAuthentication: {type: Passthrough}
---
apiVersion: sallyport.dev/v1alpha1
kind: PublishedApp
metadata: {name: orphan, namespace: team-a}
spec:
  externalUrl: https://orphan.example.com/
  internalUrl: http://orphan.corp.internal/
  connectorGroup: {name: gone}
---
apiVersion: sallyport.dev/v1alpha1
kind: ConditionalAccessPolicy
metadata: {name: block-range, namespace: team-a}
spec:
  assignments: {apps: {selector: {matchLabels: {tier: internal}}}, users: {include: ['*']}}
  conditions: {locations: {include: [198.51.100.0/24]}}
  grant: {block: true}
---
apiVersion: sallyport.dev/v1alpha1
kind: ConditionalAccessPolicy
metadata: {name: require-mfa, namespace: team-a}
spec:
  assignments: {apps: {names: [wiki]}, groups: {include: [staff]}}
  grant: {require: {mfa: true}}
  session: {signInFrequency: 8h}
---
apiVersion: sallyport.dev/v1alpha1
kind: ConditionalAccessPolicy
metadata: {name: report-android, namespace: team-a}
spec:
  state: ReportOnly
  assignments: {apps: {selector: {}}, users: {include: ['*']}}
  conditions: {clientPlatforms: [android]}
  grant: {block: true}
---
apiVersion: sallyport.dev/v1alpha1
kind: ConditionalAccessPolicy
metadata: {name: baseline, namespace: sallyport-system}
spec:
  assignments: {apps: {selector: {}}, users: {include: ['*']}}
  conditions: {signInRisk: [high]}
  grant: {block: true}
";

    fn manifests() -> Manifests {
        fixtures::manifests(&[GROUP_DC, MANIFESTS])
    }

    fn parse(extra: &[&str]) -> Result<WhatIfArgs, clap::Error> {
        let args = ["sallyport-operator", "whatif"].iter().chain(extra);
        Cli::try_parse_from(args).map(|cli| match cli.command {
            Some(Command::WhatIf(args)) => args,
            other => panic!("expected whatif, got {other:?}"),
        })
    }

    fn args(extra: &[&str]) -> WhatIfArgs {
        parse(extra).unwrap_or_else(|e| panic!("{e}"))
    }

    const NOON: &str = "2026-01-05T12:00:00Z";

    /// The answer as `(exit code, stdout, stderr)`.
    fn ask(extra: &[&str]) -> Result<(ExitCode, String, String), WhatIfError> {
        let args = args(extra);
        let now: Timestamp = NOON.parse().unwrap_or_else(|e| panic!("{e}"));
        let sign_in = SignIn::new(&args, now)?;
        let (mut out, mut report) = (Vec::new(), Vec::new());
        let code = answer(&args, &sign_in, &manifests(), false, &mut out, &mut report)?;
        Ok((
            code,
            String::from_utf8_lossy(&out).into_owned(),
            String::from_utf8_lossy(&report).into_owned(),
        ))
    }

    fn json(extra: &[&str]) -> (ExitCode, serde_json::Value) {
        let mut all = extra.to_vec();
        all.extend(["-o", "json"]);
        let (code, out, _) = ask(&all).unwrap_or_else(|e| panic!("{e}"));
        let value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        (code, value)
    }

    /// `(id, result)` of every policy of a sign-in log line.
    fn results(event: &serde_json::Value) -> Vec<(String, String)> {
        event["policies"]
            .as_array()
            .map(|policies| {
                policies
                    .iter()
                    .map(|p| {
                        (
                            p["id"].as_str().unwrap_or_default().to_owned(),
                            p["result"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn arguments_are_parsed_and_checked() {
        let parsed = args(&[
            "--app",
            "team-a/wiki",
            "--user",
            "alice",
            "--group",
            "staff",
            "--group",
            "ops",
            "--ip",
            "2001:db8::1",
            "--platform",
            "MACOS",
            "--amr",
            "pwd",
            "--amr",
            "otp",
            "--sign-in-risk",
            "medium",
            "--mfa-acr-value",
            "phr",
            "--time",
            "2026-01-05T09:30:00+01:00",
        ]);
        assert_eq!(parsed.app, "team-a/wiki");
        assert_eq!(parsed.groups, ["staff", "ops"]);
        assert_eq!(parsed.platform, Some(Platform::MacOs));
        assert_eq!(parsed.amr, ["pwd", "otp"]);
        assert_eq!(parsed.sign_in_risk, Risk::Medium);
        assert_eq!(parsed.user_risk, Risk::None);
        assert_eq!(parsed.mfa_acr_values, ["phr"]);
        assert_eq!(parsed.operator_namespace, "sallyport-system");
        assert_eq!(parsed.output, Output::Text);
        assert!(parsed.from_files.is_empty());
        assert_eq!(
            parsed.time.map(|t| t.to_string()).as_deref(),
            Some("2026-01-05T08:30:00Z")
        );

        let base = [
            "--app",
            "team-a/wiki",
            "--user",
            "alice",
            "--ip",
            "192.0.2.1",
        ];
        let with = |extra: &[&str]| parse(&[&base[..], extra].concat());
        assert!(with(&[]).is_ok());
        for (bad, why) in [
            (&["--app", "wiki"][..], "an app without its namespace"),
            (&["--app", "team-a/wiki/x"], "a path, not an app"),
            (&["--ip", "192.0.2.300"], "not an IP address"),
            (&["--time", "2026-01-05T09:30:00"], "a time without offset"),
            (&["--auth-time", "yesterday"], "not a time"),
            (&["--platform", "beos"], "an unknown platform"),
            (&["--platform", "linux", "--user-agent", "X11"], "both"),
            (&["--sign-in-risk", "extreme"], "an unknown risk level"),
            (&["-n", "team-b"], "-n without --from-file"),
            (&["-o", "yaml"], "an unknown output"),
        ] {
            assert!(with(bad).is_err(), "{why} was accepted: {bad:?}");
        }
        let no_user = parse(&["--app", "team-a/wiki", "--ip", "192.0.2.1"]);
        assert!(no_user.is_err(), "no --user nor --email was accepted");
        let email_only = args(&["--app", "a/b", "--email", "Bob@x.org", "--ip", "192.0.2.1"]);
        assert!(email_only.user.is_none());
        assert_eq!(email_only.time, None, "--time defaults to now, at run time");
    }

    #[test]
    fn the_sign_in_follows_the_arguments() {
        let now: Timestamp = NOON.parse().unwrap_or_else(|e| panic!("{e}"));
        let base = [
            "--app",
            "a/b",
            "--email",
            "bob@example.com",
            "--ip",
            "10.0.0.1",
        ];
        let sign_in = SignIn::new(&args(&base), now).unwrap_or_else(|e| panic!("{e}"));
        let context = sign_in.context();
        assert_eq!(context.user_name, "bob@example.com", "the e-mail stands in");
        assert_eq!(context.email, Some("bob@example.com"));
        assert_eq!((context.now, context.auth_time), (now, now));
        assert_eq!(context.platform, None);
        assert_eq!(context.sign_in_risk, None);

        let android = "Mozilla/5.0 (Linux; Android 14; Pixel 8) Mobile";
        let sign_in = SignIn::new(
            &args(&[&base[..], &["--user-agent", android, "--user-risk", "high"]].concat()),
            now,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sign_in.context().platform, Some(ClientPlatform::Android));
        assert_eq!(sign_in.context().user_risk, Some(RiskLevel::High));

        let later = SignIn::new(
            &args(&[&base[..], &["--auth-time", "2026-01-05T12:00:01Z"]].concat()),
            now,
        );
        assert!(
            matches!(
                later,
                Err(WhatIfError::InvalidArgument {
                    flag: "--auth-time",
                    ..
                })
            ),
            "{later:?}"
        );
    }

    const WIKI: [&str; 2] = ["--app", "team-a/wiki"];
    /// A user the require-mfa policy names.
    const ALICE: [&str; 4] = ["--user", "alice", "--group", "staff"];
    /// A user no policy of the app names (besides those for everyone).
    const CAROL: [&str; 4] = ["--user", "carol", "--group", "contractors"];

    /// The arguments of a sign-in to team-a/wiki by `who` from `ip`, then `extra`.
    fn on_wiki(
        who: &[&'static str],
        ip: &'static str,
        extra: &[&'static str],
    ) -> Vec<&'static str> {
        [&WIKI[..], who, &["--ip", ip], extra].concat()
    }

    #[test]
    fn a_user_outside_every_policy_is_allowed() {
        let (code, event) = json(&on_wiki(&CAROL, "203.0.113.9", &[]));
        assert_eq!(code, ExitCode::SUCCESS);
        assert_eq!(event["decision"], "allowed");
        assert_eq!(event["stage"], "whatIf");
        assert_eq!(event["app"], "team-a/wiki");
        assert_eq!(event["time"], NOON);
        assert_eq!(
            results(&event),
            [
                ("sallyport-system/baseline".into(), "notApplied".into()),
                ("team-a/block-range".into(), "notApplied".into()),
                (
                    "team-a/report-android".into(),
                    "reportOnlyNotApplied".into()
                ),
                ("team-a/require-mfa".into(), "notApplied".into()),
            ]
        );
    }

    #[test]
    fn the_text_answer_names_the_decision_and_every_policy() {
        let (code, out, report) = ask(&on_wiki(
            &ALICE,
            "203.0.113.9",
            &[
                "--platform",
                "android",
                "--mfa-acr-value",
                "phr",
                "--mfa-acr-value",
                "phrh",
            ],
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(code, ExitCode::from(NOT_ALLOWED_EXIT_CODE));
        assert_eq!(report, "");
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines.contains(&"App:       team-a/wiki (https://wiki.example.com/)"),
            "{out}"
        );
        assert!(
            lines.contains(&"Client:    203.0.113.9 (public), platform android"),
            "{out}"
        );
        assert!(lines.contains(&"Decision:  stepUp"), "{out}");
        assert!(
            lines.contains(&"Reason:    policies team-a/require-mfa require multi-factor authentication: the user must sign in again"),
            "{out}"
        );
        assert!(
            lines.contains(&"Step-up:   the proxy sends the user back to the provider with acr_values=phr phrh max_age=(none)"),
            "{out}"
        );
        assert!(
            lines.contains(
                &"Session:   sign-in frequency 8h, re-authentication due at 2026-01-05T20:00:00Z"
            ),
            "{out}"
        );
        // Columns are padded: split on runs of two or more spaces.
        let table: Vec<Vec<&str>> = lines
            .iter()
            .skip_while(|l| !l.starts_with("POLICY"))
            .map(|l| {
                l.split("  ")
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .collect()
            })
            .collect();
        assert_eq!(
            table,
            [
                vec!["POLICY", "STATE", "RESULT", "WHY"],
                vec![
                    "sallyport-system/baseline",
                    "enabled",
                    "notApplied",
                    "not applied: the sign-in risk level is not included"
                ],
                vec![
                    "team-a/block-range",
                    "enabled",
                    "notApplied",
                    "not applied: the client IP is in no included location"
                ],
                vec![
                    "team-a/report-android",
                    "reportOnly",
                    "reportOnlyFailure",
                    "applies and blocks access"
                ],
                vec![
                    "team-a/require-mfa",
                    "enabled",
                    "failure",
                    "applies; not met: multi-factor authentication"
                ],
            ]
        );
    }

    #[test]
    fn mfa_in_the_sign_in_satisfies_the_policy_until_the_sign_in_frequency_lapses() {
        let fresh = on_wiki(&ALICE, "203.0.113.9", &["--amr", "pwd", "--amr", "mfa"]);
        let (code, event) = json(&fresh);
        assert_eq!(
            (code, event["decision"].as_str()),
            (ExitCode::SUCCESS, Some("allowed"))
        );

        let by_acr = on_wiki(
            &ALICE,
            "203.0.113.9",
            &["--acr", "phr", "--mfa-acr-value", "phr"],
        );
        assert_eq!(json(&by_acr).1["decision"], "allowed");

        let stale = [&fresh[..], &["--auth-time", "2026-01-05T03:59:59Z"]].concat();
        let (code, out, _) = ask(&stale).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(code, ExitCode::from(NOT_ALLOWED_EXIT_CODE));
        assert!(out.contains("Decision:  stepUp\n"), "{out}");
        assert!(out.contains("max_age=28800 (8h)"), "{out}");
        assert!(out.contains("applies; not met: a recent sign-in"), "{out}");
    }

    #[test]
    fn blocks_win_and_report_only_never_decides() {
        let (_, event) = json(&on_wiki(&ALICE, "198.51.100.7", &["--amr", "mfa"]));
        assert_eq!(event["decision"], "blocked");
        assert_eq!(event["reason"], "blocked by policy team-a/block-range");

        let (_, event) = json(&on_wiki(&CAROL, "203.0.113.9", &["--sign-in-risk", "high"]));
        assert_eq!(event["decision"], "blocked");
        assert_eq!(
            event["reason"],
            "blocked by policy sallyport-system/baseline"
        );

        // Report-only fails, and still allowed.
        let (code, event) = json(&on_wiki(&CAROL, "203.0.113.9", &["--platform", "android"]));
        assert_eq!(
            (code, event["decision"].as_str()),
            (ExitCode::SUCCESS, Some("allowed"))
        );
        assert!(
            results(&event).contains(&("team-a/report-android".into(), "reportOnlyFailure".into()))
        );
    }

    #[test]
    fn a_user_the_app_does_not_assign_is_not_assigned() {
        let (code, out, _) = ask(&on_wiki(&["--user", "mallory"], "203.0.113.9", &[]))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(code, ExitCode::from(NOT_ALLOWED_EXIT_CODE));
        assert!(out.contains("Decision:  notAssigned\n"), "{out}");
        assert!(
            out.contains("No policy was evaluated: the user is not assigned to the app."),
            "{out}"
        );

        let (_, out, _) = ask(&on_wiki(
            &["--user", "mallory"],
            "203.0.113.9",
            &["-o", "json-line"],
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.contains("\"decision\":\"notAssigned\""), "{out}");
    }

    #[test]
    fn apps_without_a_sign_in_are_named_in_the_error() {
        let who = ["--user", "alice", "--ip", "203.0.113.9"];
        let error = |app: &str| {
            ask(&[&["--app", app][..], &who].concat())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert_eq!(error("team-a/nope"), "there is no PublishedApp team-a/nope");
        assert!(
            error("team-a/status").starts_with(
                "PublishedApp team-a/status uses spec.preAuthentication.type Passthrough"
            ),
            "{}",
            error("team-a/status")
        );
        assert!(
            error("team-a/orphan")
                .starts_with("PublishedApp team-a/orphan is not served (ConnectorGroupNotFound: "),
            "{}",
            error("team-a/orphan")
        );
    }

    #[test]
    fn manifests_are_read_from_files_and_directories() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        // Objects without a namespace land in the app's.
        let without_namespace =
            format!("{GROUP_DC}---{MANIFESTS}").replace(", namespace: team-a", "");
        std::fs::write(dir.path().join("objects.yaml"), without_namespace)
            .unwrap_or_else(|e| panic!("{e}"));
        let read = sources::from_files(&[dir.path().to_owned()], "team-b")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read.apps.len(), 3);
        assert_eq!(read.apps[0].metadata.namespace.as_deref(), Some("team-b"));
        assert_eq!(read.policies.len(), 4);
        let missing = sources::from_files(&[dir.path().join("nope.yaml")], "team-b");
        assert!(matches!(missing, Err(WhatIfError::Manifests(_))));
    }

    #[test]
    fn the_cluster_status_of_an_app_warns_when_it_is_not_served() {
        let mut apps = manifests().apps;
        apps[0].status = serde_json::from_value(serde_json::json!({"conditions": [
            {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "", "lastTransitionTime": NOON},
            {"type": "ResolvedRefs", "status": "False", "reason": "TLSSecretNotFound", "message": "Secret team-a/wiki-tls not found", "lastTransitionTime": NOON},
            {"type": "Ready", "status": "False", "reason": "RefsNotResolved", "message": "", "lastTransitionTime": NOON},
        ]}))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            status_warnings(&apps, "team-a/wiki"),
            [
                "PublishedApp team-a/wiki has ResolvedRefs=False (TLSSecretNotFound: Secret team-a/wiki-tls not found): the proxies do not serve it until that is fixed; below is what they will decide once they do"
            ]
        );
        assert!(status_warnings(&apps, "team-a/status").is_empty());
    }

    #[test]
    fn session_controls_are_shown_in_force_and_per_policy() {
        const CONTROLS: &str = "
apiVersion: sallyport.dev/v1alpha1
kind: ConditionalAccessPolicy
metadata: {name: watch-staff, namespace: team-a}
spec:
  assignments: {apps: {names: [wiki]}, groups: {include: [staff]}}
  session: {monitor: true, readOnly: true}
---
apiVersion: sallyport.dev/v1alpha1
kind: ConditionalAccessPolicy
metadata: {name: no-files, namespace: team-a}
spec:
  assignments: {apps: {names: [wiki]}, users: {include: ['*']}}
  session: {blockDownloads: true, downloadContentTypes: [application/pdf]}
---
apiVersion: sallyport.dev/v1alpha1
kind: ConditionalAccessPolicy
metadata: {name: trial-monitor, namespace: team-a}
spec:
  state: ReportOnly
  assignments: {apps: {names: [wiki]}, users: {include: ['*']}}
  session: {monitor: true}
";
        let manifests = fixtures::manifests(&[GROUP_DC, MANIFESTS, CONTROLS]);
        let now: Timestamp = NOON.parse().unwrap_or_else(|e| panic!("{e}"));
        let run = |extra: &[&'static str]| {
            let args = args(&on_wiki(
                &ALICE,
                "203.0.113.9",
                &[&["--amr", "mfa"][..], extra].concat(),
            ));
            let sign_in = SignIn::new(&args, now).unwrap_or_else(|e| panic!("{e}"));
            let (mut out, mut report) = (Vec::new(), Vec::new());
            answer(&args, &sign_in, &manifests, false, &mut out, &mut report)
                .unwrap_or_else(|e| panic!("{e}"));
            String::from_utf8_lossy(&out).into_owned()
        };
        let out = run(&[]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines.contains(&"Decision:  allowed"), "{out}");
        assert!(
            lines.contains(&"Session:   sign-in frequency 8h, re-authentication due at 2026-01-05T20:00:00Z, monitor every request (audit session.request; team-a/watch-staff), allow only GET, HEAD and OPTIONS (team-a/watch-staff), block downloads (attachments and application/pdf; team-a/no-files)"),
            "{out}"
        );
        assert!(
            lines.contains(&"Report-only session controls (not enforced): would monitor every request (audit session.request; team-a/trial-monitor)"),
            "{out}"
        );
        let row = |id: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(id))
                .map(|l| {
                    l.split("  ")
                        .map(str::trim)
                        .filter(|c| !c.is_empty())
                        .last()
                        .unwrap_or_default()
                        .to_owned()
                })
                .unwrap_or_else(|| panic!("no row for {id}: {out}"))
        };
        assert_eq!(
            row("team-a/watch-staff"),
            "applies; every requirement is met; session: monitor, readOnly"
        );
        assert_eq!(
            row("team-a/no-files"),
            "applies; every requirement is met; session: blockDownloads"
        );
        assert_eq!(
            row("team-a/trial-monitor"),
            "applies; every requirement is met; session: monitor"
        );
        assert_eq!(
            row("team-a/require-mfa"),
            "applies; every requirement is met"
        );

        // The JSON answer is the sign-in log line, with the controls.
        let out = run(&["-o", "json"]);
        let event: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(
            event["sessionControls"]["monitor"],
            serde_json::json!(["team-a/watch-staff"])
        );
        assert_eq!(
            event["sessionControls"]["readOnly"],
            serde_json::json!(["team-a/watch-staff"])
        );
        assert_eq!(
            event["sessionControls"]["blockDownloads"],
            serde_json::json!(["team-a/no-files"])
        );
        assert_eq!(
            event["reportOnlySessionControls"]["monitor"],
            serde_json::json!(["team-a/trial-monitor"])
        );
    }
}
