//! The Sallyport tunnel: what the proxy fleet and its connectors agree on.
//!
//! - [`identity`]: who a connector is, as its client certificate says it.
//! - [`body`]: the streaming body type both ends exchange.
//! - [`tls`]: the rustls settings of both ends.
//! - [`pool`]: the proxy's side: the live tunnels of every group, least-outstanding-streams
//!   balancing, revocation.
//! - [`dial`]: the connector's side: dialling, serving HTTP/2 on the connections it made,
//!   reconnecting with backoff, draining.
//! - [`splice`]: copying between two byte streams both ways, as both ends of a tunneled
//!   WebSocket do.
//! - [`wire`]: the ALPN protocol, header names, control paths and JSON messages of the
//!   reverse HTTP/2 tunnel and of the fleet API (registration, renewal, configuration).
//!
//! A connector dials the fleet over TLS with its client certificate and ALPN
//! [`wire::TUNNEL_ALPN`]; once the handshake is done the roles flip: the proxy is the
//! HTTP/2 client and the connector the HTTP/2 server, so every user request is one
//! stream with flow control, streaming bodies, cancellation and trailers.

pub mod body;
pub mod dial;
pub mod identity;
pub mod pool;
pub mod splice;
pub mod tls;
pub mod wire;

pub use identity::{ConnectorIdentity, IdentityError};
