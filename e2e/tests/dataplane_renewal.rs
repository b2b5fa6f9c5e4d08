//! Certificate renewal of a running connector, end to end: with a group whose
//! certificates are to be renewed after 5 s, the connector renews again and again under
//! load (its state file and its Connector object's `status.certificate.serial` change
//! together) without a single failed request, and the tunnels it dials afterwards present
//! the renewed certificate, not the one it registered with.
//!
//! To see which certificate a new tunnel presents, proxy-b is stopped and an observer
//! takes its address for a moment: a TLS listener with the fleet's own tunnel certificate
//! that records the client certificate of the connector's next dial and hangs up. Then
//! proxy-b comes back on the same address and the connector's tunnels to it are served
//! again.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kube::api::{Api, ListParams};
use sallyport_api::Connector;
use sallyport_e2e::dataplane::{
    Fleet, LoadOutcome, LoadTarget, REACTION_TIMEOUT, StepError, TrafficBackend, eventually,
    https_get, run_load, wait_for_port,
};
use sallyport_tunnel::tls::{Credentials, certificates_from_pem, fleet_server_config};
use serde_json::json;
use tokio::time::Instant;

type TestResult = Result<(), StepError>;

const APP_HOST: &str = "app.renewal.test";
/// The group's `certificate.renewAfter`.
const RENEW_AFTER: &str = "5s";
/// How long the load runs: at least two renewals fall inside.
const LOAD: Duration = Duration::from_secs(12);

