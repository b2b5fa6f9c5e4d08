//! Every component serves its Prometheus metrics, they move with real traffic, and the
//! monitoring assets name only metrics that exist.
//!
//! A fleet (operator, one proxy replica, one connector with `--metrics-address`) carries
//! requests to a real backend; an app's rate limit is then cut to one request per second
//! so that a burst meets 429. The proxy's `/metrics` (on its probe address), the
//! connector's and the operator's (on its probe address) are scraped: the request
//! counters of the app moved on both sides of the tunnel, the proxy holds tunnels of the
//! group, the connector has tunnels up, the operator counts the group's one connected
//! connector, and certificates expire in the future. Then every PromQL expression of
//! `charts/sallyport/monitoring/grafana-dashboard.json` and `prometheusrule.yaml` is
//! parsed with a real PromQL parser, and each metric it selects must be one that some
//! component's scrape exposes (a histogram through its `_bucket`, `_sum` and `_count`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kube::api::{Api, Patch, PatchParams};
use promql_parser::parser::{self, Expr};
use promql_parser::util::{ExprVisitor, walk_expr};
use sallyport_api::PublishedApp;
use sallyport_e2e::dataplane::{
    Fleet, REACTION_TIMEOUT, StepError, TrafficBackend, eventually, free_port, https_get,
};
use sallyport_e2e::process::OwnedProcess;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type TestResult = Result<(), StepError>;

