//! The registration token Secret: what the operator writes for each ConnectorGroup and
//! the fleet's registration endpoint reads and counts.
//!
//! One Secret `<group>-registration` of type [`TOKEN_SECRET_TYPE`] in the group's
//! namespace holds the bootstrap token under [`TOKEN_KEY`] and the fleet's root CA under
//! [`CA_KEY`] (so a connector can verify the fleet before it has a certificate).
//! Annotations say when it was minted and expires, how many registrations it allows and
//! how many used it.
//!
//! A group with a connector Deployment also has state slots (see [`STATE_SECRET_TYPE`]).

/// The Secret type of registration token Secrets.
pub const TOKEN_SECRET_TYPE: &str = "sallyport.dev/registration-token";
/// When the token was minted (RFC 3339).
pub const ISSUED_AT_ANNOTATION: &str = "sallyport.dev/issued-at";
/// When the token stops being accepted (RFC 3339).
pub const EXPIRES_AT_ANNOTATION: &str = "sallyport.dev/expires-at";
/// How many registrations the token allows; 0 is unlimited.
pub const MAX_USES_ANNOTATION: &str = "sallyport.dev/max-uses";
/// How many registrations used the token, counted by the registration endpoint.
pub const USES_ANNOTATION: &str = "sallyport.dev/uses";
/// The Secret key holding the token.
pub const TOKEN_KEY: &str = "token";
/// The Secret key holding the fleet's root CA certificate (PEM).
pub const CA_KEY: &str = "ca.crt";
/// The label on Connector objects naming their ConnectorGroup.
pub const CONNECTOR_GROUP_LABEL: &str = "sallyport.dev/connector-group";

/// The name of the registration token Secret of the ConnectorGroup `group`.
pub fn token_secret_name(group: &str) -> String {
    format!("{group}-registration")
}

/// The Secret type of connector state slots: Secrets `<group>-connector-state-<i>` the
/// operator makes empty for a group's connector Deployment, in which each connector pod
/// keeps its credentials (see [`STATE_KEY`]).
pub const STATE_SECRET_TYPE: &str = "sallyport.dev/connector-state";
/// The Secret key of a state slot holding the connector's state document (JSON, the same
/// document a connector outside Kubernetes keeps on disk).
pub const STATE_KEY: &str = "connector-state.json";
/// The annotation of a state slot naming the pod that holds it.
pub const STATE_HOLDER_ANNOTATION: &str = "sallyport.dev/state-holder";
/// The annotation of a state slot saying when its holder last renewed its claim
/// (RFC 3339).
pub const STATE_RENEWED_AT_ANNOTATION: &str = "sallyport.dev/state-renewed-at";

/// The name of state slot `index` of the ConnectorGroup `group`.
pub fn state_secret_name(group: &str, index: usize) -> String {
    format!("{group}-connector-state-{index}")
}

/// The request header in which a connector reports its software version each time it
/// pulls its configuration, so its Connector status follows an upgrade that kept its
/// identity (no new registration or renewal).
pub const CONNECTOR_VERSION_HEADER: &str = "sallyport-connector-version";

/// The pod template annotation of a connector Deployment naming the connector version
/// its image carries.
pub const CONNECTOR_VERSION_ANNOTATION: &str = "sallyport.dev/connector-version";
