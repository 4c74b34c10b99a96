//! The CPU collective backend: a ring over TCP between the ranks of one job.
//!
//! Written by hand because nothing usable does it: libtorch's own CPU backend (gloo) cannot be
//! compiled against from the torch wheel (it ships no gloo headers, and no package registry we
//! reach ships headers of the gloo commit torch 2.11 bundles), and vendoring gloo is not an option.
//! The rendezvous is still c10d's: peers publish their addresses in the job's TCPStore.
//!
//! Design: every rank holds a connection to and one from every other rank (see `rendezvous`);
//! the ring collectives use those to the next rank and from the previous one, the all-to-all
//! (a pairwise exchange, W-1 steps) uses them all.
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
mod rendezvous;
use link::Sender;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// Bytes a receive reduces at a time (the pipelining grain).
const SEGMENT: usize = 1 << 18;
/// Up to this many bytes a step writes before reading without a helper thread (far below what
/// the kernel's socket buffers hold, so two ranks writing to each other cannot block).
const INLINE: usize = 16 << 10;

/// The connections of one rank (see [`rendezvous::Mesh`]), and per outgoing connection a
/// sender thread that writes to it (a clone of its socket) while the caller reads elsewhere.
struct Links {
    out: Vec<Option<TcpStream>>,
    inc: Vec<Option<TcpStream>>,
    senders: Vec<Option<Sender>>,
}

/// One step's connections: to `to`, its sender, and from `from`.
struct Pair<'a> {
    to: &'a mut TcpStream,
    sender: &'a Sender,
    from: &'a mut TcpStream,
}

impl Links {
    fn pair(&mut self, to: usize, from: usize) -> Pair<'_> {
        let Links { out, inc, senders } = self;
        Pair {
            to: out[to].as_mut().expect("a connection to every other rank"),
            sender: senders[to].as_ref().expect("a sender to every other rank"),
            from: inc[from]
                .as_mut()
                .expect("a connection from every other rank"),
        }
    }
}

pub struct RingGroup {
    rank: usize,
    world_size: usize,
    links: Mutex<Links>,
    /// Bytes this rank wrote to and read from its connections (headers included).
    sent: AtomicU64,
    received: AtomicU64,
}

