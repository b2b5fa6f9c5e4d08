//! Fleet notices and tunnels to every replica.

use std::time::Duration;

use sallyport_tunnel::dial::{DialStatus, TunnelPhase};

use crate::support::{
    Connector, Pki, Replica, TestApp, dial_settings, identity, listen, pool_settings, within,
};

const REPLICAS: [&str; 2] = ["proxy-a", "proxy-b"];

/// Both replicas have at least `n` serving tunnels.
fn serves_both(status: &DialStatus, n: usize) -> bool {
    let per_replica = status.per_replica();
    REPLICAS
        .iter()
        .all(|replica| per_replica.get(*replica).copied().unwrap_or(0) >= n)
}

/// Tunnels dialling or serving: what the targeting rule bounds.
fn active(status: &DialStatus) -> usize {
    status
        .tunnels
        .iter()
        .filter(|t| matches!(t.phase, TunnelPhase::Dialing | TunnelPhase::Serving))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_reach_the_connector_which_serves_every_replica() {
    let pki = Pki::new();
    let a = Replica::new(
        REPLICAS[0],
        &REPLICAS,
        pool_settings(Duration::from_secs(2)),
    );
    let b = Replica::new(
        REPLICAS[1],
        &REPLICAS,
        pool_settings(Duration::from_secs(2)),
    );
    let listener_a = listen(&pki, vec![a.clone()], |_| 0).await;
    let listener_b = listen(&pki, vec![b.clone()], |_| 0).await;
    let app = TestApp::new("vm-1");
    let mut connector = Connector::start(
        &pki,
        identity("infra", "east", "vm-1"),
        dial_settings(vec![listener_a.address.clone(), listener_b.address.clone()]),
        app.handler(),
    );
    connector
        .wait_status("two tunnels to each replica", |status| {
            serves_both(status, 2)
        })
        .await;
    let status = connector.status.borrow().clone();
    assert!(active(&status) <= 8, "{status:?}");
    assert_eq!(status.replicas, REPLICAS);

    // The notice went one way, the reply the other.
    let notice = connector.notices.borrow().clone();
    let notice = notice.unwrap_or_else(|| panic!("no notice"));
    assert_eq!(notice.replicas, REPLICAS);
    assert_eq!(notice.config_version, "v1");
    within("replica a's tunnels", a.pool.wait_for(|t| t.len() >= 2)).await;
    for tunnel in a.pool.snapshot() {
        assert_eq!(tunnel.replica, "proxy-a");
        assert_eq!(tunnel.config_version, "v1");
        assert_eq!(tunnel.connector_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(tunnel.identity.connector_id(), "infra/vm-1");
    }

    // A configuration change: the replica tells every tunnel; once the connector has
    // pulled it, its replies say so.
    within("replica b's tunnels", b.pool.wait_for(|t| t.len() >= 2)).await;
    b.set_config_version("v2");
    let tunnels_b = b.pool.snapshot().len();
    assert_eq!(b.pool.notify_all(|_| b.notice()).await, tunnels_b);
    within(
        "the connector hears of v2",
        connector
            .notices
            .wait_for(|n| n.as_ref().is_some_and(|n| n.config_version == "v2")),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    connector.config_version.send_replace("v2".to_owned());
    assert_eq!(b.pool.notify_all(|_| b.notice()).await, tunnels_b);
    assert!(
        b.pool.snapshot().iter().all(|t| t.config_version == "v2"),
        "{:?}",
        b.pool.snapshot()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_skewed_load_balancer_every_replica_is_still_reached() {
    let pki = Pki::new();
    let a = Replica::new(
        REPLICAS[0],
        &REPLICAS,
        pool_settings(Duration::from_secs(2)),
    );
    let b = Replica::new(
        REPLICAS[1],
        &REPLICAS,
        pool_settings(Duration::from_secs(2)),
    );
    // The first eight connections all land on replica a, then they alternate: the
    // dialer reaches its cap with b still missing and must retire surplus tunnels of a.
    let balancer = listen(&pki, vec![a.clone(), b.clone()], |n| {
        if n < 8 { 0 } else { n % 2 }
    })
    .await;
    let app = TestApp::new("vm-1");
    let mut connector = Connector::start(
        &pki,
        identity("infra", "east", "vm-1"),
        dial_settings(vec![balancer.address.clone()]),
        app.handler(),
    );
    connector
        .wait_status("two tunnels to each replica", |status| {
            serves_both(status, 2)
        })
        .await;
    let status = connector.status.borrow().clone();
    assert!(active(&status) <= 8, "beyond the cap: {status:?}");
    within("replica b's tunnels", b.pool.wait_for(|t| t.len() >= 2)).await;
    within(
        "replica a keeps at most the cap",
        a.pool.wait_for(|t| t.len() <= 6),
    )
    .await;
}
