//! The connector outside Kubernetes, as `deploy/systemd/sallyport-connector.service`
//! runs it on a VM.
//!
//! First the unit itself: `systemd-analyze verify` (with a real binary at its ExecStart=
//! path) finds nothing to say, `systemd-analyze security --offline` rates it "OK", the
//! stop timeout outlasts the drain, and every variable of the example environment file
//! is a real flag of `sallyport-connector run`.
//!
//! Then the connector runs exactly as the unit says, without systemd (no service
//! manager runs in the test's container): the command line of ExecStart= with
//! `${STATE_DIRECTORY}` expanded, an environment made only of Environment= and the
//! EnvironmentFile= (the example file, the fleet's values filled in), as a fresh user id
//! with no capabilities and no new privileges (DynamicUser=, CapabilityBoundingSet=,
//! NoNewPrivileges=), its state directory made with StateDirectoryMode=. Against a real
//! fleet (kube-apiserver, operator, proxy) and an external ConnectorGroup whose token
//! the operator issued:
//!
//! 1. it registers with the token: a Connector object appears, the token's use is
//!    counted, a passthrough app answers from a real backend through it, and its
//!    metrics listen where the environment file says;
//! 2. it renews its certificate (renewAfter 5 s) several times without a restart;
//! 3. an upgrade: SIGTERM while a slow request is in flight (it completes, the process
//!    exits 0), then another copy of the binary at another path (the new version) with
//!    the same state directory and no token reuses the identity: the same Connector
//!    object, the token's use count unchanged, and it serves again;
//! 4. revocation (deleting the Connector object): the running connector stops with the
//!    exit status the unit's RestartPreventExitStatus= names and a message saying what
//!    to do; started again, even with a valid token at hand, it refuses to run and does
//!    not register anew.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams};
use sallyport_api::Connector;
use sallyport_e2e::dataplane::{
    FLEET_TUNNEL_HOST, Fleet, REACTION_TIMEOUT, StepError, TrafficBackend, eventually, free_port,
    http_request, https_get,
};
use sallyport_e2e::manifests::repo_path;
use sallyport_e2e::process::{OwnedProcess, workspace_binary};
use serde_json::json;

type TestResult = Result<(), StepError>;

const APP_HOST: &str = "app.standalone.test";
/// Where the unit expects the binary.
const INSTALLED_BINARY: &str = "/usr/local/bin/sallyport-connector";
/// The environment file the unit reads, and the directory the install guide fills.
const ETC_DIR: &str = "/etc/sallyport";
/// How long the backend holds the request in flight across the upgrade.
const SLOW_MS: u64 = 3000;

/// The unit file as `key=value` entries per section, in order: comments dropped,
/// continued lines joined.
struct Unit {
    entries: Vec<(String, String, String)>,
}

impl Unit {
    fn parse(text: &str) -> Result<Self, StepError> {
        let mut entries = Vec::new();
        let mut section = String::new();
        let mut pending = String::new();
        for line in text.lines() {
            let line = line.trim();
            if pending.is_empty() && (line.is_empty() || line.starts_with(['#', ';'])) {
                continue;
            }
            if let Some(continued) = line.strip_suffix('\\') {
                pending.push_str(continued);
                pending.push(' ');
                continue;
            }
            pending.push_str(line);
            let whole = std::mem::take(&mut pending);
            if let Some(name) = whole.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
                section = name.to_owned();
                continue;
            }
            let (key, value) = whole
                .split_once('=')
                .ok_or_else(|| format!("the unit's line {whole:?} is not key=value"))?;
            entries.push((
                section.clone(),
                key.trim().to_owned(),
                value.trim().to_owned(),
            ));
        }
        Ok(Self { entries })
    }

    /// Every value of `key` in `[Service]`, in order.
    fn service(&self, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(section, k, _)| section == "Service" && k == key)
            .map(|(_, _, value)| value.as_str())
            .collect()
    }

    /// The one value of `key` in `[Service]`.
    fn one(&self, key: &str) -> Result<&str, StepError> {
        match self.service(key).as_slice() {
            [value] => Ok(value),
            values => {
                Err(format!("the unit sets {key}= {} times: {values:?}", values.len()).into())
            }
        }
    }
}

