//! Apps' rate limits counted fleet-wide in Redis, end to end: a real control plane,
//! operator, two proxy replicas sharing a `redis-server` of the test's own
//! (`--limits-store`), a connector and a backend.
//!
//! The app's limit is 2 requests a second in bursts of 30. Alone, each of the two
//! replicas would enforce its share (1 a second, bursts of 15). Through the store:
//!
//! 1. 30 requests to replica A: more succeed than A's share would let through (the
//!    fleet's whole burst is A's to use); then requests to replica B are answered 429
//!    with `Retry-After`, and the successes across both stay within the fleet's bound
//!    (the burst plus the rate over the time taken);
//! 2. once the bucket has refilled (its Redis key expires when full), B serves again;
//! 3. with Redis stopped, both replicas keep serving under their own share: some
//!    requests succeed, a long burst still meets 429 (limited, not unlimited), and the
//!    replica reports the store down and counts its fallbacks.

use std::path::Path;
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use sallyport_api::PublishedApp;
use sallyport_e2e::dataplane::{
    Fleet, ProxyOptions, REACTION_TIMEOUT, StepError, TrafficBackend, eventually, https_get,
};
use sallyport_e2e::risk::RedisServer;
use sallyport_e2e::sign_in::check;
use serde_json::json;

const APP_HOST: &str = "wiki.limits.test";
const RATE: u32 = 2;
const BURST: u32 = 30;

/// How many of `count` requests to `listen` succeeded (200) and were limited (429); any
/// other answer fails the test.
async fn burst(
    listen: std::net::SocketAddr,
    ca: &[u8],
    count: u32,
) -> Result<(u32, u32), StepError> {
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..count {
        let answer = https_get(listen, APP_HOST, ca, "/").await?;
        match answer.status.as_u16() {
            200 => ok += 1,
            429 => {
                check(
                    answer.headers.contains_key("retry-after"),
                    format!("a 429 without Retry-After: {:?}", answer.headers),
                )?;
                limited += 1;
            }
            other => return Err(format!("unexpected {other}: {}", answer.text()).into()),
        }
    }
    Ok((ok, limited))
}

/// `redis-cli` against `port`, its output trimmed.
fn redis_cli(port: &str, args: &[&str]) -> Result<String, StepError> {
    let output = std::process::Command::new("redis-cli")
        .args(["-p", port])
        .args(args)
        .output()?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Waits until the app's fleet bucket is full again (its key expired), then a little
/// more so that the replicas' own fast-path buckets are full too.
async fn refilled(port: &str, key: &str) -> Result<(), StepError> {
    eventually(
        "the app's bucket full again",
        REACTION_TIMEOUT,
        async || Ok((redis_cli(port, &["EXISTS", key])? == "0").then_some(())),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_an_apps_rate_limit_through_redis_and_fall_back_to_their_share()
-> Result<(), StepError> {
    let redis = RedisServer::start().await?;
    let port = redis
        .url
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let options = ProxyOptions {
        extra_args: vec![
            "--limits-store".to_owned(),
            redis.url.clone(),
            "--limits-store-prefix".to_owned(),
            "e2e".to_owned(),
        ],
        stdout_file: None,
    };
    let fleet = Fleet::start_with(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        "limits-shared",
        &["proxy-a", "proxy-b"],
        &[],
        &options,
    )
    .await?;
    let namespace = fleet.bed.namespace.clone();
    let key = format!("e2e:app:{namespace}/wiki");
    let backend = TrafficBackend::start("wiki").await?;
    let group = fleet.create_group("east", json!({})).await?;
    let ca = fleet
        .publish_app("wiki", APP_HOST, &backend.url(), "east")
        .await?;
    let state = tempfile::tempdir()?;
    let _connector = fleet.connector(&group, state.path()).start()?;
    let [a, b] = [0, 1].map(|i| {
        fleet
            .proxies
            .get(i)
            .map(|p| (p.ports.listen, p.ports.probes))
    });
    let ((a, a_probes), (b, _)) = (a.ok_or("no proxy A")?, b.ok_or("no proxy B")?);
    for (name, listen) in [("A", a), ("B", b)] {
        eventually(
            &format!("the app answering through replica {name}"),
            REACTION_TIMEOUT,
            async || Ok((https_get(listen, APP_HOST, &ca, "/").await?.status == 200).then_some(())),
        )
        .await?;
    }

    // The limit, in force on both replicas once each answers 429.
    Api::<PublishedApp>::namespaced(fleet.bed.client.clone(), &namespace)
        .patch(
            "wiki",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"rateLimit": {"requestsPerSecond": RATE, "burst": BURST}}}),
            ),
        )
        .await?;
    for (name, listen) in [("A", a), ("B", b)] {
        eventually(
            &format!("replica {name} enforcing the new limit"),
            REACTION_TIMEOUT,
            async || Ok((burst(listen, &ca, 10).await?.1 > 0).then_some(())),
        )
        .await?;
    }
    check(
        redis_cli(&port, &["EXISTS", &key])? == "1",
        format!("no bucket {key} in Redis"),
    )?;
    refilled(&port, &key).await?;

    // 1. The fleet's burst, taken through A, then B is over the limit.
    let started = Instant::now();
    let (a_ok, _) = burst(a, &ca, BURST).await?;
    let (b_ok, b_limited) = burst(b, &ca, BURST).await?;
    let elapsed = started.elapsed().as_secs() + 1;
    let fleet_bound = u64::from(BURST) + u64::from(RATE) * elapsed + 1;
    check(
        u64::from(a_ok + b_ok) <= fleet_bound,
        format!("{a_ok} + {b_ok} successes in {elapsed} s: over the fleet's {fleet_bound}"),
    )?;
    let share_bound = u64::from(BURST / 2) + u64::from(RATE / 2) * elapsed;
    check(
        u64::from(a_ok) > share_bound || elapsed > 10,
        format!("replica A let {a_ok} through, no more than its own share {share_bound}"),
    )?;
    check(
        b_limited > 0,
        format!("replica B limited none of {BURST} after A took the fleet's burst ({b_ok} ok)"),
    )?;

    // 2. Recovered once the bucket refilled.
    refilled(&port, &key).await?;
    let (ok, _) = burst(b, &ca, 3).await?;
    check(ok == 3, format!("{ok} of 3 through B after the refill"))?;

    // 3. Redis stopped: each replica limits with its own share.
    drop(redis);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (a_ok, a_limited) = burst(a, &ca, 3 * BURST).await?;
    check(
        a_ok > 0 && a_limited > 0,
        format!(
            "with Redis down, replica A: {a_ok} ok, {a_limited} limited of {}",
            3 * BURST
        ),
    )?;
    let (b_ok, _) = burst(b, &ca, 3).await?;
    check(b_ok > 0, "with Redis down, replica B served none of 3")?;
    let metrics = https_or_plain_metrics(a_probes).await?;
    check(
        metrics.contains("sallyport_proxy_rate_limit_store_up 0")
            && metrics.lines().any(|line| {
                line.starts_with("sallyport_proxy_rate_limit_store_fallbacks_total ")
                    && !line.ends_with(" 0")
            }),
        format!("replica A's metrics with Redis down:\n{metrics}"),
    )?;
    Ok(())
}

/// The proxy's `/metrics` on its probe address (plain HTTP/1.1).
async fn https_or_plain_metrics(address: std::net::SocketAddr) -> Result<String, StepError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: probes\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text)
}
