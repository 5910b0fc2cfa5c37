//! relay-floor: the least a hop written in Rust can cost. Two relays that
//! parse nothing and copy bytes between each client and one node's unix
//! socket, on one thread, measured by `proxy-bench --floors` next to
//! mtm-proxy, PgBouncer and HAProxy:
//!
//! - `tokio`: `tokio::io::copy_bidirectional` per connection on a
//!   current-thread runtime (epoll, one `recvfrom`/`sendto` per read and
//!   write), the machinery mtm-proxy's session threads use;
//! - `uring`: an io_uring loop (the `io-uring` crate) that keeps one
//!   receive or send in flight per direction and submits and reaps every
//!   session's operations with one system call per turn: the lever issue
//!   10 names, "fewer syscalls per round trip".
//!
//! Whatever mtm-proxy costs above the tokio relay is its own work (parsing,
//! routing, the commit path's bookkeeping); what the io_uring relay saves
//! against the tokio one is what moving the proxy to io_uring could save
//! at best. Not a product: no authentication, no limits.
//!
//! Usage: relay-floor --engine tokio|uring --port 6001 --node-socket /path/.s.PGSQL.5432

use clap::{Parser, ValueEnum};
use std::path::PathBuf;

#[derive(Clone, Copy, ValueEnum)]
enum Engine {
    Tokio,
    Uring,
}

#[derive(Parser)]
struct Args {
    #[arg(long)]
    engine: Engine,
    /// Port to listen on, on 127.0.0.1.
    #[arg(long)]
    port: u16,
    /// The node's unix socket (`<dir>/.s.PGSQL.<port>`).
    #[arg(long)]
    node_socket: PathBuf,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = std::net::TcpListener::bind(("127.0.0.1", args.port))?;
    match args.engine {
        Engine::Tokio => tokio_relay(listener, args.node_socket),
        Engine::Uring => uring::run(listener, &args.node_socket),
    }
}

fn tokio_relay(listener: std::net::TcpListener, node: PathBuf) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        loop {
            let (mut client, _) = listener.accept().await?;
            client.set_nodelay(true)?;
            let node = node.clone();
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::UnixStream::connect(&node).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    })
}

/// The io_uring relay. Each connection is a pair of sockets and two
/// directions; each direction has exactly one operation in flight, a
/// receive into its buffer or a send of what that receive got, so a
/// buffer is never touched by the kernel and by us at once.
mod uring {
    use io_uring::{opcode, squeue, types, IoUring};
    use std::net::TcpListener;
    use std::os::fd::{AsRawFd, RawFd};
    use std::os::unix::net::UnixStream;
    use std::path::Path;

    const BUF: usize = 64 * 1024;
    /// user_data: slot << 8 | operation.
    const ACCEPT: u64 = 0;
    const RECV: u64 = 1;
    const SEND: u64 = 2;

    struct Direction {
        from: RawFd,
        to: RawFd,
        buf: Box<[u8]>,
        len: usize,
        sent: usize,
    }

    struct Pair {
        /// Kept to close the sockets when the pair is dropped.
        _client: std::net::TcpStream,
        _node: UnixStream,
        dirs: [Direction; 2],
        in_flight: u32,
        closing: bool,
    }

    fn key(slot: usize, dir: usize, op: u64) -> u64 {
        ((slot as u64) << 8) | ((dir as u64) << 4) | op
    }

    pub fn run(listener: TcpListener, node: &Path) -> std::io::Result<()> {
        let mut ring = IoUring::new(1024)?;
        let mut pairs: Vec<Option<Pair>> = Vec::new();
        let mut queue: Vec<squeue::Entry> = Vec::new();
        let accept = || opcode::Accept::new(types::Fd(listener.as_raw_fd()), std::ptr::null_mut(), std::ptr::null_mut()).build().user_data(ACCEPT);
        queue.push(accept());
        loop {
            {
                let mut sq = ring.submission();
                for e in queue.drain(..) {
                    // SAFETY: every buffer an entry points at belongs to a
                    // Pair that stays in `pairs`, unmoved (boxed), until
                    // its operations have all completed (`in_flight`).
                    unsafe { sq.push(&e).expect("submission queue has room: one entry per direction") };
                }
            }
            ring.submit_and_wait(1)?;
            let done: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
            for (data, res) in done {
                let op = data & 0xF;
                if op == ACCEPT {
                    queue.push(accept());
                    if res >= 0 {
                        // SAFETY: the kernel gave us this new descriptor.
                        let client = unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(res) };
                        let _ = client.set_nodelay(true);
                        if let Ok(server) = UnixStream::connect(node) {
                            let slot = pairs.iter().position(Option::is_none).unwrap_or_else(|| {
                                pairs.push(None);
                                pairs.len() - 1
                            });
                            let (c, s) = (client.as_raw_fd(), server.as_raw_fd());
                            let dir = |from, to| Direction { from, to, buf: vec![0; BUF].into_boxed_slice(), len: 0, sent: 0 };
                            let mut p = Pair { _client: client, _node: server, dirs: [dir(c, s), dir(s, c)], in_flight: 0, closing: false };
                            for d in 0..2 {
                                queue.push(recv(&mut p, slot, d));
                            }
                            pairs[slot] = Some(p);
                        }
                    }
                    continue;
                }
                let slot = (data >> 8) as usize;
                let d = ((data >> 4) & 0xF) as usize;
                let Some(p) = pairs[slot].as_mut() else { continue };
                p.in_flight -= 1;
                if res <= 0 || p.closing {
                    if !p.closing {
                        p.closing = true;
                        // Ends the other direction's receive too.
                        for fd in [p.dirs[0].from, p.dirs[1].from] {
                            let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
                        }
                    }
                    if p.in_flight == 0 {
                        pairs[slot] = None;
                    }
                    continue;
                }
                let entry = if op == RECV {
                    p.dirs[d].len = res as usize;
                    p.dirs[d].sent = 0;
                    send(p, slot, d)
                } else {
                    p.dirs[d].sent += res as usize;
                    if p.dirs[d].sent < p.dirs[d].len {
                        send(p, slot, d)
                    } else {
                        recv(p, slot, d)
                    }
                };
                queue.push(entry);
            }
        }
    }

    fn recv(p: &mut Pair, slot: usize, d: usize) -> squeue::Entry {
        p.in_flight += 1;
        let dir = &mut p.dirs[d];
        opcode::Recv::new(types::Fd(dir.from), dir.buf.as_mut_ptr(), BUF as u32).build().user_data(key(slot, d, RECV))
    }

    fn send(p: &mut Pair, slot: usize, d: usize) -> squeue::Entry {
        p.in_flight += 1;
        let dir = &mut p.dirs[d];
        let rest = &dir.buf[dir.sent..dir.len];
        opcode::Send::new(types::Fd(dir.to), rest.as_ptr(), rest.len() as u32).build().user_data(key(slot, d, SEND))
    }
}