const APP_HOST: &str = "wiki.metrics.test";
/// Requests sent after the first answer.
const REQUESTS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_expose_metrics_that_move_and_the_dashboards_use_only_those() -> TestResult {
    let fleet = Fleet::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "metrics",
        &["proxy-a"],
    )
    .await?;
    let namespace = fleet.bed.namespace.clone();
    let app_id = format!("{namespace}/wiki");
    let backend = TrafficBackend::start("wiki").await?;
    let group = fleet.create_group("east", json!({})).await?;
    let app_ca = fleet
        .publish_app("wiki", APP_HOST, &backend.url(), "east")
        .await?;

    // The connector, with its metrics on a loopback port.
    let connector_metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let state = tempfile::tempdir()?;
    let launch = fleet.connector(&group, state.path());
    let addresses = launch
        .fleet_addresses
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let (ca, state_dir, metrics_address) = (
        launch.fleet_ca.display().to_string(),
        launch.state_dir.display().to_string(),
        connector_metrics.to_string(),
    );
    let _connector = OwnedProcess::start(
        "sallyport-connector",
        &[
            "run",
            "--fleet-address",
            &addresses,
            "--fleet-server-name",
            launch.tunnel_hostname,
            "--fleet-ca-file",
            &ca,
            "--group",
            launch.group,
            "--state-dir",
            &state_dir,
            "--metrics-address",
            &metrics_address,
        ],
        &[
            ("SALLYPORT_REGISTRATION_TOKEN", launch.token),
            ("RUST_LOG", "info"),
        ],
    )?;

    // Traffic: the first answer, then a few more.
    let proxy = fleet.proxies.first().ok_or("no proxy replica")?;
    let (listen, probes) = (proxy.ports.listen, proxy.ports.probes);
    eventually(
        "the app answering through the fleet",
        REACTION_TIMEOUT,
        async || {
            let answer = https_get(listen, APP_HOST, &app_ca, "/").await?;
            Ok((answer.status == 200).then_some(()))
        },
    )
    .await?;
    for _ in 0..REQUESTS {
        let answer = https_get(listen, APP_HOST, &app_ca, "/").await?;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }

    // The proxy: the app's requests, their durations, the group's tunnels.
    let proxy_text = scrape(probes).await?;
    let proxy_scrape = Scrape::parse(&proxy_text);
    let served = proxy_scrape.sum(
        "sallyport_proxy_requests_total",
        &[("app", &app_id), ("code", "200"), ("class", "2xx")],
    );
    assert!(
        served >= (REQUESTS + 1) as f64,
        "{served} requests counted for {app_id}:\n{proxy_text}"
    );
    let timed = proxy_scrape.sum(
        "sallyport_proxy_request_duration_seconds_count",
        &[("app", &app_id)],
    );
    assert!(
        timed >= (REQUESTS + 1) as f64,
        "{timed} timed:\n{proxy_text}"
    );
    let tunnels = proxy_scrape.sum("sallyport_proxy_tunnels_open", &[("group", &group.id)]);
    assert!(
        tunnels > 0.0,
        "no tunnel of {} counted:\n{proxy_text}",
        group.id
    );
    let now = unix_now();
    // The app's own TLS certificate, by app and Secret: in the future, and a date an
    // X.509 certificate can hold (up to the end of 9999; the test CA's rcgen
    // certificates run to 4096).
    let app_expiry = proxy_scrape.sum(
        "sallyport_proxy_app_certificate_expiry_timestamp_seconds",
        &[("app", &app_id)],
    );
    assert!(
        app_expiry > now && app_expiry <= 253_402_300_799.0,
        "{app_id}'s certificate expires at {app_expiry}:\n{proxy_text}"
    );
    for certificate in ["tunnel-serving", "connector-issuer"] {
        let expiry = proxy_scrape.sum(
            "sallyport_proxy_certificate_expiry_timestamp_seconds",
            &[("certificate", certificate)],
        );
        assert!(
            expiry > now,
            "{certificate} expires at {expiry}:\n{proxy_text}"
        );
    }

    // The connector: the same requests carried, its tunnels and certificate.
    let connector_text = scrape(connector_metrics).await?;
    let connector_scrape = Scrape::parse(&connector_text);
    let carried = connector_scrape.sum(
        "sallyport_connector_requests_total",
        &[("app", &app_id), ("code", "200")],
    );
    assert!(
        carried >= (REQUESTS + 1) as f64,
        "{carried} carried:\n{connector_text}"
    );
    let backend_timed = connector_scrape.sum(
        "sallyport_connector_backend_duration_seconds_count",
        &[("app", &app_id)],
    );
    assert!(backend_timed >= (REQUESTS + 1) as f64, "{connector_text}");
    let up = connector_scrape.sum(
        "sallyport_connector_tunnels_up",
        &[("replica", &proxy.name)],
    );
    assert!(
        up > 0.0,
        "no tunnel up to {}:\n{connector_text}",
        proxy.name
    );
    let expiry = connector_scrape.sum(
        "sallyport_connector_certificate_expiry_timestamp_seconds",
        &[],
    );
    assert!(expiry > now, "{connector_text}");

    // The operator: the group's connected connector (from its status), the app ready,
    // the PKI's expiry.
    let operator_probes = operator_probe_address(fleet.operator.pid()).await?;
    let operator_text = eventually(
        "the operator counting one connected connector of the group",
        REACTION_TIMEOUT,
        async || {
            let text = scrape(operator_probes).await?;
            let labels = [("namespace", namespace.as_str()), ("group", "east")];
            let scrape = Scrape::parse(&text);
            let connected = scrape.sum(
                "sallyport_operator_connector_group_connected_connectors",
                &labels,
            );
            let ready = scrape.sum(
                "sallyport_operator_published_app_ready",
                &[("namespace", namespace.as_str()), ("app", "wiki")],
            );
            Ok((connected == 1.0 && ready == 1.0).then_some(text))
        },
    )
    .await?;
    let operator_scrape = Scrape::parse(&operator_text);
    let desired = operator_scrape.sum(
        "sallyport_operator_connector_group_desired_connectors",
        &[("namespace", namespace.as_str()), ("group", "east")],
    );
    assert_eq!(desired, 1.0, "{operator_text}");
    for secret in [
        "sallyport-root-ca",
        "sallyport-connector-issuer",
        "sallyport-tunnel-tls",
    ] {
        let expiry = operator_scrape.sum(
            "sallyport_operator_certificate_expiry_timestamp_seconds",
            &[("secret", secret)],
        );
        assert!(
            expiry > now,
            "{secret} expires at {expiry}:\n{operator_text}"
        );
    }

    // The app's rate limit cut to 1 request per second: a burst meets 429, counted as
    // limited.
    Api::<PublishedApp>::namespaced(fleet.bed.client.clone(), &namespace)
        .patch(
            "wiki",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"rateLimit": {"requestsPerSecond": 1, "burst": 1}}})),
        )
        .await?;
    eventually("a burst meeting 429", REACTION_TIMEOUT, async || {
        for _ in 0..3 {
            if https_get(listen, APP_HOST, &app_ca, "/").await?.status == 429 {
                return Ok(Some(()));
            }
        }
        Ok(None)
    })
    .await?;
    let proxy_text = scrape(probes).await?;
    let proxy_scrape = Scrape::parse(&proxy_text);
    let limited = proxy_scrape.sum(
        "sallyport_proxy_requests_limited_total",
        &[("kind", "app"), ("app", &app_id)],
    );
    let refused = proxy_scrape.sum(
        "sallyport_proxy_requests_total",
        &[("app", &app_id), ("code", "429")],
    );
    assert!(limited >= 1.0 && refused >= limited, "{proxy_text}");

    // Every metric the dashboard and the alerts select is exposed by some component.
    let mut exposed = BTreeSet::new();
    for scrape in [&proxy_scrape, &connector_scrape, &operator_scrape] {
        exposed.extend(scrape.exposed_names());
    }
    let monitoring = workspace_root().join("charts/sallyport/monitoring");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(
        monitoring.join("grafana-dashboard.json"),
    )?)?;
    let rule: Value = serde_yaml::from_str(&std::fs::read_to_string(
        monitoring.join("prometheusrule.yaml"),
    )?)?;
    let mut expressions = Vec::new();
    dashboard_expressions(&dashboard, &mut expressions);
    let dashboard_count = expressions.len();
    assert!(
        dashboard_count >= 15,
        "only {dashboard_count} dashboard queries"
    );
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    for group in rule["spec"]["groups"].as_array().ok_or("no rule groups")? {
        for alert in group["rules"]
            .as_array()
            .ok_or("a rule group without rules")?
        {
            let expr = alert["expr"].as_str().ok_or("a rule without expr")?;
            expressions.push((format!("alert {}", alert["alert"]), expr.to_owned()));
        }
    }
    assert!(expressions.len() >= dashboard_count + 5, "{expressions:#?}");
    let mut missing = BTreeMap::new();
    let mut used = BTreeSet::new();
    for (source, query) in &expressions {
        let names =
            selected_metrics(&grafana_to_promql(query)).map_err(|e| format!("{source}: {e}"))?;
        for name in names {
            if !exposed.contains(&name) {
                missing.insert(name.clone(), source.clone());
            }
            used.insert(name);
        }
    }
    assert!(
        missing.is_empty(),
        "metrics no component exposes: {missing:#?}\nexposed: {exposed:#?}"
    );
    // The check can fail: an unknown name is caught.
    let unknown = selected_metrics("rate(sallyport_proxy_no_such_thing_total[5m])")?;
    assert!(unknown.iter().any(|name| !exposed.contains(name)));
    // Each component's metrics are on the dashboard.
    for prefix in [
        "sallyport_proxy_",
        "sallyport_connector_",
        "sallyport_operator_",
    ] {
        assert!(
            used.iter().any(|name| name.starts_with(prefix)),
            "{used:#?}"
        );
    }
    Ok(())
}

