//! The key-value memory of METHOD.md section 2 (in the style of Memorizing Transformers, Wu et al.
//! 2022, <https://arxiv.org/abs/2203.08913>): a FIFO ring of `capacity` (key, value, example id)
//! entries, sharded over the ranks of a [`Collective`] — rank i holds ring slots i, i+W, i+2W, ...
//! Reads are exact top-k by `q . k / tau`, with entries of the query's own example masked out;
//! ties are broken by ring slot (oldest slot first), so a sharded read returns exactly what an
//! unsharded memory with the same entries returns, values and order. Written by hand because no
//! crate does exact, deterministic top-k over libtorch tensors across ranks; faiss is the
//! reference the benchmark compares against.
use crate::config::MemoryConfig;
use crate::dist::Collective;
use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor};

/// Entries of one read: `scores (q, k)` (already divided by tau; -inf where fewer than k entries
/// qualified), `values (q, k, d_v)`, `keys (q, k, d_k)`, `ids (q, k)` (-1 for none), `slots
/// (q, k)` (ring slots).
pub struct Retrieved {
    pub scores: Tensor,
    pub values: Tensor,
    pub keys: Tensor,
    pub ids: Tensor,
    pub slots: Tensor,
}

impl Retrieved {
    /// `r = sum_j softmax(scores)_j v_j`, `(q, d_v)`; zero for a query with no entry.
    pub fn weighted_values(&self) -> Tensor {
        let valid = self.ids.ge(0); // (q, k)
        let any = valid.any_dim(1, true); // (q, 1)
        let safe = self.scores.where_self(&any, &self.scores.zeros_like());
        let w = safe.softmax(-1, Kind::Float) * valid.to_kind(Kind::Float); // (q, k)
        (w.unsqueeze(-1) * &self.values).sum_dim_intlist(1, false, Kind::Float)
    }
}

pub struct ShardedKvMemory {
    capacity: usize,
    rank: usize,
    world_size: usize,
    tau: f64,
    /// `(local capacity, d_k)`, `(local capacity, d_v)` f32.
    keys: Tensor,
    values: Tensor,
    /// `(local capacity,)` i64: the example id of each entry, -1 when empty.
    ids: Tensor,
    /// Entries written so far, all ranks together (the ring position of the next write).
    written: u64,
    /// Local rows of each example id, so that self-exclusion touches only those rows (an id has
    /// one row but for repeats: kept inline, no allocation per entry).
    rows_of_id: std::collections::HashMap<i64, smallvec::SmallVec<[i64; 1]>>,
}

