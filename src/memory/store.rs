//! The key-value memory of METHOD.md section 2 (in the style of Memorizing Transformers, Wu et al.
//! 2022, <https://arxiv.org/abs/2203.08913>): a FIFO ring of `capacity` (key, value, example id)
//! entries, sharded over the ranks of a [`Collective`] — rank i holds ring slots i, i+W, i+2W, ...
//! Reads are exact top-k by `q . k / tau`, with entries of the query's own example masked out;
//! ties are broken by ring slot (oldest slot first), so a sharded read returns exactly what an
//! unsharded memory with the same entries returns, values and order (the reads: `read.rs`). Written by hand because no
//! crate does exact, deterministic top-k over libtorch tensors across ranks; faiss is the
//! reference the benchmark compares against.
use crate::config::MemoryConfig;
use crate::dist::Collective;
use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor};

pub struct ShardedKvMemory {
    capacity: usize,
    rank: usize,
    world_size: usize,
    pub(super) tau: f64,
    /// `(local capacity, d_k)` in `memory.key_dtype`, `(local capacity, d_v)` f32.
    pub(super) keys: Tensor,
    pub(super) values: Tensor,
    /// `(local capacity,)` i64: the example id of each entry, -1 when empty.
    pub(super) ids: Tensor,
    /// Entries written so far, all ranks together (the ring position of the next write).
    written: u64,
}

/// The slot of a read's padding (no entry).
pub(super) const NO_SLOT: i64 = i64::MAX;

impl ShardedKvMemory {
    /// This rank's shard of a memory of `capacity` entries.
    pub fn new(
        cfg: &MemoryConfig,
        d_value: i64,
        rank: usize,
        world_size: usize,
        device: Device,
    ) -> Self {
        let (capacity, d_key, tau) = (cfg.capacity, cfg.key_size, cfg.tau);
        let local = Self::local_capacity(capacity, rank, world_size) as i64;
        ShardedKvMemory {
            capacity,
            rank,
            world_size,
            tau,
            keys: Tensor::zeros([local, d_key], (cfg.key_dtype.kind(), device)),
            values: Tensor::zeros([local, d_value], (Kind::Float, device)),
            ids: Tensor::full([local], -1, (Kind::Int64, device)),
            written: 0,
        }
    }

