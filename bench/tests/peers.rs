//! The benchmark's peers, for real: `bench/install-peers.sh` installs nginx, rathole and
//! frp (at once when they are there), the bench's own backend runs as a process, and each
//! of the five peers is started in front of it; a small GET and a 1 MiB download through
//! each must come back whole, its processes must be the ones it reports, and once it is
//! dropped they must be gone and its address closed (nginx's workers too).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sallyport_bench::dataplane::backend::SMALL_BODY;
use sallyport_bench::dataplane::process::ChildProcess;
use sallyport_bench::peers::{PeerKind, PeerTools, RunningPeer};

const MIB: u64 = 1024 * 1024;

fn free_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .unwrap_or_else(|e| panic!("a free loopback port: {e}"))
}

async fn start_backend(dir: &Path) -> (ChildProcess, SocketAddr) {
    let address = free_address();
    let backend = ChildProcess::start(
        "backend",
        Path::new(env!("CARGO_BIN_EXE_sallyport-bench")),
        &[
            "dataplane-backend".to_owned(),
            "--listen".to_owned(),
            address.to_string(),
            "--workers".to_owned(),
            "1".to_owned(),
        ],
        &[],
        &dir.join("backend.log"),
    )
    .unwrap_or_else(|e| panic!("starting the backend: {e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(address).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the backend does not listen on {address}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (backend, address)
}

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z")
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn every_peer_carries_small_gets_and_downloads_to_the_backend() {
    let script = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/install-peers.sh"));
    let tools = PeerTools::install(&script)
        .await
        .unwrap_or_else(|e| panic!("installing the peers: {e}"));
    let versions = tools.versions().await;
    for name in ["nginx", "rathole", "frp"] {
        let version = versions
            .get(name)
            .unwrap_or_else(|| panic!("no {name} version in {versions:?}"));
        assert!(!version.starts_with("unknown"), "{name} version: {version}");
    }
    assert!(versions["nginx"].starts_with("nginx/"), "{versions:?}");
    assert!(versions["rathole"].starts_with("rathole "), "{versions:?}");

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("a temporary directory: {e}"));
    let (mut backend, backend_address) = start_backend(dir.path()).await;

    for kind in PeerKind::ALL {
        let label = kind.label();
        let mut peer = RunningPeer::start(kind, &tools, backend_address, dir.path())
            .await
            .unwrap_or_else(|e| panic!("starting {label}: {e}"));
        assert_eq!(peer.kind, kind);
        assert_ne!(peer.address, backend_address, "{label}");
        assert_eq!(peer.ca_pem.is_some(), kind.user_tls(), "{label}");
        let target = peer
            .target()
            .unwrap_or_else(|e| panic!("{label}'s target: {e}"));

        // Two connections one after the other (rathole opens a data channel per visitor
        // connection), a small GET and a 1 MiB download on each.
        for round in 0..2 {
            let mut connection = target
                .connect()
                .await
                .unwrap_or_else(|e| panic!("connecting to {label} ({round}): {e}"));
            let small = connection
                .get("/", Duration::from_secs(10))
                .await
                .unwrap_or_else(|e| panic!("GET / through {label}: {e}"));
            assert_eq!(small.status, http::StatusCode::OK, "{label}");
            assert_eq!(small.head.as_bytes(), SMALL_BODY, "{label}");
            let download = connection
                .get(&format!("/bytes/{MIB}"), Duration::from_secs(30))
                .await
                .unwrap_or_else(|e| panic!("GET /bytes/{MIB} through {label}: {e}"));
            assert_eq!(download.status, http::StatusCode::OK, "{label}");
            assert_eq!(download.received, MIB, "{label}");
            assert!(
                download.head.bytes().all(|byte| byte == b'x'),
                "{label}: {:?}",
                download.head
            );
        }

        let pids = peer.pids();
        let names: Vec<&str> = pids.iter().map(|(name, _)| *name).collect();
        let expected: &[&str] = match kind {
            PeerKind::Nginx | PeerKind::NginxTls => {
                &["nginx-master", "nginx-worker", "nginx-worker"]
            }
            PeerKind::RatholeTls | PeerKind::RatholeTcp => &["rathole-server", "rathole-client"],
            PeerKind::Frp => &["frps", "frpc"],
        };
        assert_eq!(names, expected, "{label}: {pids:?}");
        for (name, pid) in &pids {
            assert!(alive(*pid), "{label}: {name} ({pid}) is not running");
        }
        peer.check_running()
            .unwrap_or_else(|e| panic!("{label} after the requests: {e}"));
        let address = peer.address;
        drop(peer);

        // Every process of the peer is gone, nginx's workers too (they are the master's
        // children, not this test's).
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|(_, pid)| alive(*pid)) {
            assert!(
                Instant::now() < deadline,
                "{label}: processes left after drop: {:?}",
                pids.iter()
                    .filter(|(_, pid)| alive(*pid))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Nothing serves its address any more (a worker the master had started anew
        // would, holding the listening socket).
        while tokio::net::TcpStream::connect(address).await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "{label}: {address} still accepts connections after drop"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    backend
        .check_running()
        .unwrap_or_else(|e| panic!("the backend: {e}"));
}