/// A systemd time span such as `60s`, `5min` or `2min 30s` (also a bare number of seconds).
fn timespan(text: &str) -> Result<Duration, StepError> {
    let mut total = Duration::ZERO;
    for part in text.split_whitespace() {
        let split = part
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(part.len());
        let (number, unit) = part.split_at(split);
        let number: u64 = number.parse()?;
        total += match unit {
            "" | "s" | "sec" => Duration::from_secs(number),
            "ms" | "msec" => Duration::from_millis(number),
            "m" | "min" => Duration::from_secs(number * 60),
            "h" | "hr" => Duration::from_secs(number * 3600),
            _ => return Err(format!("unknown time unit in {text:?}").into()),
        };
    }
    Ok(total)
}

/// The `KEY=VALUE` lines of an environment file, in order; with `commented`, also the
/// `#KEY=VALUE` lines (options shown but off).
fn env_lines(text: &str, commented: bool) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter_map(|line| {
            let line = match line.strip_prefix('#') {
                Some(rest) if commented => rest,
                Some(_) => return None,
                None => line,
            };
            let (key, value) = line.split_once('=')?;
            let key_ok = !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            key_ok.then(|| (key.to_owned(), value.trim_matches('"').to_owned()))
        })
        .collect()
}

/// The example environment file with the fleet's values put in: every key in `values`
/// must be in the example (uncommented), so a renamed setting fails here.
fn fill_env_file(example: &str, values: &BTreeMap<&str, String>) -> Result<String, StepError> {
    let present: Vec<String> = env_lines(example, false)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for key in values.keys() {
        if !present.iter().any(|k| k == key) {
            return Err(format!("the example environment file has no {key}=").into());
        }
    }
    Ok(example
        .lines()
        .map(|line| {
            let key = line.split_once('=').map(|(k, _)| k.trim());
            match key.and_then(|k| values.get(k).map(|v| (k, v))) {
                Some((key, value)) if !line.trim_start().starts_with('#') => {
                    format!("{key}={value}\n")
                }
                _ => format!("{line}\n"),
            }
        })
        .collect())
}

/// Expands `${NAME}` and `$NAME` in one word of ExecStart= from `vars`, as systemd does
/// for a variable that stands alone or inside a word; an unknown variable or a `%`
/// specifier fails (the test would not run what systemd runs).
fn expand(word: &str, vars: &BTreeMap<String, String>) -> Result<String, StepError> {
    if word.contains('%') {
        return Err(
            format!("ExecStart= uses a specifier the test does not emulate: {word}").into(),
        );
    }
    let mut out = String::new();
    let mut rest = word;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, tail) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {word}"))?;
            (&braced[..end], &braced[end + 1..])
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        let value = vars
            .get(name)
            .ok_or_else(|| format!("ExecStart= uses ${name}, which the test does not set"))?;
        out.push_str(value);
        rest = tail;
    }
    out.push_str(rest);
    Ok(out)
}

/// The machine the unit is installed on, inside a directory of the test: `etc/sallyport`
/// and `var/lib`, the service's user, and the binaries.
struct Vm {
    root: tempfile::TempDir,
    /// The service's user and group id (DynamicUser=): a fresh one when the test runs as
    /// root, else the test's own.
    uid: Option<u32>,
}

impl Vm {
    /// A path of the VM (`/etc/sallyport/x` → `<root>/etc/sallyport/x`).
    fn path(&self, absolute: &str) -> PathBuf {
        self.root.path().join(absolute.trim_start_matches('/'))
    }

    fn give_to_service(&self, path: &Path) -> Result<(), StepError> {
        if let Some(uid) = self.uid {
            std::os::unix::fs::chown(path, Some(uid), Some(uid))?;
        }
        Ok(())
    }

