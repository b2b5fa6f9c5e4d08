//! TLS settings of both ends (being written).