/// `GET /metrics` at `address`: the body of a 200 answer.
async fn scrape(address: SocketAddr) -> Result<String, StepError> {
    let mut stream = TcpStream::connect(address).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .map_err(|_| format!("no answer from {address} within 10s"))??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers from {address}: {response:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{address} answered {head}").into());
    }
    if !head
        .to_ascii_lowercase()
        .contains("content-type: text/plain")
    {
        return Err(format!("{address} answered without a text content type: {head}").into());
    }
    Ok(body.to_owned())
}

/// One scrape in the Prometheus text format: samples and declared metric types.
struct Scrape {
    /// Each sample: its series name, its labels and its value.
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    /// `# TYPE` declarations: metric name and type.
    types: BTreeMap<String, String>,
}

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(declaration) = line.strip_prefix("# TYPE ") {
                if let Some((name, kind)) = declaration.split_once(' ') {
                    types.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or((line, "NaN"));
            let value = value.parse().unwrap_or(f64::NAN);
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            samples.push((name.to_owned(), labels, value));
        }
        Self { samples, types }
    }

    /// The sum of the samples of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(series, have, _)| {
                series == name
                    && labels
                        .iter()
                        .all(|(key, value)| have.get(*key).map(String::as_str) == Some(*value))
            })
            .map(|(_, _, value)| value)
            .sum()
    }

    /// Every series name a query can select: those sampled, and those declared (a
    /// histogram's and a summary's through their `_bucket`, `_sum` and `_count`).
    fn exposed_names(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self
            .samples
            .iter()
            .map(|(name, _, _)| name.clone())
            .collect();
        for (name, kind) in &self.types {
            match kind.as_str() {
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                "summary" => {
                    names.insert(name.clone());
                    for suffix in ["_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    names.insert(name.clone());
                }
            }
        }
        names
    }
}

