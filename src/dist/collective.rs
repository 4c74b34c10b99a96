//! The collective operations the rest of the crate may use (the external memory reads and writes
//! through them, the trainer all-reduces gradients and broadcasts weights through them).
//! Implementations: [`SingleProcess`] (world size 1), [`InProcessGroup`] (one rank per thread,
//! for tests and for simulating sharding on one machine), and the multi-process backends:
//! [`super::ring::RingGroup`] (CPU tensors, TCP ring) and [`super::c10d::NcclGroup`] (CUDA
//! tensors, libtorch's ProcessGroupNCCL).
use crate::error::{Error, Result};
use std::sync::{Arc, Barrier, Mutex};
use tch::Tensor;

/// `t` with at least one dimension (a 0-d tensor as one row), as the gathers stack it.
pub fn as_rows(t: &Tensor) -> Tensor {
    if t.dim() == 0 {
        t.reshape([1])
    } else {
        t.shallow_clone()
    }
}

/// Every rank's tensor stacked along the first dimension (the gather-everything fallback).
pub(crate) fn stack_rows(parts: &[Tensor]) -> Tensor {
    Tensor::cat(&parts.iter().map(as_rows).collect::<Vec<_>>(), 0)
}

/// Bytes a backend has written to and read from its connections since it started, headers
/// included (what [`Collective::traffic`] reports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
}

/// Checks the arguments of an all-to-all on `rank` of `world`: one tensor per rank, at least one
/// dimension, one dtype and trailing shape; `recv_rows`, if given, one count per rank.
pub fn check_all_to_all(
    rank: usize,
    world: usize,
    send: &[Tensor],
    recv_rows: Option<&[i64]>,
) -> Result<()> {
    let fail = |msg: String| Err(Error::Collective { rank, msg });
    if send.len() != world || recv_rows.is_some_and(|r| r.len() != world) {
        return fail(format!(
            "an all-to-all needs one tensor and one receive count per rank: {} tensors, {:?} \
             counts for {world} ranks",
            send.len(),
            recv_rows.map(|r| r.len())
        ));
    }
    let first = &send[0];
    for (j, t) in send.iter().enumerate() {
        if t.dim() == 0 || t.kind() != first.kind() || t.size()[1..] != first.size()[1..] {
            return fail(format!(
                "an all-to-all's tensors share one dtype and trailing shape and have a first \
                 dimension: the one for rank {j} is {:?} {:?}, for rank 0 {:?} {:?}",
                t.kind(),
                t.size(),
                first.kind(),
                first.size()
            ));
        }
    }
    Ok(())
}

/// How [`Collective::all_reduce`] combines the ranks' tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Mean,
}

/// Every rank must call each collective, in the same order as the others; a rank that does not
/// answer within the backend's timeout makes the call fail naming it.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Every rank's `t` (same shape and dtype everywhere) stacked along the first dimension
    /// (a 0-d tensor counts as one row).
    fn all_gather_same(&self, t: &Tensor) -> Result<Tensor>;
    /// Every rank's `t` in rank order (same dtype and trailing shape, any first dimension):
    /// the lengths first, then one gather of blocks padded to the longest.
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        if self.world_size() == 1 {
            return Ok(vec![t.shallow_clone()]);
        }
        if t.dim() == 0 {
            let rows = self.all_gather_same(&as_rows(t))?;
            return Ok(rows.split(1, 0).iter().map(|r| r.reshape([])).collect());
        }
        let rows = t.size()[0];
        let lens = self.all_gather_same(&Tensor::from_slice(&[rows]).to_device(t.device()))?;
        let lens = crate::host::i64s(&lens)?;
        let longest = lens.iter().copied().max().unwrap_or(0);
        let padded = if rows < longest {
            let mut shape = t.size();
            shape[0] = longest - rows;
            Tensor::cat(
                &[
                    t.shallow_clone(),
                    Tensor::zeros(shape.as_slice(), (t.kind(), t.device())),
                ],
                0,
            )
        } else {
            t.shallow_clone()
        };
        let all = self.all_gather_same(&padded.contiguous())?;
        Ok(lens
            .iter()
            .enumerate()
            .map(|(r, &n)| all.narrow(0, r as i64 * longest, n))
            .collect())
    }
    /// Replaces `t` on every rank by the sum (or mean) over ranks, in place (same shape and dtype
    /// everywhere). Backends with a native all-reduce override this gather-and-sum.
    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let gathered = self.all_gather(t)?;
        let sum = gathered
            .iter()
            .skip(1)
            .fold(gathered[0].copy(), |acc, x| acc + x);
        let out = match op {
            ReduceOp::Sum => sum,
            ReduceOp::Mean => sum / self.world_size() as f64,
        };
        tch::no_grad(|| t.copy_(&out));
        Ok(())
    }
    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        self.all_reduce(t, ReduceOp::Sum)
    }
    /// Replaces `t` on every rank by rank `root`'s (same shape and dtype everywhere).
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let gathered = self.all_gather(t)?;
        tch::no_grad(|| t.copy_(&gathered[root]));
        Ok(())
    }
    /// `send[j]` goes to rank j; returns what every rank sent to this one, in rank order. The
    /// tensors share one dtype and trailing shape on every rank; first dimensions may differ.
    /// `recv_rows`, when the caller knows them, are the first dimensions of what arrives (a
    /// backend that must size its buffers beforehand then skips exchanging them). This default
    /// gathers everything (traffic grows with the world size); backends override it with a
    /// direct exchange.
    fn all_to_all(&self, send: &[Tensor], recv_rows: Option<&[i64]>) -> Result<Vec<Tensor>> {
        let (rank, w) = (self.rank(), self.world_size());
        check_all_to_all(rank, w, send, recv_rows)?;
        if w == 1 {
            return Ok(vec![send[0].shallow_clone()]);
        }
        let device = send[0].device();
        let rows: Vec<i64> = send.iter().map(|t| t.size()[0]).collect();
        let counts = self.all_gather_same(&Tensor::from_slice(&rows).to_device(device))?;
        let counts = crate::host::i64s(&counts)?; // (w * w)
        let parts = self.all_gather(&Tensor::cat(send, 0))?;
        Ok(parts
            .iter()
            .enumerate()
            .map(|(j, part)| {
                let row = &counts[j * w..(j + 1) * w];
                let offset: i64 = row[..rank].iter().sum();
                part.narrow(0, offset, row[rank])
            })
            .collect())
    }
    /// Bytes this rank's backend has moved, when it counts them (the CPU ring does).
    fn traffic(&self) -> Option<Traffic> {
        None
    }
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()> {
        let mut t = Tensor::from_slice(&[1i64]);
        self.all_reduce(&mut t, ReduceOp::Sum)
    }
    fn is_rank_zero(&self) -> bool {
        self.rank() == 0
    }
}

