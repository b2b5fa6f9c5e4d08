//! S8, proxy part: the resident memory of one `sallyport-proxy` holding the configuration
//! of a large fleet (the goal: at most 200 MiB at 10,000 apps).
//!
//! The fleet is the compile part's generated one ([`super::fleet`]), compiled the same way
//! and written as the file a standalone proxy follows (`--fleet-config-file`), with every
//! TLS Secret it names written under `--tls-dir`: the fleet's default certificate and the
//! third of the apps that bring their own. All certificates are issued by one CA made for
//! the run, so the benchmark's client verifies every handshake. Two changes make the
//! fleet reachable on loopback and quick to answer, and change nothing the proxy keeps:
//! external URLs carry the proxy's port (a route must match the port the user connected
//! to), and OpenID providers' issuer URLs point at a closed loopback port (a sign-in
//! redirect then fails at once instead of waiting on DNS).
//!
//! Measured: the proxy's RSS before the configuration arrives (an empty file), once it
//! holds the whole fleet and serves it (the last app's own certificate answers a
//! handshake), and after one HTTPS request to every app (a new TLS connection each, with
//! the per-client limits off, since the visits all come from one address; the answers are
//! whatever the app gives a request without a signed-in user or a connector: 401 for an
//! OpenID app asked by a non-browser client, 503 for a passthrough app, 429 where the
//! app's own rate limit is lower than the visits' pace). Peak RSS (`VmHWM`) is reported
//! too.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use sallyport_api::published_app::PreAuthenticationType;
use serde::Serialize;

use super::fleet;
use crate::dataplane::DataplaneError;
use crate::dataplane::client::{self, Target};
use crate::dataplane::fleet::{free_address, wait_for_port};
use crate::dataplane::pki;
use crate::dataplane::process::ChildProcess;
use crate::error::BenchError;

/// The tunnel host name the proxy is given (no connector dials it here).
const TUNNEL_HOST: &str = "tunnel.s8.bench.test";
/// Where the generated fleet's OpenID providers are sent: a loopback port nobody serves.
const CLOSED_ISSUER: &str = "https://127.0.0.1:9/";

/// How the proxy part runs.
#[derive(Clone, Debug)]
pub struct ProxyMemoryOptions {
    /// Apps in the generated fleet.
    pub apps: usize,
    /// The `sallyport-proxy` executable.
    pub proxy: PathBuf,
    /// HTTPS requests in flight at once while every app is visited.
    pub concurrency: usize,
    /// `RUST_LOG` of the proxy.
    pub log_filter: String,
}

/// RSS of the proxy at one point of the run.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct RssPoint {
    /// `VmRSS`, bytes.
    pub rss_bytes: u64,
    /// `VmHWM` so far, bytes.
    pub peak_rss_bytes: u64,
}

/// What the proxy part measured.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyMemoryReport {
    /// Apps in the fleet (= routes).
    pub apps: usize,
    /// TLS Secrets written (the default one and the apps' own).
    pub certificates: usize,
    /// Size of the configuration file (compact JSON).
    pub config_json_bytes: usize,
    /// The proxy started on an empty configuration, settled.
    pub empty: RssPoint,
    /// Holding and serving the whole fleet, settled.
    pub loaded: RssPoint,
    /// From the configuration file's arrival until the last app's own certificate
    /// answered a handshake, seconds.
    pub load_s: f64,
    /// After one HTTPS request to every app, settled.
    pub visited: RssPoint,
    /// How long visiting every app took, seconds.
    pub visit_s: f64,
    /// The visits' answers, by status code (`"error"`: no answer: TLS or connection
    /// failure, or the per-request bound).
    pub answers: BTreeMap<String, usize>,
    /// The proxy's CPU time over the whole part, seconds.
    pub proxy_cpu_s: f64,
    /// The proxy executable.
    pub proxy_binary: String,
}

impl ProxyMemoryReport {
    /// The RSS the goal is judged on: the higher of loaded and visited.
    pub fn judged_rss_bytes(&self) -> u64 {
        self.loaded.rss_bytes.max(self.visited.rss_bytes)
    }

    /// Growth from the empty proxy to the judged RSS, per app, bytes.
    pub fn per_app_bytes(&self) -> f64 {
        self.judged_rss_bytes().saturating_sub(self.empty.rss_bytes) as f64
            / self.apps.max(1) as f64
    }
}

/// One app as a user reaches it: the host for SNI and `Host`, and the path.
struct Visit {
    host: String,
    path: String,
}

