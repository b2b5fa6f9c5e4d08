//! Slow clients (slowloris) against a real proxy: 1,000 TCP connections from eight
//! loopback addresses (127.0.0.10 to 127.0.0.17) that stall, half of them in the middle of
//! a TLS ClientHello and half after the handshake in the middle of an HTTP/1.1 request's
//! headers. While they hold on, requests from 127.0.0.1 are served; and the proxy closes
//! every stalled connection itself, by its handshake and header-read timeouts.
//!
//! The proxy runs with `--handshake-timeout` and `--header-read-timeout` of 15 s (short
//! for the test's sake) and the default cap of 256 connections per address, which 125
//! connections per address stay under. Everything is bounded: the number of connections,
//! each wait, and the time the proxy may take to close them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use sallyport_e2e::dataplane::{
    Fleet, ProxyOptions, REACTION_TIMEOUT, StepError, TrafficBackend, eventually, https_get,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio::time::Instant;

type TestResult = Result<(), StepError>;

const APP_HOST: &str = "app.slow.test";
/// Stalled connections in all.
const SLOW_CLIENTS: usize = 1_000;
/// The addresses they come from: 127.0.0.10 onwards.
const SLOW_ADDRESSES: u8 = 8;
/// The proxy's `--handshake-timeout` and `--header-read-timeout`.
const TIMEOUT: Duration = Duration::from_secs(15);
/// How long past its timeout the proxy may take to close a stalled connection (a busy
/// 2-core machine).
const CLOSE_SLACK: Duration = Duration::from_secs(20);
/// Requests from 127.0.0.1 while the slow clients hold on.
const NORMAL_REQUESTS: usize = 20;

/// How a slow client stalls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stall {
    /// In the middle of the TLS ClientHello.
    Handshake,
    /// After the handshake, in the middle of the request headers.
    Headers,
}

/// What happened to one slow client.
#[derive(Debug)]
struct Outcome {
    stall: Stall,
    /// How long after it stalled the proxy closed it; `None`: it did not within the bound.
    closed_after: Option<Duration>,
}

/// The soft limit of open files raised to the hard one, so that this process and the
/// proxies it starts (which inherit it) can hold every connection; the soft limit.
fn raise_open_files() -> Result<u64, StepError> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(soft)
}

/// A TCP connection to `proxy` from `from`.
async fn connect_from(from: IpAddr, proxy: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(proxy).await
}

/// Waits for the proxy to close `stream` (end of stream or an error), at most `within`.
async fn closed_by_peer<S: AsyncReadExt + Unpin>(stream: &mut S, within: Duration) -> bool {
    let mut buffer = [0u8; 512];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // Whatever the proxy sends (a TLS alert, a 408): keep reading to the close.
            Ok(Ok(_)) => {}
        }
    }
}

