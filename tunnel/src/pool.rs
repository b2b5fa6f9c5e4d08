//! The proxy side of the tunnel (being written).