    /// Starts `binary` as the unit would start its ExecStart=: environment from the unit
    /// alone, state directory per StateDirectory=, as the service's user without
    /// privileges.
    fn start(&self, unit: &Unit, binary: &Path) -> Result<OwnedProcess, StepError> {
        let state_directory = self.path(&format!("/var/lib/{}", unit.one("StateDirectory")?));
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert(
            "PATH".to_owned(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        );
        env.insert(
            "STATE_DIRECTORY".to_owned(),
            state_directory.display().to_string(),
        );
        for assignments in unit.service("Environment") {
            for assignment in assignments.split_whitespace() {
                let (key, value) = assignment
                    .split_once('=')
                    .ok_or_else(|| format!("Environment={assignment} is not KEY=VALUE"))?;
                env.insert(key.to_owned(), value.to_owned());
            }
        }
        for file in unit.service("EnvironmentFile") {
            let (optional, file) = file.strip_prefix('-').map_or((false, file), |f| (true, f));
            let text = match std::fs::read_to_string(self.path(file)) {
                Ok(text) => text,
                Err(error) if optional && error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(format!("EnvironmentFile={file}: {error}").into()),
            };
            env.extend(env_lines(&text, false));
        }
        let exec_start = unit.one("ExecStart")?;
        let mut words = exec_start.split_whitespace();
        let program = words.next().ok_or("ExecStart= is empty")?;
        if program != INSTALLED_BINARY {
            return Err(format!(
                "ExecStart= runs {program}, the install guide puts the binary at {INSTALLED_BINARY}"
            )
            .into());
        }
        let args = words
            .map(|word| expand(word, &env))
            .collect::<Result<Vec<_>, _>>()?;
        // env -i: nothing of the test's environment; then setpriv as the service's user.
        let mut command: Vec<String> = vec!["-i".to_owned()];
        command.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        command.push("/usr/bin/setpriv".to_owned());
        if let Some(uid) = self.uid {
            command.extend([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".to_owned(),
                "--bounding-set=-all".to_owned(),
                "--inh-caps=-all".to_owned(),
            ]);
        }
        command.extend([
            "--no-new-privs".to_owned(),
            "--pdeathsig=KILL".to_owned(),
            "--".to_owned(),
        ]);
        command.push(binary.display().to_string());
        command.extend(args);
        let command: Vec<&str> = command.iter().map(String::as_str).collect();
        Ok(OwnedProcess::start_program(
            Path::new("/usr/bin/env"),
            &command,
            &[],
            true,
        )?)
    }
}

/// The Connector objects of the test's namespace, by name.
async fn connector_names(connectors: &Api<Connector>) -> Result<Vec<String>, StepError> {
    Ok(connectors
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect())
}

/// The certificate serial on Connector `name`.
async fn serial(connectors: &Api<Connector>, name: &str) -> Result<Option<String>, StepError> {
    Ok(connectors
        .get_opt(name)
        .await?
        .and_then(|c| c.status)
        .and_then(|s| s.certificate)
        .map(|c| c.serial))
}

/// The registration token's use count.
async fn token_uses(secrets: &Api<Secret>, group: &str) -> Result<Option<String>, StepError> {
    Ok(secrets
        .get(&format!("{group}-registration"))
        .await?
        .metadata
        .annotations
        .unwrap_or_default()
        .get("sallyport.dev/uses")
        .cloned())
}

/// Waits until the app answers 200 through `address` from the connector labelled `label`.
async fn served_by(
    backend: &TrafficBackend,
    address: std::net::SocketAddr,
    app_ca: &[u8],
    label: &str,
) -> Result<(), StepError> {
    eventually(
        &format!("the app served through {label}"),
        REACTION_TIMEOUT,
        async || {
            let answer = https_get(address, APP_HOST, app_ca, "/").await?;
            let from_label = backend
                .arrivals()
                .iter()
                .any(|a| a.from.as_deref() == Some(label));
            Ok(
                (answer.status == 200 && answer.text().contains("backend=app") && from_label)
                    .then_some(()),
            )
        },
    )
    .await
}

fn systemd_version() -> Result<u32, StepError> {
    let out = Command::new("/usr/bin/systemd-analyze")
        .arg("--version")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("cannot read systemd's version from {text:?}"))?;
    Ok(version)
}

