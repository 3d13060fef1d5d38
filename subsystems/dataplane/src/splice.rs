//! Piping a proxied connection in the kernel: each direction moves bytes socket → pipe →
//! socket with splice(2), so the payload never crosses into user space (a long stream costs
//! two syscalls per pipe-full instead of two copies of every byte). Pipes are kept in a small
//! pool: short connections would otherwise pay for making and closing two pipes each.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Mutex;

use nix::fcntl::{splice, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes asked of one splice: what a pipe holds once enlarged.
const CHUNK: usize = 256 * 1024;
/// Pipes kept for reuse (two fds each, held while idle).
const POOL: usize = 64;

static PIPES: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// One kernel pipe; empty whenever it is in the pool.
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn take() -> io::Result<Pipe> {
        if let Some(p) = PIPES.lock().ok().and_then(|mut v| v.pop()) {
            return Ok(p);
        }
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)?;
        // A larger pipe moves a stream in fewer calls; the default (64 KiB) serves otherwise.
        let _ = nix::fcntl::fcntl(
            write.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETPIPE_SZ(CHUNK as i32),
        );
        Ok(Pipe { read, write })
    }

    /// Back to the pool; only an empty pipe may be reused, so one that held bytes is closed.
    fn give_back(self, empty: bool) {
        if !empty {
            return;
        }
        if let Ok(mut v) = PIPES.lock() {
            if v.len() < POOL {
                v.push(self);
            }
        }
    }
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

/// Moves what `from` sends to `to` through `pipe` until `from` ends its side, then ends `to`'s
/// write side. Returns the bytes moved.
async fn one_way(from: &TcpStream, to: &TcpStream, pipe: Pipe) -> io::Result<u64> {
    let mut held = 0usize;
    let result = async {
        let mut total = 0u64;
        loop {
            let n = from
                .async_io(Interest::READABLE, || {
                    splice(from.as_fd(), None, pipe.write.as_fd(), None, CHUNK, FLAGS)
                        .map_err(io::Error::from)
                })
                .await?;
            if n == 0 {
                // The peer is done sending: tell the other side, keep the other direction going.
                match nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write) {
                    Ok(()) | Err(nix::errno::Errno::ENOTCONN) => return Ok(total),
                    Err(e) => return Err(e.into()),
                }
            }
            held = n;
            while held > 0 {
                let m = to
                    .async_io(Interest::WRITABLE, || {
                        splice(pipe.read.as_fd(), None, to.as_fd(), None, held, FLAGS)
                            .map_err(io::Error::from)
                    })
                    .await?;
                held -= m;
            }
            total += n as u64;
        }
    }
    .await;
    pipe.give_back(held == 0);
    result
}

/// The two pipes of a connection; `Err` when none can be made (out of descriptors), and the
/// caller then copies in user space.
pub(crate) fn pipes() -> io::Result<(Pipe, Pipe)> {
    Ok((Pipe::take()?, Pipe::take()?))
}

/// Pipes both ways until both directions are done (each ends its side as `copy_bidirectional`
/// does); the first error ends both. Returns (bytes to `b`, bytes to `a`).
pub(crate) async fn both_ways(
    a: &TcpStream,
    b: &TcpStream,
    (ab, ba): (Pipe, Pipe),
) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(a, b, ab), one_way(b, a, ba))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A client ↔ proxy ↔ server chain where the proxy splices: every byte arrives in order
    /// both ways, half-closes pass through, and the counts are right.
    #[tokio::test]
    async fn splices_both_ways_with_half_close() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (saddr, paddr) = (server.local_addr().unwrap(), proxy.local_addr().unwrap());
        let relay = tokio::spawn(async move {
            let (c, _) = proxy.accept().await.unwrap();
            let u = TcpStream::connect(saddr).await.unwrap();
            both_ways(&c, &u, pipes().unwrap()).await.unwrap()
        });
        let echo = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            // Answer after the client's half-close: reversed, 3 MiB.
            let answer: Vec<u8> = got.iter().rev().copied().cycle().take(3 << 20).collect();
            s.write_all(&answer).await.unwrap();
            got.len()
        });
        let mut c = TcpStream::connect(paddr).await.unwrap();
        let sent: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        c.write_all(&sent).await.unwrap();
        c.shutdown().await.unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        assert_eq!(echo.await.unwrap(), sent.len());
        let want: Vec<u8> = sent.iter().rev().copied().cycle().take(3 << 20).collect();
        assert!(back == want, "the answer arrived changed ({} bytes)", back.len());
        assert_eq!(relay.await.unwrap(), (sent.len() as u64, 3 << 20));
        // The pipes went back empty, ready for the next connection.
        assert!(PIPES.lock().unwrap().len() >= 2);
    }
}
