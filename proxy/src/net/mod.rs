//! Bytes on the wire: framing of frontend messages ([`frame`]), a scanner
//! that follows backend messages as they stream past ([`scan`]), the
//! messages the proxy writes itself ([`messages`]), and the client
//! connection type, plain or TLS ([`stream`]).

pub mod frame;
pub mod messages;
pub mod scan;
pub mod stream;
