//! How the CPU backend's ranks find each other: every rank publishes its listening address in
//! the job's c10d store, connects to every other rank and accepts every other rank's connection
//! (a full mesh: the ring's collectives use the links to the neighbours, the all-to-all uses
//! them all). A connection proves it belongs to this job (a nonce rank 0 puts in the store, and
//! the peer's rank) in both directions, or is refused; a client that connects and stays silent
//! holds up nothing.
use super::link::{configure, hello, local_ip_towards, Greeting, HELLO_DEADLINE};
use crate::dist::c10d::Store;
use crate::error::{Error, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Rank `rank`'s connections: `out[j]` it opened to rank j (it writes there), `inc[j]` rank j
/// opened to it (it reads there); `None` at its own index.
pub(super) struct Mesh {
    pub(super) out: Vec<Option<TcpStream>>,
    pub(super) inc: Vec<Option<TcpStream>>,
}

pub(super) fn connect(
    store: &Store,
    rank: usize,
    world_size: usize,
    master: &str,
    timeout: Duration,
) -> Result<Mesh> {
    let fail = |msg: String| Error::Collective { rank, msg };
    let absent = |peer: usize, e: Error| {
        fail(format!(
            "rank {peer} did not join the job within {:.0} s (dist.timeout_s): {e}",
            timeout.as_secs_f64()
        ))
    };
    let nonce: [u8; 16] = if rank == 0 {
        let n: [u8; 16] = rand::random();
        store.set("ring/nonce", &n)?;
        n
    } else {
        store
            .get("ring/nonce")
            .map_err(|e| absent(0, e))?
            .try_into()
            .map_err(|_| fail("the job's ring nonce in the store is malformed".into()))?
    };
    let ip = local_ip_towards(master);
    let listener = TcpListener::bind((ip, 0))
        .map_err(|e| fail(format!("listening for the ring on {ip}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| fail(format!("ring listener address: {e}")))?;
    store.set(&format!("ring/addr/{rank}"), addr.to_string().as_bytes())?;
    let deadline = Instant::now() + timeout;
    let peers: Vec<usize> = (1..world_size).map(|s| (rank + s) % world_size).collect();

    let mut out: Vec<Option<TcpStream>> = (0..world_size).map(|_| None).collect();
    let mut inc: Vec<Option<TcpStream>> = (0..world_size).map(|_| None).collect();
    let mut addrs = vec![None; world_size];
    for &peer in &peers {
        let published = store
            .get(&format!("ring/addr/{peer}"))
            .map_err(|e| absent(peer, e))?;
        let peer_addr: SocketAddr = String::from_utf8_lossy(&published)
            .parse()
            .map_err(|e| fail(format!("rank {peer} published a bad ring address: {e}")))?;
        let mut s = TcpStream::connect_timeout(&peer_addr, timeout)
            .map_err(|e| fail(format!("connecting to rank {peer} at {peer_addr}: {e}")))?;
        configure(&s, timeout).map_err(|e| fail(format!("socket to rank {peer}: {e}")))?;
        s.write_all(&hello(&nonce, rank))
            .map_err(|e| fail(format!("greeting rank {peer}: {e}")))?;
        out[peer] = Some(s);
        addrs[peer] = Some(peer_addr);
    }

    // Accept until every peer has shown up with this job's nonce; strangers are dropped.
    // Greetings are read without blocking, several connections at a time.
    listener
        .set_nonblocking(true)
        .map_err(|e| fail(format!("ring listener: {e}")))?;
    let mut waiting: Vec<Greeting> = Vec::new();
    let mut missing = peers.len();
    while missing > 0 {
        match listener.accept() {
            Ok((s, from)) => match s.set_nonblocking(true) {
                Ok(()) => waiting.push(Greeting::new(s, from)),
                Err(e) => tracing::warn!(rank, %from, "dropped a ring connection: {e}"),
            },
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(fail(format!("accepting a ring connection: {e}"))),
        }
        let mut i = 0;
        while i < waiting.len() {
            let done = waiting[i].poll();
            let from = done.filter(|ok| *ok).and_then(|_| {
                peers
                    .iter()
                    .copied()
                    .find(|&p| inc[p].is_none() && waiting[i].buf == hello(&nonce, p))
            });
            match (done, from) {
                (Some(true), Some(peer)) => {
                    inc[peer] = Some(waiting.swap_remove(i).stream);
                    missing -= 1;
                }
                (None, _) if waiting[i].since.elapsed() < HELLO_DEADLINE => i += 1,
                _ => {
                    let from = waiting.swap_remove(i).from;
                    tracing::warn!(rank, %from, "refused a ring connection that did not prove it belongs to this job");
                }
            }
        }
        if missing > 0 && Instant::now() > deadline {
            let late: Vec<String> = peers
                .iter()
                .filter(|&&p| inc[p].is_none())
                .map(|p| p.to_string())
                .collect();
            return Err(fail(format!(
                "rank {} did not connect within {:.0} s",
                late.join(", rank "),
                timeout.as_secs_f64()
            )));
        }
        if missing > 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // Both directions proven: the acceptor answers with its own greeting.
    for &peer in &peers {
        let s = inc[peer].as_mut().expect("accepted above");
        s.set_nonblocking(false)
            .and_then(|_| configure(s, timeout))
            .map_err(|e| fail(format!("socket from rank {peer}: {e}")))?;
        s.write_all(&hello(&nonce, rank))
            .map_err(|e| fail(format!("answering rank {peer}: {e}")))?;
    }
    for &peer in &peers {
        let mut buf = [0u8; 24];
        let s = out[peer].as_mut().expect("connected above");
        s.read_exact(&mut buf)
            .map_err(|e| fail(format!("waiting for rank {peer}'s answer: {e}")))?;
        if buf != hello(&nonce, peer) {
            return Err(fail(format!(
                "the peer at {} is not rank {peer} of this job",
                addrs[peer].expect("connected above")
            )));
        }
    }
    Ok(Mesh { out, inc })
}