    /// Slots `rank, rank + W, ...` below `capacity`.
    pub fn local_capacity(capacity: usize, rank: usize, world_size: usize) -> usize {
        (capacity + world_size - 1 - rank) / world_size
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries held by all ranks together.
    pub fn len(&self) -> usize {
        (self.written as usize).min(self.capacity)
    }

    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    /// Forgets every entry (the ring starts again at slot 0).
    pub fn clear(&mut self) {
        let _ = self.ids.fill_(-1);
        let _ = self.keys.zero_();
        let _ = self.values.zero_();
        self.written = 0;
    }

    /// Bytes of this rank's shard.
    pub fn bytes(&self) -> usize {
        [&self.keys, &self.values, &self.ids]
            .iter()
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }

    /// The ring slots of local `rows`.
    pub(super) fn slot_of(&self, rows: &Tensor) -> Tensor {
        rows * self.world_size as i64 + self.rank as i64
    }

    /// The local rows of this shard's ring `slots`.
    pub(super) fn row_of(&self, slots: &Tensor) -> Tensor {
        slots.divide_scalar_mode(self.world_size as i64, "floor")
    }

    /// Appends every rank's `keys (n, d_k)`, `values (n, d_v)`, `ids (n,)` to the ring, in rank
    /// order; each rank sends each of its entries to the rank owning its slot (one all-to-all:
    /// a rank receives the entries it stores, not everyone's). Collective: all ranks call it.
    pub fn write(
        &mut self,
        group: &dyn Collective,
        keys: &Tensor,
        values: &Tensor,
        ids: &Tensor,
    ) -> Result<()> {
        let (w, device) = (self.world_size as i64, self.keys.device());
        let (d_k, d_v) = self.dims();
        let n = keys.size()[0];
        // Every rank's count and widths, so that all fail alike on a bad write.
        let shape = [n, keys.size()[1], values.size()[1], ids.size()[0]];
        let shapes = if w == 1 {
            shape.to_vec()
        } else {
            crate::host::i64s(
                &group.all_gather_same(&Tensor::from_slice(&shape).to_device(device))?,
            )?
        };
        for (r, s) in shapes.chunks(4).enumerate() {
            if s[1] != d_k || s[2] != d_v || s[3] != s[0] {
                return Err(Error::Collective {
                    rank: self.rank,
                    msg: format!(
                        "memory write on rank {r} of {} keys of width {}, values of width {} and {} ids: the memory holds keys of {d_k} and values of {d_v}",
                        s[0], s[1], s[2], s[3]
                    ),
                });
            }
        }
        let counts: Vec<i64> = shapes.chunks(4).map(|s| s[0]).collect();
        let total: i64 = counts.iter().sum();
        let before: i64 = counts[..self.rank].iter().sum();
        let cap = self.capacity as i64;
        // Only the last `capacity` entries of a write this large survive.
        let skip = (total - cap).max(0);
        // This rank's entries from the first that survives: their positions in the write, and
        // their indices here (known on the host: no data-dependent selection).
        let first = (skip - before).clamp(0, n);
        let kept = Tensor::arange_start(first, n, (Kind::Int64, device));
        let slots = (kept.shallow_clone() + before + self.written as i64).remainder(cap);
        let owner = slots.remainder(w);
        let order = owner.argsort_stable(true, 0, false);
        let (slots, kept) = (slots.index_select(0, &order), kept.index_select(0, &order));
        let pick = |t: &Tensor, kind: Kind| {
            t.detach()
                .to_device(device)
                .to_kind(kind)
                .index_select(0, &kept)
        };
        let payload = Tensor::cat(
            &[
                pick(keys, Kind::Float),
                pick(values, Kind::Float),
                i64_as_columns(&slots.divide_scalar_mode(w, "floor")),
                i64_as_columns(&pick(ids, Kind::Int64)),
            ],
            1,
        );
        // Entries per owning rank, counted on the host from the same slot arithmetic.
        let mut per_owner = vec![0i64; w as usize];
        for i in first..n {
            per_owner[((before + i + self.written as i64) % cap % w) as usize] += 1;
        }
        let mut send = Vec::with_capacity(w as usize);
        let mut offset = 0;
        for &m in &per_owner {
            send.push(payload.narrow(0, offset, m));
            offset += m;
        }
        let got = Tensor::cat(&group.all_to_all(&send, None)?, 0).to_device(device);
        if got.size()[0] > 0 {
            let (local, new_ids) = (
                i64_from_columns(&got, d_k + d_v),
                i64_from_columns(&got, d_k + d_v + 2),
            );
            let new_keys = got.narrow(1, 0, d_k).to_kind(self.keys.kind());
            let _ = self.keys.index_copy_(0, &local, &new_keys);
            let _ = self.values.index_copy_(0, &local, &got.narrow(1, d_k, d_v));
            let _ = self.ids.index_copy_(0, &local, &new_ids);
        }
        self.written += total as u64;
        Ok(())
    }

    /// Rows of this shard that hold an entry (the ring fills local rows in order).
    pub(super) fn filled_rows(&self) -> i64 {
        let held = (self.written as usize).min(self.capacity);
        Self::local_capacity(held, self.rank, self.world_size) as i64
    }

    /// This shard's tensors (for saving with a run).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut t = self.shard_tensors();
        t.push(("written".into(), Tensor::from_slice(&[self.written as i64])));
        t
    }

    /// `(d_key, d_value)`.
    pub fn dims(&self) -> (i64, i64) {
        (self.keys.size()[1], self.values.size()[1])
    }

    /// Entries ever written, all ranks together (the ring position of the next write).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The whole ring in slot order, whatever the world size (to inspect or compare memories;
    /// files hold one shard per rank, see [`super::files`]): every
    /// rank's shard gathered and interleaved (slot `s` is row `s / W` of rank `s % W`).
    /// Collective when sharded.
    pub fn global_tensors(&self, group: &dyn Collective) -> Result<Vec<(String, Tensor)>> {
        let w = self.world_size as i64;
        if w == 1 {
            return Ok(self.tensors());
        }
        let device = self.keys.device();
        let ring = |t: &Tensor| -> Result<Tensor> {
            let parts = group.all_gather(t)?;
            let mut shape = t.size();
            shape[0] = self.capacity as i64;
            let full = Tensor::zeros(shape.as_slice(), (t.kind(), device));
            for (r, part) in parts.iter().enumerate() {
                let slots = Tensor::arange(part.size()[0], (Kind::Int64, device)) * w + r as i64;
                let mut f = full.shallow_clone();
                let _ = f.index_copy_(0, &slots, &part.to_device(device));
            }
            Ok(full)
        };
        Ok(vec![
            ("keys".into(), ring(&self.keys)?),
            ("values".into(), ring(&self.values)?),
            ("ids".into(), ring(&self.ids)?),
            ("written".into(), Tensor::from_slice(&[self.written as i64])),
        ])
    }