const NO_SLOT: i64 = i64::MAX;

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
            keys: Tensor::zeros([local, d_key], (Kind::Float, device)),
            values: Tensor::zeros([local, d_value], (Kind::Float, device)),
            ids: Tensor::full([local], -1, (Kind::Int64, device)),
            written: 0,
            rows_of_id: Default::default(),
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
        self.rows_of_id.clear();
        self.written = 0;
    }

    /// Bytes of this rank's shard.
    pub fn bytes(&self) -> usize {
        [&self.keys, &self.values, &self.ids]
            .iter()
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }

    /// The ring slot of local row `j`.
    fn slot_of(&self, local: &Tensor) -> Tensor {
        local * self.world_size as i64 + self.rank as i64
    }

    /// Appends every rank's `keys (n, d_k)`, `values (n, d_v)`, `ids (n,)` (gathered in rank
    /// order) to the ring; each rank stores the slots it owns. Collective: all ranks call it.
    pub fn write(
        &mut self,
        group: &dyn Collective,
        keys: &Tensor,
        values: &Tensor,
        ids: &Tensor,
    ) -> Result<()> {
        let gather = |t: &Tensor| -> Result<Tensor> { Ok(Tensor::cat(&group.all_gather(t)?, 0)) };
        let device = self.keys.device();
        let (mut k, mut v, mut i) = (
            gather(&keys.detach().to_kind(Kind::Float))?.to_device(device),
            gather(&values.detach().to_kind(Kind::Float))?.to_device(device),
            gather(&ids.to_kind(Kind::Int64))?.to_device(device),
        );
        let mut n = k.size()[0];
        if k.size()[1] != self.keys.size()[1] || v.size()[1] != self.values.size()[1] {
            return Err(Error::Collective {
                rank: self.rank,
                msg: format!(
                    "memory write of keys {:?} / values {:?}: the memory holds {:?} / {:?}",
                    k.size(),
                    v.size(),
                    self.keys.size(),
                    self.values.size()
                ),
            });
        }
        let cap = self.capacity as i64;
        let mut start = self.written as i64;
        if n > cap {
            // Only the last `capacity` entries survive a write this large.
            let skip = n - cap;
            (k, v, i) = (
                k.narrow(0, skip, cap),
                v.narrow(0, skip, cap),
                i.narrow(0, skip, cap),
            );
            start += skip;
            n = cap;
        }
        let slots = (Tensor::arange(n, (Kind::Int64, device)) + start).remainder(cap);
        let mine = slots.remainder(self.world_size as i64).eq(self.rank as i64);
        let rows = mine.nonzero().squeeze_dim(1);
        if rows.numel() > 0 {
            let local = slots
                .index_select(0, &rows)
                .divide_scalar_mode(self.world_size as i64, "floor");
            let _ = self.keys.index_copy_(0, &local, &k.index_select(0, &rows));
            let _ = self
                .values
                .index_copy_(0, &local, &v.index_select(0, &rows));
            let new_ids = i.index_select(0, &rows);
            let rows_list = Vec::<i64>::try_from(local.to_device(Device::Cpu))?;
            let old =
                Vec::<i64>::try_from(self.ids.index_select(0, &local).to_device(Device::Cpu))?;
            let new = Vec::<i64>::try_from(new_ids.to_device(Device::Cpu))?;
            for ((&row, &was), &now) in rows_list.iter().zip(&old).zip(&new) {
                if let Some(v) = self.rows_of_id.get_mut(&was) {
                    v.retain(|r| *r != row);
                    if v.is_empty() {
                        self.rows_of_id.remove(&was);
                    }
                }
                self.rows_of_id.entry(now).or_default().push(row);
            }
            let _ = self.ids.index_copy_(0, &local, &new_ids);
        }
        self.written = (start + n) as u64;
        Ok(())
    }

    /// Rows of this shard that hold an entry (the ring fills local rows in order).
    fn filled_rows(&self) -> i64 {
        let held = (self.written as usize).min(self.capacity);
        Self::local_capacity(held, self.rank, self.world_size) as i64
    }

    /// Top-`k` of this shard for `queries (q, d_k)`, excluding entries whose id equals the
    /// query's; ties broken by ring slot.
    pub fn search_local(
        &self,
        queries: &Tensor,
        query_ids: &Tensor,
        k: usize,
    ) -> Result<Retrieved> {
        let q = queries.size()[0];
        let filled = self.filled_rows();
        let device = self.keys.device();
        let k = k as i64;
        if filled == 0 || q == 0 {
            return Ok(empty(
                q,
                k,
                self.values.size()[1],
                self.keys.size()[1],
                device,
            ));
        }
        let keys = self.keys.narrow(0, 0, filled);
        let scores = (queries.to_kind(Kind::Float) / self.tau).matmul(&keys.tr()); // (q, n)
                                                                                   // A NaN score would sort first in top-k: it ranks last instead.
        let mut scores = scores.masked_fill(&scores.isnan(), f64::NEG_INFINITY);
        // Self-exclusion: only the rows of the queries' own examples.
        let qids = Vec::<i64>::try_from(query_ids.to_device(Device::Cpu))?;
        let (mut qi, mut rows) = (Vec::new(), Vec::new());
        for (i, id) in qids.iter().enumerate() {
            for &r in self.rows_of_id.get(id).into_iter().flatten() {
                if r < filled {
                    qi.push(i as i64);
                    rows.push(r);
                }
            }
        }
        if !qi.is_empty() {
            let index = [
                Some(Tensor::from_slice(&qi).to_device(device)),
                Some(Tensor::from_slice(&rows).to_device(device)),
            ];
            let _ = scores.index_put_(
                &index,
                &Tensor::from(f64::NEG_INFINITY)
                    .to_kind(Kind::Float)
                    .to_device(device),
                false,
            );
        }
        let kk = k.min(filled);
        // Fast path: the (k+1)-th score is below the k-th in every row, so topk's set is exact.
        let (top, top_cols) = scores.topk((kk + 1).min(filled), 1, true, true);
        let boundary_tie = kk < filled
            && top
                .narrow(1, kk - 1, 1)
                .eq_tensor(&top.narrow(1, kk, 1))
                .logical_and(&top.narrow(1, kk - 1, 1).isfinite())
                .any()
                .int64_value(&[])
                != 0;
        let cols = if !boundary_tie {
            top_cols.narrow(1, 0, kk).contiguous()
        } else {
            let kth = top.narrow(1, kk - 1, 1); // (q, 1)
                                                // Everything above the k-th score, then the oldest slots among those equal to it.
            let above = scores.gt_tensor(&kth);
            let equal = scores.eq_tensor(&kth);
            let room = -above.sum_dim_intlist(1, true, Kind::Int64) + kk; // (q, 1)
            let take = above
                .logical_or(&equal.logical_and(&equal.cumsum(1, Kind::Int64).le_tensor(&room))); // exactly kk per row, in slot order
            take.nonzero().select(1, 1).view([q, kk])
        };
        let picked = scores.gather(1, &cols, false);
        let slots = self.slot_of(&cols);
        let ids = self.ids.index_select(0, &cols.reshape([-1])).view([q, kk]);
        let values = self
            .values
            .index_select(0, &cols.reshape([-1]))
            .view([q, kk, -1]);
        let keys = self
            .keys
            .index_select(0, &cols.reshape([-1]))
            .view([q, kk, -1]);
        let found = Retrieved {
            scores: picked,
            values,
            keys,
            ids,
            slots,
        };
        let found = sort_by_score_then_slot(mark_invalid(found));
        Ok(pad_to(found, k))
    }

    /// The global top-`k` for this rank's `queries (q, d_k)` and their example ids `(q,)`.
    /// Collective when sharded: every rank calls it with its own queries.
    pub fn read(
        &self,
        group: &dyn Collective,
        queries: &Tensor,
        query_ids: &Tensor,
        k: usize,
    ) -> Result<Retrieved> {
        if group.world_size() == 1 {
            return self.search_local(queries, query_ids, k);
        }
        let device = self.keys.device();
        let all_q = group.all_gather(&queries.detach().to_kind(Kind::Float))?;
        let all_ids = Tensor::cat(&group.all_gather(&query_ids.to_kind(Kind::Int64))?, 0);
        let counts: Vec<i64> = all_q.iter().map(|t| t.size()[0]).collect();
        let offset: i64 = counts[..group.rank()].iter().sum();
        let mine = counts[group.rank()];
        let local = self.search_local(
            &Tensor::cat(&all_q, 0).to_device(device),
            &all_ids.to_device(device),
            k,
        )?;
        let gather = |t: &Tensor| -> Result<Vec<Tensor>> {
            Ok(group
                .all_gather(t)?
                .into_iter()
                .map(|x| x.narrow(0, offset, mine).to_device(device))
                .collect())
        };
        let merged = Retrieved {
            scores: Tensor::cat(&gather(&local.scores)?, 1),
            values: Tensor::cat(&gather(&local.values)?, 1),
            keys: Tensor::cat(&gather(&local.keys)?, 1),
            ids: Tensor::cat(&gather(&local.ids)?, 1),
            slots: Tensor::cat(&gather(&local.slots)?, 1),
        };
        let sorted = sort_by_score_then_slot(merged);
        let k = k as i64;
        let keys = sorted.keys.narrow(1, 0, k);
        // The scores again from this rank's queries (the gathered ones were detached), so the
        // read's gradient reaches the query projection as in one process: q . k / tau of the
        // chosen keys, -inf where none was found.
        let found = sorted.scores.narrow(1, 0, k).isfinite();
        let rescored = (queries.to_kind(Kind::Float) / self.tau)
            .unsqueeze(1)
            .matmul(&keys.transpose(1, 2))
            .squeeze_dim(1);
        Ok(Retrieved {
            scores: rescored.where_self(&found, &sorted.scores.narrow(1, 0, k)),
            values: sorted.values.narrow(1, 0, k),
            keys,
            ids: sorted.ids.narrow(1, 0, k),
            slots: sorted.slots.narrow(1, 0, k),
        })
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
        self.finish_restore(saved.written)
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

    /// Ends a restore: `written` entries were ever written to the saved ring.
    fn finish_restore(&mut self, written: u64) -> Result<()> {
        let ids = Vec::<i64>::try_from(self.ids.to_device(Device::Cpu))?;
        self.rows_of_id.clear();
        self.rows_of_id.reserve(ids.len());
        for (row, id) in ids.into_iter().enumerate().filter(|(_, id)| *id != -1) {
            self.rows_of_id.entry(id).or_default().push(row as i64);
        }
        self.written = written;
        Ok(())
    }
}

