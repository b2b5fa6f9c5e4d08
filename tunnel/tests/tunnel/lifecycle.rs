//! Tunnels coming and going: revocation, reconnection, drain, rotation, shutdown.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use sallyport_tunnel::dial::TunnelPhase;
use sallyport_tunnel::pool::PoolError;

use crate::support::{GROUP, OneReplica, fetch, get, read_body, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_connector_cuts_its_tunnels() {
    let mut setup = OneReplica::start(Duration::from_millis(300)).await;
    let pool = setup.replica.pool.clone();
    let in_flight = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.send(GROUP, get("/slow")).await })
    };
    setup.app.wait_slow(1).await;

    // Revoked: the listener refuses it from now on, and its tunnels go at once.
    setup.replica.revoke("infra/vm-1");
    assert_eq!(pool.close_connector("infra/vm-1"), 2);
    assert_eq!(pool.tunnel_count(GROUP), 0);
    let cut = within("the in-flight request fails", in_flight)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(cut, Err(PoolError::Request { .. })), "{cut:?}");
    let refused = fetch(&pool, GROUP, "/hello").await;
    assert!(
        matches!(&refused, Err(PoolError::NoTunnel { group }) if group == GROUP),
        "{refused:?}"
    );

    // The connector redials, is refused, and backs off.
    setup
        .connector
        .wait_status("the dialer is refused", |status| {
            status.consecutive_failures >= 2 && status.last_error.is_some()
        })
        .await;
    assert_eq!(pool.tunnel_count(GROUP), 0);
    assert_eq!(pool.close_connector("infra/vm-1"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dialer_reconnects_when_the_fleet_drops_its_connections() {
    let setup = OneReplica::start(Duration::from_secs(2)).await;
    let pool = &setup.replica.pool;
    let before: Vec<u64> = pool.snapshot().iter().map(|t| t.id).collect();

    setup.replica.drop_connections();
    within(
        "two new tunnels",
        pool.wait_for(|tunnels| {
            tunnels.len() == 2 && tunnels.iter().all(|t| !before.contains(&t.id))
        }),
    )
    .await;
    let (status, hello) = fetch(pool, GROUP, "/hello")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (status, hello),
        (StatusCode::OK, Bytes::from("hello from vm-1"))
    );
    // Healthy tunnels that dropped are redialled at once, not counted as failures.
    assert_eq!(setup.connector.status.borrow().consecutive_failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_lets_in_flight_streams_finish() {
    let mut setup = OneReplica::start(Duration::from_millis(300)).await;
    let pool = setup.replica.pool.clone();
    let in_flight = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.send(GROUP, get("/slow")).await })
    };
    setup.app.wait_slow(1).await;

    setup.connector.begin_shutdown();
    setup
        .connector
        .wait_status("the tunnels drain", |status| {
            !status.tunnels.is_empty()
                && status
                    .tunnels
                    .iter()
                    .all(|t| t.phase == TunnelPhase::Draining)
        })
        .await;
    // A request during the drain is either served or finds no tunnel; it is never lost
    // on a tunnel that is going away.
    match fetch(&pool, GROUP, "/hello").await {
        Ok((StatusCode::OK, _)) | Err(PoolError::NoTunnel { .. }) => {}
        other => panic!("a request during the drain: {other:?}"),
    }

    setup.app.open_gate();
    let response = within("the in-flight response", in_flight)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(read_body(response).await, Bytes::from("slow done"));

    setup
        .connector
        .join()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(setup.connector.status.borrow().tunnels.is_empty());
    within(
        "the pool lets go",
        pool.wait_for(|tunnels| tunnels.is_empty()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_credentials_apply_to_new_tunnels_only() {
    let setup = OneReplica::start(Duration::from_secs(2)).await;
    let pool = setup.replica.pool.clone();
    let first = setup.connector.credentials.load().chain[0].clone();
    assert_eq!(
        setup.replica.presented(),
        vec![first.clone(), first.clone()]
    );

    let in_flight = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.send(GROUP, get("/slow")).await })
    };
    setup.app.wait_slow(1).await;
    let tunnels = pool.snapshot();
    let busy = tunnels
        .iter()
        .find(|t| t.outstanding == 1)
        .map(|t| t.id)
        .unwrap_or_else(|| panic!("no busy tunnel: {tunnels:?}"));
    let idle = tunnels
        .iter()
        .find(|t| t.id != busy)
        .map(|t| t.id)
        .unwrap_or_else(|| panic!("no idle tunnel: {tunnels:?}"));

    let renewed = setup.pki.connector(&setup.connector.identity);
    let second = renewed.chain[0].clone();
    setup.connector.credentials.store(Arc::new(renewed));
    assert!(pool.close_tunnel(idle));
    within(
        "a tunnel with the new certificate",
        pool.wait_for(|tunnels| tunnels.len() == 2 && tunnels.iter().all(|t| t.id != idle)),
    )
    .await;
    assert_eq!(
        setup.replica.presented(),
        vec![first.clone(), first, second]
    );

    // The busy tunnel, made with the old certificate, carries its stream to the end.
    assert!(pool.snapshot().iter().any(|t| t.id == busy));
    setup.app.open_gate();
    let response = within("the in-flight response", in_flight)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read_body(response).await, Bytes::from("slow done"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_pool_lets_in_flight_streams_finish() {
    let setup = OneReplica::start(Duration::from_secs(2)).await;
    let pool = setup.replica.pool.clone();
    let in_flight = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.send(GROUP, get("/slow")).await })
    };
    setup.app.wait_slow(1).await;

    let closing = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.close_all().await })
    };
    within("routing stops", pool.wait_for(|tunnels| tunnels.is_empty())).await;
    let refused = pool.send(GROUP, get("/hello")).await;
    assert!(matches!(refused, Err(PoolError::Closed)), "{refused:?}");
    assert!(
        !closing.is_finished(),
        "close_all returned with a stream in flight"
    );

    setup.app.open_gate();
    let response = within("the in-flight response", in_flight)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read_body(response).await, Bytes::from("slow done"));
    within("close_all returns", closing)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tunnel_signals_once_it_carries_requests() {
    let setup = OneReplica::start(Duration::from_secs(2)).await;
    // The connector's two tunnels: each signalled once, when it joined the pool.
    within("both tunnels signal", async {
        while setup.replica.routed() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(setup.replica.pool.snapshot().len(), 2);
    let (status, _) = fetch(&setup.replica.pool, GROUP, "/hello")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, StatusCode::OK);
    // Requests signal nothing more.
    assert_eq!(setup.replica.routed(), 2);
}
