//! Requests through the tunnel: bodies, balancing, waiting, isolation, cancellation.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use sallyport_tunnel::body::BoxError;
use sallyport_tunnel::pool::PoolError;

use crate::support::{
    Connector, GROUP, OneReplica, Pki, Replica, STREAM_CHUNKS, TestApp, dial_settings, fetch, get,
    identity, listen, pool_settings, read_body, request, within,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_both_ways() {
    let setup = OneReplica::start(Duration::from_secs(2)).await;
    let pool = &setup.replica.pool;

    let (status, hello) = fetch(pool, GROUP, "/hello")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (status, hello),
        (StatusCode::OK, Bytes::from("hello from vm-1"))
    );

    // The first frame arrives while the app still holds the rest back: the response
    // streams rather than being buffered by either end.
    let response = within("the /stream head", pool.send(GROUP, get("/stream")))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut streamed = response.into_body();
    let first = within("the first frame", streamed.frame())
        .await
        .unwrap_or_else(|| panic!("no first frame"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"first;")));
    setup.app.open_gate();
    let rest = within("the rest of /stream", streamed.collect())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .to_bytes();
    assert_eq!(rest.len(), STREAM_CHUNKS * 64 * 1024);
    assert!(rest.iter().all(|b| *b == b'x'));

    // A 3 MiB upload in 64 KiB chunks comes back whole.
    let chunks: Vec<Bytes> = (0..48u8).map(|i| Bytes::from(vec![i; 64 * 1024])).collect();
    let expected: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let upload = StreamBody::new(futures::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, BoxError>(Frame::data(c))),
    ))
    .boxed_unsync();
    let response = within(
        "the /echo head",
        pool.send(GROUP, request(Method::POST, "/echo", upload)),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(read_body(response).await, Bytes::from(expected));

    assert!(
        pool.snapshot().iter().all(|t| t.outstanding == 0),
        "finished bodies still count: {:?}",
        pool.snapshot()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_outstanding_spreads_slow_requests() {
    let setup = OneReplica::start(Duration::from_secs(2)).await;
    let pool = setup.replica.pool.clone();

    let requests: Vec<_> = (0..10)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.send(GROUP, get("/slow")).await })
        })
        .collect();
    setup.app.wait_slow(10).await;
    let loads: Vec<usize> = pool.snapshot().iter().map(|t| t.outstanding).collect();
    assert_eq!(loads, vec![5, 5], "10 slow requests over two tunnels");

    setup.app.open_gate();
    for request in requests {
        let response = within("a slow response", request)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_body(response).await, Bytes::from("slow done"));
    }
    let loads: Vec<usize> = pool.snapshot().iter().map(|t| t.outstanding).collect();
    assert_eq!(loads, vec![0, 0]);
}