/// One slow client: connects from `from`, stalls as `stall` says, counts itself in
/// `stalled` once and in `holding` while it waits, and reports when the proxy closed it.
async fn slow_client(
    from: IpAddr,
    proxy: SocketAddr,
    stall: Stall,
    tls: tokio_rustls::TlsConnector,
    stalled: Arc<AtomicUsize>,
    holding: Arc<AtomicUsize>,
) -> Result<Outcome, StepError> {
    let mut tcp = connect_from(from, proxy).await?;
    let wait = TIMEOUT + CLOSE_SLACK;
    let (stalled_at, closed) = match stall {
        Stall::Handshake => {
            // A TLS record header announcing a 512-byte handshake message, and the first
            // bytes of a ClientHello: the proxy waits for the rest.
            tcp.write_all(&[
                0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
            ])
            .await?;
            let stalled_at = Instant::now();
            holding.fetch_add(1, Ordering::SeqCst);
            stalled.fetch_add(1, Ordering::SeqCst);
            let closed = closed_by_peer(&mut tcp, wait).await;
            (stalled_at, closed)
        }
        Stall::Headers => {
            let name = ServerName::try_from(APP_HOST.to_owned())?;
            let mut stream = tls.connect(name, tcp).await?;
            stream
                .write_all(format!("GET / HTTP/1.1\r\nHost: {APP_HOST}\r\nX-Slow: a").as_bytes())
                .await?;
            stream.flush().await?;
            let stalled_at = Instant::now();
            holding.fetch_add(1, Ordering::SeqCst);
            stalled.fetch_add(1, Ordering::SeqCst);
            let closed = closed_by_peer(&mut stream, wait).await;
            (stalled_at, closed)
        }
    };
    holding.fetch_sub(1, Ordering::SeqCst);
    Ok(Outcome {
        stall,
        closed_after: closed.then(|| stalled_at.elapsed()),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_timed_out_without_stopping_others() -> TestResult {
    // Each connection is a descriptor here and one in the proxy (which inherits the
    // limit); the rest is headroom for the control plane and the test's clients.
    let open_files = raise_open_files()?;
    assert!(
        open_files >= 2 * SLOW_CLIENTS as u64 + 1024,
        "RLIMIT_NOFILE {open_files} cannot hold {SLOW_CLIENTS} connections; raise `ulimit -Hn`"
    );
    let timeout = format!("{}s", TIMEOUT.as_secs());
    let options = ProxyOptions {
        extra_args: [
            "--handshake-timeout",
            &timeout,
            "--header-read-timeout",
            &timeout,
            "--max-connections-per-client",
            "256",
        ]
        .map(str::to_owned)
        .to_vec(),
        ..ProxyOptions::default()
    };
    let fleet = Fleet::start_with(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "slowloris",
        &["proxy-a"],
        &[],
        &options,
    )
    .await?;
    let backend = TrafficBackend::start("app").await?;
    let group = fleet.create_group("dc", json!({})).await?;
    let app_ca = fleet
        .publish_app("app", APP_HOST, &backend.url(), "dc")
        .await?;
    let state = tempfile::tempdir()?;
    let _connector = fleet.connector(&group, state.path()).start()?;
    let proxy = fleet.addresses()[0];
    eventually(
        "the app served through the proxy",
        REACTION_TIMEOUT,
        async || {
            let answer = https_get(proxy, APP_HOST, &app_ca, "/").await?;
            Ok((answer.status == 200).then_some(()))
        },
    )
    .await?;

    // The slow clients, as fast as they can connect; TLS trusting the app's certificate.
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(&app_ca) {
        roots.add(certificate?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
    let holding = Arc::new(AtomicUsize::new(0));
    let stalled = Arc::new(AtomicUsize::new(0));
    let mut slow = JoinSet::new();
    for n in 0..SLOW_CLIENTS {
        let offset = u8::try_from(n % usize::from(SLOW_ADDRESSES))?;
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + offset));
        let stall = if n % 2 == 0 {
            Stall::Handshake
        } else {
            Stall::Headers
        };
        slow.spawn(slow_client(
            from,
            proxy,
            stall,
            tls.clone(),
            stalled.clone(),
            holding.clone(),
        ));
    }
    eventually(
        "the slow clients connected and stalled",
        TIMEOUT,
        async || Ok((stalled.load(Ordering::SeqCst) == SLOW_CLIENTS).then_some(())),
    )
    .await
    .map_err(|e| {
        format!(
            "{e} ({} of {SLOW_CLIENTS} stalled)",
            stalled.load(Ordering::SeqCst)
        )
    })?;
    eprintln!(
        "{SLOW_CLIENTS} slow clients stalled, {} holding their connections",
        holding.load(Ordering::SeqCst)
    );

    // Meanwhile, users from 127.0.0.1 are served.
    let mut least_holding = SLOW_CLIENTS;
    for n in 0..NORMAL_REQUESTS {
        let answer = tokio::time::timeout(
            TIMEOUT,
            https_get(proxy, APP_HOST, &app_ca, &format!("/normal/{n}")),
        )
        .await
        .map_err(|_| format!("request {n} from 127.0.0.1 not answered within {TIMEOUT:?}"))??;
        assert_eq!(answer.status, 200, "request {n}: {}", answer.text());
        assert!(answer.text().contains("backend=app"), "{}", answer.text());
        least_holding = least_holding.min(holding.load(Ordering::SeqCst));
    }
    eprintln!(
        "{NORMAL_REQUESTS} requests from 127.0.0.1 served while at least {least_holding} slow clients held on"
    );
    assert!(
        least_holding >= SLOW_CLIENTS * 9 / 10,
        "the requests were served while the slow clients held on (at least {least_holding} of {SLOW_CLIENTS})"
    );

    // The proxy closes every stalled connection itself, once its timeout has passed.
    let mut outcomes = Vec::with_capacity(SLOW_CLIENTS);
    while let Some(joined) = slow.join_next().await {
        outcomes.push(joined??);
    }
    for stall in [Stall::Handshake, Stall::Headers] {
        let of_kind: Vec<&Outcome> = outcomes.iter().filter(|o| o.stall == stall).collect();
        let open = of_kind.iter().filter(|o| o.closed_after.is_none()).count();
        assert_eq!(
            open,
            0,
            "{open} connections stalled in the {stall:?} still open {:?} after stalling",
            TIMEOUT + CLOSE_SLACK
        );
        let earliest = of_kind.iter().filter_map(|o| o.closed_after).min();
        let latest = of_kind.iter().filter_map(|o| o.closed_after).max();
        eprintln!(
            "{} stalled in the {stall:?}: closed by the proxy between {earliest:?} and {latest:?} after stalling",
            of_kind.len()
        );
        // Closed by the timeout, not refused at once: none long before it (the
        // proxy's timers start a little before the client stalls: at accept, or when
        // the handshake ends, before the partial request is written).
        assert!(
            earliest.is_some_and(|e| e >= TIMEOUT / 2),
            "{stall:?}: closed before the timeout ({earliest:?})"
        );
    }

    // And the proxy still serves.
    let answer = https_get(proxy, APP_HOST, &app_ca, "/after").await?;
    assert_eq!(answer.status, 200, "{}", answer.text());
    Ok(())
}