/// Runs the proxy part in a temporary directory (kept, and named, when it fails).
pub fn run(options: &ProxyMemoryOptions) -> Result<ProxyMemoryReport, DataplaneError> {
    crate::dataplane::in_run_dir(None, "s8-proxy-memory", |dir| async move {
        measure(&dir, options).await
    })
}

async fn measure(
    dir: &Path,
    options: &ProxyMemoryOptions,
) -> Result<ProxyMemoryReport, DataplaneError> {
    let listen = free_address()?;
    let probe = free_address()?;
    eprintln!(
        "S8 proxy: generating and compiling a fleet of {} apps",
        options.apps
    );
    let mut generated = fleet::generate(options.apps)?;
    let visits = localize(&mut generated, listen.port());
    let compiled =
        sallyport_operator::compile::compile(&generated.inputs()).map_err(BenchError::from)?;
    if !compiled.skipped.is_empty() || compiled.config.routes.len() != options.apps {
        return Err(BenchError::UnexpectedCompile {
            apps: options.apps,
            routes: compiled.config.routes.len(),
            skipped: compiled.skipped.len(),
            first_skipped: compiled
                .skipped
                .first()
                .map(|s| format!("{} {}: {}", s.kind, s.id, s.reason))
                .unwrap_or_default(),
        }
        .into());
    }
    let config_json = serde_json::to_vec(&compiled.config)
        .map_err(|error| BenchError::Encode(error.to_string()))?;

    eprintln!("S8 proxy: issuing the fleet's certificates");
    let tls_dir = dir.join("tls");
    let (ca_pem, certificates, last_own) = write_certificates(&tls_dir, &generated)?;
    let fleet_pki = pki::write_fleet_pki(&dir.join("pki"), TUNNEL_HOST)?;

    // The proxy starts on an empty configuration, so its own baseline is measured first.
    let config_file = dir.join("fleet-config.json");
    let no_apps =
        sallyport_operator::compile::compile(&sallyport_operator::compile::CompileInputs {
            apps: &[],
            ..generated.inputs()
        })
        .map_err(BenchError::from)?;
    let empty_config = serde_json::to_vec(&no_apps.config)
        .map_err(|error| BenchError::Encode(error.to_string()))?;
    write(&config_file, &empty_config)?;
    let path = |p: &Path| p.display().to_string();
    // The visits come from one address, faster than a user: the per-client limits would
    // answer most of them before their app (S5 turns them off the same way).
    let mut args: Vec<String> = [
        "run",
        "--listen",
        &listen.to_string(),
        "--probe-address",
        &probe.to_string(),
        "--fleet-config-file",
        &path(&config_file),
        "--tls-dir",
        &path(&tls_dir),
        "--tunnel-hostname",
        TUNNEL_HOST,
        "--tunnel-tls-dir",
        &path(&fleet_pki.tunnel_tls_dir),
        "--connector-issuer-dir",
        &path(&fleet_pki.connector_issuer_dir),
        "--replica",
        "s8-proxy",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(crate::s5::LIMITS_OFF.iter().map(|a| (*a).to_owned()));
    eprintln!("S8 proxy: starting the proxy on {listen}");
    let mut proxy = ChildProcess::start(
        "sallyport-proxy",
        &options.proxy,
        &args,
        &[("RUST_LOG", &options.log_filter)],
        &dir.join("proxy.log"),
    )?;
    wait_for_port(listen, &mut proxy, Duration::from_secs(30)).await?;
    let empty = settled_rss(&mut proxy).await?;
    eprintln!(
        "S8 proxy: empty configuration: RSS {:.1} MiB",
        mib(empty.rss_bytes)
    );

    // The whole fleet, written atomically (the proxy polls the file every second).
    let staged = dir.join("fleet-config.json.new");
    write(&staged, &config_json)?;
    std::fs::rename(&staged, &config_file).map_err(DataplaneError::io(format!(
        "replacing {}",
        config_file.display()
    )))?;
    let arrived = Instant::now();
    let tls = client::tls_trusting(&ca_pem, "the S8 fleet CA")?;
    let last = visits.get(last_own).ok_or_else(|| BenchError::Fixture {
        what: "the generated fleet".into(),
        message: "no app with its own certificate".into(),
    })?;
    let target = target(listen, last, &tls);
    let deadline = arrived + Duration::from_secs(120);
    loop {
        proxy.check_running()?;
        match target.connect().await {
            Ok(_) => break,
            Err(error) if Instant::now() > deadline => {
                return Err(DataplaneError::Timeout {
                    what: format!("the proxy serving {}'s own certificate", last.host),
                    waited: Duration::from_secs(120),
                    last: Some(error.to_string()),
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let load_s = arrived.elapsed().as_secs_f64();
    let loaded = settled_rss(&mut proxy).await?;
    eprintln!(
        "S8 proxy: {} apps served after {load_s:.2} s: RSS {:.1} MiB",
        options.apps,
        mib(loaded.rss_bytes)
    );

    eprintln!(
        "S8 proxy: one HTTPS request to each of the {} apps, {} at a time",
        visits.len(),
        options.concurrency
    );
    let started = Instant::now();
    let answers = visit_all(listen, &visits, &tls, options.concurrency).await;
    let visit_s = started.elapsed().as_secs_f64();
    proxy.check_running()?;
    let visited = settled_rss(&mut proxy).await?;
    eprintln!(
        "S8 proxy: visited in {visit_s:.1} s ({answers:?}): RSS {:.1} MiB, peak {:.1} MiB",
        mib(visited.rss_bytes),
        mib(visited.peak_rss_bytes)
    );
    let proxy_cpu_s = proxy.cpu_time()?.as_secs_f64();
    Ok(ProxyMemoryReport {
        apps: options.apps,
        certificates,
        config_json_bytes: config_json.len(),
        empty,
        loaded,
        load_s,
        visited,
        visit_s,
        answers,
        proxy_cpu_s,
        proxy_binary: options.proxy.display().to_string(),
    })
}

/// Gives every app's external URL the proxy's `port` and sends every OpenID provider to
/// [`CLOSED_ISSUER`]; returns each app's visit, in the order of the apps.
fn localize(generated: &mut fleet::Fleet, port: u16) -> Vec<Visit> {
    let mut visits = Vec::with_capacity(generated.apps.len());
    for app in &mut generated.apps {
        let spec = &mut app.spec;
        let (host, path) = split_url(&spec.external_url);
        let (host, path) = (host.to_owned(), path.to_owned());
        spec.external_url = format!("https://{host}:{port}{path}");
        if spec.pre_authentication.kind == PreAuthenticationType::Oidc
            && let Some(oidc) = spec.pre_authentication.oidc.as_mut()
        {
            oidc.issuer_url = CLOSED_ISSUER.to_owned();
        }
        visits.push(Visit {
            host: host
                .strip_prefix("*.")
                .map_or_else(|| host.clone(), |parent| format!("visit.{parent}")),
            path,
        });
    }
    if let Some(oidc) = generated.defaults.oidc.as_mut() {
        oidc.issuer_url = CLOSED_ISSUER.to_owned();
    }
    visits
}

/// `https://host/path` as its host and path (`/` when absent).
fn split_url(url: &str) -> (&str, &str) {
    let rest = url.strip_prefix("https://").unwrap_or(url);
    match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash..]),
        None => (rest, "/"),
    }
}

/// The certificate name covering `host`: a wildcard host itself, else a wildcard for its
/// parent (one per team, not one per app, as a real default certificate would be).
fn default_certificate_name(host: &str) -> String {
    if host.starts_with("*.") {
        return host.to_owned();
    }
    match host.split_once('.') {
        Some((_, parent)) if parent.contains('.') => format!("*.{parent}"),
        _ => host.to_owned(),
    }
}

/// Writes the fleet's default TLS Secret and each app's own under `tls_dir`, all issued
/// by one new CA; returns the CA (PEM), how many Secrets were written, and the index of
/// the last app with its own certificate.
fn write_certificates(
    tls_dir: &Path,
    generated: &fleet::Fleet,
) -> Result<(Vec<u8>, usize, usize), DataplaneError> {
    let failed = |what: &'static str| {
        move |error: rcgen::Error| DataplaneError::Pki {
            what,
            message: error.to_string(),
        }
    };
    let mut ca_params =
        CertificateParams::new(Vec::<String>::new()).map_err(failed("S8 fleet CA"))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sallyport-bench S8 fleet CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(failed("S8 fleet CA key"))?;
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(failed("S8 fleet CA"))?;
    let issue = |names: Vec<String>, namespace: &str, name: &str| {
        let mut params = CertificateParams::new(names).map_err(failed("app certificate"))?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().map_err(failed("app certificate key"))?;
        let certificate = params
            .signed_by(&key, &*ca)
            .map_err(failed("app certificate"))?;
        let secret_dir = tls_dir.join(namespace).join(name);
        write(&secret_dir.join("tls.crt"), certificate.pem().as_bytes())?;
        write(&secret_dir.join("tls.key"), key.serialize_pem().as_bytes())
    };

    let mut default_names = BTreeSet::new();
    let mut own = 0;
    let mut last_own = None;
    for (index, app) in generated.apps.iter().enumerate() {
        let (host, _) = split_url(&app.spec.external_url);
        let host = host.split(':').next().unwrap_or(host);
        match &app.spec.tls {
            Some(tls) => {
                let namespace = app.metadata.namespace.as_deref().unwrap_or_default();
                issue(vec![host.to_owned()], namespace, &tls.secret_name)?;
                own += 1;
                last_own = Some(index);
            }
            None => {
                default_names.insert(default_certificate_name(host));
            }
        }
    }
    if let Some(default) = &generated.defaults.tls_secret {
        issue(
            default_names.into_iter().collect(),
            &default.namespace,
            &default.name,
        )?;
    }
    let last_own = last_own.ok_or_else(|| BenchError::Fixture {
        what: "the generated fleet".into(),
        message: "no app brings its own certificate".into(),
    })?;
    Ok((ca.pem().into_bytes(), own + 1, last_own))
}

fn target(listen: SocketAddr, visit: &Visit, tls: &Arc<rustls::ClientConfig>) -> Target {
    Target::Proxy {
        address: listen,
        host: visit.host.clone(),
        port: listen.port(),
        tls: tls.clone(),
        cookie: None,
    }
}

/// One new HTTPS connection and `GET` per app, `concurrency` at a time, each bounded by
/// 10 s; the answers counted by status.
async fn visit_all(
    listen: SocketAddr,
    visits: &[Visit],
    tls: &Arc<rustls::ClientConfig>,
    concurrency: usize,
) -> BTreeMap<String, usize> {
    let within = Duration::from_secs(10);
    let outcomes: Vec<String> = futures::stream::iter(visits)
        .map(|visit| async move {
            let target = target(listen, visit, tls);
            let attempt = async {
                let mut connection = target.connect().await?;
                connection.get(&visit.path, within).await
            };
            match tokio::time::timeout(within, attempt).await {
                Ok(Ok(answer)) => answer.status.as_u16().to_string(),
                Ok(Err(_)) | Err(_) => "error".to_owned(),
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut answers = BTreeMap::new();
    for outcome in outcomes {
        *answers.entry(outcome).or_insert(0) += 1;
    }
    answers
}

/// The proxy's RSS once it has stopped moving: sampled every 250 ms until two samples a
/// second apart differ by less than 1%, at most 15 s.
async fn settled_rss(proxy: &mut ChildProcess) -> Result<RssPoint, DataplaneError> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut previous = proxy.memory()?;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        proxy.check_running()?;
        let now = proxy.memory()?;
        let change = now.rss_bytes.abs_diff(previous.rss_bytes) as f64;
        if change < 0.01 * previous.rss_bytes as f64 || Instant::now() > deadline {
            return Ok(RssPoint {
                rss_bytes: now.rss_bytes,
                peak_rss_bytes: now.peak_rss_bytes,
            });
        }
        previous = now;
    }
}

fn write(path: &Path, content: &[u8]) -> Result<(), DataplaneError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(DataplaneError::io(format!("creating {}", parent.display())))?;
    }
    std::fs::write(path, content).map_err(DataplaneError::io(format!("writing {}", path.display())))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_host_and_path() {
        assert_eq!(
            split_url("https://a.example.com/svc/"),
            ("a.example.com", "/svc/")
        );
        assert_eq!(split_url("https://a.example.com"), ("a.example.com", "/"));
    }

    #[test]
    fn the_default_certificate_names_one_wildcard_per_parent() {
        assert_eq!(
            default_certificate_name("app-00001.team-000.apps.example.com"),
            "*.team-000.apps.example.com"
        );
        assert_eq!(
            default_certificate_name("*.env-00050.example.com"),
            "*.env-00050.example.com"
        );
        assert_eq!(default_certificate_name("example.com"), "example.com");
    }

    #[test]
    fn a_localized_fleet_is_reached_on_the_proxy_port_and_never_at_a_real_provider()
    -> Result<(), BenchError> {
        let mut generated = fleet::generate(200)?;
        let visits = localize(&mut generated, 8443);
        assert_eq!(visits.len(), 200);
        for (app, visit) in generated.apps.iter().zip(&visits) {
            assert!(
                app.spec.external_url.contains(":8443/"),
                "{}",
                app.spec.external_url
            );
            assert!(!visit.host.starts_with('*'), "{}", visit.host);
            if let Some(oidc) = &app.spec.pre_authentication.oidc {
                assert_eq!(oidc.issuer_url, CLOSED_ISSUER);
            }
        }
        let compiled = sallyport_operator::compile::compile(&generated.inputs())?;
        assert!(
            compiled.skipped.is_empty(),
            "{:?}",
            compiled.skipped.first()
        );
        assert_eq!(compiled.config.routes.len(), 200);
        Ok(())
    }
}