fn empty(q: i64, k: i64, d_value: i64, d_key: i64, device: Device) -> Retrieved {
    Retrieved {
        scores: Tensor::full([q, k], f64::NEG_INFINITY, (Kind::Float, device)),
        values: Tensor::zeros([q, k, d_value], (Kind::Float, device)),
        keys: Tensor::zeros([q, k, d_key], (Kind::Float, device)),
        ids: Tensor::full([q, k], -1, (Kind::Int64, device)),
        slots: Tensor::full([q, k], NO_SLOT, (Kind::Int64, device)),
    }
}

/// Entries with a -inf score become padding: id -1, zero value, no slot.
fn mark_invalid(r: Retrieved) -> Retrieved {
    let invalid = r.scores.isinf(); // scores are never +inf for normalized keys
    Retrieved {
        ids: r.ids.masked_fill(&invalid, -1),
        slots: r.slots.masked_fill(&invalid, NO_SLOT),
        values: r.values.masked_fill(&invalid.unsqueeze(-1), 0.0),
        keys: r.keys.masked_fill(&invalid.unsqueeze(-1), 0.0),
        scores: r.scores,
    }
}

/// Rows sorted by score (high first), equal scores by slot (low first): two stable sorts.
fn sort_by_score_then_slot(r: Retrieved) -> Retrieved {
    let by_slot = r.slots.sort_stable(true, 1, false).1;
    let apply = |t: &Tensor, order: &Tensor| -> Tensor {
        if t.dim() == 3 {
            let d = t.size()[2];
            t.gather(1, &order.unsqueeze(-1).expand([-1, -1, d], false), false)
        } else {
            t.gather(1, order, false)
        }
    };
    let r = Retrieved {
        scores: apply(&r.scores, &by_slot),
        values: apply(&r.values, &by_slot),
        keys: apply(&r.keys, &by_slot),
        ids: apply(&r.ids, &by_slot),
        slots: apply(&r.slots, &by_slot),
    };
    let by_score = r.scores.sort_stable(true, 1, true).1;
    Retrieved {
        scores: apply(&r.scores, &by_score),
        values: apply(&r.values, &by_score),
        keys: apply(&r.keys, &by_score),
        ids: apply(&r.ids, &by_score),
        slots: apply(&r.slots, &by_score),
    }
}

/// Pads a read of fewer than `k` columns (a shard smaller than k) with empty entries.
fn pad_to(r: Retrieved, k: i64) -> Retrieved {
    let have = r.scores.size()[1];
    if have >= k {
        return r;
    }
    let (q, d, dk) = (r.scores.size()[0], r.values.size()[2], r.keys.size()[2]);
    let pad = empty(q, k - have, d, dk, r.scores.device());
    Retrieved {
        scores: Tensor::cat(&[r.scores, pad.scores], 1),
        values: Tensor::cat(&[r.values, pad.values], 1),
        keys: Tensor::cat(&[r.keys, pad.keys], 1),
        ids: Tensor::cat(&[r.ids, pad.ids], 1),
        slots: Tensor::cat(&[r.slots, pad.slots], 1),
    }
}