/// `a="x",b="y"` as a map (values without escaped quotes, as ours are).
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let Some((value, after)) = after.split_once('"') else {
            break;
        };
        labels.insert(key.trim_start_matches(',').to_owned(), value.to_owned());
        rest = after;
    }
    labels
}

/// Every query of a Grafana dashboard: each `expr`, and the metric of each
/// `label_values(metric, label)` variable (as an expression selecting it).
fn dashboard_expressions(value: &Value, into: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", Value::String(expr)) => {
                        into.push((format!("panel query {expr}"), expr.clone()));
                    }
                    ("definition", Value::String(definition)) => {
                        if let Some(metric) = definition
                            .strip_prefix("label_values(")
                            .and_then(|rest| rest.split_once(','))
                            .map(|(metric, _)| metric.trim())
                        {
                            into.push((format!("variable {definition}"), metric.to_owned()));
                        }
                    }
                    _ => dashboard_expressions(value, into),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                dashboard_expressions(item, into);
            }
        }
        _ => {}
    }
}

/// A Grafana query as plain PromQL: interval variables as durations, other variables
/// (`$app`, `${app}`) as match-anything regular expressions.
fn grafana_to_promql(query: &str) -> String {
    let query = query
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h");
    let mut out = String::with_capacity(query.len());
    let mut chars = query.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'{') {
            for c in chars.by_ref() {
                if c == '}' {
                    break;
                }
            }
        } else {
            while chars
                .peek()
                .is_some_and(|c| c.is_ascii_alphanumeric() || *c == '_')
            {
                chars.next();
            }
        }
        out.push_str(".*");
    }
    out
}

/// The metric names a PromQL expression selects; an error for a selector without one.
fn selected_metrics(query: &str) -> Result<BTreeSet<String>, String> {
    struct Names(BTreeSet<String>, Vec<String>);
    impl ExprVisitor for Names {
        type Error = String;
        fn pre_visit(&mut self, expr: &Expr) -> Result<bool, String> {
            let selector = match expr {
                Expr::VectorSelector(selector) => selector,
                Expr::MatrixSelector(matrix) => &matrix.vs,
                _ => return Ok(true),
            };
            match &selector.name {
                Some(name) => {
                    self.0.insert(name.clone());
                }
                None => self.1.push(format!("{selector:?}")),
            }
            Ok(true)
        }
    }
    let expr = parser::parse(query).map_err(|e| format!("cannot parse {query:?}: {e}"))?;
    let mut names = Names(BTreeSet::new(), Vec::new());
    walk_expr(&mut names, &expr)?;
    if !names.1.is_empty() {
        return Err(format!("selectors without a metric name: {:?}", names.1));
    }
    Ok(names.0)
}

/// The operator's probe address: the loopback TCP port process `pid` listens on that
/// answers `/metrics` (it was started on port 0).
async fn operator_probe_address(pid: u32) -> Result<SocketAddr, StepError> {
    eventually("the operator's probe port", REACTION_TIMEOUT, async || {
        for port in listening_ports(pid) {
            let address = SocketAddr::from(([127, 0, 0, 1], port));
            if let Ok(text) = scrape(address).await
                && text.contains("sallyport_operator_")
            {
                return Ok(Some(address));
            }
        }
        Ok(None)
    })
    .await
}

/// The TCP ports process `pid` listens on: its sockets' inodes matched against the
/// listening sockets of `/proc/net/tcp{,6}`.
fn listening_ports(pid: u32) -> Vec<u16> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let sockets: BTreeSet<String> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read_link(entry.path()).ok())
        .filter_map(|link| {
            link.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_owned)
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let listening = fields.get(3) == Some(&"0A");
            let ours = fields.get(9).is_some_and(|inode| sockets.contains(*inode));
            let port = fields
                .get(1)
                .and_then(|local| local.rsplit_once(':'))
                .and_then(|(_, port)| u16::from_str_radix(port, 16).ok());
            if let (true, true, Some(port)) = (listening, ours, port) {
                ports.push(port);
            }
        }
    }
    ports
}

fn workspace_root() -> PathBuf {
    sallyport_e2e::manifests::e2e_dir()
        .parent()
        .map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |elapsed| elapsed.as_secs_f64())
}
