//! Anonymizing networks from a watched ConfigMap, end to end: a real control plane,
//! operator, proxy, connector and OpenID provider.
//!
//! The proxy follows the ConfigMap `sallyport-anonymizers` in the fleet's namespace; a
//! policy blocks sign-ins with medium or high sign-in risk. The list first names other
//! networks, and Alice signs in from 127.0.0.2. Then 127.0.0.2/32 is added to the
//! ConfigMap while the proxy runs: her next sign-in from there is blocked, with
//! `anonymizedIpAddress` in the sign-in log, while from 127.0.0.3 she still signs in.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use http::StatusCode;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams};
use sallyport_e2e::access::{AccessBed, AccessBedConfig, AccessProxy, app_policy};
use sallyport_e2e::dataplane::{REACTION_TIMEOUT, StepError, eventually};
use sallyport_e2e::risk::{detections, sign_in_from};
use sallyport_e2e::sign_in::check;
use serde_json::json;

const VPN: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const ELSEWHERE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
const CONFIG_MAP: &str = "sallyport-anonymizers";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_anonymizer_added_to_the_config_map_is_detected_without_a_restart()
-> Result<(), StepError> {
    let bed = AccessBed::start(
        Path::new(env!("CARGO_BIN_EXE_sallyport-cluster")),
        &AccessBedConfig {
            prefix: "risk-anonymizer".to_owned(),
            proxies: vec![AccessProxy::new(
                "proxy-a",
                &["--risk-anonymizer-configmap", CONFIG_MAP],
            )],
            assignment: json!({"groups": ["staff"]}),
            policies: vec![app_policy(
                "block-risky-sign-ins",
                "Enabled",
                json!({"signInRisk": ["medium", "high"]}),
                json!({"block": true}),
            )],
        },
    )
    .await?;
    let config_maps = Api::<ConfigMap>::namespaced(
        bed.fleet.bed.client.clone(),
        &bed.fleet.bed.operator_namespace,
    );
    let apply = async |cidrs: &str| -> Result<(), StepError> {
        config_maps
            .patch(
                CONFIG_MAP,
                &PatchParams::apply("sallyport-e2e").force(),
                &Patch::Apply(json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": CONFIG_MAP},
                    "data": {"cidrs": cidrs},
                })),
            )
            .await?;
        Ok(())
    };
    apply("# a VPN provider\n198.51.100.0/24\n").await?;

    let before = sign_in_from(&bed, 0, VPN, "alice").await?;
    check(
        before.answer.status == StatusCode::FOUND && before.session_cookie.is_some(),
        format!(
            "alice's sign-in from 127.0.0.2 before it is listed: {} {}",
            before.answer.status,
            before.answer.text()
        ),
    )?;

    apply("# a VPN provider\n198.51.100.0/24\n127.0.0.2/32  # the test's VPN\n").await?;
    eventually(
        "alice's sign-in from 127.0.0.2 blocked once it is listed",
        REACTION_TIMEOUT,
        async || {
            let attempt = sign_in_from(&bed, 0, VPN, "alice").await?;
            Ok((attempt.answer.status == StatusCode::FORBIDDEN
                && attempt.answer.text().contains("Access blocked"))
            .then_some(()))
        },
    )
    .await?;
    let event = bed.logs[0]
        .wait_for("the blocked sign-in in the sign-in log", |e| {
            e["stage"] == "signIn" && e["decision"] == "blocked"
        })
        .await?;
    check(
        event["clientIp"] == "127.0.0.2"
            && event["signInRisk"] == "medium"
            && detections(&event) == vec!["anonymizedIpAddress".to_owned()]
            && event["riskDetections"][0]["detail"]
                .as_str()
                .is_some_and(|d| d.contains("127.0.0.2/32")),
        format!("the sign-in log of the blocked sign-in: {event}"),
    )?;

    let elsewhere = sign_in_from(&bed, 0, ELSEWHERE, "alice").await?;
    check(
        elsewhere.answer.status == StatusCode::FOUND && elsewhere.session_cookie.is_some(),
        format!(
            "alice's sign-in from 127.0.0.3: {} {}",
            elsewhere.answer.status,
            elsewhere.answer.text()
        ),
    )?;
    Ok(())
}
