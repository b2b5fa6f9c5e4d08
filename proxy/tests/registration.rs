//! Registration, renewal and configuration end to end in one process: the fleet API on a
//! real TLS listener (the fleet's own rustls settings, a PKI made as the operator makes
//! it), a MemoryRegistry, and the connector's own client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::Engine;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, ServerName};
use sallyport_api::FleetConfig;
use sallyport_api::connector_group::{CertificatePolicy, Registration};
use sallyport_api::fleet_config::ConnectorGroupConfig;
use sallyport_connector::register::{self, FleetEndpoint, RegisterError};
use sallyport_connector::state::ConnectorState;
use sallyport_proxy::fleet_api::{ClientAddress, FleetApi};
use sallyport_proxy::issuer::Issuer;
use sallyport_proxy::registry::{MemoryRegistry, RecordEvent, StaticToken};
use sallyport_tunnel::tls::{self, Credentials};
use sallyport_tunnel::wire::{ApiError, REGISTER_PATH, RegisterRequest};
use time::OffsetDateTime;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const SERVER_NAME: &str = "fleet.sallyport.test";

fn ok<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// The fleet's PKI, made as the operator makes it: a root, the connector issuer under
/// it, the tunnel serving certificate under the root.
struct Pki {
    root_pem: String,
    root_der: CertificateDer<'static>,
    issuer: Issuer,
    serving: Credentials,
}

fn ca_params(name: &str, path_len: u8) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Sallyport");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = OffsetDateTime::now_utc() + time::Duration::days(3 * 365);
    params
}

fn pki() -> Pki {
    let root_key = ok(KeyPair::generate());
    let root_params = ca_params("Sallyport root CA", 1);
    let root = ok(root_params.self_signed(&root_key));
    let root_signer = rcgen::Issuer::new(root_params, root_key);

    let issuer_key = ok(KeyPair::generate());
    let mut issuer_params = ca_params("Sallyport connector issuer", 0);
    issuer_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let issuer_cert = ok(issuer_params.signed_by(&issuer_key, &root_signer));

    let serving_key = ok(KeyPair::generate());
    let mut serving_params = ok(CertificateParams::new(vec![SERVER_NAME.to_owned()]));
    serving_params
        .distinguished_name
        .push(DnType::CommonName, SERVER_NAME);
    serving_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    serving_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_cert = ok(serving_params.signed_by(&serving_key, &root_signer));

    Pki {
        root_pem: root.pem(),
        root_der: root.der().clone(),
        issuer: ok(Issuer::from_pem(
            &issuer_cert.pem(),
            &issuer_key.serialize_pem(),
            &root.pem(),
        )),
        serving: ok(Credentials::from_pem(
            "tunnel serving certificate",
            serving_cert.pem().as_bytes(),
            serving_key.serialize_pem().as_bytes(),
        )),
    }
}

fn group(id: &str, validity: &str, renew_after: &str) -> ConnectorGroupConfig {
    ConnectorGroupConfig {
        id: id.to_owned(),
        certificate: CertificatePolicy {
            validity: ok(sallyport_api::Duration::parse(validity)),
            renew_after: ok(sallyport_api::Duration::parse(renew_after)),
        },
        registration: Registration::default(),
        inactive_connector_ttl: ok(sallyport_api::Duration::parse("240h")),
        connector_version: None,
    }
}

fn fleet_config(revoked: Vec<String>) -> FleetConfig {
    ok(FleetConfig::new(
        vec![],
        vec![],
        vec![
            group("infra/east", "24h", "12h"),
            group("infra/old", "24h", "12h"),
            group("infra/once", "24h", "12h"),
            group("infra/west", "3h", "2h59m"),
        ],
        revoked,
    ))
}

fn token(group_id: &str, token: &str, expires_in_seconds: i64, max_uses: u32) -> StaticToken {
    StaticToken {
        group_id: group_id.to_owned(),
        token: token.to_owned(),
        expires_at: Some(OffsetDateTime::now_utc() + time::Duration::seconds(expires_in_seconds)),
        max_uses,
    }
}