/// The serial (lower-case hex) of the first certificate of `chain_pem`.
fn leaf_serial(chain_pem: &[u8]) -> Result<String, StepError> {
    let chain = certificates_from_pem("connector certificate", chain_pem)?;
    let leaf = chain.first().ok_or("the chain holds no certificate")?;
    let (_, certificate) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| format!("bad certificate: {e}"))?;
    Ok(certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The serial of the certificate in the connector's state file.
fn state_serial(state_dir: &Path) -> Result<String, StepError> {
    let text = std::fs::read(state_dir.join("connector-state.json"))?;
    let state: serde_json::Value = serde_json::from_slice(&text)?;
    let chain = state["chainPem"]
        .as_str()
        .ok_or("the state file has no chainPem")?;
    leaf_serial(chain.as_bytes())
}

/// The serial recorded on the group's only Connector object.
async fn status_serial(connectors: &Api<Connector>) -> Result<Option<String>, StepError> {
    let list = connectors.list(&ListParams::default()).await?;
    if list.items.len() > 1 {
        return Err(format!("{} Connector objects, expected one", list.items.len()).into());
    }
    Ok(list
        .items
        .first()
        .and_then(|c| c.status.as_ref())
        .and_then(|s| s.certificate.as_ref())
        .map(|c| c.serial.clone()))
}

/// Serials in the order they were seen, with when.
type History = Arc<Mutex<Vec<(Instant, String)>>>;

fn push_if_new(history: &History, serial: String) {
    let mut history = history.lock().unwrap_or_else(PoisonError::into_inner);
    if history.last().is_none_or(|(_, last)| *last != serial) {
        history.push((Instant::now(), serial));
    }
}

fn serials(history: &History) -> Vec<String> {
    history
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|(_, s)| s.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_renews_under_load_and_dials_with_its_new_certificate() -> TestResult {
    let mut fleet = Fleet::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "renewal",
        &["proxy-a", "proxy-b"],
    )
    .await?;
    let backend = TrafficBackend::start("app").await?;
    let group = fleet
        .create_group(
            "dc",
            json!({"certificate": {"validity": "1h", "renewAfter": RENEW_AFTER}}),
        )
        .await?;
    let app_ca = fleet
        .publish_app("app", APP_HOST, &backend.url(), "dc")
        .await?;
    let state = tempfile::tempdir()?;
    let mut launch = fleet.connector(&group, state.path());
    launch.capture_output = true;
    let connector = launch.start()?;

    let addresses = fleet.addresses();
    for address in &addresses {
        eventually(
            &format!("the app through {address}"),
            REACTION_TIMEOUT,
            async || {
                let answer = https_get(*address, APP_HOST, &app_ca, "/").await?;
                Ok((answer.status == 200).then_some(()))
            },
        )
        .await?;
    }
    let connectors = Api::<Connector>::namespaced(fleet.bed.client.clone(), &fleet.bed.namespace);
    let registered = eventually(
        "the Connector's certificate",
        REACTION_TIMEOUT,
        async || status_serial(&connectors).await,
    )
    .await?;
    assert_eq!(
        state_serial(state.path())?,
        registered,
        "the state file holds the certificate the Connector object records"
    );

    // Follow the serial in the state file and on the Connector object while users work.
    let (on_disk, on_object): (History, History) = Default::default();
    push_if_new(&on_disk, registered.clone());
    push_if_new(&on_object, registered.clone());
    let tracker = {
        let (on_disk, on_object) = (on_disk.clone(), on_object.clone());
        let (dir, connectors) = (state.path().to_owned(), connectors.clone());
        tokio::spawn(async move {
            // Bounded: far beyond the test's length.
            for _ in 0..3000 {
                if let Ok(serial) = state_serial(&dir) {
                    push_if_new(&on_disk, serial);
                }
                if let Ok(Some(serial)) = status_serial(&connectors).await {
                    push_if_new(&on_object, serial);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let targets = LoadTarget::per_replica(&addresses, APP_HOST, &app_ca, "/", "backend=app");
    let load_started = Instant::now();
    let outcomes = run_load(&targets, 4, load_started + LOAD, Duration::from_secs(5)).await;
    let load_ended = Instant::now();
    let failures: Vec<&LoadOutcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    let renewals_under_load = on_disk
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter(|(at, _)| *at > load_started && *at < load_ended)
        .count();
    eprintln!(
        "{} requests, {} failed, {renewals_under_load} renewals under load; serials on disk {:?}, on the Connector {:?}",
        outcomes.len(),
        failures.len(),
        serials(&on_disk),
        serials(&on_object)
    );
    assert!(
        failures.is_empty(),
        "requests failed across renewals: {failures:?}"
    );
    assert!(outcomes.len() >= 100, "the load ran");
    assert!(
        renewals_under_load >= 2,
        "the connector renewed {renewals_under_load} times in {LOAD:?} with renewAfter {RENEW_AFTER}"
    );
    // The fleet recorded each renewal on the Connector object.
    let newest = serials(&on_disk).last().cloned().unwrap_or_default();
    eventually(
        "the Connector object recording the newest certificate",
        REACTION_TIMEOUT,
        async || {
            Ok(
                (status_serial(&connectors).await?.as_deref() == Some(newest.as_str()))
                    .then_some(()),
            )
        },
    )
    .await?;
    let recorded = serials(&on_object);
    for serial in serials(&on_disk) {
        assert!(
            recorded.contains(&serial),
            "certificate {serial} of the state file never showed on the Connector object ({recorded:?})"
        );
    }
    assert!(
        connector.output().contains("certificate renewed"),
        "the connector logs its renewals"
    );

    // New tunnels: stop proxy-b, let an observer take its address, and look at the
    // certificate the connector presents when it dials there again. proxy-b is killed
    // (SIGKILL): its Lease stays until it expires, so connectors keep redialling its
    // address; a graceful stop takes it out of the fleet first and connectors let it go.
    let b = 1;
    let ports = fleet.proxies[b].ports;
    fleet.proxies[b]
        .process
        .signal(nix::sys::signal::Signal::SIGKILL)?;
    fleet.proxies[b]
        .process
        .wait_for_exit(Duration::from_secs(40))
        .await
        .ok_or("proxy-b did not stop")?;
    let pki = fleet.pki.path();
    let tunnel_tls = Credentials::from_pem(
        "tunnel serving certificate",
        &std::fs::read(pki.join("tunnel-tls/tls.crt"))?,
        &std::fs::read(pki.join("tunnel-tls/tls.key"))?,
    )?;
    let fleet_root = certificates_from_pem(
        "fleet root CA",
        &std::fs::read(pki.join("tunnel-tls/ca.crt"))?,
    )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(fleet_server_config(&tunnel_tls, &fleet_root)?);
    let observer = tokio::net::TcpListener::bind(ports.listen).await?;
    let (presented, on_disk_then) = tokio::time::timeout(Duration::from_secs(30), async {
        // Bounded by the timeout around it.
        loop {
            let (tcp, _) = observer.accept().await?;
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await
            else {
                continue;
            };
            let Some(leaf) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
                continue;
            };
            let (_, certificate) = x509_parser::parse_x509_certificate(leaf)
                .map_err(|e| format!("bad client certificate: {e}"))?;
            let serial: String = certificate
                .raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            // What the connector held when it dialled: the state file is written just
            // before the new certificate is put to use.
            let mut held = serials(&on_disk);
            if let Ok(now) = state_serial(state.path()) {
                held.push(now);
            }
            held.dedup();
            return Ok::<_, StepError>((serial, held));
        }
    })
    .await
    .map_err(|_| "the connector did not dial proxy-b's address within 30s")??;
    drop(observer);
    tracker.abort();
    eprintln!(
        "a new tunnel presented certificate {presented}; registered with {registered}; the state file held {:?}",
        on_disk_then.last()
    );
    assert_ne!(
        presented, registered,
        "a tunnel dialled after renewals presents the certificate the connector registered with"
    );
    // The newest certificate, or the one before it when the dial raced a renewal.
    let current = &on_disk_then[on_disk_then.len().saturating_sub(2)..];
    assert!(
        current.contains(&presented),
        "a new tunnel presented {presented}, not the current certificate (the last ones on disk: {current:?})"
    );

    // proxy-b comes back where it was and the connector's tunnels to it serve again.
    let restarted = fleet.start_replica("proxy-b", ports)?;
    fleet.proxies[b].process = restarted;
    wait_for_port(ports.listen, REACTION_TIMEOUT).await?;
    eventually(
        "the app through the restarted proxy-b",
        REACTION_TIMEOUT,
        async || {
            let answer = https_get(ports.listen, APP_HOST, &app_ca, "/").await?;
            Ok((answer.status == 200).then_some(()))
        },
    )
    .await?;
    for address in &addresses {
        let answer = https_get(*address, APP_HOST, &app_ca, "/").await?;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    Ok(())
}
