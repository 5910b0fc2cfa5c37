//! TCP keepalive and user timeout on the proxy's TCP connections (clients
//! and nodes), so that a peer whose host vanished without a reset (power
//! loss, a network partition, a frozen VM) is noticed: the kernel probes
//! an idle connection, bounds how long sent data may stay unacknowledged,
//! and then fails the socket's reads and writes, which ends the session as
//! any lost connection does. Without it a session waiting on such a node
//! (in the middle of a commit, say) would wait forever.

use socket2::{SockRef, TcpKeepalive};
use std::os::fd::AsFd;
use std::time::Duration;

/// Probes after `idle` without traffic, then every third of it (at least
/// a second), three times; sent data unacknowledged for as long fails the
/// connection too. A vanished peer is noticed after about twice `idle`.
/// Zero leaves the system's settings.
pub fn enable(socket: &impl AsFd, idle: Duration) -> std::io::Result<()> {
    if idle.is_zero() {
        return Ok(());
    }
    let every = (idle / 3).max(Duration::from_secs(1));
    let sock = SockRef::from(socket);
    sock.set_tcp_keepalive(&TcpKeepalive::new().with_time(idle).with_interval(every).with_retries(3))?;
    sock.set_tcp_user_timeout(Some(idle + every * 3))
}
