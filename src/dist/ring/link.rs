//! The ring's connections: the greeting that proves a connection belongs to this job, the
//! per-group sender thread that writes to the next rank while the caller reads from the previous
//! one, and socket setup.
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub(super) const MAGIC: &[u8; 4] = b"UMTR";
/// How long an accepted connection may take to send its greeting (a ring peer sends it as soon as
/// it has connected); a silent one is dropped so that it cannot hold up the rendezvous.
pub(super) const HELLO_DEADLINE: Duration = Duration::from_secs(5);

/// An accepted connection whose 24-byte greeting is still arriving.
pub(super) struct Greeting {
    pub(super) stream: TcpStream,
    pub(super) from: SocketAddr,
    pub(super) buf: [u8; 24],
    got: usize,
    pub(super) since: Instant,
}

impl Greeting {
    pub(super) fn new(stream: TcpStream, from: SocketAddr) -> Self {
        Greeting {
            stream,
            from,
            buf: [0; 24],
            got: 0,
            since: Instant::now(),
        }
    }

    /// Reads what has arrived: `Some(true)` with the whole greeting, `Some(false)` when the
    /// connection closed or failed first, `None` while more is to come.
    pub(super) fn poll(&mut self) -> Option<bool> {
        while self.got < self.buf.len() {
            match self.stream.read(&mut self.buf[self.got..]) {
                Ok(0) => return Some(false),
                Ok(n) => self.got += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Some(false),
            }
        }
        Some(true)
    }
}
/// One thread per group that writes to the next rank while the collective's thread reads from
/// the previous one (a thread per step would put a thread start on every step's latency).
pub(super) struct Sender {
    jobs: mpsc::Sender<(usize, usize)>,
    done: mpsc::Receiver<std::io::Result<()>>,
}

impl Sender {
    pub(super) fn spawn(mut stream: TcpStream) -> std::io::Result<Sender> {
        let (jobs, job_rx) = mpsc::channel::<(usize, usize)>();
        let (done_tx, done) = mpsc::channel();
        std::thread::Builder::new()
            .name("umtune-ring-send".into())
            .spawn(move || {
                for (addr, len) in job_rx {
                    // SAFETY: `send` keeps the bytes alive and unchanged until `done` reports.
                    let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
                    if done_tx.send(stream.write_all(bytes)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Sender { jobs, done })
    }

    /// Writes `out` on the sender thread while `receive` runs here; returns both outcomes. Never
    /// returns, or unwinds, before the write has finished (bounded by the socket's timeout): the
    /// sender thread reads `out` through a raw pointer, so `out` must outlive the write even when
    /// `receive` panics. A guard's drop waits for it on that path.
    pub(super) fn send_while<T>(
        &self,
        out: &[u8],
        receive: impl FnOnce() -> T,
    ) -> (T, std::io::Result<()>) {
        if self.jobs.send((out.as_ptr() as usize, out.len())).is_err() {
            let gone = std::io::Error::other("the ring sender thread is gone");
            return (receive(), Err(gone));
        }
        let write = InFlight {
            done: &self.done,
            finished: false,
        };
        let got = receive();
        (got, write.wait())
    }
}

/// A write the sender thread is doing from borrowed bytes; dropping it (a panic in the
/// receiving closure) still waits for the write to end.
struct InFlight<'a> {
    done: &'a mpsc::Receiver<std::io::Result<()>>,
    finished: bool,
}

impl InFlight<'_> {
    fn wait(mut self) -> std::io::Result<()> {
        self.finished = true;
        self.done
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the ring sender thread is gone")))
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.finished {
            // The thread reports every job it takes (or has exited, which ends `recv`).
            let _ = self.done.recv();
        }
    }
}

/// The local address whose interface routes to `master` (no packet is sent), so peers on other
/// nodes can reach the listener; loopback for a local master.
pub(super) fn local_ip_towards(master: &str) -> std::net::IpAddr {
    let fallback = std::net::IpAddr::from([127, 0, 0, 1]);
    let probe = || -> std::io::Result<std::net::IpAddr> {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.connect((master, 9))?;
        Ok(sock.local_addr()?.ip())
    };
    probe().unwrap_or(fallback)
}

pub(super) fn configure(s: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))
}

pub(super) fn hello(nonce: &[u8; 16], rank: usize) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[..4].copy_from_slice(MAGIC);
    h[4..20].copy_from_slice(nonce);
    h[20..].copy_from_slice(&(rank as u32).to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A panic while the sender thread still writes from the caller's buffer must not unwind
    /// past the write: the peer starts reading only `delay` after it accepts the connection, and
    /// the buffer is larger than the sockets hold, so the write ends no earlier than `delay`
    /// after the connection (the clock starts before it).
    #[test]
    fn a_panic_in_the_receive_closure_waits_for_the_write() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let delay = Duration::from_millis(300);
        let reader = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            std::thread::sleep(delay);
            let mut all = Vec::new();
            s.read_to_end(&mut all).unwrap();
            all
        });
        let out: Vec<u8> = (0..32 << 20).map(|i| (i % 251) as u8).collect();
        // The reader's delay starts after it accepts, so after this instant.
        let start = Instant::now();
        let stream = TcpStream::connect(addr).unwrap();
        let sender = Sender::spawn(stream).unwrap();
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            sender.send_while(&out, || panic!("receive failed"))
        }));
        assert!(unwound.is_err());
        let waited = start.elapsed();
        assert!(
            waited >= delay,
            "unwound after {waited:?}, before the write ended"
        );
        drop(sender);
        assert_eq!(reader.join().unwrap(), out);
    }
}