    /// This rank's rows (what its shard of a memory file holds): `keys`, `values`, `ids`.
    pub fn shard_tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            ("keys".into(), self.keys.shallow_clone()),
            ("values".into(), self.values.shallow_clone()),
            ("ids".into(), self.ids.shallow_clone()),
        ]
    }

    /// Replaces this shard's entries with its slots of a saved memory (see
    /// [`super::files::load`]), saved at any world size; `path` names the memory in errors.
    pub fn restore(&mut self, saved: &super::files::Loaded, path: &std::path::Path) -> Result<()> {
        if saved.capacity != self.capacity {
            return Err(Error::format(
                path,
                format!(
                    "holds a memory of {} entries; memory.capacity is {}",
                    saved.capacity, self.capacity
                ),
            ));
        }
        // Saved at this world size, this rank's shard overwrites every row; otherwise the rows
        // no saved slot maps to stay empty.
        if saved.world_size != self.world_size {
            self.clear();
        }
        for shard in &saved.shards {
            self.restore_rows(shard.rank, saved.world_size, &shard.tensors, &shard.path)?;
        }
        self.written = saved.written;
        Ok(())
    }

    /// Takes the entries this rank owns from shard `saved_rank` of a memory saved at world size
    /// `saved_world` (its row j is ring slot `saved_rank + j * saved_world`): slot s goes to rank
    /// `s % W`, row `s / W` — the slot rule, at any pair of world sizes. `tensors` are that
    /// shard's `keys`, `values`, `ids`; `path` names the file in errors.
    pub fn restore_rows(
        &mut self,
        saved_rank: usize,
        saved_world: usize,
        tensors: &std::collections::HashMap<String, Tensor>,
        path: &std::path::Path,
    ) -> Result<()> {
        let take = |name: &str, like: &Tensor| -> Result<Tensor> {
            let t = tensors
                .get(name)
                .ok_or_else(|| Error::tensor(path, name, "missing from the memory file"))?;
            let rows = Self::local_capacity(self.capacity, saved_rank, saved_world) as i64;
            let mut want = like.size();
            want[0] = rows;
            if t.size() != want {
                return Err(Error::tensor(
                    path,
                    name,
                    format!(
                        "has shape {:?}; shard {saved_rank} of {saved_world} of a memory of {} entries has {:?}",
                        t.size(),
                        self.capacity,
                        want
                    ),
                ));
            }
            Ok(t.to_device(like.device()).to_kind(like.kind()))
        };
        let (keys, values, ids) = (
            take("keys", &self.keys)?,
            take("values", &self.values)?,
            take("ids", &self.ids)?,
        );
        if (saved_rank, saved_world) == (self.rank, self.world_size) {
            // The same shard: row for row.
            tch::no_grad(|| {
                self.keys.copy_(&keys);
                self.values.copy_(&values);
                self.ids.copy_(&ids);
            });
            return Ok(());
        }
        let device = self.keys.device();
        let (w, rank) = (self.world_size as i64, self.rank as i64);
        let slots = Tensor::arange(ids.size()[0], (Kind::Int64, device)) * saved_world as i64
            + saved_rank as i64;
        let rows = slots.remainder(w).eq(rank).nonzero().squeeze_dim(1);
        if rows.numel() == 0 {
            return Ok(());
        }
        let local = slots.index_select(0, &rows).divide_scalar_mode(w, "floor");
        let _ = self
            .keys
            .index_copy_(0, &local, &keys.index_select(0, &rows));
        let _ = self
            .values
            .index_copy_(0, &local, &values.index_select(0, &rows));
        let _ = self.ids.index_copy_(0, &local, &ids.index_select(0, &rows));
        Ok(())
    }
}

/// `(n,)` i64 as two f32 columns `(n, 2)` holding its bits (to travel with f32 rows).
pub(super) fn i64_as_columns(t: &Tensor) -> Tensor {
    t.reshape([-1, 1]).contiguous().view_dtype(Kind::Float)
}

/// The `(n,)` i64 whose bits [`i64_as_columns`] put in columns `at`, `at + 1` of `t (n, m)`.
pub(super) fn i64_from_columns(t: &Tensor, at: i64) -> Tensor {
    // Into a fresh compact tensor: an i64 view needs an even f32 offset and row stride.
    let mut out = Tensor::empty([t.size()[0], 2], (Kind::Float, t.device()));
    out.copy_(&t.narrow(1, at, 2));
    out.view_dtype(Kind::Int64).reshape([-1])
}
