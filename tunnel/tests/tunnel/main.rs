//! The tunnel end to end on loopback: a test fleet (pools behind TLS listeners) and
//! connectors (dialers) in one process.

mod lifecycle;
mod replicas;
mod routing;
mod support;
