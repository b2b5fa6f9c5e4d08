//! The one body type that travels through the tunnel in both directions.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

/// Any error a body may fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streaming body: what the proxy sends on a tunnel stream and what the connector
/// answers with, so that neither end buffers whole bodies.
pub type TunnelBody = UnsyncBoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> TunnelBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body of `bytes`, sent at once.
pub fn full(bytes: impl Into<Bytes>) -> TunnelBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body received by hyper, streamed on as it arrives.
pub fn incoming(body: hyper::body::Incoming) -> TunnelBody {
    body.map_err(BoxError::from).boxed_unsync()
}
