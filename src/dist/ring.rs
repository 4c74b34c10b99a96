//! The CPU collective backend: a ring over TCP between the ranks of one job.
//!
//! Written by hand because nothing usable does it: libtorch's own CPU backend (gloo) cannot be
//! compiled against from the torch wheel (it ships no gloo headers, and no package registry we
//! reach ships headers of the gloo commit torch 2.11 bundles), and vendoring gloo is not an option.
//! The rendezvous is still c10d's: peers publish their addresses in the job's TCPStore.
//!
//! Design: every rank holds two connections, one to the next rank and one from the previous.
//! All-reduce is the bandwidth-optimal ring (reduce-scatter, then all-gather: each rank sends
//! 2(W-1)/W of the buffer), with the send of one chunk overlapping the receive-and-reduce of the
//! next in segments, so the reduction hides behind the transfer. Broadcast forwards segments
//! around the ring as they arrive; all-gather passes every rank's block around (blocks may differ
//! in their first dimension). Each connection proves it belongs to this job (a nonce rank 0 puts
//! in the store, and the peer's rank) or is refused; every blocking call has a deadline and an
//! error names the rank that did not answer.
use super::c10d::Store;
use super::{Collective, ReduceOp};
use crate::error::{Error, Result};
mod element;
mod link;

use element::{as_bytes, as_bytes_mut, disjoint, slice_of, Element};
use link::{configure, hello, local_ip_towards, Greeting, Sender, HELLO_DEADLINE};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Bytes a receive reduces at a time (the pipelining grain).
const SEGMENT: usize = 1 << 18;
/// Up to this many bytes a step writes before reading without a helper thread (far below what
/// the kernel's socket buffers hold, so two ranks writing to each other cannot block).
const INLINE: usize = 16 << 10;

struct Links {
    next: TcpStream,
    prev: TcpStream,
    /// Writes to `next` (a clone of its socket) while the caller reads from `prev`.
    sender: Sender,
}

pub struct RingGroup {
    rank: usize,
    world_size: usize,
    links: Mutex<Links>,
}