/// A fleet API listening on loopback.
struct Fleet {
    address: SocketAddr,
    root_pem: String,
    root_der: CertificateDer<'static>,
    registry: Arc<MemoryRegistry>,
    config: Arc<ArcSwap<FleetConfig>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Fleet {
    async fn start() -> Self {
        Self::start_with_alpn(None).await
    }

    /// A fleet whose listener offers only `alpn`, when given.
    async fn start_with_alpn(alpn: Option<&[u8]>) -> Self {
        let pki = pki();
        let registry = Arc::new(MemoryRegistry::new(vec![
            token("infra/east", "east-token", 3600, 0),
            token("infra/west", "west-token", 3600, 0),
            token("infra/old", "old-token", -60, 0),
            token("infra/once", "once-token", 3600, 1),
        ]));
        let config = Arc::new(ArcSwap::from_pointee(fleet_config(vec![])));
        let api = FleetApi::new(
            Arc::new(ArcSwap::from_pointee(pki.issuer)),
            registry.clone(),
            config.clone(),
        );
        let mut server_config = ok(tls::fleet_server_config(
            &pki.serving,
            std::slice::from_ref(&pki.root_der),
        ));
        if let Some(alpn) = alpn {
            let mut only = (*server_config).clone();
            only.alpn_protocols = vec![alpn.to_vec()];
            server_config = Arc::new(only);
        }
        let listener = ok(TcpListener::bind("127.0.0.1:0").await);
        let address = ok(listener.local_addr());
        let acceptor = TlsAcceptor::from(server_config);
        let server = tokio::spawn(async move {
            while let Ok((tcp, client)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let api = api.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let peer = tls::peer_identity(stream.get_ref().1).and_then(Result::ok);
                    let service = hyper::service::service_fn(
                        move |mut request: Request<hyper::body::Incoming>| {
                            let api = api.clone();
                            let peer = peer.clone();
                            request.extensions_mut().insert(ClientAddress(client));
                            async move { Ok::<_, Infallible>(api.handle(request, peer).await) }
                        },
                    );
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            address,
            root_pem: pki.root_pem,
            root_der: pki.root_der,
            registry,
            config,
            server,
        }
    }

    fn endpoint(&self) -> FleetEndpoint {
        FleetEndpoint {
            address: self.address.to_string(),
            server_name: SERVER_NAME.to_owned(),
            ca: vec![self.root_der.clone()],
        }
    }

    /// POSTs a registration with any CSR, over HTTP/1.1 without a client certificate.
    async fn register_raw(
        &self,
        token: &str,
        group: &str,
        csr: &str,
    ) -> (StatusCode, serde_json::Value) {
        let config = ok(tls::connector_client_config(
            None,
            std::slice::from_ref(&self.root_der),
            &[b"http/1.1"],
        ));
        let tcp = ok(TcpStream::connect(self.address).await);
        let name = ok(ServerName::try_from(SERVER_NAME));
        let stream = ok(TlsConnector::from(config).connect(name, tcp).await);
        let (mut sender, connection) =
            ok(hyper::client::conn::http1::handshake(TokioIo::new(stream)).await);
        tokio::spawn(connection);
        let body = ok(serde_json::to_vec(&RegisterRequest {
            group: group.to_owned(),
            csr: csr.to_owned(),
            hostname: "vm-9".to_owned(),
            version: "test".to_owned(),
        }));
        let request = ok(Request::post(REGISTER_PATH)
            .header("host", SERVER_NAME)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body))));
        let response = ok(sender.send_request(request).await);
        let status = response.status();
        let body = ok(response.into_body().collect().await).to_bytes();
        (status, ok(serde_json::from_slice(&body)))
    }
}