/// Every rank's `value`, in rank order.
pub fn all_gather_strings(group: &dyn Collective, value: &str) -> Result<Vec<String>> {
    if group.world_size() == 1 {
        return Ok(vec![value.to_string()]);
    }
    group
        .all_gather(&Tensor::from_slice(value.as_bytes()))?
        .iter()
        .enumerate()
        .map(|(r, t)| {
            String::from_utf8(crate::host::u8s(t)?).map_err(|_| Error::Collective {
                rank: group.rank(),
                msg: format!("rank {r} sent a string that is not UTF-8"),
            })
        })
        .collect()
}

/// Rank 0's `value` on every rank (a decision only rank 0 may take, e.g. a new directory name).
pub fn rank_zero_string(group: &dyn Collective, value: &str) -> Result<String> {
    Ok(all_gather_strings(group, value)?.swap_remove(0))
}

/// Rank 0's decision on every rank: rank 0 passes `Some(value)`, the others `None`; the value
/// travels as JSON.
pub fn broadcast_json<T: serde::Serialize + serde::de::DeserializeOwned>(
    group: &dyn Collective,
    value: Option<&T>,
) -> Result<T> {
    let internal =
        |e: serde_json::Error| Error::Internal(format!("rank 0's decision as JSON: {e}"));
    let json = value
        .map(serde_json::to_string)
        .transpose()
        .map_err(internal)?;
    let chosen = rank_zero_string(group, json.as_deref().unwrap_or(""))?;
    serde_json::from_str(&chosen).map_err(internal)
}

/// One process, nothing to exchange.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_gather_same(&self, t: &Tensor) -> Result<Tensor> {
        Ok(as_rows(t))
    }
}

struct Shared {
    slots: Mutex<Vec<Option<Tensor>>>,
    barrier: Barrier,
}

/// A group of `world_size` ranks living in one process, one per thread; tensors are exchanged
/// as CPU copies.
pub struct InProcessGroup {
    rank: usize,
    world_size: usize,
    shared: Arc<Shared>,
}

impl InProcessGroup {
    /// The `world_size` members of a new group, rank 0 first.
    pub fn new(world_size: usize) -> Vec<InProcessGroup> {
        let shared = Arc::new(Shared {
            slots: Mutex::new((0..world_size).map(|_| None).collect()),
            barrier: Barrier::new(world_size),
        });
        (0..world_size)
            .map(|rank| InProcessGroup {
                rank,
                world_size,
                shared: shared.clone(),
            })
            .collect()
    }

    fn slots(&self) -> Result<std::sync::MutexGuard<'_, Vec<Option<Tensor>>>> {
        self.shared.slots.lock().map_err(|_| Error::Collective {
            rank: self.rank,
            msg: "another rank panicked during a collective".into(),
        })
    }
}

impl Collective for InProcessGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let device = t.device();
        self.slots()?[self.rank] = Some(t.to_device(tch::Device::Cpu).copy());
        self.shared.barrier.wait();
        let gathered = self
            .slots()?
            .iter()
            .enumerate()
            .map(|(r, s)| {
                s.as_ref()
                    .map(|t| t.copy().to_device(device))
                    .ok_or_else(|| Error::Collective {
                        rank: self.rank,
                        msg: format!("rank {r} sent nothing"),
                    })
            })
            .collect::<Result<Vec<_>>>();
        // Nobody may overwrite a slot before everyone has read it.
        self.shared.barrier.wait();
        gathered
    }
    fn all_gather_same(&self, t: &Tensor) -> Result<Tensor> {
        Ok(stack_rows(&self.all_gather(t)?))
    }
}
