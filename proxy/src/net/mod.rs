//! Bytes on the wire: framing of frontend messages ([`frame`]), a scanner
//! that follows backend messages as they stream past ([`scan`]), the
//! messages the proxy writes itself ([`messages`]), the client
//! connection type, plain or TLS ([`stream`]), and TCP keepalive
//! ([`keepalive`]).

pub mod frame;
pub mod keepalive;
pub mod messages;
pub mod scan;
pub mod stream;
