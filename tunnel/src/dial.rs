//! The connector side of the tunnel (being written).