impl RingGroup {
    /// Connects `rank` to every other rank of the job, found through `store` (every rank calls
    /// this). `master` is the store's address, used to pick the interface the peers can reach.
    pub fn connect(
        store: &Store,
        rank: usize,
        world_size: usize,
        master: &str,
        timeout: Duration,
    ) -> Result<RingGroup> {
        let fail = |msg: String| Error::Collective { rank, msg };
        let rendezvous::Mesh { out, inc } =
            rendezvous::connect(store, rank, world_size, master, timeout)?;
        let senders = out
            .iter()
            .enumerate()
            .map(|(peer, s)| {
                s.as_ref()
                    .map(|s| {
                        let clone = s
                            .try_clone()
                            .map_err(|e| fail(format!("socket to rank {peer}: {e}")))?;
                        Sender::spawn(clone)
                            .map_err(|e| fail(format!("starting the ring sender thread: {e}")))
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RingGroup {
            rank,
            world_size,
            links: Mutex::new(Links { out, inc, senders }),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        })
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world_size
    }
    fn prev_rank(&self) -> usize {
        (self.rank + self.world_size - 1) % self.world_size
    }

    fn count(&self, sent: usize, received: usize) {
        self.sent.fetch_add(sent as u64, Ordering::Relaxed);
        self.received.fetch_add(received as u64, Ordering::Relaxed);
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
        let Pair {
            to: next,
            sender,
            from: prev,
        } = links.pair(self.next_rank(), self.prev_rank());
        self.count(out.len(), len);
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
            let Pair {
                from: prev, sender, ..
            } = links.pair(self.next_rank(), self.prev_rank());
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
            self.count(out.len(), 24 + received.0.len());
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

    /// All-to-all over the mesh in W-1 steps: at step s, rank r sends its block for rank r+s
    /// while it receives rank r-s's block for it (a 16-byte header: rows and element size, then
    /// the rows). Each block crosses one connection once, so a rank receives exactly what is
    /// addressed to it plus 16 bytes per peer.
    fn pairwise_all_to_all(
        &self,
        send: &[Tensor],
        recv_rows: Option<&[i64]>,
    ) -> Result<Vec<Tensor>> {
        let (w, rank) = (self.world_size, self.rank);
        let (kind, device) = (send[0].kind(), send[0].device());
        let mut shape = send[0].size();
        let elt = kind.elt_size_in_bytes();
        let mut recv: Vec<Option<Tensor>> = (0..w).map(|_| None).collect();
        recv[rank] = Some(send[rank].shallow_clone());
        let mut links = self.links()?;
        for s in 1..w {
            let (to, from) = ((rank + s) % w, (rank + w - s) % w);
            let work = send[to].to_device(Device::Cpu).contiguous();
            let len = work.numel() * elt;
            let mut out = Vec::with_capacity(16 + len);
            out.extend((work.size()[0] as u64).to_le_bytes());
            out.extend((elt as u64).to_le_bytes());
            // SAFETY: contiguous CPU tensor of `len` bytes.
            out.extend_from_slice(unsafe { slice_of::<u8>(&work, len) });
            let Pair {
                to: next,
                sender,
                from: prev,
            } = links.pair(to, from);
            let receive = |prev: &mut TcpStream| -> std::io::Result<(u64, u64, Vec<u8>)> {
                let mut head = [0u8; 16];
                prev.read_exact(&mut head)?;
                let rows = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
                let size = u64::from_le_bytes(head[8..].try_into().expect("8 bytes"));
                let row_bytes = (shape[1..].iter().product::<i64>() as u64) * size;
                let mut body = vec![0u8; (rows * row_bytes) as usize];
                prev.read_exact(&mut body)?;
                Ok((rows, size, body))
            };
            let peer = |e: std::io::Error, what: &str, who: usize| peer_error(rank, who, what, e);
            let got = if out.len() <= INLINE {
                next.write_all(&out)
                    .map_err(|e| peer(e, "sending to", to))?;
                receive(prev)
            } else {
                let (got, sent) = sender.send_while(&out, || receive(prev));
                sent.map_err(|e| peer(e, "sending to", to))?;
                got
            };
            let (rows, size, body) = got.map_err(|e| peer(e, "receiving from", from))?;
            self.count(out.len(), 16 + body.len());
            let fail = |msg: String| Error::Collective { rank, msg };
            if size as usize != elt {
                return Err(fail(format!(
                    "rank {from} sent an all-to-all block of another dtype ({size}-byte elements, {elt} here)"
                )));
            }
            if let Some(want) = recv_rows.map(|r| r[from]) {
                if want != rows as i64 {
                    return Err(fail(format!(
                        "rank {from} sent {rows} rows to an all-to-all that expected {want}"
                    )));
                }
            }
            shape[0] = rows as i64;
            let t = tensor_from_bytes(&body, &shape, kind)
                .ok_or_else(|| Error::Internal("all-to-all block size".into()))?;
            recv[from] = Some(t.to_device(device));
        }
        Ok(recv
            .into_iter()
            .map(|t| t.expect("every block received"))
            .collect())
    }

    /// Forwards `data` from `root` around the ring, segment by segment.
    fn ring_broadcast(&self, data: &mut [u8], root: usize) -> Result<()> {
        let mut links = self.links()?;
        let Pair {
            to: next,
            from: prev,
            ..
        } = links.pair(self.next_rank(), self.prev_rank());
        let forward = self.next_rank() != root;
        if self.rank == root {
            self.count(data.len(), 0);
            return next.write_all(data).map_err(|e| self.send_error(e));
        }
        self.count(if forward { data.len() } else { 0 }, data.len());
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
                let out = tensor_from_bytes(&bytes, &s, kind).ok_or_else(|| Error::Collective {
                    rank: self.rank,
                    msg: format!(
                        "rank {r} sent {} bytes to an all-gather of {kind:?} rows {:?} (ranks disagree on the trailing shape)",
                        bytes.len(),
                        &s[1..]
                    ),
                })?;
                let out = if shape.is_empty() { out.reshape([]) } else { out };
                Ok(out.to_device(t.device()))
            })
            .collect()
    }

    fn all_gather_same(&self, t: &Tensor) -> Result<Tensor> {
        Ok(super::collective::stack_rows(&self.all_gather(t)?))
    }

    fn all_to_all(&self, send: &[Tensor], recv_rows: Option<&[i64]>) -> Result<Vec<Tensor>> {
        super::collective::check_all_to_all(self.rank, self.world_size, send, recv_rows)?;
        self.pairwise_all_to_all(send, recv_rows)
    }

    fn traffic(&self) -> Option<super::Traffic> {
        Some(super::Traffic {
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
        })
    }
}

/// A CPU tensor of `shape` and `kind` holding `bytes`, or None when their lengths differ.
fn tensor_from_bytes(bytes: &[u8], shape: &[i64], kind: Kind) -> Option<Tensor> {
    let out = Tensor::empty(shape, (kind, Device::Cpu));
    let want = out.numel() * kind.elt_size_in_bytes();
    if want != bytes.len() {
        return None;
    }
    // SAFETY: freshly allocated contiguous tensor of exactly `want` bytes.
    unsafe { slice_of::<u8>(&out, want) }.copy_from_slice(bytes);
    Some(out)
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
