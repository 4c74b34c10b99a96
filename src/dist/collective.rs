//! The collective operations the rest of the crate may use (the external memory reads and writes
//! through them; the trainer will all-reduce through them). Implementations: [`SingleProcess`]
//! (world size 1) and [`InProcessGroup`] (one rank per thread, for tests and for simulating
//! sharding on one machine); the multi-process backends implement the same trait.
use crate::error::{Error, Result};
use std::sync::{Arc, Barrier, Mutex};
use tch::Tensor;

pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Every rank's `t` in rank order (same dtype and trailing shape, any first dimension).
    /// Every rank must call it, in the same order as the others.
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>>;
    /// Replaces `t` on every rank by the sum over ranks (same shape and dtype everywhere).
    /// Backends with a native all-reduce override this gather-and-sum.
    fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        let gathered = self.all_gather(t)?;
        let sum = gathered
            .iter()
            .skip(1)
            .fold(gathered[0].copy(), |acc, x| acc + x);
        tch::no_grad(|| t.copy_(&sum));
        Ok(())
    }
    fn is_rank_zero(&self) -> bool {
        self.rank() == 0
    }
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
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        Ok(vec![t.shallow_clone()])
    }
    fn all_reduce_sum(&self, _t: &mut Tensor) -> Result<()> {
        Ok(())
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
}
