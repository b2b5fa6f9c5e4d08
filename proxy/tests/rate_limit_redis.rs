//! The fleet-wide rate limit buckets against a real `redis-server` (Debian's
//! `redis-server` package): the test starts its own on a free loopback port, without
//! persistence. Two [`SharedLimits`] play two replicas.

use std::net::{IpAddr, TcpListener};
use std::process::Stdio;
use std::time::Duration;

use sallyport_api::published_app::{ClientRateLimit, RateLimit};
use sallyport_proxy::rate_limit::shared::{Bucket, SharedLimits, Verdict};
use sallyport_proxy::rate_limit::{AppRateLimiter, Limited};
use tokio::process::{Child, Command};

struct RedisServer {
    child: Child,
    url: String,
    port: u16,
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
                child,
                url: format!("redis://127.0.0.1:{port}/"),
                port,
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("redis-server did not listen on port {port}");
}

fn bucket(key: &str, requests_per_second: u32, burst: u32) -> Bucket {
    Bucket {
        key: key.to_owned(),
        requests_per_second,
        burst,
    }
}

async fn take(limits: &SharedLimits, buckets: &[Bucket]) -> Verdict {
    limits
        .take(buckets)
        .await
        .unwrap_or_else(|e| panic!("take: {e}"))
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("redis-cli: {e}"));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[tokio::test]
async fn two_replicas_share_one_burst_and_get_a_wait_when_it_is_gone() {
    let redis = redis_server().await;
    let a = SharedLimits::new(&redis.url, "test").unwrap_or_else(|e| panic!("{e}"));
    let b = SharedLimits::new(&redis.url, "test").unwrap_or_else(|e| panic!("{e}"));
    // One a second (slow enough that nothing refills while the test runs), bursts of 4.
    let app = [bucket("app:team/wiki", 1, 4)];
    for replica in [&a, &b, &a, &b] {
        assert_eq!(take(replica, &app).await, Verdict::Allowed);
    }
    for replica in [&a, &b] {
        match take(replica, &app).await {
            Verdict::Limited { bucket: 0, wait } => assert!(
                wait > Duration::ZERO && wait <= Duration::from_secs(1),
                "{wait:?}"
            ),
            other => panic!("the fifth request: {other:?}"),
        }
    }
    // The key expires once the bucket is full again: within the 4 s it takes to refill.
    let ttl: i64 = redis_cli(redis.port, &["PTTL", "test:app:team/wiki"])
        .parse()
        .unwrap_or_else(|e| panic!("PTTL: {e}"));
    assert!(ttl > 0 && ttl <= 4_001, "{ttl}");
    assert!(a.is_up() && b.is_up());
}

#[tokio::test]
async fn a_clients_empty_bucket_takes_nothing_from_the_apps() {
    let redis = redis_server().await;
    let limits = SharedLimits::new(&redis.url, "test").unwrap_or_else(|e| panic!("{e}"));
    let client = bucket("app-client:team/wiki:192.0.2.1", 1, 1);
    let other = bucket("app-client:team/wiki:192.0.2.2", 1, 1);
    let app = bucket("app:team/wiki", 1, 2);
    assert_eq!(
        take(&limits, &[client.clone(), app.clone()]).await,
        Verdict::Allowed
    );
    // The client's bucket is empty: refused, naming it, and the app's keeps its room.
    assert!(matches!(
        take(&limits, &[client.clone(), app.clone()]).await,
        Verdict::Limited { bucket: 0, .. }
    ));
    assert_eq!(
        take(&limits, &[other.clone(), app.clone()]).await,
        Verdict::Allowed
    );
    // Now the app's is empty too.
    let third = bucket("app-client:team/wiki:192.0.2.3", 1, 1);
    assert!(matches!(
        take(&limits, &[third, app]).await,
        Verdict::Limited { bucket: 1, .. }
    ));
}

#[tokio::test]
async fn an_apps_limit_holds_for_the_fleet_and_falls_back_to_the_share_without_redis() {
    let mut redis = redis_server().await;
    let limit = RateLimit {
        requests_per_second: 1,
        burst: 6,
        per_client_ip: Some(ClientRateLimit {
            requests_per_second: 1,
            burst: 100,
        }),
    };
    let client: IpAddr = "192.0.2.1".parse().unwrap_or_else(|e| panic!("{e}"));
    let store = SharedLimits::new(&redis.url, "test").unwrap_or_else(|e| panic!("{e}"));
    // Three replicas' buckets (a share would be 2 each); the fleet takes 6 in all.
    let replicas: Vec<AppRateLimiter> = (0..3).map(|_| AppRateLimiter::new(&limit, 3)).collect();
    let mut allowed = 0;
    for _ in 0..4 {
        for replica in &replicas {
            if replica
                .check_request("team/wiki", client, Some(&store))
                .await
                .is_ok()
            {
                allowed += 1;
            }
        }
    }
    assert!((6..=7).contains(&allowed), "{allowed} of 12 allowed");
    // All through one replica: more than its share of 2.
    let redis_cli_flush = redis_cli(redis.port, &["FLUSHALL"]);
    assert_eq!(redis_cli_flush, "OK");
    let one = AppRateLimiter::new(&limit, 3);
    let mut through_one = 0;
    for _ in 0..6 {
        if one
            .check_request("team/wiki", client, Some(&store))
            .await
            .is_ok()
        {
            through_one += 1;
        }
    }
    assert!(through_one >= 5, "{through_one} of 6 through one replica");

    // Redis gone: a fresh replica falls back to its share (2), not to unlimited.
    redis.child.kill().await.unwrap_or_else(|e| panic!("{e}"));
    let fresh = AppRateLimiter::new(&limit, 3);
    let mut results = Vec::new();
    for _ in 0..4 {
        results.push(fresh.check_request("team/wiki", client, Some(&store)).await);
    }
    assert_eq!(&results[..2], &[Ok(()), Ok(())], "{results:?}");
    assert!(
        results[2..]
            .iter()
            .all(|r| matches!(r, Err(Limited::App(_)))),
        "{results:?}"
    );
    assert!(!store.is_up());
}