impl RingGroup {
    /// Connects `rank` to its ring neighbours, found through `store` (every rank calls this).
    /// `master` is the store's address, used to pick the interface the peers can reach.
    pub fn connect(
        store: &Store,
        rank: usize,
        world_size: usize,
        master: &str,
        timeout: Duration,
    ) -> Result<RingGroup> {
        let fail = |msg: String| Error::Collective { rank, msg };
        let nonce: [u8; 16] = if rank == 0 {
            let n: [u8; 16] = rand::random();
            store.set("ring/nonce", &n)?;
            n
        } else {
            store
                .get("ring/nonce")
                .map_err(|e| {
                    fail(format!(
                        "rank 0 did not join the job within {:.0} s (dist.timeout_s): {e}",
                        timeout.as_secs_f64()
                    ))
                })?
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
        let next_rank = (rank + 1) % world_size;
        let prev_rank = (rank + world_size - 1) % world_size;
        let deadline = Instant::now() + timeout;

        let published = store.get(&format!("ring/addr/{next_rank}")).map_err(|e| {
            fail(format!(
                "rank {next_rank} did not join the job within {:.0} s (dist.timeout_s): {e}",
                timeout.as_secs_f64()
            ))
        })?;
        let next_addr: SocketAddr = String::from_utf8_lossy(&published).parse().map_err(|e| {
            fail(format!(
                "rank {next_rank} published a bad ring address: {e}"
            ))
        })?;
        let mut next = TcpStream::connect_timeout(&next_addr, timeout).map_err(|e| {
            fail(format!(
                "connecting to rank {next_rank} at {next_addr}: {e}"
            ))
        })?;
        configure(&next, timeout).map_err(|e| fail(format!("socket to rank {next_rank}: {e}")))?;
        next.write_all(&hello(&nonce, rank))
            .map_err(|e| fail(format!("greeting rank {next_rank}: {e}")))?;

        // Accept until the previous rank shows up with this job's nonce; strangers are dropped.
        // Greetings are read without blocking, several connections at a time, so a client that
        // connects and stays silent holds up nothing: it is dropped after HELLO_DEADLINE.
        listener
            .set_nonblocking(true)
            .map_err(|e| fail(format!("ring listener: {e}")))?;
        let want = hello(&nonce, prev_rank);
        let mut waiting: Vec<Greeting> = Vec::new();
        let prev = 'found: loop {
            match listener.accept() {
                Ok((s, from)) => match s.set_nonblocking(true) {
                    Ok(()) => waiting.push(Greeting::new(s, from)),
                    Err(e) => tracing::warn!(rank, %from, "dropped a ring connection: {e}"),
                },
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(fail(format!("accepting the ring connection: {e}"))),
            }
            let mut i = 0;
            while i < waiting.len() {
                match waiting[i].poll() {
                    Some(true) if waiting[i].buf == want => {
                        break 'found waiting.swap_remove(i).stream;
                    }
                    None if waiting[i].since.elapsed() < HELLO_DEADLINE => i += 1,
                    _ => {
                        let from = waiting.swap_remove(i).from;
                        tracing::warn!(rank, %from, "refused a ring connection that did not prove it belongs to this job");
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(fail(format!(
                    "rank {prev_rank} did not connect within {:.0} s",
                    timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let mut prev = prev;
        prev.set_nonblocking(false)
            .and_then(|_| configure(&prev, timeout))
            .map_err(|e| fail(format!("socket from rank {prev_rank}: {e}")))?;
        // Both directions proven: the acceptor answers with its own greeting.
        prev.write_all(&hello(&nonce, rank))
            .map_err(|e| fail(format!("answering rank {prev_rank}: {e}")))?;
        let mut buf = [0u8; 24];
        next.read_exact(&mut buf)
            .map_err(|e| fail(format!("waiting for rank {next_rank}'s answer: {e}")))?;
        if buf != hello(&nonce, next_rank) {
            return Err(fail(format!(
                "the peer at {next_addr} is not rank {next_rank} of this job"
            )));
        }
        Ok(RingGroup {
            rank,
            world_size,
            links: Mutex::new(Links {
                sender: Sender::spawn(
                    next.try_clone()
                        .map_err(|e| fail(format!("socket to rank {next_rank}: {e}")))?,
                )
                .map_err(|e| fail(format!("starting the ring sender thread: {e}")))?,
                next,
                prev,
            }),
        })
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world_size
    }
    fn prev_rank(&self) -> usize {
        (self.rank + self.world_size - 1) % self.world_size
    }

    fn links(&self) -> Result<std::sync::MutexGuard<'_, Links>> {
        self.links.lock().map_err(|_| Error::Collective {
            rank: self.rank,
            msg: "an earlier collective panicked on this rank".into(),
        })
    }

    fn send_error(&self, e: std::io::Error) -> Error {
        peer_error(self.rank, self.next_rank(), "sending to", e)
    }
    fn recv_error(&self, e: std::io::Error) -> Error {
        peer_error(self.rank, self.prev_rank(), "receiving from", e)
    }

    /// Sends `out` to the next rank while receiving `len` bytes from the previous one, handing
    /// each received segment to `on_segment(offset, bytes)` as it arrives.
    fn exchange(
        &self,
        links: &mut Links,
        out: &[u8],
        len: usize,
        mut on_segment: impl FnMut(usize, &[u8]),
    ) -> Result<()> {
        let Links { next, prev, sender } = links;
        let mut receive = |prev: &mut TcpStream| -> Result<()> {
            let mut buf = vec![0u8; SEGMENT.min(len)];
            let mut offset = 0;
            while offset < len {
                let n = SEGMENT.min(len - offset);
                prev.read_exact(&mut buf[..n])
                    .map_err(|e| self.recv_error(e))?;
                on_segment(offset, &buf[..n]);
                offset += n;
            }
            Ok(())
        };
        if out.len() <= INLINE {
            next.write_all(out).map_err(|e| self.send_error(e))?;
            return receive(prev);
        }
        let (received, sent) = sender.send_while(out, || receive(prev));
        received?;
        sent.map_err(|e| self.send_error(e))
    }

    /// Ring all-reduce of `data` in place (reduce-scatter, then all-gather).
    fn ring_all_reduce<T: Element>(&self, data: &mut [T]) -> Result<()> {
        let w = self.world_size;
        let n = data.len();
        let bounds = |c: usize| (c * n / w, (c + 1) * n / w);
        let mut links = self.links()?;
        // Reduce-scatter: after step s, chunk (rank - s - 1) holds s + 2 ranks' sum.
        for s in 0..w - 1 {
            let send = (self.rank + w - s) % w;
            let recv = (self.rank + w - s - 1) % w;
            let (out, target) = disjoint(data, bounds(send), bounds(recv));
            self.exchange(
                &mut links,
                as_bytes(out),
                target.len() * T::SIZE,
                |offset, bytes| T::add_bytes(&mut target[offset / T::SIZE..], bytes),
            )?;
        }
        // All-gather: pass the reduced chunks around.
        for s in 0..w - 1 {
            let send = (self.rank + 1 + w - s) % w;
            let recv = (self.rank + w - s) % w;
            let (out, target) = disjoint(data, bounds(send), bounds(recv));
            let target = as_bytes_mut(target);
            self.exchange(&mut links, as_bytes(out), target.len(), |offset, bytes| {
                target[offset..offset + bytes.len()].copy_from_slice(bytes)
            })?;
        }
        Ok(())
    }

    /// Every rank's `block` in rank order (a ring pass of W-1 steps; blocks may differ in length).
    fn ring_all_gather(
        &self,
        block: Vec<u8>,
        header: [u64; 2],
    ) -> Result<Vec<(Vec<u8>, [u64; 2])>> {
        let w = self.world_size;
        let mut blocks: Vec<Option<(Vec<u8>, [u64; 2])>> = vec![None; w];
        blocks[self.rank] = Some((block, header));
        let mut links = self.links()?;
        for s in 0..w - 1 {
            let send = (self.rank + w - s) % w;
            let recv = (self.rank + w - s - 1) % w;
            let (bytes, hdr) = blocks[send].as_ref().expect("sent blocks were received");
            let mut out = Vec::with_capacity(24 + bytes.len());
            out.extend((bytes.len() as u64).to_le_bytes());
            out.extend(hdr[0].to_le_bytes());
            out.extend(hdr[1].to_le_bytes());
            out.extend(bytes);
            let Links { prev, sender, .. } = &mut *links;
            // The header first (fixed size: length and two words), then the block.
            let (got, sent) = sender.send_while(&out, || -> std::io::Result<_> {
                let mut head = [0u8; 24];
                prev.read_exact(&mut head)?;
                let word = |i: usize| {
                    u64::from_le_bytes(head[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
                };
                let mut body = vec![0u8; word(0) as usize];
                prev.read_exact(&mut body)?;
                Ok((body, [word(1), word(2)]))
            });
            let received = got.map_err(|e| self.recv_error(e))?;
            sent.map_err(|e| self.send_error(e))?;
            blocks[recv] = Some(received);
        }
        blocks
            .into_iter()
            .enumerate()
            .map(|(r, b)| {
                b.ok_or_else(|| Error::Internal(format!("ring all-gather lost rank {r}'s block")))
            })
            .collect()
    }

    /// Forwards `data` from `root` around the ring, segment by segment.
    fn ring_broadcast(&self, data: &mut [u8], root: usize) -> Result<()> {
        let mut links = self.links()?;
        let Links { next, prev, .. } = &mut *links;
        let forward = self.next_rank() != root;
        if self.rank == root {
            return next.write_all(data).map_err(|e| self.send_error(e));
        }
        for seg in data.chunks_mut(SEGMENT) {
            prev.read_exact(seg).map_err(|e| self.recv_error(e))?;
            if forward {
                next.write_all(seg).map_err(|e| self.send_error(e))?;
            }
        }
        Ok(())
    }
}

impl Collective for RingGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        if self.world_size > 1 && t.numel() > 0 {
            let kind = t.kind();
            let work_kind = match kind {
                Kind::Float | Kind::BFloat16 | Kind::Half => Kind::Float,
                Kind::Double => Kind::Double,
                Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8 | Kind::Bool => {
                    Kind::Int64
                }
                k => {
                    return Err(Error::Internal(format!(
                        "the cpu collective cannot reduce {k:?} tensors"
                    )))
                }
            };
            let in_place = t.device() == Device::Cpu && kind == work_kind && t.is_contiguous();
            let work = if in_place {
                t.shallow_clone()
            } else {
                t.to_device(Device::Cpu).to_kind(work_kind).contiguous()
            };
            let n = work.numel();
            // SAFETY: `work` is a contiguous CPU tensor of `n` elements of the matching type,
            // alive and not aliased elsewhere during the call.
            match work_kind {
                Kind::Float => self.ring_all_reduce(unsafe { slice_of::<f32>(&work, n) })?,
                Kind::Double => self.ring_all_reduce(unsafe { slice_of::<f64>(&work, n) })?,
                _ => self.ring_all_reduce(unsafe { slice_of::<i64>(&work, n) })?,
            }
            if !in_place {
                tch::no_grad(|| t.copy_(&work));
            }
        }
        if op == ReduceOp::Mean {
            tch::no_grad(|| {
                let mean = t.to_kind(Kind::Double) / self.world_size as f64;
                t.copy_(&mean)
            });
        }
        Ok(())
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        if self.world_size == 1 || t.numel() == 0 {
            return Ok(());
        }
        let work = t.to_device(Device::Cpu).contiguous();
        let len = work.numel() * work.kind().elt_size_in_bytes();
        // SAFETY: contiguous CPU tensor of `len` bytes, owned here.
        self.ring_broadcast(unsafe { slice_of::<u8>(&work, len) }, root)?;
        tch::no_grad(|| t.copy_(&work));
        Ok(())
    }

    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let work = t.to_device(Device::Cpu).contiguous();
        let kind = work.kind();
        let shape = work.size();
        let rows = shape.first().copied().unwrap_or(1);
        let len = work.numel() * kind.elt_size_in_bytes();
        // SAFETY: contiguous CPU tensor of `len` bytes.
        let bytes = unsafe { slice_of::<u8>(&work, len) }.to_vec();
        let blocks = self.ring_all_gather(bytes, [rows as u64, kind.elt_size_in_bytes() as u64])?;
        blocks
            .into_iter()
            .enumerate()
            .map(|(r, (bytes, [rows, size]))| {
                if size as usize != kind.elt_size_in_bytes() {
                    return Err(Error::Collective {
                        rank: self.rank,
                        msg: format!("rank {r} sent a tensor of another dtype to an all-gather"),
                    });
                }
                let mut s = shape.clone();
                if s.is_empty() {
                    s.push(1);
                }
                s[0] = rows as i64;
                let out = Tensor::empty(s.as_slice(), (kind, Device::Cpu));
                let want = out.numel() * kind.elt_size_in_bytes();
                if want != bytes.len() {
                    return Err(Error::Collective {
                        rank: self.rank,
                        msg: format!(
                            "rank {r} sent {} bytes to an all-gather, its shape needs {want} (ranks disagree on the trailing shape)",
                            bytes.len()
                        ),
                    });
                }
                // SAFETY: freshly allocated contiguous tensor of exactly `want` bytes.
                unsafe { slice_of::<u8>(&out, want) }.copy_from_slice(&bytes);
                let out = if shape.is_empty() { out.reshape([]) } else { out };
                Ok(out.to_device(t.device()))
            })
            .collect()
    }

    fn all_gather_same(&self, t: &Tensor) -> Result<Tensor> {
        Ok(super::collective::stack_rows(&self.all_gather(t)?))
    }
}

fn peer_error(rank: usize, peer: usize, what: &str, e: std::io::Error) -> Error {
    let why = match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            "no answer within the collective timeout (dist.timeout_s)".to_string()
        }
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
            "the connection closed (did that rank exit?)".to_string()
        }
        _ => e.to_string(),
    };
    Error::Collective {
        rank,
        msg: format!("{what} rank {peer}: {why}"),
    }
}