/// `systemd-analyze verify` and `security` on the unit, with `binary` at its ExecStart=
/// path.
fn check_unit_with_systemd(unit_text: &str, binary: &Path, dir: &Path) -> TestResult {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !analyze.is_file() {
        return Err("systemd-analyze is missing (Debian's systemd package); this test checks the unit with it".into());
    }
    let copy = dir.join("sallyport-connector.service");
    std::fs::write(
        &copy,
        unit_text.replace(INSTALLED_BINARY, &binary.display().to_string()),
    )?;
    let verify = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()?;
    let said = String::from_utf8_lossy(&verify.stderr).into_owned()
        + &String::from_utf8_lossy(&verify.stdout);
    // Keys newer than this systemd: warned about and ignored, as documented in the unit.
    let newer = [("RestartSteps", 254), ("RestartMaxDelaySec", 254)];
    let version = systemd_version()?;
    let complaints: Vec<&str> = said
        .lines()
        .filter(|line| !line.trim().is_empty())
        .filter(|line| {
            !newer.iter().any(|(key, since)| {
                version < *since && line.contains(&format!("Unknown key '{key}'"))
            })
        })
        .collect();
    eprintln!("systemd {version}: systemd-analyze verify: {}", said.trim());
    assert!(
        verify.status.success(),
        "systemd-analyze verify failed: {said}"
    );
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complains: {complaints:?}"
    );
    // Exposure at most 2.0 of 10 ("OK"); the threshold is in tenths.
    let security = Command::new(analyze)
        .args(["security", "--offline=yes", "--threshold=20", "--no-pager"])
        .arg(&copy)
        .output()?;
    let report = String::from_utf8_lossy(&security.stdout);
    let overall = report
        .lines()
        .find(|l| l.contains("Overall exposure"))
        .unwrap_or("");
    eprintln!("systemd-analyze security: {overall}");
    assert!(
        security.status.success(),
        "systemd-analyze security rates the unit above 2.0: {report}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_unit_registers_renews_upgrades_and_stops_when_revoked() -> TestResult {
    let unit_text =
        std::fs::read_to_string(repo_path("deploy/systemd/sallyport-connector.service"))?;
    let example = std::fs::read_to_string(repo_path("deploy/systemd/connector.env.example"))?;
    let unit = Unit::parse(&unit_text)?;

    // The VM: two copies of the binary (the release installed now, and the next one),
    // stripped as a release is, where the service's user can run them.
    let root = tempfile::tempdir()?;
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))?;
    let root_user = std::fs::metadata("/proc/self")?.uid() == 0;
    let uid = root_user.then(|| 61184 + std::process::id() % 4000);
    if uid.is_none() {
        eprintln!(
            "NOTE: not root: the connector runs as the test's user, not as a user of its own (DynamicUser=)"
        );
    }
    let vm = Vm { root, uid };
    let built = workspace_binary("sallyport-connector")?;
    let mut binaries = Vec::new();
    for version in ["v1", "v2"] {
        let dir = vm.path(&format!("/opt/{version}"));
        std::fs::create_dir_all(&dir)?;
        let binary = dir.join("sallyport-connector");
        let stripped = Command::new("strip")
            .arg("-o")
            .arg(&binary)
            .arg(&built)
            .status();
        if !stripped.is_ok_and(|s| s.success()) {
            std::fs::copy(&built, &binary)?;
        }
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755))?;
        binaries.push(binary);
    }
    check_unit_with_systemd(&unit_text, &binaries[0], vm.root.path())?;

    // What the unit promises, beyond what systemd checks.
    for (key, value) in [
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("DynamicUser", "yes"),
    ] {
        assert_eq!(unit.one(key)?, value, "{key}= of the unit");
    }
    assert!(
        unit.service("SystemCallFilter")
            .contains(&"@system-service")
    );
    assert!(
        unit.service("EnvironmentFile")
            .contains(&"/etc/sallyport/connector.env")
    );
    let example_env: BTreeMap<String, String> = env_lines(&example, false).into_iter().collect();
    let drain = timespan(
        example_env
            .get("SALLYPORT_DRAIN_TIMEOUT")
            .map_or("30s", String::as_str),
    )?;
    let stop = timespan(unit.one("TimeoutStopSec")?)?;
    assert!(
        stop >= drain + Duration::from_secs(15),
        "TimeoutStopSec={stop:?} leaves the drain ({drain:?}) no margin"
    );
    let prevent: Vec<i32> = unit
        .one("RestartPreventExitStatus")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // Every variable the example sets or shows is a flag of `run`.
    let help = Command::new(&binaries[0])
        .args(["run", "--help"])
        .output()?;
    // Whitespace made single: clap wraps `[env: NAME]` across lines.
    let help = String::from_utf8_lossy(&help.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for (key, _) in env_lines(&example, true) {
        assert!(
            help.contains(&format!("[env: {key}")),
            "the example environment file sets {key}, which `sallyport-connector run` does not read"
        );
    }

    // So is every variable the install guide names.
    let guide = std::fs::read_to_string(repo_path("docs/connector-install.md"))?;
    for word in guide.split(|c: char| !(c.is_ascii_uppercase() || c == '_')) {
        if word.starts_with("SALLYPORT_") {
            assert!(
                help.contains(&format!("[env: {word}")),
                "docs/connector-install.md names {word}, which `sallyport-connector run` does not read"
            );
        }
    }

    // A fleet, an external group (no deployment) and a passthrough app.
    let fleet = Fleet::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "standalone",
        &["proxy-a"],
    )
    .await?;
    let backend = TrafficBackend::start("app").await?;
    let group = fleet
        .create_group(
            "branch",
            json!({
                "registration": {"tokenTTL": "2h", "maxUses": 2},
                "certificate": {"validity": "1h", "renewAfter": "5s"},
                "allowedNamespaces": {"from": "Same"}
            }),
        )
        .await?;
    let app_ca = fleet
        .publish_app("app", APP_HOST, &backend.url(), "branch")
        .await?;
    let address = fleet.proxies[0].ports.listen;
    let connectors = Api::<Connector>::namespaced(fleet.bed.client.clone(), &fleet.bed.namespace);
    let secrets = Api::<Secret>::namespaced(fleet.bed.client.clone(), &fleet.bed.namespace);

    // Install: /etc/sallyport (the CA, the environment file from the example), the state
    // directory as StateDirectory= makes it.
    let etc = vm.path(ETC_DIR);
    std::fs::create_dir_all(&etc)?;
    let ca_file = etc.join("fleet-ca.crt");
    std::fs::copy(&group.fleet_ca, &ca_file)?;
    std::fs::set_permissions(&ca_file, std::fs::Permissions::from_mode(0o644))?;
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut values: BTreeMap<&str, String> = BTreeMap::from([
        ("SALLYPORT_FLEET_ADDRESS", address.to_string()),
        ("SALLYPORT_FLEET_SERVER_NAME", FLEET_TUNNEL_HOST.to_owned()),
        ("SALLYPORT_FLEET_CA_FILE", ca_file.display().to_string()),
        ("SALLYPORT_CONNECTOR_GROUP", group.id.clone()),
        ("SALLYPORT_REGISTRATION_TOKEN", group.token.clone()),
        ("SALLYPORT_METRICS_ADDRESS", metrics.to_string()),
    ]);
    let env_file = etc.join("connector.env");
    std::fs::write(&env_file, fill_env_file(&example, &values)?)?;
    std::fs::set_permissions(&env_file, std::fs::Permissions::from_mode(0o600))?;
    let state_dir = vm.path(&format!("/var/lib/{}", unit.one("StateDirectory")?));
    std::fs::create_dir_all(&state_dir)?;
    let mode = u32::from_str_radix(unit.one("StateDirectoryMode")?, 8)?;
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(mode))?;
    vm.give_to_service(&state_dir)?;

    // 1. First start: it registers with the token and serves.
    let mut v1 = vm.start(&unit, &binaries[0])?;
    backend.watch(&v1, "v1");
    served_by(&backend, address, &app_ca, "v1").await?;
    let names = eventually("the Connector object", REACTION_TIMEOUT, async || {
        let names = connector_names(&connectors).await?;
        Ok((!names.is_empty()).then_some(names))
    })
    .await?;
    assert_eq!(names.len(), 1, "one registration, one Connector: {names:?}");
    let name = names[0].clone();
    assert_eq!(token_uses(&secrets, "branch").await?.as_deref(), Some("1"));
    let state_file = state_dir.join("connector-state.json");
    let file = std::fs::metadata(&state_file)?;
    assert_eq!(
        file.mode() & 0o777,
        0o600,
        "the state file is the service's alone"
    );
    if let Some(uid) = vm.uid {
        assert_eq!(
            file.uid(),
            uid,
            "the state file belongs to the service's user"
        );
    }
    let livez = http_request(
        metrics,
        http::Request::get("/livez").body(Full::new(Bytes::new()))?,
    )
    .await?;
    assert_eq!(livez.status, 200);
    let scraped = http_request(
        metrics,
        http::Request::get("/metrics").body(Full::new(Bytes::new()))?,
    )
    .await?;
    assert!(
        scraped.text().contains("sallyport_connector_tunnels_up"),
        "{}",
        scraped.text()
    );

    // 2. Renewal without a restart: the Connector records new certificates.
    let first_serial = eventually(
        "the Connector's certificate",
        REACTION_TIMEOUT,
        async || serial(&connectors, &name).await,
    )
    .await?;
    let mut seen = vec![first_serial];
    eventually("two renewals", Duration::from_secs(60), async || {
        if let Some(now) = serial(&connectors, &name).await?
            && seen.last() != Some(&now)
        {
            seen.push(now);
        }
        Ok((seen.len() >= 3).then_some(()))
    })
    .await?;
    assert!(v1.is_running(), "the connector renewed without a restart");
    assert!(
        v1.output().contains("certificate renewed"),
        "it logs its renewals"
    );
    let answer = https_get(address, APP_HOST, &app_ca, "/").await?;
    assert_eq!(
        answer.status,
        200,
        "served after renewals: {}",
        answer.text()
    );

    // 3. Upgrade. SIGTERM (systemctl stop) while a slow request is in flight...
    let slow_path = format!("/slow/{SLOW_MS}");
    let ca = app_ca.clone();
    let slow = tokio::spawn(async move {
        https_get(address, APP_HOST, &ca, &slow_path)
            .await
            .map_err(|e| e.to_string())
    });
    eventually(
        "the slow request at the backend",
        REACTION_TIMEOUT,
        async || {
            Ok(backend
                .arrivals()
                .iter()
                .any(|a| a.target.starts_with("/slow/") && a.from.as_deref() == Some("v1"))
                .then_some(()))
        },
    )
    .await?;
    v1.terminate()?;
    let status = v1.wait_for_exit(stop).await.ok_or_else(|| {
        format!("the connector still runs {stop:?} (TimeoutStopSec=) after SIGTERM")
    })?;
    let slow = slow.await??;
    assert_eq!(
        slow.status,
        200,
        "the request in flight completed: {}",
        slow.text()
    );
    assert!(slow.text().contains("backend=app"), "{}", slow.text());
    assert!(
        status.success(),
        "the drained connector exited with {status}: {}",
        v1.output()
    );

    // ... then the new version, at another path, same state, no token (emptied as the
    // guide says once registered): the same identity serves again.
    values.insert("SALLYPORT_REGISTRATION_TOKEN", String::new());
    std::fs::write(&env_file, fill_env_file(&example, &values)?)?;
    let mut v2 = vm.start(&unit, &binaries[1])?;
    backend.watch(&v2, "v2");
    served_by(&backend, address, &app_ca, "v2").await?;
    assert!(
        v2.output().contains("using the saved registration"),
        "{}",
        v2.output()
    );
    assert_eq!(
        connector_names(&connectors).await?,
        vec![name.clone()],
        "the same Connector"
    );
    assert_eq!(
        token_uses(&secrets, "branch").await?.as_deref(),
        Some("1"),
        "no token spent"
    );

    // 4. Revocation: the running connector stops, saying why, with the status that keeps
    // systemd from restarting it.
    connectors.delete(&name, &DeleteParams::default()).await?;
    let status = v2
        .wait_for_exit(REACTION_TIMEOUT + Duration::from_secs(30))
        .await
        .ok_or("the revoked connector still runs")?;
    let output = v2.output();
    eprintln!("the revoked connector exited with {status}");
    assert!(
        status.code().is_some_and(|code| prevent.contains(&code)),
        "the revoked connector exited with {status}, not a RestartPreventExitStatus= of the unit ({prevent:?})"
    );
    assert!(
        output.contains("ConnectorRevoked") && output.contains("register anew"),
        "the revoked connector says why it stopped and what to do: {output}"
    );
    // Started again (an administrator's `systemctl start`), with a valid token in the
    // environment file: it refuses to run and does not register anew on its own.
    values.insert("SALLYPORT_REGISTRATION_TOKEN", group.token.clone());
    std::fs::write(&env_file, fill_env_file(&example, &values)?)?;
    let mut again = vm.start(&unit, &binaries[1])?;
    let status = again
        .wait_for_exit(REACTION_TIMEOUT)
        .await
        .ok_or("a revoked connector started again keeps running")?;
    assert!(
        status.code().is_some_and(|code| prevent.contains(&code)),
        "started again, the revoked connector exited with {status}: {}",
        again.output()
    );
    assert!(
        again.output().contains("ConnectorRevoked"),
        "{}",
        again.output()
    );
    assert_eq!(token_uses(&secrets, "branch").await?.as_deref(), Some("1"));
    assert!(
        connector_names(&connectors).await?.is_empty(),
        "no new Connector"
    );
    let answer = https_get(address, APP_HOST, &app_ca, "/").await?;
    assert_eq!(
        answer.status,
        503,
        "nothing serves the group: {}",
        answer.text()
    );
    Ok(())
}