/// `(outstanding, bulk)` of each tunnel, in the pool's order.
fn loads(pool: &sallyport_tunnel::pool::TunnelPool) -> Vec<(usize, usize)> {
    pool.snapshot()
        .iter()
        .map(|t| (t.outstanding, t.bulk))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_steers_new_requests_to_the_other_tunnel() {
    let setup = OneReplica::start(Duration::from_secs(2)).await;
    let pool = setup.replica.pool.clone();

    // A download, read past the bulk threshold and then held open.
    let response = within("the /stream head", pool.send(GROUP, get("/stream")))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut download = response.into_body();
    setup.app.open_gate();
    let mut received = 0u64;
    while received < sallyport_tunnel::pool::BULK_STREAM_BYTES {
        let frame = within("a frame of /stream", download.frame())
            .await
            .unwrap_or_else(|| panic!("/stream ended after {received} bytes"))
            .unwrap_or_else(|e| panic!("{e}"));
        received += frame.into_data().map_or(0, |data| data.len() as u64);
    }
    let mut seen = loads(&pool);
    seen.sort_unstable();
    assert_eq!(
        seen,
        vec![(0, 0), (1, 1)],
        "the download is a bulk transfer"
    );

    // Ten small requests, their answers held unread (so they stay outstanding), all go
    // to the tunnel without the download; without the bulk weight they would split 5/5.
    let mut held = Vec::new();
    for _ in 0..10 {
        let response = within("a /hello head", pool.send(GROUP, get("/hello")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        held.push(response);
    }
    let mut seen = loads(&pool);
    seen.sort_unstable();
    assert_eq!(
        seen,
        vec![(1, 1), (10, 0)],
        "small requests avoid the download"
    );

    for response in held {
        assert_eq!(read_body(response).await, Bytes::from("hello from vm-1"));
    }
    let rest = within("the rest of /stream", download.collect())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .to_bytes();
    assert_eq!(
        received + rest.len() as u64,
        (STREAM_CHUNKS * 64 * 1024 + b"first;".len()) as u64
    );
    assert_eq!(
        loads(&pool),
        vec![(0, 0), (0, 0)],
        "finished bodies still count"
    );

    // An upload that declares a bulk length counts as one from the start.
    let upload = sallyport_tunnel::body::full(vec![7u8; 600 * 1024]);
    let response = within(
        "the /echo head",
        pool.send(GROUP, request(Method::POST, "/echo", upload)),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let mut seen = loads(&pool);
    seen.sort_unstable();
    assert_eq!(seen, vec![(0, 0), (1, 1)], "a declared bulk upload");
    assert_eq!(read_body(response).await.len(), 600 * 1024);
    assert_eq!(loads(&pool), vec![(0, 0), (0, 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_without_tunnels_fails_within_the_wait() {
    let setup = OneReplica::start(Duration::from_millis(300)).await;
    let started = tokio::time::Instant::now();
    let outcome = within(
        "NoTunnel",
        setup.replica.pool.send("infra/west", get("/hello")),
    )
    .await;
    let waited = started.elapsed();
    assert!(
        matches!(&outcome, Err(PoolError::NoTunnel { group }) if group == "infra/west"),
        "{outcome:?}"
    );
    assert!(
        waited >= Duration::from_millis(300),
        "gave up after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "held the request {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_for_a_tunnel_that_comes_up() {
    let pki = Pki::new();
    let replica = Replica::new("proxy-0", &["proxy-0"], pool_settings(WAIT_LONG));
    let listener = listen(&pki, vec![replica.clone()], |_| 0).await;
    let pool = replica.pool.clone();
    let waiting = tokio::spawn(async move { fetch(&pool, GROUP, "/hello").await });

    let app = TestApp::new("vm-1");
    let _connector = Connector::start(
        &pki,
        identity("infra", "east", "vm-1"),
        dial_settings(vec![listener.address.clone()]),
        app.handler(),
    );
    let (status, hello) = within("the held request", waiting)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (status, hello),
        (StatusCode::OK, Bytes::from("hello from vm-1"))
    );
}

/// Long enough for a connector to come up, well below the tests' bound.
const WAIT_LONG: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_isolated() {
    let pki = Pki::new();
    let replica = Replica::new(
        "proxy-0",
        &["proxy-0"],
        pool_settings(Duration::from_millis(200)),
    );
    let listener = listen(&pki, vec![replica.clone()], |_| 0).await;
    let east = TestApp::new("east-1");
    let west = TestApp::new("west-1");
    let _east = Connector::start(
        &pki,
        identity("infra", "east", "east-1"),
        dial_settings(vec![listener.address.clone()]),
        east.handler(),
    );
    let _west = Connector::start(
        &pki,
        identity("infra", "west", "west-1"),
        dial_settings(vec![listener.address.clone()]),
        west.handler(),
    );
    within(
        "two tunnels per group",
        replica.pool.wait_for(|tunnels| tunnels.len() == 4),
    )
    .await;

    for _ in 0..20 {
        let (_, answer) = fetch(&replica.pool, "infra/west", "/hello")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answer, Bytes::from("hello from west-1"));
    }
    assert_eq!(
        east.hits.load(Ordering::Relaxed),
        0,
        "east served a west request"
    );
    assert_eq!(west.hits.load(Ordering::Relaxed), 20);

    // Same group name, other namespace: another group.
    let other = fetch(&replica.pool, "other/west", "/hello").await;
    assert!(
        matches!(other, Err(PoolError::NoTunnel { .. })),
        "{other:?}"
    );
    assert_eq!(
        replica.pool.live_groups().into_iter().collect::<Vec<_>>(),
        vec![("infra/east".to_owned(), 2), ("infra/west".to_owned(), 2)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mass_cancellation_keeps_the_tunnels() {
    let mut setup = OneReplica::start(Duration::from_secs(2)).await;
    let pool = setup.replica.pool.clone();
    let tunnels: Vec<u64> = pool.snapshot().iter().map(|t| t.id).collect();
    let dialled: Vec<u64> = setup
        .connector
        .status
        .borrow()
        .tunnels
        .iter()
        .map(|t| t.id)
        .collect();

    // 1,000 requests reach the slow app, then all are dropped at once.
    let mut requests: FuturesUnordered<_> =
        (0..1000).map(|_| pool.send(GROUP, get("/slow"))).collect();
    within("1,000 requests in flight", async {
        tokio::select! {
            early = requests.next() => panic!("a slow request ended early: {early:?}"),
            () = setup.app.wait_slow(1000) => {}
        }
    })
    .await;
    drop(requests);
    assert!(
        pool.snapshot().iter().all(|t| t.outstanding == 0),
        "cancelled streams still count: {:?}",
        pool.snapshot()
    );

    // 1,000 more, dropped while most are still on their way in: streams the connector
    // has not accepted yet are reset under it.
    let mut requests: FuturesUnordered<_> =
        (0..1000).map(|_| pool.send(GROUP, get("/slow"))).collect();
    within("the second wave starts", async {
        tokio::select! {
            early = requests.next() => panic!("a slow request ended early: {early:?}"),
            () = setup.app.wait_slow(1050) => {}
        }
    })
    .await;
    drop(requests);

    // Requests on both tunnels still succeed, and no tunnel was replaced.
    for _ in 0..4 {
        let (status, _) = fetch(&pool, GROUP, "/hello")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status, StatusCode::OK);
    }
    let after: Vec<u64> = pool.snapshot().iter().map(|t| t.id).collect();
    assert_eq!(after, tunnels, "the pool's tunnels changed");
    setup
        .connector
        .wait_status("the dialer keeps its tunnels", |status| {
            status.tunnels.iter().map(|t| t.id).collect::<Vec<_>>() == dialled
        })
        .await;
    assert_eq!(setup.connector.status.borrow().consecutive_failures, 0);
}