fn refusal<T: std::fmt::Debug>(result: Result<T, RegisterError>) -> (u16, String) {
    match result {
        Err(RegisterError::Refused { status, reason, .. }) => (status, reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_connector_registers_renews_and_pulls_its_configuration() {
    let fleet = Fleet::start().await;
    let endpoint = fleet.endpoint();

    let state = ok(register::register(&endpoint, "infra/east", "east-token", "VM-1.corp").await);
    assert_eq!(state.group_id, "infra/east");
    assert!(
        state.connector_id.starts_with("infra/vm-1-corp-"),
        "{}",
        state.connector_id
    );
    assert_eq!(state.ca_pem.trim(), fleet.root_pem.trim());
    let now = OffsetDateTime::now_utc();
    assert!(state.not_after > now + time::Duration::hours(23));
    assert!(state.not_after <= now + time::Duration::hours(24));
    assert!(state.renew_at <= now + time::Duration::hours(12));
    let identity = ok(state.identity());
    assert_eq!(identity.connector_id(), state.connector_id);
    let recorded = fleet
        .registry
        .record_of(&state.connector_id)
        .unwrap_or_else(|| panic!("not recorded"));
    assert_eq!(recorded.event, RecordEvent::Registered);
    assert_eq!(recorded.hostname.as_deref(), Some("VM-1.corp"));
    assert_eq!(fleet.registry.uses("infra/east"), 1);

    let renewed = ok(register::renew(&endpoint, &state).await);
    assert_eq!(renewed.connector_id, state.connector_id);
    assert_ne!(renewed.key_pem, state.key_pem, "a renewal brings a new key");
    assert_ne!(renewed.chain_pem, state.chain_pem);
    let record = fleet
        .registry
        .record_of(&state.connector_id)
        .unwrap_or_else(|| panic!("not recorded"));
    assert_eq!(record.event, RecordEvent::Renewed);
    assert_ne!(record.serial_hex, recorded.serial_hex);
    assert_eq!(record.hostname.as_deref(), Some("VM-1.corp"));
    assert_eq!(
        fleet.registry.uses("infra/east"),
        1,
        "renewal spends no token"
    );

    // The renewed certificate authenticates in turn.
    let slice = ok(register::fetch_config(&endpoint, &renewed, None).await)
        .unwrap_or_else(|| panic!("no slice"));
    assert_eq!(slice.group.id, "infra/east");
    let unchanged = ok(register::fetch_config(&endpoint, &renewed, Some(&slice.version)).await);
    assert_eq!(unchanged, None);
    let stale = ok(register::fetch_config(&endpoint, &state, Some("an-older-version")).await);
    assert_eq!(stale.map(|s| s.version), Some(slice.version));
    ok(register::renew(&endpoint, &renewed).await);
}

#[tokio::test]
async fn registration_works_over_http1_too() {
    let fleet = Fleet::start_with_alpn(Some(b"http/1.1")).await;
    let state = ok(register::register(&fleet.endpoint(), "infra/west", "west-token", "vm-2").await);
    // infra/west: validity 3h, renewAfter 2h59m: renewal comes at two thirds.
    let lifetime = state.not_after - OffsetDateTime::now_utc();
    let until_renewal = state.renew_at - OffsetDateTime::now_utc();
    assert!(lifetime <= time::Duration::hours(3));
    assert!(until_renewal <= time::Duration::hours(2), "{until_renewal}");
    assert!(
        until_renewal > time::Duration::minutes(119),
        "{until_renewal}"
    );
    ok(register::renew(&fleet.endpoint(), &state).await);
}

#[tokio::test]
async fn wrong_expired_and_spent_tokens_are_refused() {
    let fleet = Fleet::start().await;
    let endpoint = fleet.endpoint();
    let attempt = |group: &'static str, token: &'static str| {
        let endpoint = endpoint.clone();
        async move { register::register(&endpoint, group, token, "vm-3").await }
    };
    assert_eq!(
        refusal(attempt("infra/east", "wrong").await),
        (401, "TokenInvalid".to_owned())
    );
    assert_eq!(
        refusal(attempt("infra/east", "west-token").await),
        (401, "TokenInvalid".to_owned())
    );
    assert_eq!(
        refusal(attempt("infra/none", "east-token").await),
        (401, "TokenInvalid".to_owned())
    );
    assert_eq!(
        refusal(attempt("infra/old", "old-token").await),
        (401, "TokenExpired".to_owned())
    );
    ok(attempt("infra/once", "once-token").await);
    let spent = attempt("infra/once", "once-token").await;
    let message = spent
        .as_ref()
        .err()
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(
        message.starts_with("the fleet refused the registration: TokenUsedUp: "),
        "{message}"
    );
    assert_eq!(refusal(spent), (401, "TokenUsedUp".to_owned()));
    assert_eq!(fleet.registry.records().len(), 1);
}

/// A connector state holding a certificate the fleet never issued.
fn forged_state(
    legitimate: &ConnectorState,
    signer: Option<(&rcgen::Issuer<'_, KeyPair>, &str)>,
) -> ConnectorState {
    let identity = ok(legitimate.identity());
    let key = ok(KeyPair::generate());
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, identity.name());
    params.subject_alt_names = vec![SanType::URI(ok(identity.uri().as_str().try_into()))];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let chain_pem = match signer {
        None => ok(params.self_signed(&key)).pem(),
        Some((issuer, issuer_pem)) => {
            format!("{}{issuer_pem}", ok(params.signed_by(&key, issuer)).pem())
        }
    };
    ConnectorState {
        chain_pem,
        key_pem: key.serialize_pem(),
        ..legitimate.clone()
    }
}

#[tokio::test]
async fn forged_client_certificates_get_nothing() {
    let fleet = Fleet::start().await;
    let endpoint = fleet.endpoint();
    let state = ok(register::register(&endpoint, "infra/east", "east-token", "vm-4").await);

    // Self-signed, with the identity of a real connector.
    let self_signed = forged_state(&state, None);
    // Signed by a rogue CA that copies the issuer's name.
    let rogue_key = ok(KeyPair::generate());
    let rogue_params = ca_params("Sallyport connector issuer", 0);
    let rogue_cert = ok(rogue_params.self_signed(&rogue_key));
    let rogue = rcgen::Issuer::new(rogue_params, rogue_key);
    let rogue_signed = forged_state(&state, Some((&rogue, &rogue_cert.pem())));

    for forged in [self_signed, rogue_signed] {
        let renewal = register::renew(&endpoint, &forged).await;
        assert!(
            matches!(
                renewal,
                Err(RegisterError::Http { .. } | RegisterError::Connect { .. })
            ),
            "a forged certificate must fail the handshake: {renewal:?}"
        );
        let config = register::fetch_config(&endpoint, &forged, None).await;
        assert!(config.is_err(), "{config:?}");
    }
    let record = fleet.registry.record_of(&state.connector_id);
    assert_eq!(record.map(|r| r.event), Some(RecordEvent::Registered));
}

#[tokio::test]
async fn a_revoked_connector_can_neither_renew_nor_pull() {
    let fleet = Fleet::start().await;
    let endpoint = fleet.endpoint();
    let state = ok(register::register(&endpoint, "infra/east", "east-token", "vm-5").await);
    let other = ok(register::register(&endpoint, "infra/east", "east-token", "vm-6").await);
    fleet
        .config
        .store(Arc::new(fleet_config(vec![state.connector_id.clone()])));

    assert_eq!(
        refusal(register::renew(&endpoint, &state).await),
        (403, "ConnectorRevoked".to_owned())
    );
    assert_eq!(
        refusal(register::fetch_config(&endpoint, &state, None).await),
        (403, "ConnectorRevoked".to_owned())
    );
    // Other connectors of the group are untouched.
    ok(register::renew(&endpoint, &other).await);

    // A group that disappeared takes its connectors' access with it.
    let without_east = ok(FleetConfig::new(
        vec![],
        vec![],
        vec![group("infra/west", "3h", "2h")],
        vec![],
    ));
    fleet.config.store(Arc::new(without_east));
    assert_eq!(
        refusal(register::renew(&endpoint, &other).await),
        (403, "GroupNotFound".to_owned())
    );
}

fn pem(label: &str, der: &[u8]) -> String {
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = text
        .as_bytes()
        .chunks(64)
        .filter_map(|chunk| std::str::from_utf8(chunk).ok())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

#[tokio::test]
async fn bad_csrs_are_refused_without_spending_the_token() {
    let fleet = Fleet::start().await;
    let key = ok(KeyPair::generate());
    let csr = |edit: &dyn Fn(&mut CertificateParams)| {
        let mut params = CertificateParams::default();
        edit(&mut params);
        ok(ok(params.serialize_request(&key)).pem())
    };

    let ca = csr(&|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained));
    let server = csr(&|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]);
    let named = csr(&|p| {
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, "tamper-me");
    });
    let mut der = ok(CertificateSigningRequestDer::from_pem_slice(
        named.as_bytes(),
    ))
    .to_vec();
    let at = der
        .windows(9)
        .position(|w| w == b"tamper-me")
        .unwrap_or_else(|| panic!("no CN in the CSR"));
    der[at] = b'T';
    let tampered = pem("CERTIFICATE REQUEST", &der);

    for (request, reason) in [
        (ca.as_str(), "CsrRequestsCa"),
        (server.as_str(), "CsrRequestsUsage"),
        (tampered.as_str(), "CsrBadSignature"),
        ("garbage", "CsrMalformed"),
        (fleet.root_pem.as_str(), "CsrMalformed"),
    ] {
        let (status, answer) = fleet
            .register_raw("once-token", "infra/once", request)
            .await;
        let error: ApiError = ok(serde_json::from_value(answer));
        assert_eq!(
            (status, error.reason.as_str()),
            (StatusCode::BAD_REQUEST, reason),
            "{}",
            error.message
        );
    }
    assert_eq!(fleet.registry.uses("infra/once"), 0);
    let (status, answer) = fleet
        .register_raw("once-token", "infra/once", &csr(&|_| {}))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(
        answer["connector"]
            .as_str()
            .is_some_and(|c| c.starts_with("infra/vm-9-"))
    );
    assert_eq!(fleet.registry.uses("infra/once"), 1);
}
