//! The QUIC transport between nodes.
