//! The Redis store against a real `redis-server` (Debian's `redis-server` package): the
//! test starts its own on a free loopback port, without persistence, never the system
//! service.

use std::net::{IpAddr, TcpListener};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use sallyport_risk::{
    DetectionSettings, RedisStore, RiskDetectionKind, RiskEngine, RiskStore, SignInAttempt,
    SignInRecord, StoreSettings,
};
use tokio::process::{Child, Command};

struct RedisServer {
    _child: Child,
    url: String,
}

async fn redis_server() -> RedisServer {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("free port: {e}"))
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("redis-server (hack/install-test-packages.sh installs it): {e}")
        });
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return RedisServer {
                _child: child,
                url: format!("redis://127.0.0.1:{port}/"),
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("redis-server did not listen on port {port}");
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn settings(prefix: &str) -> StoreSettings {
    StoreSettings {
        failure_window: Duration::from_secs(600),
        history_len: 3,
        key_prefix: prefix.to_owned(),
        ..StoreSettings::default()
    }
}

const MINUTE: i64 = 60_000;

#[tokio::test]
async fn failures_and_history_are_shared_through_redis() {
    let server = redis_server().await;
    // Two stores, as two replicas would have.
    let a = RedisStore::new(&server.url, settings("test")).unwrap_or_else(|e| panic!("{e}"));
    let b = RedisStore::new(&server.url, settings("test")).unwrap_or_else(|e| panic!("{e}"));
    let other_fleet =
        RedisStore::new(&server.url, settings("other")).unwrap_or_else(|e| panic!("{e}"));
    let t0 = 1_800_000_000_000;
    let attacker = ip("203.0.113.9");
    a.record_failure(None, attacker, t0)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    a.record_failure(Some("alice"), attacker, t0 + MINUTE)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    b.record_failure(Some("bob"), attacker, t0 + 2 * MINUTE)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    b.record_failure(Some("bob"), ip("198.51.100.1"), t0 + 3 * MINUTE)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let seen = a
        .observe("bob", attacker, t0 + 4 * MINUTE)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (seen.ip_failures, seen.ip_failed_users, seen.user_failures),
        (3, 2, 2)
    );
    // The window slides: the first failure leaves it after ten minutes.
    let later = b
        .observe("bob", attacker, t0 + 10 * MINUTE + 1)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (
            later.ip_failures,
            later.ip_failed_users,
            later.user_failures
        ),
        (2, 2, 2)
    );
    let elsewhere = other_fleet
        .observe("bob", attacker, t0 + 4 * MINUTE)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (elsewhere.ip_failures, elsewhere.user_failures),
        (0, 0),
        "another prefix is another fleet"
    );

    for n in 1..=4u8 {
        let record = SignInRecord {
            at_ms: t0 + i64::from(n) * MINUTE,
            ip: IpAddr::from([198, 51, 100, n]),
            network: "198.51.100.0/24".to_owned(),
            platform: None,
            place: None,
        };
        a.record_sign_in("alice", &record)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let history = b
        .observe("alice", attacker, t0 + 5 * MINUTE)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .history;
    let ips: Vec<IpAddr> = history.iter().map(|r| r.ip).collect();
    assert_eq!(
        ips,
        vec![ip("198.51.100.4"), ip("198.51.100.3"), ip("198.51.100.2")],
        "the last three, newest first"
    );
}

#[tokio::test]
async fn failures_on_one_replica_raise_risk_on_another() {
    let server = redis_server().await;
    let engine = |prefix: &str| {
        RiskEngine::new(
            DetectionSettings {
                ip_failures: 4,
                ..DetectionSettings::default()
            },
            Arc::new(
                RedisStore::new(&server.url, settings(prefix)).unwrap_or_else(|e| panic!("{e}")),
            ),
        )
    };
    let (a, b) = (engine("fleet"), engine("fleet"));
    let now = 1_800_000_000_000;
    let attacker = ip("203.0.113.9");
    for n in 0..4 {
        a.record_failure(None, attacker, now + n).await;
    }
    let assessed = b
        .assess(&SignInAttempt {
            user: "carol",
            ip: attacker,
            platform: None,
            now_ms: now + 10,
        })
        .await;
    assert_eq!(
        assessed
            .detections
            .iter()
            .map(|d| d.kind)
            .collect::<Vec<_>>(),
        vec![RiskDetectionKind::MaliciousIpAddress]
    );
    let elsewhere = b
        .assess(&SignInAttempt {
            user: "carol",
            ip: ip("198.51.100.1"),
            platform: None,
            now_ms: now + 10,
        })
        .await;
    assert!(
        elsewhere.detections.is_empty(),
        "{:?}",
        elsewhere.detections
    );
}

#[tokio::test]
async fn a_store_that_is_down_fails_the_operation_not_the_caller() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("free port: {e}"))
        .port();
    let url = format!("redis://127.0.0.1:{port}/");
    let store = RedisStore::new(&url, settings("down")).unwrap_or_else(|e| panic!("{e}"));
    let error = store
        .observe("alice", ip("203.0.113.9"), 0)
        .await
        .err()
        .unwrap_or_else(|| panic!("nothing listens on {url}"));
    assert!(error.to_string().contains(&url), "{error}");
    // The engine goes on without the state.
    let engine = RiskEngine::new(DetectionSettings::default(), Arc::new(store));
    let assessed = engine
        .assess(&SignInAttempt {
            user: "alice",
            ip: ip("203.0.113.9"),
            platform: None,
            now_ms: 0,
        })
        .await;
    assert!(assessed.detections.is_empty());
}
